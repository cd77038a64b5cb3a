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
  for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$port/healthz" && break; sleep 0.1; done
  taskset -c 1 wrk -t1 -c8 -d2s -s "$LUA" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null
done

TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
run() { # pid port -> "req/s cpu_us_per_request p50_us"
  local c0 c1 out out1
  c0="$(cpu_ticks "$1")"
  out="$(taskset -c 1 wrk -t1 -c64 -d"$DURATION" -s "$LUA" "http://127.0.0.1:$2/v1/chat/completions")"
  c1="$(cpu_ticks "$1")"
  out1="$(taskset -c 0 wrk -t1 -c1 -d"$DURATION" --latency -s "$LUA" "http://127.0.0.1:$2/v1/chat/completions")"
  awk -v c=$((c1 - c0)) -v t="$TCK" '
    /^Requests\/sec/ { if (!rps) rps = $2 }
    / requests in / { if (!n) n = $1 }
    $1 == "50%" { p = $2 }
    END {
      u = p + 0; unit = p; sub(/^[0-9.]+/, "", unit)
      if (unit == "ms") u *= 1000; else if (unit == "s") u *= 1000000
      printf "%.0f %.1f %.0f\n", rps, c / t * 1e6 / n, u
    }' <<<"$out"$'\n'"$out1"
}
RA=(); RB=()
for i in $(seq 1 "$PAIRS"); do
  RA+=("$(run "$PA" 9101)"); echo "A ${RA[-1]}" >&2
  RB+=("$(run "$PB" 9103)"); echo "B ${RB[-1]}" >&2
done
med() { sort -g | awk '{ a[NR] = $1 } END { print (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
echo "| | req/s at c=64 | CPU per request at c=64 | p50 at c=1 |"
echo "|---|---|---|---|"
for side in A B; do
  if [ "$side" = A ]; then rows=("${RA[@]}"); bin="$A"; else rows=("${RB[@]}"); bin="$B"; fi
  echo "| $side \`${bin#"$PWD/"}\` | $(printf '%s\n' "${rows[@]}" | cut -d' ' -f1 | med) | $(printf '%s\n' "${rows[@]}" | cut -d' ' -f2 | med) µs | $(printf '%s\n' "${rows[@]}" | cut -d' ' -f3 | med) µs |"
done
echo
echo "Medians of $PAIRS alternating pairs, $DURATION per run; $(date -u +%FT%TZ)."
