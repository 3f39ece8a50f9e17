#!/usr/bin/env bash
# bench/dag.sh -- a DAG of N process tasks (each runs `true`), concurrency
# 2, every state change tracked.  Not a test.
#
#   drover     `drover exec` of a workflow: a drover.task per node running
#              drover.proc.run({"true"}) with tags={"cpu"} and
#              drover.limit("cpu", 2); each node a drover.spawn that first
#              joins its dependencies' handles (every task run is a row in
#              the store: RUNNING then COMPLETED, start and end times)
#   make       `make -j2` on a Makefile of phony targets, recipe `@true`
#   snakemake  `snakemake -j2 --scheduler greedy` on a Snakefile (one
#              wildcard rule; touch() markers, since Snakemake tracks files)
#   floor      bench/floor.c: the same graph, each node a `true` (looked up
#              in PATH once) started with posix_spawn and reaped with
#              waitpid, 2 at a time,
#              dependencies respected, nothing tracked: the least any
#              runner can cost, so drover/floor is the figure that holds
#              across machines
#
# The graph is drawn once by bench/dag_gen.lua (node i depends on up to 3
# earlier nodes, fixed seed) into a file all three generators read.  Also a
# chain of CHAIN dependent tasks (drover vs make), where nothing overlaps.
# drover, make and the floor are timed interleaved: each of RUNS rounds runs
# every one of them once, in turn, so load from other work on a shared
# machine falls on all of them alike; the median of the rounds is reported,
# with each command's own CPU per task (its process alone, not the `true`
# children every runner pays alike: bench/own_cpu.py), the figure a
# runner's overhead shows in, and one load from other work moves less.
# Each drover run starts from a copy of an empty store made before the
# rounds, as a user's run starts from the store their DROVER_HOME already
# has: making a new store (its tables, the fsyncs SQLite pays for a new
# file) is once per home, and is timed on its own in the same rounds
# (`drover store migrate` on an empty home) and printed beside the rest.  Snakemake is timed with hyperfine.
# Targets (issue 13): drover at most 1.0x make -j2 on both graphs, and at
# most 1.1x the floor on the DAG.
#
#   DROVER_BUILD=build-x bash bench/dag.sh   (N=1000 CHAIN=200 RUNS=3 SNAKE_RUNS=2 SEED=42)
#   SNAKE=0 skips snakemake.  PERF=1 also profiles one drover run of the
#   DAG (perf record -g) and prints the top PERF_TOP entries (default 10).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
N=${N:-1000}
CHAIN=${CHAIN:-200}
RUNS=${RUNS:-3}
SNAKE_RUNS=${SNAKE_RUNS:-2}
SEED=${SEED:-42}
SNAKE=${SNAKE:-1}
PERF=${PERF:-0}
PERF_TOP=${PERF_TOP:-10}
DROVER=$PWD/$BUILD/drover
GEN=$PWD/bench/dag_gen.lua
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
if ! command -v hyperfine >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q hyperfine >/dev/null 2>&1 || true
fi
command -v hyperfine >/dev/null || { echo "bench/dag: hyperfine is missing" >&2; exit 1; }
snake_note=
if [ "$SNAKE" = 1 ] && ! command -v snakemake >/dev/null; then
  echo "bench/dag: installing snakemake (Debian package, a few minutes)" >&2
  apt-get -o DPkg::Lock::Timeout=600 install -y -q snakemake >/dev/null 2>&1 || true
fi
if [ "$SNAKE" != 1 ]; then
  snake_note="skipped (SNAKE=0)"
elif ! command -v snakemake >/dev/null; then
  snake_note="skipped (snakemake could not be installed)"
fi

work=$(mktemp -d /tmp/drover-bench-dag.XXXXXX)
trap 'rm -rf "$work"' EXIT
export DROVER_HOME=$work/home

for shape in random chain; do
  n=$N; [ "$shape" = chain ] && n=$CHAIN
  lua5.4 "$GEN" deps "$shape" "$n" "$SEED" >"$work/$shape.deps"
  lua5.4 "$GEN" make "$work/$shape.deps" >"$work/$shape.mk"
  lua5.4 "$GEN" drover "$work/$shape.deps" >"$work/$shape-flow.lua"
done
lua5.4 "$GEN" snake "$work/random.deps" >"$work/Snakefile"
${CC:-cc} -O2 -o "$work/floor" bench/floor.c
edges=$(awk -F: '{n += split($2, a, " ")} END {print n}' "$work/random.deps")

# time NAME RUNS PREPARE COMMAND -> $work/NAME.json
time_it() {
  hyperfine -N --warmup 0 --runs "$2" --prepare "$3" --export-json "$work/$1.json" -n "$1" "$4" >&2
}

# interleaved NAME=COMMAND ...: RUNS rounds of every command in turn (a
# drover-* command gets a copy of the empty store first, new-store an empty
# home) -> $work/NAME.json, shaped like hyperfine's export (results[1].median,
# seconds)
interleaved() {
  local round spec name cmd t0 t1
  for spec in "$@"; do : >"$work/${spec%%=*}.t"; done
  for round in $(seq "$RUNS"); do
    for spec in "$@"; do
      name=${spec%%=*}; cmd=${spec#*=}
      case $name in
        drover-*) rm -rf "$DROVER_HOME"; cp -a "$work/empty-store" "$DROVER_HOME" ;;
        new-store) rm -rf "$DROVER_HOME" ;;
      esac
      # wall and the command's own CPU (not its children's): bench/own_cpu.py
      python3 bench/own_cpu.py $cmd >>"$work/$name.t" 2>"$work/$name.err" ||
        { echo "bench/dag: $name failed:" >&2; cat "$work/$name.err" >&2; exit 1; }
    done
    echo "bench/dag: round $round of $RUNS done" >&2
  done
  for spec in "$@"; do
    name=${spec%%=*}
    { sort -n -k1,1 "$work/$name.t" | awk '{ a[NR] = $1 } END { printf "%.9f ", a[int((NR + 1) / 2)] / 1e9 }'
      sort -n -k2,2 "$work/$name.t" | awk '{ a[NR] = $2 } END { printf "%.9f", a[int((NR + 1) / 2)] / 1e9 }'
    } | awk '{ printf "{\"results\":[{\"median\":%s,\"own_cpu\":%s}]}\n", $1, $2 }' >"$work/$name.json"
  done
}
DROVER_HOME=$work/empty-store "$DROVER" store migrate >/dev/null
interleaved "new-store=$DROVER store migrate" "drover-random=$DROVER exec $work/random-flow.lua" "make-random=make -j2 -s -f $work/random.mk all" \
  "floor-random=$work/floor $work/random.deps 2" "drover-chain=$DROVER exec $work/chain-flow.lua" \
  "make-chain=make -j2 -s -f $work/chain.mk all" "floor-chain=$work/floor $work/chain.deps 2"
if [ -z "$snake_note" ]; then
  time_it snakemake-random "$SNAKE_RUNS" "rm -rf $work/snake" \
    "snakemake -j2 --scheduler greedy -s $work/Snakefile -d $work/snake"
  made=$(find "$work/snake/out" -type f | wc -l)
  [ "$made" = "$N" ] || { echo "bench/dag: snakemake made $made of $N outputs" >&2; exit 1; }
fi

# Sanity, outside the timings: a drover run of the random DAG really
# tracked every node, in dependency order, never more than 2 at a time.
rm -rf "$DROVER_HOME"
"$DROVER" exec "$work/random-flow.lua" 2>/dev/null
"$DROVER" -e '
  local db = assert(require("drover").db.open(arg[1] .. "/drover.db"))
  local n = tonumber(arg[3])
  local rows = db:rows("SELECT name, state, started, ended FROM task_runs")
  local by = {}
  for _, r in ipairs(rows) do
    assert(r.state == "COMPLETED" and r.started and r.ended, "task run " .. r.name .. " is " .. r.state)
    by[tonumber(r.name:match("^n(%d+)$"))] = r
  end
  for i = 1, n do assert(by[i], "node " .. i .. " was not tracked") end
  assert(#rows == n, "expected " .. n .. " task runs, found " .. #rows)
  for line in io.lines(arg[2]) do
    local i, rest = line:match("^(%d+):(.*)$")
    for j in rest:gmatch("%d+") do
      assert(by[tonumber(j)].ended <= by[tonumber(i)].started,
        "node " .. i .. " started before its dependency " .. j .. " ended")
    end
  end
  local ev = {}
  for _, r in ipairs(rows) do ev[#ev + 1] = { r.started, 1 }; ev[#ev + 1] = { r.ended, -1 } end
  table.sort(ev, function(a, b) if a[1] ~= b[1] then return a[1] < b[1] end return a[2] < b[2] end)
  local cur, max = 0, 0
  for _, e in ipairs(ev) do cur = cur + e[2]; if cur > max then max = cur end end
  assert(max <= 2, "up to " .. max .. " task runs overlapped (limit 2)")
  db:close()' "$DROVER_HOME" "$work/random.deps" "$N"

if [ "$PERF" = 1 ]; then
  # where drover's time goes on the DAG: call graphs of the drover process
  # alone (--no-inherit: not the `true` children it starts)
  rm -rf "$DROVER_HOME"
  perf record -q -g --no-inherit -o "$work/perf.data" "$DROVER" exec "$work/random-flow.lua" >/dev/null 2>&1
  perf report -i "$work/perf.data" --no-children --stdio --sort dso,symbol -g none >"$work/perf.txt" 2>/dev/null
  echo "perf: top $PERF_TOP entries of drover exec on the DAG (self time, drover's process only)"
  grep -v '^#' "$work/perf.txt" | grep -v '^ *$' | sed -n "1,${PERF_TOP}p"
fi

lua5.4 - "$work" "$N" "$CHAIN" "$edges" "$snake_note" <<'LUA'
local cjson = require "cjson"
local work, n, chain, edges, snake_note = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
local own = {} -- name -> median CPU of the command's own process (s)
local function load(name)
  local f = io.open(work .. "/" .. name .. ".json")
  if not f then return nil end
  local r = cjson.decode(f:read("a")).results[1]
  f:close()
  own[name] = r.own_cpu
  return r.median or r.mean
end
local d, m, s = load("drover-random"), load("make-random"), load("snakemake-random")
local dc, mc = load("drover-chain"), load("make-chain")
local f, fc = load("floor-random"), load("floor-chain")
local new_store = load("new-store")
local function ms(t, k) return t * 1000 / k end
print(string.format("DAG: %d process tasks (each `true`), %s dependency edges, concurrency 2 (median wall)", n, edges))
print(string.format("  drover     %7.3f ms/task  (%.2f s)", ms(d, n), d))
print(string.format("  make -j2   %7.3f ms/task  (%.2f s)", ms(m, n), m))
print(string.format("  floor      %7.3f ms/task  (%.2f s)", ms(f, n), f))
if s then
  print(string.format("  snakemake  %7.3f ms/task  (%.2f s)", ms(s, n), s))
else
  print("  snakemake  " .. snake_note)
end
print(string.format("chain: %d dependent process tasks (median wall)", chain))
print(string.format("  drover     %7.3f ms/task  (%.2f s)", ms(dc, chain), dc))
print(string.format("  make       %7.3f ms/task  (%.2f s)", ms(mc, chain), mc))
print(string.format("  floor      %7.3f ms/task  (%.2f s)", ms(fc, chain), fc))
print(string.format("a new store (once per DROVER_HOME, not in the drover figures): %.1f ms", new_store * 1000))
local function us(name, k) return own[name] * 1e6 / k end
print("own CPU per task (the runner's process, not the children it starts; median):")
print(string.format("  DAG:    drover %.0f us, make %.0f us, floor %.0f us", us("drover-random", n),
  us("make-random", n), us("floor-random", n)))
print(string.format("  chain:  drover %.0f us, make %.0f us, floor %.0f us (start-up included)",
  us("drover-chain", chain), us("make-chain", chain), us("floor-chain", chain)))
print("ratios:")
print(string.format("  drover/make, DAG:    %.2fx  (target <= 1.0x)", d / m))
print(string.format("  drover/make, chain:  %.2fx  (target <= 1.0x)", dc / mc))
print(string.format("  drover/floor, DAG:   %.2fx  (target <= 1.1x)", d / f))
print(string.format("  drover/floor, chain: %.2fx", dc / fc))
print(string.format("  make/floor, DAG:     %.2fx, chain %.2fx", m / f, mc / fc))
if s then
  print(string.format("  snakemake/drover:    %.2fx   snakemake/floor: %.2fx", s / d, s / f))
  -- What each runner adds above make, which does little but start the
  -- processes: the orchestration cost proper.
  print(string.format("  above make: drover %.3f ms/task, snakemake %.3f ms/task (%.1fx)",
    ms(d - m, n), ms(s - m, n), (s - m) / math.max(d - m, 1e-9)))
end
print(string.format("  own CPU drover/make, DAG: %.2fx, chain %.2fx", own["drover-random"] / own["make-random"],
  own["drover-chain"] / own["make-chain"]))
print(string.format("RESULT dag drover_make=%.2f chain_drover_make=%.2f drover_floor=%.2f chain_drover_floor=%.2f " ..
  "snakemake_drover=%s", d / m, dc / mc, d / f, dc / fc, s and string.format("%.2f", s / d) or "skipped"))
LUA
