#!/usr/bin/env bash
# Streaming load benchmark: what the gateway adds to a streamed answer, against the
# baseline proxy in the same run, plus cache hits (streamed and not).
#
#   scripts/streamtest.sh                      # ROUNDS=3, DURATION=5s, TTFB_N=300
#   ROUNDS=5 DURATION=4s scripts/streamtest.sh # more rounds on a noisy machine
#   GW_BIN=path/to/llm-tower-proxy scripts/streamtest.sh   # another gateway build
#   PROFILE=dev ROUNDS=1 DURATION=1s TTFB_N=20 scripts/streamtest.sh   # check the script only
#   TTFB_CORE=1 scripts/streamtest.sh          # curl beside the mock instead (see below)
#
# The servers and cores are loadtest.sh's: the mock upstream on core 1, the gateway
# (examples/proxy/bench.toml, full stack) and the baseline `llm-tower-bare-proxy` on core 0.
# The streamed request asks for an answer of 16 content chunks (the mock sends one word per
# chunk: "mock answer to: " and the 13 words of the prompt), so a stream is 20 events: the
# role chunk, 16 content chunks, the finish chunk, the usage chunk, then `data: [DONE]`.
#
# Each round runs, alternating baseline and gateway so that both share the host's load:
#   - c=64, wrk on core 1: streamed (miss path: `Cache-Control: no-cache`) through the
#     baseline and the gateway: req/s and each proxy's CPU time per request (user + kernel,
#     from /proc/PID/stat);
#   - c=64: cache hits through the gateway, non-streamed and streamed (same request every
#     time), against the baseline's non-streamed and streamed round trip;
#   - c=1, curl on core TTFB_CORE (default 0), TTFB_N requests on one connection each to the
#     mock directly, the baseline and the gateway: time to first byte and to last byte (p50).
# Reports the medians over the rounds with their range, per request and per content chunk,
# and the gateway's peak RSS (VmHWM). Writes the table to $OUT (default
# $CARGO_TARGET_DIR/streamtest.md) too. Needs wrk, taskset, curl.
set -euo pipefail

cd "$(dirname "$0")/.."
DURATION="${DURATION:-5s}"
ROUNDS="${ROUNDS:-3}"
TTFB_N="${TTFB_N:-300}"
# Where curl runs for the c=1 times. On core 0 (the proxies' core) it sees a proxy's first
# bytes only once the proxy gives up the core, so a proxy with more of the stream to
# write is seen later than it wrote; on core 1 it sees them when they are written, and
# every proxied request pays the wake-up of the other core (the baseline's too).
TTFB_CORE="${TTFB_CORE:-0}"
CHUNKS=16
MOCK_ADDR=127.0.0.1:9100
GW_ADDR=127.0.0.1:9101
BARE_ADDR=127.0.0.1:9102
CHAT=/v1/chat/completions

for tool in wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "streamtest: $tool is required" >&2; exit 1; }
done

. scripts/bench-setup.sh
OUT="${OUT:-$TARGET_DIR/streamtest.md}"

STREAM_BODY='{"model":"bench","stream":true,"messages":[{"role":"user","content":"one two three four five six seven eight nine ten eleven twelve thirteen"}]}'
# Cache hits need a deterministic request (temperature 0): anything else bypasses the cache.
HIT_BODY='{"model":"bench","temperature":0,"messages":[{"role":"user","content":"a cached question"}]}'
HIT_STREAM_BODY='{"model":"bench","temperature":0,"stream":true,"messages":[{"role":"user","content":"one two three four five six seven eight nine ten eleven twelve thirteen"}]}'
LUA_S="$(mktemp --suffix=.lua)"; LUA_H="$(mktemp --suffix=.lua)"; LUA_HS="$(mktemp --suffix=.lua)"
BODY_FILE="$(mktemp)"; CURL_CFG="$(mktemp)"
wrk_lua "$LUA_S" "$STREAM_BODY" no-cache
wrk_lua "$LUA_H" "$HIT_BODY" max-age=3600
wrk_lua "$LUA_HS" "$HIT_STREAM_BODY" max-age=3600
printf '%s' "$STREAM_BODY" >"$BODY_FILE"
trap 'cleanup; rm -f "$LUA_S" "$LUA_H" "$LUA_HS" "$BODY_FILE" "$CURL_CFG"' EXIT

taskset -c 1 "$MOCK_BIN" --addr "$MOCK_ADDR" --threads 1 >/dev/null 2>&1 &
PIDS+=($!)
RUST_LOG=warn taskset -c 0 "$GW_BIN" --config "${CONFIG:-examples/proxy/bench.toml}" >/dev/null 2>&1 &
GW_PID=$!; PIDS+=("$GW_PID")
taskset -c 0 "$BARE_BIN" --addr "$BARE_ADDR" --upstream "$MOCK_ADDR" >/dev/null 2>&1 &
BARE_PID=$!; PIDS+=("$BARE_PID")
wait_up "http://$GW_ADDR/healthz"
wait_up "http://$MOCK_ADDR/v1/models"
wait_up "http://$BARE_ADDR/v1/models"

# The streamed answer really has CHUNKS content chunks, through the gateway as directly.
events() { curl -sfN -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
  -H 'cache-control: no-cache' -d "$STREAM_BODY" "$1$CHAT" | grep -c '"content":"[^"]'; }
for base in "http://$MOCK_ADDR" "http://$GW_ADDR"; do
  n="$(events "$base")"
  [ "$n" = "$CHUNKS" ] || { echo "streamtest: $base streams $n content chunks, not $CHUNKS" >&2; exit 1; }
done

# The cache-hit runs really hit: the first request stores, the second is served from it.
hit() { curl -sf -o /dev/null -D - -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
  -H 'cache-control: max-age=3600' -d "$1" "http://$GW_ADDR$CHAT" | tr -d '\r' | awk -F': ' 'tolower($1) == "x-llm-cache" { print $2 }'; }
for body in "$HIT_BODY" "$HIT_STREAM_BODY"; do
  hit "$body" >/dev/null
  [ "$(hit "$body")" = hit ] || { echo "streamtest: a repeated request is not a cache hit: $body" >&2; exit 1; }
done

echo "== warm-up" >&2
for lua in "$LUA_S" "$LUA_H" "$LUA_HS" "$LUA"; do
  taskset -c 1 wrk -t1 -c8 -d1s -s "$lua" "http://$GW_ADDR$CHAT" >/dev/null
done
taskset -c 1 wrk -t1 -c8 -d1s -s "$LUA_S" "http://$BARE_ADDR$CHAT" >/dev/null

TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
load() { # pid lua url -> "req/s cpu_us_per_request"
  local c0 c1 out n
  c0="$(cpu_ticks "$1")"
  out="$(taskset -c 1 wrk -t1 -c64 -d"$DURATION" -s "$2" "$3")"
  c1="$(cpu_ticks "$1")"
  if grep -q 'Non-2xx\|Socket errors' <<<"$out"; then echo "warning: $3: $(grep 'Non-2xx\|Socket errors' <<<"$out")" >&2; fi
  n="$(awk '/ requests in / { print $1 }' <<<"$out")"
  echo "$(rps "$out") $(awk -v c=$((c1 - c0)) -v t="$TCK" -v n="$n" 'BEGIN { printf "%.1f", c / t * 1e6 / n }')"
}
# `ttfb URL CACHE_CONTROL` -> "p50_first_byte_us p50_last_byte_us" over TTFB_N requests on
# one connection (curl's own timers, from the request's start).
ttfb() {
  : >"$CURL_CFG"
  for i in $(seq 1 "$TTFB_N"); do
    # `next` between entries only: one after the last is an entry without a URL.
    if [ "$i" -gt 1 ]; then printf 'next\n' >>"$CURL_CFG"; fi
    printf 'url = "%s"\nheader = "content-type: application/json"\nheader = "authorization: Bearer sk-bench"\nheader = "cache-control: %s"\ndata-binary = "@%s"\noutput = "/dev/null"\nwrite-out = "%%{time_pretransfer} %%{time_starttransfer} %%{time_total}\\n"\nno-buffer\n' \
      "$1" "$2" "$BODY_FILE" >>"$CURL_CFG"
  done
  # Skip the first (connection set-up); time from the request's start (pretransfer).
  taskset -c "$TTFB_CORE" curl -s -K "$CURL_CFG" | tail -n +2 |
    awk '{ printf "%.0f %.0f\n", ($2 - $1) * 1e6, ($3 - $1) * 1e6 }' >"$CURL_CFG.out"
  echo "$(med %.0f $(cut -d' ' -f1 "$CURL_CFG.out")) $(med %.0f $(cut -d' ' -f2 "$CURL_CFG.out"))"
  rm -f "$CURL_CFG.out"
}

A_BRPS=(); A_GRPS=(); A_BCPU=(); A_GCPU=(); A_RATIO=(); A_CPUR=()
A_BNRPS=(); A_BNCPU=(); A_HRPS=(); A_HCPU=(); A_HSRPS=(); A_HSCPU=()
A_DT=(); A_BT=(); A_GT=(); A_DL=(); A_BL=(); A_GL=(); A_ADDT=()
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round/$ROUNDS: c=64 streamed, baseline then gateway ($DURATION each)" >&2
  read -r brps bcpu <<<"$(load "$BARE_PID" "$LUA_S" "http://$BARE_ADDR$CHAT")"
  read -r grps gcpu <<<"$(load "$GW_PID" "$LUA_S" "http://$GW_ADDR$CHAT")"
  echo "== round $round/$ROUNDS: c=64 cache hits and the baseline's non-streamed round trip" >&2
  read -r bnrps bncpu <<<"$(load "$BARE_PID" "$LUA_H" "http://$BARE_ADDR$CHAT")"
  read -r hrps hcpu <<<"$(load "$GW_PID" "$LUA_H" "http://$GW_ADDR$CHAT")"
  read -r hsrps hscpu <<<"$(load "$GW_PID" "$LUA_HS" "http://$GW_ADDR$CHAT")"
  echo "== round $round/$ROUNDS: c=1 time to first/last byte, $TTFB_N requests each" >&2
  read -r dt dl <<<"$(ttfb "http://$MOCK_ADDR$CHAT" no-cache)"
  read -r bt bl <<<"$(ttfb "http://$BARE_ADDR$CHAT" no-cache)"
  read -r gt gl <<<"$(ttfb "http://$GW_ADDR$CHAT" no-cache)"
  A_BRPS+=("$brps"); A_GRPS+=("$grps"); A_BCPU+=("$bcpu"); A_GCPU+=("$gcpu")
  A_RATIO+=("$(awk -v g="$grps" -v b="$brps" 'BEGIN { printf "%.2f", g / b }')")
  A_CPUR+=("$(awk -v g="$gcpu" -v b="$bcpu" 'BEGIN { printf "%.2f", g / b }')")
  A_BNRPS+=("$bnrps"); A_BNCPU+=("$bncpu"); A_HRPS+=("$hrps"); A_HCPU+=("$hcpu")
  A_HSRPS+=("$hsrps"); A_HSCPU+=("$hscpu")
  A_DT+=("$dt"); A_BT+=("$bt"); A_GT+=("$gt"); A_DL+=("$dl"); A_BL+=("$bl"); A_GL+=("$gl")
  A_ADDT+=($(((gt - dt) - (bt - dt))))
  echo "   streamed ${A_RATIO[-1]}× the baseline's req/s, CPU ${A_CPUR[-1]}× ($gcpu vs $bcpu µs); TTFB direct $dt, baseline $bt, gateway $gt µs" >&2
done
RSS_KB="$(awk '/^VmHWM:/ { print $2 }' "/proc/$GW_PID/status")"

range() { [ "$#" -gt 1 ] && printf '%s\n' "$@" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf " (%s – %s)", lo, hi }'; }
m() { med "$@"; }
brps=$(m %.0f "${A_BRPS[@]}"); grps=$(m %.0f "${A_GRPS[@]}")
bcpu=$(m %.1f "${A_BCPU[@]}"); gcpu=$(m %.1f "${A_GCPU[@]}")
ratio=$(m %.2f "${A_RATIO[@]}"); cpur=$(m %.2f "${A_CPUR[@]}")
bnrps=$(m %.0f "${A_BNRPS[@]}"); bncpu=$(m %.1f "${A_BNCPU[@]}")
hrps=$(m %.0f "${A_HRPS[@]}"); hcpu=$(m %.1f "${A_HCPU[@]}")
hsrps=$(m %.0f "${A_HSRPS[@]}"); hscpu=$(m %.1f "${A_HSCPU[@]}")
dt=$(m %.0f "${A_DT[@]}"); bt=$(m %.0f "${A_BT[@]}"); gt=$(m %.0f "${A_GT[@]}")
dl=$(m %.0f "${A_DL[@]}"); bl=$(m %.0f "${A_BL[@]}"); gl=$(m %.0f "${A_GL[@]}")
addt=$(m %.0f "${A_ADDT[@]}")
rss_mb=$(awk -v k="$RSS_KB" 'BEGIN { printf "%.1f", k / 1024 }')
per() { awk -v v="$1" -v n="$CHUNKS" 'BEGIN { printf "%.1f", v / n }'; }
verdict() { if [ "$1" = 1 ]; then echo "yes"; else echo "NO"; fi; }
le() { awk -v a="$1" -v b="$2" 'BEGIN { print (a <= b) ? 1 : 0 }'; }

mkdir -p "$(dirname "$OUT")"
{
  echo "| streamed, $CHUNKS content chunks | direct (mock) | baseline proxy | gateway (full stack) | gateway vs baseline | target | met |"
  echo "|---|---|---|---|---|---|---|"
  echo "| throughput, c=64 | | ${brps} req/s | ${grps} req/s | ${ratio}×$(range "${A_RATIO[@]}") | ≥ 0.7× | $(verdict "$(le 0.7 "$ratio")") |"
  echo "| proxy CPU per request, c=64 | | ${bcpu} µs | ${gcpu} µs | ${cpur}×$(range "${A_CPUR[@]}") | ≤ 2× | $(verdict "$(le "$cpur" 2)") |"
  echo "| proxy CPU per content chunk, c=64 | | $(per "$bcpu") µs | $(per "$gcpu") µs | | | |"
  echo "| time to first byte p50, c=1 | ${dt} µs | ${bt} µs (+$((bt - dt))) | ${gt} µs (+$((gt - dt))) | $(printf "%+d" "$addt") µs$(range "${A_ADDT[@]}") | ≤ +20 µs | $(verdict "$(le "$addt" 20)") |"
  echo "| time to last byte p50, c=1 | ${dl} µs | ${bl} µs (+$((bl - dl))) | ${gl} µs (+$((gl - dl))) | $(printf "%+d" $(((gl - dl) - (bl - dl)))) µs | | |"
  echo "| gateway peak RSS (VmHWM) | | | ${rss_mb} MB | | < 30 MB | $(verdict "$(le "$rss_mb" 30)") |"
  echo
  echo "| cache hit, c=64 | baseline round trip (to the mock) | gateway hit | gateway CPU per hit | baseline CPU per request |"
  echo "|---|---|---|---|---|"
  echo "| non-streamed | ${bnrps} req/s | ${hrps} req/s | ${hcpu} µs | ${bncpu} µs |"
  echo "| streamed ($CHUNKS content chunks) | ${brps} req/s | ${hsrps} req/s | ${hscpu} µs | ${bcpu} µs |"
  echo
  echo "Median of $ROUNDS round(s), range in brackets. wrk -t1 -c64 ${DURATION} per run on core 1; curl on core $TTFB_CORE, $TTFB_N requests per target and round on one connection (times from the request's start); gateway \`${GW_BIN#"$PWD/"}\` (\`${CONFIG:-examples/proxy/bench.toml}\`) and baseline on core 0, mock on core 1; CPU = the proxy's user + kernel time / requests; $(nproc) cores, $(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo); $(date -u +%FT%TZ)."
} | tee "$OUT"
