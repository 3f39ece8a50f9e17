#!/usr/bin/env bash
# bench/first_task.sh -- how soon a run's first task starts (not a test).
#
# For each of N runs (20): take the wall clock right after `drover run`
# returns, then poll the store for the run's first task run and read its
# `started`; the difference is the time from `drover run` returning to the
# first task starting (worker exec, package unpack, class load).  Also the
# time `drover run` itself took.  Medians, in three settings:
#   daemon     a `drover serve` already runs on the store
#   no-daemon  none runs: each `drover run` starts one (`serve --auto`), and
#              it is stopped again before the next run
#   DAEMON=0   DROVER_DAEMON=0: no daemon wanted at all
# The runs are the small workflow of tests/fixtures/sched (three tasks).
#
#   DROVER_BUILD=build-x bash bench/first_task.sh      (N=20)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
N=${N:-20}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
work=$(mktemp -d /tmp/drover-bench-first.XXXXXX)
export DROVER_HOME=$work/home DROVER_BIN=$DROVER
cleanup() {
  if [ -s "$DROVER_HOME/daemon.json" ]; then
    kill "$(sed -n 's/.*"pid":\([0-9]*\).*/\1/p' "$DROVER_HOME/daemon.json")" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

pkg=$("$DROVER" package --module sched_flow --class Sched --entrypoint main --path tests/fixtures/sched --json |
  sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
"$DROVER" deploy flow --package "$pkg" >/dev/null

cat >"$work/bench.lua" <<'LUA'
local drover = require "drover"
local json = require "drover.json"
local store_mod = require "drover.store"
local daemon = require "drover.daemon"
local bin, n = os.getenv("DROVER_BIN"), tonumber(arg[1])
local store = assert(store_mod.open())

local function median(t)
  table.sort(t)
  local m = #t // 2
  return #t % 2 == 1 and t[m + 1] or (t[m] + t[m + 1]) / 2
end

local function stop_daemon()
  local info = daemon.running(store.home)
  if not info then return end
  drover.kill(info.pid, "TERM")
  local deadline = drover.now() + 30
  while drover.kill(info.pid, 0) and drover.now() < deadline do drover.sleep(0.01) end
end

local function one(env)
  local t0 = store_mod.time()
  local r = assert(drover.proc.run({ bin, "run", "flow", "--json" }, { env = env }))
  local t1 = store_mod.time()
  assert(r.code == 0, r.stderr)
  local id = json.decode(r.stdout).id
  local started
  local deadline = drover.now() + 60
  repeat
    started = store:value("SELECT min(started) FROM task_runs WHERE flow_run_id = ?", id)
    if not started then drover.sleep(0.001) end
  until started or drover.now() > deadline
  assert(started, "no task of run " .. id .. " started")
  -- let it finish before the next one
  repeat drover.sleep(0.005) until store:value("SELECT state FROM flow_runs WHERE id = ?", id) == "COMPLETED"
    or drover.now() > deadline
  return started - t1, t1 - t0
end

local function mode(name, env, before)
  local first, call = {}, {}
  for i = 1, n do
    if before then before() end
    first[i], call[i] = one(env)
  end
  print(string.format("%-10s first task %6.1f ms after drover run returned (median of %d);"
    .. " drover run took %6.1f ms", name, median(first) * 1000, n, median(call) * 1000))
end

local home = store.home
-- a daemon already running (the first run starts it; not counted)
one({ DROVER_HOME = home })
assert(daemon.running(home), "a daemon runs")
mode("daemon", { DROVER_HOME = home })
mode("no-daemon", { DROVER_HOME = home }, stop_daemon)
stop_daemon()
mode("DAEMON=0", { DROVER_HOME = home, DROVER_DAEMON = "0" })
store:close()
LUA
"$DROVER" "$work/bench.lua" "$N"
