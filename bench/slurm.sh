#!/usr/bin/env bash
# bench/slurm.sh -- the slurm backend on a real Slurm cluster (not a test).
#
#   1. a 500-task fan-out: drover's `map` (one job array, one REST call),
#      drover's `run` in a loop (500 jobs, 500 REST calls), and a plain
#      shell loop of `sbatch` (500 jobs running `true`): the time to submit,
#      and the time until every task has ended
#   2. from `run` returning to the run's first task running on a node
#      (median of N single runs), and from `map` to the first array task
#   3. a one-job flow end to end through drover (run -> the worker has
#      recorded the end) vs sbatch of a script that touches a file (submit
#      -> the file exists): the overhead drover adds (median of N)
#
# MODE=api (default): the workers report to a `drover serve` this script
# starts (api_url), on the test cluster's hidden nodes (partition debug:
# they cannot see this host's /tmp, where the store lives).  MODE=shared:
# the shared-filesystem fallback, on the node that sees it (partition
# shared, one node).  The sbatch baselines run on the same partition.
#
# Uses the cluster in SLURM_CONF/DROVER_SLURM_SOCKET if set (source the env
# of tests/services/slurm.sh), else starts a private one and stops it.
#   DROVER_BUILD=build-x bash bench/slurm.sh          (TASKS=500 N=10 MODE=api)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
TASKS=${TASKS:-500}
N=${N:-10}
MODE=${MODE:-api}
case "$MODE" in api|shared) ;; *) echo "bench/slurm.sh: MODE must be api or shared" >&2; exit 2 ;; esac
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
work=$(mktemp -d /tmp/drover-bench-slurm.XXXXXX)
# the baseline's marker files: where every node can write them
marks=$(mktemp -d /var/tmp/drover-bench-slurm.XXXXXX)
own_cluster='' serve_pid=''
cleanup() {
  [ -n "$serve_pid" ] && kill "$serve_pid" 2>/dev/null && wait "$serve_pid" 2>/dev/null
  [ -n "$own_cluster" ] && bash tests/services/slurm.sh stop "$work/cluster" >/dev/null 2>&1
  rm -rf "$work" "$marks"
}
trap cleanup EXIT
if [ -z "${DROVER_SLURM_SOCKET:-}" ]; then
  own_cluster=1
  bash tests/services/slurm.sh start "$work/cluster" >"$work/cluster.log" 2>&1 ||
    { cat "$work/cluster.log"; exit 1; }
  . "$work/cluster/env"
fi
export SLURM_CONF DROVER_SLURM_SOCKET
export DROVER_HOME=$work/home DROVER_BIN=$DROVER DROVER_DAEMON=0 DROVER_ROOT=$ROOT
if [ "$MODE" = api ]; then
  export PART=${DROVER_SLURM_PARTITION:-debug}
  mkdir -p "$DROVER_HOME"
  "$DROVER" serve --port 0 >"$work/serve.log" 2>&1 &
  serve_pid=$!
  for _ in $(seq 1 600); do [ -s "$DROVER_HOME/daemon.json" ] && break; sleep 0.05; done
  BENCH_API=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$DROVER_HOME/daemon.json")
  [ -n "$BENCH_API" ] || { echo "bench/slurm.sh: drover serve did not start: $(cat "$work/serve.log")" >&2; exit 1; }
  export BENCH_API
else
  export PART=${DROVER_SLURM_SHARED_PARTITION:-shared}
fi
now() { date +%s.%N; }
calc() { awk "BEGIN { print $* }"; }

# ---- the shell loop of sbatch: submit, then wait for the queue to drain
cat >"$work/true.sh" <<'EOF'
#!/bin/sh
true
EOF
t0=$(now)
for i in $(seq 1 "$TASKS"); do
  sbatch --parsable --partition="$PART" --job-name=bench-loop --output=/dev/null "$work/true.sh" >/dev/null
done
t1=$(now)
while [ -n "$(squeue -h --name=bench-loop -o %i | head -1)" ]; do sleep 0.05; done
t2=$(now)
sbatch_submit=$(calc "$t1 - $t0"); sbatch_total=$(calc "$t2 - $t0")

# ---- one-job flow: sbatch of a script that touches a file when done,
# polled every 10 ms (as the drover side polls the store), N times.
# (`sbatch --wait` polls far more slowly: it would flatter drover.)
cat >"$work/touch.sh" <<'EOF'
#!/bin/sh
touch "$1"
EOF
sb_one=()
for i in $(seq 1 "$N"); do
  a=$(now); sbatch --parsable --partition="$PART" --output=/dev/null "$work/touch.sh" "$marks/done.$i" >/dev/null
  while [ ! -e "$marks/done.$i" ]; do sleep 0.01; done; b=$(now)
  sb_one+=("$(calc "$b - $a")")
done
sbatch_one=$(printf '%s\n' "${sb_one[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}')

cat >"$work/bench.lua" <<'LUA'
local drover = require "drover"
local store_mod = require "drover.store"
local tasks, n = tonumber(os.getenv("TASKS")), tonumber(os.getenv("N"))
local orch = drover.orchestrator("slurm", { socket = os.getenv("DROVER_SLURM_SOCKET"),
  partition = os.getenv("PART"), api_url = os.getenv("BENCH_API") })
local store = orch:store()
local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = os.getenv("DROVER_ROOT") .. "/tests/fixtures/slurm" })
orch:deploy("bench-item", { package = pkg.id, params = { mode = "item" } })
orch:deploy("bench-one", { package = pkg.id, params = { mode = "ok" } })

local function median(t)
  table.sort(t)
  local m = #t // 2
  return #t % 2 == 1 and t[m + 1] or (t[m] + t[m + 1]) / 2
end

local function wait(cond)
  local deadline = drover.now() + 1800
  while not cond() do
    if drover.now() > deadline then error("bench: timed out") end
    drover.sleep(0.02)
  end
end

local function ended(ids)
  local left = 0
  for _, id in ipairs(ids) do
    if not store:value("SELECT ended FROM flow_runs WHERE id = ?", id) then left = left + 1 end
  end
  return left == 0
end

local function first_task_start(id)
  return store:value("SELECT min(started) FROM task_runs WHERE flow_run_id = ?", id)
end

local items = {}
for i = 1, tasks do items[i] = i end

-- fan-out as one job array
local t0 = store_mod.time()
local m = orch:map("bench-item", items)
local t1 = store_mod.time()
local first
wait(function()
  for _, id in ipairs(m.runs) do
    local s = first_task_start(id)
    if s then first = math.min(first or math.huge, s) end
  end
  return first ~= nil
end)
wait(function() return ended(m.runs) end)
local t2 = store_mod.time()
local failed = store:value("SELECT count(*) FROM flow_runs WHERE deployment = 'bench-item' AND state != 'COMPLETED'")
print(string.format("map_submit=%.3f map_total=%.3f map_first=%.3f map_failed=%d", t1 - t0, t2 - t0, first - t1, failed))

-- fan-out as one job per task
local ids = {}
t0 = store_mod.time()
for i = 1, tasks do ids[i] = orch:run("bench-item", { item = i, index = i }) end
t1 = store_mod.time()
wait(function() return ended(ids) end)
t2 = store_mod.time()
print(string.format("runs_submit=%.3f runs_total=%.3f", t1 - t0, t2 - t0))

-- one-job flows: run -> first task running, and run -> ended
local firsts, totals = {}, {}
for _ = 1, n do
  local a = store_mod.time()
  local id = orch:run("bench-one", {})
  local b = store_mod.time()
  wait(function() return first_task_start(id) end)
  firsts[#firsts + 1] = first_task_start(id) - b
  wait(function() return ended({ id }) end)
  totals[#totals + 1] = store:value("SELECT ended FROM flow_runs WHERE id = ?", id) - a
end
print(string.format("one_first=%.3f one_total=%.3f", median(firsts), median(totals)))
LUA
eval "$(TASKS=$TASKS N=$N "$DROVER" "$work/bench.lua" | tr ' ' '\n' | sed 's/^/r_/')"

printf '\nslurm backend, %d-task fan-out on %s (partition %s), REST over a unix socket, MODE=%s\n' "$TASKS" "$(hostname)" "$PART" "$MODE"
printf '%-44s %10s %10s\n' "" "submit s" "all done s"
printf '%-44s %10.3f %10.3f\n' "shell loop of sbatch (jobs run 'true')" "$sbatch_submit" "$sbatch_total"
printf '%-44s %10.3f %10.3f\n' "drover map: one job array (tracked flows)" "$r_map_submit" "$r_map_total"
printf '%-44s %10.3f %10.3f\n' "drover run x$TASKS: one job each (tracked)" "$r_runs_submit" "$r_runs_total"
printf 'submit ratio sbatch loop / drover map:      %.1fx\n' "$(calc "$sbatch_submit / $r_map_submit")"
printf 'submit ratio sbatch loop / drover run loop: %.2fx\n' "$(calc "$sbatch_submit / $r_runs_submit")"
printf 'map runs not COMPLETED: %s\n' "$r_map_failed"
printf '\nfrom map returning to the first array task running:   %.3f s\n' "$r_map_first"
printf 'from run returning to its first task running (median of %d): %.3f s\n' "$N" "$r_one_first"
printf '\none-job flow end to end, median of %d:\n' "$N"
printf '  sbatch, script touches a file: %.3f s\n' "$sbatch_one"
printf '  drover run -> COMPLETED:       %.3f s\n' "$r_one_total"
printf '  overhead drover adds:          %.3f s (ratio %.2fx)\n' "$(calc "$r_one_total - $sbatch_one")" \
  "$(calc "$r_one_total / $sbatch_one")"
