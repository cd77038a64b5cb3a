# Helpers of the benchmark scripts, sourced by bench-setup.sh (so by loadtest.sh,
# instructions.sh and compare.sh) and by pgo.sh.

# `wrk_lua FILE BODY CACHE_CONTROL` writes a wrk script that POSTs BODY as the benchmark's
# client (key "sk-bench") with that Cache-Control.
wrk_lua() {
  cat >"$1" <<LUAEOF
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.headers["Cache-Control"] = "$3"
LUAEOF
}

# `wait_up URL`: waits up to 10 s for URL to answer 2xx, else ends the script.
wait_up() {
  for _ in $(seq 1 100); do
    if curl -sf -o /dev/null "$1"; then return 0; fi
    sleep 0.1
  done
  echo "$(basename "$0"): $1 did not come up" >&2
  exit 1
}

# wrk's latency value ("123.45us", "1.23ms", "2.00s") in microseconds.
to_us() {
  awk -v v="$1" 'BEGIN {
    n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
    if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else m = 1;
    printf "%.0f", n * m }'
}
# `pct 50% WRK_OUTPUT`: that percentile of a `wrk --latency` run, as wrk prints it.
pct() { awk -v p="$1" '$1 == p { print $2 }' <<<"$2"; }
# `rps WRK_OUTPUT`: requests per second, rounded.
rps() { awk '/^Requests\/sec:/ { printf "%.0f", $2 }' <<<"$1"; }
# `med FMT VALUES…` prints the median in printf format FMT.
med() { local f="$1"; shift; printf '%s\n' "$@" | sort -g | awk -v f="$f" '{ a[NR] = $1 } END { printf f, (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
