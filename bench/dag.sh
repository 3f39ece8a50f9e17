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
#
# The graph is drawn once by bench/dag_gen.lua (node i depends on up to 3
# earlier nodes, fixed seed) into a file all three generators read.  Also a
# chain of CHAIN dependent tasks (drover vs make), where nothing overlaps.
# Each runner is timed with hyperfine (fresh store / output per run).
# Targets: drover at least 20x faster than snakemake, within 1.5x of make.
#
#   DROVER_BUILD=build-x bash bench/dag.sh   (N=1000 CHAIN=200 RUNS=3 SNAKE_RUNS=2 SEED=42)
#   SNAKE=0 skips snakemake.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
N=${N:-1000}
CHAIN=${CHAIN:-200}
RUNS=${RUNS:-3}
SNAKE_RUNS=${SNAKE_RUNS:-2}
SEED=${SEED:-42}
SNAKE=${SNAKE:-1}
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
edges=$(awk -F: '{n += split($2, a, " ")} END {print n}' "$work/random.deps")

# time NAME RUNS PREPARE COMMAND -> $work/NAME.json
time_it() {
  hyperfine -N --warmup 0 --runs "$2" --prepare "$3" --export-json "$work/$1.json" -n "$1" "$4" >&2
}

time_it drover-random "$RUNS" "rm -rf $DROVER_HOME" "$DROVER exec $work/random-flow.lua"
time_it make-random "$RUNS" "true" "make -j2 -s -f $work/random.mk all"
time_it drover-chain "$RUNS" "rm -rf $DROVER_HOME" "$DROVER exec $work/chain-flow.lua"
time_it make-chain "$RUNS" "true" "make -j2 -s -f $work/chain.mk all"
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

lua5.4 - "$work" "$N" "$CHAIN" "$edges" "$snake_note" <<'LUA'
local cjson = require "cjson"
local work, n, chain, edges, snake_note = arg[1], tonumber(arg[2]), tonumber(arg[3]), arg[4], arg[5]
local function load(name)
  local f = io.open(work .. "/" .. name .. ".json")
  if not f then return nil end
  local r = cjson.decode(f:read("a")).results[1]
  f:close()
  return r.median or r.mean
end
local d, m, s = load("drover-random"), load("make-random"), load("snakemake-random")
local dc, mc = load("drover-chain"), load("make-chain")
local function ms(t, k) return t * 1000 / k end
print(string.format("DAG: %d process tasks (each `true`), %s dependency edges, concurrency 2 (median wall)", n, edges))
print(string.format("  drover     %7.3f ms/task  (%.2f s)", ms(d, n), d))
print(string.format("  make -j2   %7.3f ms/task  (%.2f s)", ms(m, n), m))
if s then
  print(string.format("  snakemake  %7.3f ms/task  (%.2f s)", ms(s, n), s))
else
  print("  snakemake  " .. snake_note)
end
print(string.format("chain: %d dependent process tasks (median wall)", chain))
print(string.format("  drover     %7.3f ms/task  (%.2f s)", ms(dc, chain), dc))
print(string.format("  make       %7.3f ms/task  (%.2f s)", ms(mc, chain), mc))
print("ratios:")
print(string.format("  drover/make, DAG:   %.2fx  (target <= 1.5x)", d / m))
print(string.format("  drover/make, chain: %.2fx  (target <= 1.5x)", dc / mc))
if s then
  print(string.format("  snakemake/drover:   %.2fx  (target >= 20x)", s / d))
  -- What each runner adds above make, which does little but start the
  -- processes: the orchestration cost proper.
  print(string.format("  above make: drover %.3f ms/task, snakemake %.3f ms/task (%.1fx)",
    ms(d - m, n), ms(s - m, n), (s - m) / math.max(d - m, 1e-9)))
end
print(string.format("RESULT dag drover_make=%.2f chain_drover_make=%.2f snakemake_drover=%s",
  d / m, dc / mc, s and string.format("%.2f", s / d) or "skipped"))
LUA
