# Sourced by bench-setup.sh and pgo.sh: `wrk_lua FILE BODY CACHE_CONTROL` writes a wrk
# script that POSTs BODY as the benchmark's client (key "sk-bench") with that Cache-Control.
wrk_lua() {
  cat >"$1" <<LUAEOF
wrk.method = "POST"
wrk.body = '$2'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
wrk.headers["Cache-Control"] = "$3"
LUAEOF
}
