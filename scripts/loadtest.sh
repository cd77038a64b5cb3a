#!/usr/bin/env bash
# Load benchmark: what the gateway adds on top of an upstream.
#
#   scripts/loadtest.sh                 # DURATION=10s by default
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
# baseline's too), and the gateway's peak RSS (VmHWM). Needs wrk (`apt-get install -y
# wrk`) and taskset. Uses $CARGO_TARGET_DIR (default ./target). Writes the table to $OUT
# (default target/loadtest.md) too.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION="${DURATION:-10s}"
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

wait_up() {
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "loadtest: $1 did not come up" >&2
  exit 1
}
wait_up "http://$GW_ADDR/healthz"
wait_up "http://$MOCK_ADDR/v1/models"
wait_up "http://$BARE_ADDR/v1/models"

# A sanity call through the whole stack.
curl -sf -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
  -H 'cache-control: no-cache' -d "$BODY" "http://$GW_ADDR/v1/chat/completions" >/dev/null

# wrk's latency value ("123.45us", "1.23ms", "2.00s") in microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 1;
    printf "%.0f", n * m }'
}
run_wrk() { # core url connections -> prints wrk output
  taskset -c "$1" wrk -t1 -c"$3" -d"$DURATION" --latency -s "$LUA" "$2"
}
pct() { awk -v p="$1" '$1 == p { print $2 }' <<<"$2"; }
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$1"; }
errors() { awk '/Non-2xx|Socket errors/ { print }' <<<"$1"; }

echo "== warm-up" >&2
taskset -c 1 wrk -t1 -c8 -d2s -s "$LUA" "http://$GW_ADDR/v1/chat/completions" >/dev/null
taskset -c 1 wrk -t1 -c8 -d1s -s "$LUA" "http://$BARE_ADDR/v1/chat/completions" >/dev/null

CHAT_PATH=/v1/chat/completions
echo "== concurrency 1, wrk on core 0: direct, baseline, gateway ($DURATION each)" >&2
D1="$(run_wrk 0 "http://$MOCK_ADDR$CHAT_PATH" 1)"
B1="$(run_wrk 0 "http://$BARE_ADDR$CHAT_PATH" 1)"
G1="$(run_wrk 0 "http://$GW_ADDR$CHAT_PATH" 1)"
echo "== concurrency 64, wrk on core 1: direct, baseline, gateway ($DURATION each)" >&2
D64="$(run_wrk 1 "http://$MOCK_ADDR$CHAT_PATH" 64)"
B64="$(run_wrk 1 "http://$BARE_ADDR$CHAT_PATH" 64)"
G64="$(run_wrk 1 "http://$GW_ADDR$CHAT_PATH" 64)"

RSS_KB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$GW_PID/status")"

d50=$(to_us "$(pct 50% "$D1")"); d99=$(to_us "$(pct 99% "$D1")")
b50=$(to_us "$(pct 50% "$B1")"); b99=$(to_us "$(pct 99% "$B1")")
g50=$(to_us "$(pct 50% "$G1")"); g99=$(to_us "$(pct 99% "$G1")")
drps=$(rps "$D64"); brps=$(rps "$B64"); grps=$(rps "$G64")
add50=$((g50 - d50)); add99=$((g99 - d99))
ratio=$(awk -v g="$grps" -v d="$drps" 'BEGIN { printf "%.2f", g / d }')
bratio=$(awk -v g="$brps" -v d="$drps" 'BEGIN { printf "%.2f", g / d }')
rss_mb=$(awk -v k="$RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }')
verdict() { if [ "$1" = 1 ]; then echo "yes"; else echo "NO"; fi; }

mkdir -p "$(dirname "$OUT")"
{
  echo "| metric | direct (mock) | baseline proxy | through gateway | gateway: added / ratio | target | met |"
  echo "|---|---|---|---|---|---|---|"
  echo "| latency p50, c=1 | ${d50} µs | ${b50} µs | ${g50} µs | $(printf "%+d" "$add50") µs | < 100 µs | $(verdict $((add50 < 100))) |"
  echo "| latency p99, c=1 | ${d99} µs | ${b99} µs | ${g99} µs | $(printf "%+d" "$add99") µs | < 300 µs | $(verdict $((add99 < 300))) |"
  echo "| throughput, c=64 | ${drps} req/s | ${brps} req/s (${bratio}×) | ${grps} req/s | ${ratio}× | ≥ 0.5× | $(awk -v r="$ratio" 'BEGIN { print (r >= 0.5) ? "yes" : "NO" }') |"
  echo "| gateway peak RSS (VmHWM) | | | ${rss_mb} MB | | < 50 MB | $(awk -v m="$rss_mb" 'BEGIN { print (m < 50) ? "yes" : "NO" }') |"
  echo
  echo "wrk -t1, ${DURATION} per run; gateway ($PROFILE) and baseline on core 0, mock on core 1, wrk on core 0 at c=1 and core 1 at c=64; $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); $(date -u +%FT%TZ)."
} | tee "$OUT"

for out in "$D1" "$B1" "$G1" "$D64" "$B64" "$G64"; do
  e="$(errors "$out")"
  if [ -n "$e" ]; then echo "warning: $e" >&2; fi
done
