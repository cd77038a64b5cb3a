#!/usr/bin/env bash
# CPU work per request of the gateway, in instructions: a machine-independent companion to
# scripts/loadtest.sh, whose wall-clock numbers move with the VM's CPU model and load.
#
#   scripts/instructions.sh                          # examples/proxy/bench.toml, 15 s
#   CONFIG=my.toml DURATION=30s scripts/instructions.sh
#   PROFILE=release scripts/instructions.sh          # default: dist (as loadtest.sh)
#   PROXY=bare scripts/instructions.sh               # the baseline proxy instead (the floor)
#   ENDPOINT=/v1/messages BODY='{"model":…}' CONFIG=… scripts/instructions.sh   # another front door
#
# Runs the gateway under `valgrind --tool=callgrind` (≈50× slower, so a few thousand
# requests) in front of the mock upstream, sends requests with wrk (8 connections), and
# prints the instructions the gateway executed per request, start-up excluded (the counters
# are zeroed with callgrind_control once the gateway answers). The gateway runs one worker
# thread, as when pinned to one core in loadtest.sh (valgrind would otherwise see two CPUs
# and count the multi-threaded scheduler's work).
# Needs valgrind, wrk, curl. Same ports and client key as loadtest.sh.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION="${DURATION:-15s}"
ENDPOINT="${ENDPOINT:-/v1/chat/completions}"

for tool in valgrind callgrind_annotate callgrind_control wrk curl; do
  command -v "$tool" >/dev/null || { echo "instructions: $tool is required" >&2; exit 1; }
done

. scripts/bench-setup.sh
OUT="${OUT:-$TARGET_DIR/callgrind.gateway.out}"

"$MOCK_BIN" --addr 127.0.0.1:9100 --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
if [ "${PROXY:-gateway}" = bare ]; then
  valgrind --tool=callgrind --callgrind-out-file="$OUT" \
    "$BARE_BIN" --addr 127.0.0.1:9101 --upstream 127.0.0.1:9100 >/dev/null 2>&1 &
  STOP=-TERM # it has no graceful stop; valgrind still writes its counts
  UP=/v1/models # forwarded to the mock
else
  RUST_LOG=warn valgrind --tool=callgrind --callgrind-out-file="$OUT" \
    "$GW_BIN" --config "${CONFIG:-examples/proxy/bench.toml}" --worker-threads 1 >/dev/null 2>&1 &
  STOP=-INT
  UP=/healthz
fi
GW_PID=$!
for _ in $(seq 1 120); do
  curl -sf -o /dev/null "http://127.0.0.1:9101$UP" && break
  sleep 0.5
done
# A first request through the whole stack, then count from zero.
curl -sf -o /dev/null -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
  -H 'cache-control: no-cache' -d "$BODY" "http://127.0.0.1:9101$ENDPOINT"
callgrind_control --zero "$GW_PID" >/dev/null 2>&1
N=$(wrk -t1 -c8 -d"$DURATION" -s "$LUA" "http://127.0.0.1:9101$ENDPOINT" |
  awk '/requests in/ { print $1 }')
kill "$STOP" "$GW_PID"
wait "$GW_PID" || true

# The dump at exit holds what ran since the zeroing (plus the shutdown, a rounding error).
TOTAL=$(callgrind_annotate "$OUT" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')
echo "requests: $N; instructions: $TOTAL"
echo "instructions per request: $(( TOTAL / N ))"
echo "profile: callgrind_annotate --inclusive=yes $OUT | less"
