#!/usr/bin/env bash
# A profile-guided (PGO) build of the gateway: the `dist` profile, compiled a second time
# with the branch and call counts of a run of the load benchmark's traffic, so that LLVM
# lays out the hot path together and inlines along it.
#
#   scripts/pgo.sh                                   # writes $PGO_TARGET_DIR/dist/llm-tower-proxy
#   GW_BIN=target-pgo/dist/llm-tower-proxy scripts/loadtest.sh   # load-test that binary
#
# Needs wrk, curl, and an llvm-profdata that reads this rustc's raw profiles (LLVM 19 or
# newer; on Debian 12: `apt-get install -y llvm-19`). Builds twice in $PGO_TARGET_DIR
# (default target-pgo; the flags differ from a normal build, so it has its own directory):
# ~25 min on 2 cores. The training run uses the mock upstream and examples/proxy/bench.toml
# on the same ports as loadtest.sh: the miss path, cache hits and streamed answers.
set -euo pipefail

cd "$(dirname "$0")/.."
PROFDATA="${LLVM_PROFDATA:-$(command -v llvm-profdata-19 || command -v llvm-profdata || true)}"
[ -n "$PROFDATA" ] || { echo "pgo: llvm-profdata is required (apt-get install -y llvm-19)" >&2; exit 1; }
for tool in wrk curl; do
  command -v "$tool" >/dev/null || { echo "pgo: $tool is required" >&2; exit 1; }
done
PGO_TARGET_DIR="$(realpath -m "${PGO_TARGET_DIR:-target-pgo}")"
PROF_DIR="$PGO_TARGET_DIR/pgo-profiles"
. scripts/bench-lib.sh
rm -rf "$PROF_DIR"
mkdir -p "$PROF_DIR"

echo "== instrumented build" >&2
RUSTFLAGS="-Cprofile-generate=$PROF_DIR" CARGO_TARGET_DIR="$PGO_TARGET_DIR" \
  cargo build --profile dist -q -p llm-tower-proxy
echo "== the mock upstream (normal build)" >&2
cargo build --profile dist -q -p llm-tower-test --bin llm-tower-mock
MOCK_BIN="${CARGO_TARGET_DIR:-target}/dist/llm-tower-mock"

"$MOCK_BIN" --addr 127.0.0.1:9100 --threads 1 >/dev/null 2>&1 &
MOCK=$!
RUST_LOG=warn "$PGO_TARGET_DIR/dist/llm-tower-proxy" --config examples/proxy/bench.toml \
  --worker-threads 1 >/dev/null 2>&1 &
GW=$!
LUA="$(mktemp --suffix=.lua)"
trap 'kill $MOCK $GW 2>/dev/null || true; rm -f "$LUA"' EXIT
wait_up http://127.0.0.1:9101/healthz

train() { # body cache-control seconds
  wrk_lua "$LUA" "$1" "$2"
  wrk -t1 -c8 -d"$3" -s "$LUA" http://127.0.0.1:9101/v1/chat/completions >/dev/null
}
echo "== training run" >&2
BODY='{"model":"bench","messages":[{"role":"user","content":"Say hello to the benchmark"}],"temperature":0}'
STREAM='{"model":"bench","messages":[{"role":"user","content":"Stream a hello"}],"stream":true}'
train "$BODY" no-cache 20s            # the miss path, as the benchmark measures it
train "$BODY" max-age=60 5s           # cache hits
train "$STREAM" no-cache 5s           # streamed answers
kill -INT "$GW"                       # a graceful exit writes the profile
wait "$GW" || true

"$PROFDATA" merge -o "$PROF_DIR/merged.profdata" "$PROF_DIR"/*.profraw
echo "== optimized build" >&2
RUSTFLAGS="-Cprofile-use=$PROF_DIR/merged.profdata" CARGO_TARGET_DIR="$PGO_TARGET_DIR" \
  cargo build --profile dist -q -p llm-tower-proxy
echo "pgo: $PGO_TARGET_DIR/dist/llm-tower-proxy"
