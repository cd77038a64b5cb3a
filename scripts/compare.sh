#!/usr/bin/env bash
# Interleaved comparison of two gateway binaries on the load benchmark's traffic: on a VM
# whose speed drifts by 2× within an hour, runs of A and B must alternate to be compared.
#
#   scripts/compare.sh A_BIN B_BIN                # 5 pairs of 4 s runs
#   PAIRS=8 DURATION=6s scripts/compare.sh target/dist/llm-tower-proxy target-pgo/dist/llm-tower-proxy
#
# Both gateways run at once with examples/proxy/bench.toml (A on 127.0.0.1:9101, B on
# :9103), pinned to core 0, in front of the mock upstream on core 1. Each pair runs A then
# B: concurrency 64 with wrk on core 1 (req/s, and the gateway's CPU time per request, user
# + kernel, from /proc/PID/stat), then concurrency 1 with wrk on core 0 (p50 latency).
# Prints one line per run and the medians. Needs wrk, taskset, curl.
set -euo pipefail

cd "$(dirname "$0")/.."
[ "$#" -eq 2 ] || { echo "usage: scripts/compare.sh A_BIN B_BIN" >&2; exit 2; }
A="$(realpath "$1")"; B="$(realpath "$2")"
PAIRS="${PAIRS:-5}"
DURATION="${DURATION:-4s}"
GW_BIN="$A" # only the mock is built
. scripts/bench-setup.sh
B_CONFIG="$TARGET_DIR/compare-b.toml"
sed 's/127.0.0.1:9101/127.0.0.1:9103/' examples/proxy/bench.toml >"$B_CONFIG"

taskset -c 1 "$MOCK_BIN" --addr 127.0.0.1:9100 --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 0 "$A" --config examples/proxy/bench.toml >/dev/null 2>&1 &
PA=$!; PIDS+=("$PA")
RUST_LOG=warn taskset -c 0 "$B" --config "$B_CONFIG" >/dev/null 2>&1 &
PB=$!; PIDS+=("$PB")
for port in 9101 9103; do
  wait_up "http://127.0.0.1:$port/healthz"
  taskset -c 1 wrk -t1 -c8 -d2s -s "$LUA" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done

TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
run() { # pid port -> "req/s cpu_us_per_request p50_us"
  local c0 c1 out out1 n
  c0="$(cpu_ticks "$1")"
  out="$(taskset -c 1 wrk -t1 -c64 -d"$DURATION" -s "$LUA" "http://127.0.0.1:$2/v1/chat/completions")"
  c1="$(cpu_ticks "$1")"
  out1="$(taskset -c 0 wrk -t1 -c1 -d"$DURATION" --latency -s "$LUA" "http://127.0.0.1:$2/v1/chat/completions")"
  n="$(awk '/ requests in / { print $1 }' <<<"$out")"
  echo "$(rps "$out") $(awk -v c=$((c1 - c0)) -v t="$TCK" -v n="$n" 'BEGIN { printf "%.1f", c / t * 1e6 / n }') $(to_us "$(pct 50% "$out1")")"
}
RA=(); RB=()
for i in $(seq 1 "$PAIRS"); do
  RA+=("$(run "$PA" 9101)"); echo "A ${RA[-1]}" >&2
  RB+=("$(run "$PB" 9103)"); echo "B ${RB[-1]}" >&2
done
col() { printf '%s\n' "${rows[@]}" | cut -d' ' -f"$1"; } # column N of this side's runs
echo "| | req/s at c=64 | CPU per request at c=64 | p50 at c=1 |"
echo "|---|---|---|---|"
for side in A B; do
  if [ "$side" = A ]; then rows=("${RA[@]}"); bin="$A"; else rows=("${RB[@]}"); bin="$B"; fi
  # shellcheck disable=SC2046 # one value per word
  echo "| $side \`${bin#"$PWD/"}\` | $(med %.0f $(col 1)) | $(med %.1f $(col 2)) µs | $(med %.0f $(col 3)) µs |"
done
echo
echo "Medians of $PAIRS alternating pairs, $DURATION per run; $(date -u +%FT%TZ)."
