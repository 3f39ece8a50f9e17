#!/usr/bin/env bash
# bench/store.sh -- the store on PostgreSQL against the store on SQLite,
# the same measurements in the same script, one after the other.  Not a
# test.
#
#   (1) a run of N (1,000) tracked tasks through `drover serve` (the worker
#       reports over HTTP, the server applies its batches to the store):
#       bench/remote.sh part a, the api time (median of RUNS);
#   (2) 50 workers of 1,000 tasks reporting at once: events/s the server
#       applied and its CPU per event (bench/remote.sh part b);
#   (3) /api/runs with wrk at 64 connections, 1,000 runs stored: p50, p99, req/s.
#
# PostgreSQL is the suite's own service (tests/services/postgres.sh),
# started here on a scratch directory and stopped at the end, unless
# DROVER_PG_URL names a server whose role may create databases.
#
#   bash bench/store.sh          (N=1000 RUNS=3 WORKERS=50 TASKS=1000 CONNS=64 DURATION=10s)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
N=${N:-1000}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-50}
TASKS=${TASKS:-1000}
CONNS=${CONNS:-64}
DURATION=${DURATION:-10s}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
command -v wrk >/dev/null || { echo "bench/store: wrk is missing (apt-get install wrk)" >&2; exit 1; }
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/tests/?.lua;;" LUA_CPATH="$ROOT/$BUILD/lua/?.so;;"

work=$(mktemp -d /tmp/drover-bench-store.XXXXXX)
pg_dir=
serve_pid=
cleanup() {
  [ -n "$serve_pid" ] && { kill "$serve_pid" 2>/dev/null || true; wait "$serve_pid" 2>/dev/null || true; }
  [ -n "$pg_dir" ] && bash tests/services/postgres.sh stop "$pg_dir" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "${DROVER_PG_URL:-}" ]; then
  pg_dir=$work/pg
  mkdir -p "$pg_dir"
  bash tests/services/postgres.sh start "$pg_dir" >"$work/pg.log" 2>&1 || { cat "$work/pg.log" >&2; exit 1; }
  . "$pg_dir/env"
fi
new_database() { lua5.4 -e 'print(require("helper").pg_database())'; }

# /api/runs at CONNS connections on a fresh store holding 1,000 ended runs
api_runs() { # STORE-LOCATION LABEL
  local home=$work/api-$2
  mkdir -p "$home"
  DROVER_HOME=$home DROVER_STORE=$1 lua5.4 -e '
    local store = assert(require("drover.store").open())
    for i = 1, 1000 do
      local id = store:create_flow_run { name = "r" .. i, deployment = "bench", state = "RUNNING", params = { i = i } }
      store:set_flow_state(id, "COMPLETED", nil, { result = tostring(i) })
    end
    store:close()'
  DROVER_HOME=$home DROVER_STORE=$1 "$DROVER" serve --port 0 >"$home/serve.log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 600); do
    grep -q "\"pid\":${serve_pid}[,}]" "$home/daemon.json" 2>/dev/null && break
    sleep 0.05
  done
  local url
  url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$home/daemon.json")
  wrk -t 2 -c "$CONNS" -d 2s "$url/api/runs" >/dev/null
  wrk -t 2 -c "$CONNS" -d "$DURATION" --latency "$url/api/runs" >"$work/wrk-$2"
  kill "$serve_pid"; wait "$serve_pid" 2>/dev/null || true; serve_pid=
  local p50 p99 rps
  p50=$(awk '$1 == "50%" { print $2 }' "$work/wrk-$2")
  p99=$(awk '$1 == "99%" { print $2 }' "$work/wrk-$2")
  rps=$(awk '/^Requests\/sec/ { print $2 }' "$work/wrk-$2")
  echo "(3) $2: /api/runs wrk -c$CONNS: p50 $p50, p99 $p99, $rps req/s"
  echo "RESULT store $2 api_runs_rps=$rps p99=$p99"
}

echo "$(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"
for kind in sqlite postgresql; do
  if [ "$kind" = sqlite ]; then loc=$work/remote-sqlite/drover.db; else loc=$(new_database); fi
  echo "== the store on $kind"
  DROVER_HOME=$work/remote-$kind DROVER_STORE=$loc N=$N RUNS=$RUNS WORKERS=$WORKERS TASKS=$TASKS \
    PARTS="a b" bash bench/remote.sh 2>&1 | grep -E '^\(a\)|^\(b\)|^    |^RESULT' | sed "s/^RESULT remote/RESULT store $kind/"
  if [ "$kind" = sqlite ]; then api_runs "$work/api-sqlite/drover.db" sqlite; else api_runs "$(new_database)" postgresql; fi
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
