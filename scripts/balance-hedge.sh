#!/usr/bin/env bash
# Tail-latency benchmark of the Balance and Hedge layers.
#
#   scripts/balance-hedge.sh                      # DURATION=10s, ROUNDS=3, CONNS=4, LATENCY_MS=50, PROFILE=release
#   PROFILE=dev DURATION=3s ROUNDS=1 scripts/balance-hedge.sh   # check the script only
#
# Runs, on 127.0.0.1 only, with examples/proxy/bench-balance.toml:
#   - two mock upstreams (`llm-tower-mock`) answering after LATENCY_MS (50): "plain" on :9110,
#     and "tail" on :9111 where 5 % of calls (a hash of the request number) take 20× longer;
#   - the gateway on :9112, whose three chains put both upstreams in one balanced group and
#     differ only in how it picks: round robin, Balance (p2c), Balance + Hedge (p95, 5 %);
#   - CONNS keep-alive connections (scripts/closed-loop.py) against each chain in turn,
#     ROUNDS rounds (interleaved, so the three share the machine's noise).
# Reports the client-observed p50/p99/p99.9 of each (median over the rounds) and, for the
# hedged chain, the second attempts sent per request (from the gateway's /metrics). Needs
# python3 and curl. Not wrk: its coordinated-omission correction adds made-up samples below
# every slow answer (see closed-loop.py), which turns one 1 s call in 800 into a ~600 ms p99.
# Writes the table to $OUT (default $CARGO_TARGET_DIR/balance-hedge.md).
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION="${DURATION:-10s}"
ROUNDS="${ROUNDS:-3}"
CONNS="${CONNS:-4}"
LATENCY_MS="${LATENCY_MS:-50}"
PROFILE="${PROFILE:-release}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
DIR="$PROFILE"; [ "$PROFILE" = dev ] && DIR=debug
OUT="${OUT:-$TARGET_DIR/balance-hedge.md}"
GW=127.0.0.1:9112

for tool in python3 curl; do
  command -v "$tool" >/dev/null || { echo "balance-hedge: $tool is required" >&2; exit 1; }
done
. scripts/bench-lib.sh

echo "== building $PROFILE binaries (llm-tower-mock, llm-tower-proxy)" >&2
cargo build --profile "$PROFILE" -q -p llm-tower-test --bin llm-tower-mock -p llm-tower-proxy --bin llm-tower-proxy
MOCK_BIN="$TARGET_DIR/$DIR/llm-tower-mock"
GW_BIN="$TARGET_DIR/$DIR/llm-tower-proxy"

PIDS=()
TMP="$(mktemp -d)"
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT

# Both mocks report the same, ample rate-limit headroom on every answer: by default a mock
# counts its remaining requests down from 10 000 over its whole life, which after a few
# thousand requests would make the balancer steer away from the busier one (as it should
# for a real provider) and blur what this measures, latency.
HEADROOM='{"ratelimit_remaining_requests":9999,"ratelimit_remaining_tokens":1999999}'
"$MOCK_BIN" --addr 127.0.0.1:9110 --threads 1 --latency-ms "$LATENCY_MS" --scenario "$HEADROOM" >/dev/null 2>&1 &
PIDS+=($!)
"$MOCK_BIN" --addr 127.0.0.1:9111 --threads 1 --latency-ms "$LATENCY_MS" --scenario "$HEADROOM" \
  --tail-share 0.05 --tail-factor 20 >/dev/null 2>&1 &
PIDS+=($!)
RUST_LOG=warn "$GW_BIN" --config examples/proxy/bench-balance.toml >/dev/null 2>&1 &
PIDS+=($!)
wait_up "http://127.0.0.1:9110/v1/models"
wait_up "http://127.0.0.1:9111/v1/models"
wait_up "http://$GW/healthz"

# One request body per chain.
for chain in rr p2c hedge; do
  echo "{\"model\":\"bench-$chain\",\"messages\":[{\"role\":\"user\",\"content\":\"Say hello to the benchmark\"}]}" >"$TMP/$chain.json"
done
load() { python3 scripts/closed-loop.py "http://$GW/v1/chat/completions" "$TMP/$1.json" "$2" "$3"; }

# `metric NAME`: the gateway's counter NAME for chain "hedge" (0 if absent).
metric() {
  curl -sf "http://$GW/metrics" | awk -v n="$1" '$1 ~ "^"n"\\{" && $1 ~ /chain="hedge"/ { v = $2 } END { printf "%d", v + 0 }'
}
field() { awk -v k="$1" '$1 == k { print $2 }' <<<"$2"; }
ms() { awk -v u="$1" 'BEGIN { printf "%.1f", u / 1000 }'; }

echo "== warm-up (the hedge needs 20 samples before it hedges)" >&2
for chain in rr p2c hedge; do load "$chain" 4 2 >/dev/null; done

declare -A P50 P99 P999
EXTRA=()
for round in $(seq 1 "$ROUNDS"); do
  for chain in rr p2c hedge; do
    echo "== round $round/$ROUNDS: $chain, c=$CONNS, $DURATION" >&2
    sent0=$(metric llm_hedge_sent_total); req0=$(metric llm_hedge_requests_total); den0=$(metric llm_hedge_denied_total)
    out="$(load "$chain" "$CONNS" "${DURATION%s}")"
    errs=$(field ERRS "$out")
    if [ "${errs:-0}" != 0 ]; then echo "warning: $chain: $errs errors" >&2; fi
    P50[$chain]+="$(field P50 "$out") "; P99[$chain]+="$(field P99 "$out") "; P999[$chain]+="$(field P999 "$out") "
    if [ "$chain" = hedge ]; then
      sent=$(( $(metric llm_hedge_sent_total) - sent0 )); req=$(( $(metric llm_hedge_requests_total) - req0 ))
      EXTRA+=("$(awk -v s="$sent" -v r="$req" 'BEGIN { printf "%.2f", r ? 100 * s / r : 0 }')")
      echo "   p99 $(ms "$(field P99 "$out")") ms; extra calls $sent / $req = ${EXTRA[-1]} %; refused by the budget $(( $(metric llm_hedge_denied_total) - den0 ))" >&2
    else
      echo "   p99 $(ms "$(field P99 "$out")") ms" >&2
    fi
  done
done

curl -sf "http://$GW/metrics" | grep -E '^llm_balance_picks_total' >&2 || true
# shellcheck disable=SC2086 # word splitting of the collected values is meant
{
  echo "| picking | p50 | p99 | p99.9 | extra upstream calls |"
  echo "|---|---|---|---|---|"
  for chain in rr p2c hedge; do
    case $chain in rr) name="round robin";; p2c) name="Balance (p2c)";; hedge) name="Balance + Hedge (p95, 5 % budget)";; esac
    extra="0 %"; [ "$chain" = hedge ] && extra="$(med %.2f "${EXTRA[@]}") %"
    echo "| $name | $(ms "$(med %.0f ${P50[$chain]})") ms | $(ms "$(med %.0f ${P99[$chain]})") ms | $(ms "$(med %.0f ${P999[$chain]})") ms | $extra |"
  done
  echo
  echo "Median of $ROUNDS round(s); $CONNS keep-alive connections (closed loop), $DURATION per run; upstreams answer in ${LATENCY_MS} ms, one of them 20× slower for 5 % of its calls; profile $PROFILE; $(nproc) cores; $(date -u +%FT%TZ)."
} | tee "$OUT"
