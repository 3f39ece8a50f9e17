#!/usr/bin/env bash
# bench/tracking.sh -- the cost of tracking: N no-op task calls in one flow
# run (`drover exec bench/tracking.lua`), every call a task run written to
# the SQLite store, versus the same loop calling a plain Lua function.
# Not a test.
#
# Each variant is a whole `drover exec` process, timed by hyperfine with a
# fresh DROVER_HOME per run, so the store's final flush is inside the time:
#   empty    n=0               startup + the flow run's own rows
#   plain    n=N, plain fn     the peer
#   tracked  n=N, drover.task
# Per-task tracking overhead = (tracked - plain) / N   (target: <= 10 us),
# also from user+system CPU time, which load from other processes on a
# shared machine disturbs less than wall time.  A plain call is too cheap
# to see in N calls next to process startup, so the peer's per-call cost is
# timed inside one process over PLAIN_N calls; the ratio is
# (overhead + plain call) / plain call.
#
#   DROVER_BUILD=build-x bash bench/tracking.sh      (N=100000 RUNS=3)
#
# CALLGRIND=1 counts instructions instead (valgrind --tool=callgrind, a
# run with n=0 and one with n=CG_N tracked calls): instructions per tracked
# call, the figure to compare changes by on a shared, loaded machine,
# where wall and CPU times move with other people's work.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
N=${N:-100000}
PLAIN_N=${PLAIN_N:-10000000}
RUNS=${RUNS:-3}
DROVER=$PWD/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
if ! command -v hyperfine >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q hyperfine >/dev/null 2>&1 || true
fi
command -v hyperfine >/dev/null || { echo "bench/tracking: hyperfine is missing" >&2; exit 1; }

work=$(mktemp -d /tmp/drover-bench-tracking.XXXXXX)
trap 'rm -rf "$work"' EXIT
export DROVER_HOME=$work/home
FLOW=$PWD/bench/tracking.lua

if [ "${CALLGRIND:-0}" = 1 ]; then
  CG_N=${CG_N:-10000}
  command -v valgrind >/dev/null || { echo "bench/tracking: CALLGRIND=1 needs valgrind" >&2; exit 1; }
  declare -A ir
  for n in 0 "$CG_N"; do
    rm -rf "$DROVER_HOME"
    valgrind --tool=callgrind --callgrind-out-file="$work/cg.$n" "$DROVER" exec "$FLOW" n="$n" mode=tracked \
      >/dev/null 2>"$work/cg.$n.err" || { cat "$work/cg.$n.err" >&2; exit 1; }
    ir[$n]=$(sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$work/cg.$n.err")
  done
  per=$(( (ir[$CG_N] - ir[0]) / CG_N ))
  echo "tracked no-op calls: $CG_N in one flow run, counted by callgrind"
  echo "  instructions: n=0 ${ir[0]}, n=$CG_N ${ir[$CG_N]}"
  echo "RESULT tracking instructions_per_call=$per"
  exit 0
fi

hyperfine -N --warmup 1 --runs "$RUNS" --export-json "$work/h.json" \
  --prepare "rm -rf $DROVER_HOME" \
  -n empty "$DROVER exec $FLOW n=0 mode=plain" \
  -n plain "$DROVER exec $FLOW n=$N mode=plain" \
  -n tracked "$DROVER exec $FLOW n=$N mode=tracked" >&2

# Sanity: the tracked run really wrote N COMPLETED task runs.
rm -rf "$DROVER_HOME"
"$DROVER" exec "$FLOW" n="$N" mode=tracked 2>/dev/null
rows=$("$DROVER" -e '
  local db = assert(require("drover").db.open(arg[1] .. "/drover.db"))
  print(db:value("SELECT count(*) FROM task_runs WHERE state = ? AND ended IS NOT NULL", "COMPLETED"))
  db:close()' "$DROVER_HOME")
if [ "$rows" != "$N" ]; then
  echo "bench/tracking: expected $N COMPLETED task runs in the store, found $rows" >&2
  exit 1
fi

plain_us=$("$DROVER" -e '
  local f, n = function() end, tonumber(arg[1])
  local t = os.clock()
  for _ = 1, n do f() end
  print((os.clock() - t) / n * 1e6)' "$PLAIN_N")

lua5.4 - "$work/h.json" "$N" "$plain_us" <<'LUA'
local cjson = require "cjson"
local f = assert(io.open(arg[1])); local h = cjson.decode(f:read("a")); f:close()
local n, plain = tonumber(arg[2]), tonumber(arg[3])
local r = {}
for _, x in ipairs(h.results) do r[x.command] = x end
local function med(x) return x.median or x.mean end
local function cpu(x) return x.user + x.system end
local e, p, t = r.empty, r.plain, r.tracked
local over = (med(t) - med(p)) / n * 1e6
local over_cpu = (cpu(t) - cpu(p)) / n * 1e6
print(string.format("tracked no-op calls: %d in one flow run (store writes included)", n))
print(string.format("  wall: empty %.3f s, plain %.3f s, tracked %.3f s (median of runs)", med(e), med(p), med(t)))
print(string.format("  cpu:  empty %.3f s, plain %.3f s, tracked %.3f s (user+sys, mean)", cpu(e), cpu(p), cpu(t)))
print(string.format("tracking overhead: %.2f us/task wall, %.2f us/task cpu  (target <= 10 us)", over, over_cpu))
print(string.format("plain Lua call (peer): %.4f us/call", plain))
print(string.format("ratio tracked/plain call: %.0fx (wall), %.0fx (cpu)", (over + plain) / plain,
  (over_cpu + plain) / plain))
print(string.format("RESULT tracking overhead_us=%.2f target=10 %s", over, over <= 10 and "OK" or "MISSED"))
LUA
