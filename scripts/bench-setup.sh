# Sourced by loadtest.sh and instructions.sh (from the repository root): builds the mock
# upstream, the baseline proxy and the gateway (unless GW_BIN names one) in $PROFILE
# (default dist), and writes the wrk script that sends the benchmark request. Sets MOCK_BIN,
# BARE_BIN, GW_BIN, BODY, LUA, PIDS (killed on exit).

TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# PROFILE=dev only checks the scripts themselves; numbers are meaningful in dist (the
# shipped build: release with whole-program LTO, see Cargo.toml) or release.
PROFILE="${PROFILE:-dist}"
DIR="$PROFILE"; [ "$PROFILE" = dev ] && DIR=debug
echo "== building $PROFILE binaries (llm-tower-mock, llm-tower-bare-proxy, llm-tower-proxy)" >&2
cargo build --profile "$PROFILE" -q -p llm-tower-test --bin llm-tower-mock --bin llm-tower-bare-proxy
# GW_BIN: a gateway binary built elsewhere (e.g. by scripts/pgo.sh) instead of this build.
if [ -z "${GW_BIN:-}" ]; then
  cargo build --profile "$PROFILE" -q -p llm-tower-proxy --bin llm-tower-proxy
  GW_BIN="$TARGET_DIR/$DIR/llm-tower-proxy"
fi
MOCK_BIN="$TARGET_DIR/$DIR/llm-tower-mock"
BARE_BIN="$TARGET_DIR/$DIR/llm-tower-bare-proxy"

# BODY: the request sent (default: a short non-streamed chat request); e.g. a streamed one
# for instructions.sh.
DEFAULT_BODY='{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark"}],"temperature":0}'
BODY="${BODY:-$DEFAULT_BODY}"
PIDS=()
LUA="$(mktemp --suffix=.lua)"
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -f "$LUA"
}
trap cleanup EXIT
# Every request skips the cache lookup (no-cache) and stores its answer: the miss path.
. scripts/bench-lib.sh
wrk_lua "$LUA" "$BODY" "${CACHE_CONTROL:-no-cache}"
