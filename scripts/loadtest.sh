#!/usr/bin/env bash
# Load benchmark: what the gateway adds on top of an upstream.
#
#   scripts/loadtest.sh                 # DURATION=10s, ROUNDS=3 by default
#   ROUNDS=8 DURATION=8s scripts/loadtest.sh        # more rounds on a noisy machine
#   DURATION=5s scripts/loadtest.sh
#   PROFILE=dev DURATION=2s scripts/loadtest.sh     # check the script only
#   PROFILE=release scripts/loadtest.sh             # without LTO (quicker to build)
#   CONFIG=my-bench.toml scripts/loadtest.sh        # another gateway config (same ports)
#
# Runs, on 127.0.0.1 only:
#   - the mock upstream `llm-tower-mock` on 127.0.0.1:9100, pinned to core 1;
#   - the gateway `llm-tower-proxy` (dist profile) with examples/proxy/bench.toml on
#     127.0.0.1:9101, pinned to core 0: auth, client rate limit, cost + budget, cache (miss
#     path: every request sends `Cache-Control: no-cache`), route, a two-step fallback
#     chain, per-provider limits, metrics; validation off;
#   - the baseline `llm-tower-bare-proxy` on 127.0.0.1:9102, pinned to core 0: the same
#     HTTP stack forwarding bytes and doing nothing else, the floor of any proxy here;
#   - wrk against the mock directly, the baseline and the gateway, in the same run:
#     - concurrency 1 (latency p50/p99), wrk pinned to core 0. Direct and proxied
#       requests then cross between the two cores the same number of times (client ->
#       mock, and proxy -> mock, each way). With wrk beside the mock instead, the direct
#       path would never leave core 1 while the proxied one would cross four times, and on
#       a VM each wake-up of an idle core costs tens of µs: that would measure the VM.
#     - concurrency 64 (throughput), wrk pinned to core 1 beside the mock, so that the
#       proxy under test has core 0 to itself.
# Reports added latency (gateway - direct) at p50/p99, the throughput ratio at c=64 (the
# baseline's too), each the median over ROUNDS rounds (every round runs all six wrk runs, so
# direct and proxied runs alternate and share the host's load), and the gateway's peak RSS
# (VmHWM). Needs wrk (`apt-get install -y wrk`) and taskset. Uses $CARGO_TARGET_DIR
# (default ./target). Writes the table to $OUT (default target/loadtest.md) too.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
MOCK_ADDR=127.0.0.1:9100
GW_ADDR=127.0.0.1:9101
BARE_ADDR=127.0.0.1:9102

for tool in wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "loadtest: $tool is required" >&2; exit 1; }
done

. scripts/bench-setup.sh
OUT="${OUT:-$TARGET_DIR/loadtest.md}"

taskset -c 1 "$MOCK_BIN" --addr "$MOCK_ADDR" --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 0 "$GW_BIN" --config "${CONFIG:-examples/proxy/bench.toml}" >/dev/null 2>&1 &
GW_PID=$!
PIDS+=("$GW_PID")
taskset -c 0 "$BARE_BIN" --addr "$BARE_ADDR" --upstream "$MOCK_ADDR" >/dev/null 2>&1 &
PIDS+=($!)

wait_up "http://$GW_ADDR/healthz"
wait_up "http://$MOCK_ADDR/v1/models"
wait_up "http://$BARE_ADDR/v1/models"

# A sanity call through the whole stack.
curl -sf -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
  -H 'cache-control: no-cache' -d "$BODY" "http://$GW_ADDR/v1/chat/completions" >/dev/null

run_wrk() { # core url connections -> prints wrk output
  taskset -c "$1" wrk -t1 -c"$3" -d"$DURATION" --latency -s "$LUA" "$2"
}
errors() { awk '/Non-2xx|Socket errors/ { print }' <<<"$1"; }

echo "== warm-up" >&2
taskset -c 1 wrk -t1 -c8 -d2s -s "$LUA" "http://$GW_ADDR/v1/chat/completions" >/dev/null
taskset -c 1 wrk -t1 -c8 -d1s -s "$LUA" "http://$BARE_ADDR/v1/chat/completions" >/dev/null

CHAT_PATH=/v1/chat/completions
# Per-round values, reported as the median over the rounds (and the range): on a shared VM
# one run can move by 2× with the host's load.
A_D50=(); A_D99=(); A_B50=(); A_B99=(); A_G50=(); A_G99=(); A_DRPS=(); A_BRPS=(); A_GRPS=()
A_ADD50=(); A_ADD99=(); A_RATIO=(); A_BRATIO=()
ALL_OUT=()
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS: concurrency 1, wrk on core 0: direct, baseline, gateway ($DURATION each)" >&2
  D1="$(run_wrk 0 "http://$MOCK_ADDR$CHAT_PATH" 1)"
  B1="$(run_wrk 0 "http://$BARE_ADDR$CHAT_PATH" 1)"
  G1="$(run_wrk 0 "http://$GW_ADDR$CHAT_PATH" 1)"
  echo "== round $round/$ROUNDS: concurrency 64, wrk on core 1: direct, baseline, gateway ($DURATION each)" >&2
  D64="$(run_wrk 1 "http://$MOCK_ADDR$CHAT_PATH" 64)"
  B64="$(run_wrk 1 "http://$BARE_ADDR$CHAT_PATH" 64)"
  G64="$(run_wrk 1 "http://$GW_ADDR$CHAT_PATH" 64)"
  ALL_OUT+=("$D1" "$B1" "$G1" "$D64" "$B64" "$G64")

  d50=$(to_us "$(pct 50% "$D1")"); d99=$(to_us "$(pct 99% "$D1")")
  b50=$(to_us "$(pct 50% "$B1")"); b99=$(to_us "$(pct 99% "$B1")")
  g50=$(to_us "$(pct 50% "$G1")"); g99=$(to_us "$(pct 99% "$G1")")
  drps=$(rps "$D64"); brps=$(rps "$B64"); grps=$(rps "$G64")
  A_D50+=("$d50"); A_D99+=("$d99"); A_B50+=("$b50"); A_B99+=("$b99")
  A_G50+=("$g50"); A_G99+=("$g99"); A_DRPS+=("$drps"); A_BRPS+=("$brps"); A_GRPS+=("$grps")
  A_ADD50+=($((g50 - d50))); A_ADD99+=($((g99 - d99)))
  A_RATIO+=("$(awk -v g="$grps" -v d="$drps" 'BEGIN { printf "%.2f", g / d }')")
  A_BRATIO+=("$(awk -v g="$brps" -v d="$drps" 'BEGIN { printf "%.2f", g / d }')")
  echo "   added p50 ${A_ADD50[-1]} µs, p99 ${A_ADD99[-1]} µs; throughput ${A_RATIO[-1]}× (baseline ${A_BRATIO[-1]}×)" >&2
done

RSS_KB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$GW_PID/status")"

# `range values…` prints " (min – max)" when there was more than one round.
range() { [ "$#" -gt 1 ] && printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf " (%s – %s)", lo, hi }'; }
d50=$(med %.0f "${A_D50[@]}"); d99=$(med %.0f "${A_D99[@]}")
b50=$(med %.0f "${A_B50[@]}"); b99=$(med %.0f "${A_B99[@]}")
g50=$(med %.0f "${A_G50[@]}"); g99=$(med %.0f "${A_G99[@]}")
drps=$(med %.0f "${A_DRPS[@]}"); brps=$(med %.0f "${A_BRPS[@]}"); grps=$(med %.0f "${A_GRPS[@]}")
add50=$(med %.0f "${A_ADD50[@]}"); add99=$(med %.0f "${A_ADD99[@]}")
ratio=$(med %.2f "${A_RATIO[@]}"); bratio=$(med %.2f "${A_BRATIO[@]}")
rss_mb=$(awk -v k="$RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }')
verdict() { if [ "$1" = 1 ]; then echo "yes"; else echo "NO"; fi; }
lt() { awk -v a="$1" -v b="$2" 'BEGIN { print (a < b) ? 1 : 0 }'; }

mkdir -p "$(dirname "$OUT")"
{
  echo "| metric | direct (mock) | baseline proxy | through gateway | gateway: added / ratio | target | met |"
  echo "|---|---|---|---|---|---|---|"
  echo "| latency p50, c=1 | ${d50} µs | ${b50} µs | ${g50} µs | $(printf "%+d" "$add50") µs$(range "${A_ADD50[@]}") | < 100 µs | $(verdict "$(lt "$add50" 100)") |"
  echo "| latency p99, c=1 | ${d99} µs | ${b99} µs | ${g99} µs | $(printf "%+d" "$add99") µs$(range "${A_ADD99[@]}") | < 300 µs | $(verdict "$(lt "$add99" 300)") |"
  echo "| throughput, c=64 | ${drps} req/s | ${brps} req/s (${bratio}×) | ${grps} req/s | ${ratio}×$(range "${A_RATIO[@]}") | ≥ 0.5× | $(verdict "$(lt 0.4999 "$ratio")") |"
  echo "| gateway peak RSS (VmHWM) | | | ${rss_mb} MB | | < 50 MB | $(verdict "$(lt "$rss_mb" 50)") |"
  echo
  echo "Median of $ROUNDS round(s), range in brackets. wrk -t1, ${DURATION} per run; gateway \`${GW_BIN#"$PWD/"}\` and baseline on core 0, mock on core 1, wrk on core 0 at c=1 and core 1 at c=64; $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); $(date -u +%FT%TZ)."
} | tee "$OUT"

for out in "${ALL_OUT[@]}"; do
  e="$(errors "$out")"
  if [ -n "$e" ]; then echo "warning: $e" >&2; fi
done
