#!/usr/bin/env bash
# bench/api.sh -- the daemon's JSON API under load (not a test).
#
# Stores 1,000 flow runs (one task run and two log lines each), written
# straight through the store API, starts `drover serve --port 0` on that
# store, and runs wrk against
#   /api/runs     the default page: the newest 100 runs as JSON
#   /metrics      Prometheus text: GROUP BY counts over the whole store
# with wrk -t THREADS -c CONNS -d DURATION --latency (2 threads, 64
# keep-alive connections, 10 s).  Prints p50 / p99 latency and requests/s.
#
#   DROVER_BUILD=build-x bash bench/api.sh      (RUNS=1000 DURATION=10s)
#
# wrk: apt-get install wrk.  wrk and the daemon share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
RUNS=${RUNS:-1000}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
if ! command -v wrk >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q wrk >/dev/null 2>&1 || true
fi
command -v wrk >/dev/null || { echo "bench/api: wrk is not installed (apt-get install wrk)" >&2; exit 1; }

work=$(mktemp -d /tmp/drover-bench-api.XXXXXX)
pid=
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export DROVER_HOME=$work/home DROVER_DAEMON=0

cat >"$work/fill.lua" <<'LUA'
local store_mod = require "drover.store"
local n = tonumber(arg[1])
local store = assert(store_mod.open())
local states = { "COMPLETED", "COMPLETED", "COMPLETED", "FAILED", "CRASHED", "CANCELLED" }
store:transaction(function()
  for i = 1, n do
    local st = states[i % #states + 1]
    local id = store:create_flow_run { name = "bench", deployment = "bench", backend = "local",
      state = st, params = { i = i, label = "run " .. i }, source = { kind = "deployment" } }
    local now = store_mod.time()
    store.db:run("UPDATE flow_runs SET started = ?, ended = ?, result = ? WHERE id = ?",
      now - 2, now, '{"ok":true}', id)
    store.db:run([[INSERT INTO task_runs(id, flow_run_id, name, kind, call_key, state, params,
        params_hash, attempts, started, ended) VALUES(?,?,?,?,?,?,?,?,?,?,?)]],
      store_mod.new_id(), id, "Bench.step", "task", "Bench.step#1", st, "[]", "[]", 1, now - 1, now)
    for k = 1, 2 do
      store.db:run("INSERT INTO logs(flow_run_id, ts, stream, line) VALUES(?,?,?,?)",
        id, now, "stdout", "line " .. k .. " of run " .. i)
    end
  end
end)
print(store:value("SELECT count(*) FROM flow_runs") .. " runs stored")
store:close()
LUA
"$DROVER" "$work/fill.lua" "$RUNS"

"$DROVER" serve --port 0 >"$work/serve.log" 2>&1 &
pid=$!
for _ in $(seq 1 500); do
  [ -s "$DROVER_HOME/daemon.json" ] && break
  sleep 0.02
done
url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$DROVER_HOME/daemon.json")
[ -n "$url" ] || { cat "$work/serve.log"; echo "bench/api: the daemon did not start" >&2; exit 1; }
echo "daemon at $url; /api/runs returns $(curl -s "$url/api/runs" | wc -c) bytes"

bench() {
  local path=$1 out
  out=$(wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --latency "$url$path")
  local p50 p99 rps errs
  p50=$(awk '$1 == "50%" { print $2 }' <<<"$out")
  p99=$(awk '$1 == "99%" { print $2 }' <<<"$out")
  rps=$(awk '/^Requests\/sec:/ { print $2 }' <<<"$out")
  errs=$(grep -E "Non-2xx|Socket errors" <<<"$out" || true)
  printf '%-10s p50 %-9s p99 %-9s %10s req/s  %s\n' "$path" "$p50" "$p99" "$rps" "$errs"
}
echo "wrk -t$THREADS -c$CONNS -d$DURATION --latency ($RUNS runs in the store)"
bench /api/runs
bench /metrics
