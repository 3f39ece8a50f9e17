#!/usr/bin/env bash
# bench/docker.sh -- the docker backend on a real Docker Engine (not a test).
#
#   1. package (a fresh workflow: the bundle layer misses the build cache;
#      then the same sources again: all cached), deploy, run -> COMPLETED,
#      in container and swarm mode (median of REPS runs)
#   2. RUNS (50) runs started at once (container mode): time until every
#      run() returned, and until all are COMPLETED
#   1 and 2 again with the containers reporting to `drover serve` over HTTP
#      (api_url: no mount of the store), with the API/shared-store ratios
#   3. the same Engine operations through drover's API calls (drover.http
#      over the unix socket) and through the docker CLI, in this script:
#      image inspect x20, run-a-container-to-exit x10 (create, start, wait,
#      remove), 50 containers started at once and waited for, a swarm job
#      to completion; prints the times and the CLI/drover ratios
#
#   DROVER_BUILD=build-x bash bench/docker.sh     (RUNS=50 REPS=5)
#
# Uses the engine on DROVER_DOCKER_SOCKET (default /var/run/docker.sock);
# if none answers it starts one with tests/services/docker.sh and stops it
# at the end.  The base image comes from the same script.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
RUNS=${RUNS:-50}
REPS=${REPS:-5}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
export DROVER_BIN=$DROVER
SOCK=${DROVER_DOCKER_SOCKET:-/var/run/docker.sock}
BASE=${DROVER_DOCKER_BASE_IMAGE:-drover-base:latest}

work=$(mktemp -d /tmp/drover-bench-docker.XXXXXX)
svc=$work/svc
started=
cleanup() {
  docker rm -f $(docker ps -aq --filter label=drover.bench=1) >/dev/null 2>&1 || true
  docker service rm $(docker service ls -q --filter label=drover.bench=1) >/dev/null 2>&1 || true
  [ -n "$started" ] && bash tests/services/docker.sh stop "$svc" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$svc"
# the base image (and the engine, when none runs): the test service's job
if ! curl -sf --unix-socket "$SOCK" http://docker/_ping >/dev/null 2>&1; then started=1; fi
bash tests/services/docker.sh start "$svc" >"$work/svc.log" 2>&1 || { cat "$work/svc.log"; exit 1; }
export DROVER_HOME=$work/home DROVER_DAEMON=0 DROVER_DOCKER_SOCKET=$SOCK DROVER_DOCKER_BASE_IMAGE=$BASE

# a fresh workflow module, so that its bundle is new to the build cache
mkdir -p "$work/wf"
cat >"$work/wf/bench_flow.lua" <<LUA
-- bench workflow $(date +%s%N)
local drover = require "drover"
local B = drover.class("Bench")
B.integration_type = "pipeline"
function B:main(params) return self:step(params.n or 1) end
function B:step(n) return n + 1 end
return B
LUA

cat >"$work/bench.lua" <<'LUA'
local drover = require "drover"
local states = require "drover.states"
local RUNS, REPS, WF = tonumber(arg[1]), tonumber(arg[2]), arg[3]
local o = drover.orchestrator("docker", {})
local function t() return drover.now() end
local function out(k, v) print(string.format("%s %.4f", k, v)) end
local function median(xs) table.sort(xs); return xs[(#xs + 1) // 2] end

-- 1. package, deploy, run
local t0 = t()
local p = o:package("Bench", "bench_flow", "main", { path = WF })
out("package_cold", t() - t0)
t0 = t()
p = o:package("Bench", "bench_flow", "main", { path = WF })
out("package_cached", t() - t0)
local function wait_done(id)
  while states.active[o:status(id).state] do drover.sleep(0.02) end
  return o:status(id).state
end
--- Sections 1 and 2 with orchestrator `orch`; `tag` ("" or "_api") names
-- the outputs, `prefix` the deployments.
local function runs_of(orch, prefix, tag)
  for _, mode in ipairs { "container", "swarm" } do
    t0 = t()
    orch:deploy(prefix .. mode, { package = p.id, mode = mode })
    out("deploy_" .. mode .. tag, t() - t0)
    local xs = {}
    for _ = 1, REPS do
      t0 = t()
      local id = orch:run(prefix .. mode, { n = 1 })
      local st = wait_done(id)
      assert(st == "COMPLETED", mode .. " run ended " .. st)
      xs[#xs + 1] = t() - t0
    end
    out("run_to_completed_" .. mode .. tag, median(xs))
  end
  -- 2. RUNS runs at once
  orch:deploy(prefix .. "many", { package = p.id, mode = "container" })
  t0 = t()
  local ids, hs = {}, {}
  for i = 1, RUNS do hs[i] = drover.spawn(function() ids[i] = orch:run(prefix .. "many", { n = i }) end) end
  for _, h in ipairs(hs) do assert(h:wait()) end
  out("many_started" .. tag, t() - t0)
  for _, id in ipairs(ids) do
    local st = wait_done(id)
    assert(st == "COMPLETED", "run " .. id .. " ended " .. st)
  end
  out("many_completed" .. tag, t() - t0)
  for _, m in ipairs { "container", "swarm", "many" } do orch:stop(prefix .. m, {}) end
end
runs_of(o, "bench-", "")

-- 1 and 2 again, reporting to `drover serve` on the same store (api_url)
local home = o:store().home
local serve = assert(drover.proc.spawn({ os.getenv("DROVER_BIN"), "serve", "--port", "0" },
  { env = { DROVER_HOME = home }, stdout = home .. "/serve.log", stderr = home .. "/serve.log" }))
local info
while not info do
  local d = drover.fs.read(home .. "/daemon.json")
  d = d and drover.json.decode(d)
  if type(d) == "table" and d.pid == serve.pid then info = d else drover.sleep(0.02) end
  assert(serve:is_running(), "drover serve exited: see " .. home .. "/serve.log")
end
runs_of(drover.orchestrator("docker", { api_url = info.url }), "bench-api-", "_api")
serve:kill("TERM")
serve:wait()

-- 3. raw Engine operations through drover's API calls
local labels = { ["drover.bench"] = "1" }
t0 = t()
for _ = 1, 20 do assert(o:image_exists(p.image)) end
out("api_inspect20", t() - t0)
local function run_container(cmd)
  local c = o:api_ok("create", "POST", "/containers/create",
    { json = { Image = os.getenv("DROVER_DOCKER_BASE_IMAGE"), Cmd = cmd, Labels = labels } }).json.Id
  o:api_ok("start", "POST", "/containers/" .. c .. "/start")
  return c
end
local function wait_remove(c)
  o:api_ok("wait", "POST", "/containers/" .. c .. "/wait", { timeout = false })
  o:api_ok("remove", "DELETE", "/containers/" .. c)
end
t0 = t()
for _ = 1, 10 do wait_remove(run_container { "true" }) end
out("api_run10", t() - t0)
t0 = t()
local hs = {}
for i = 1, RUNS do hs[i] = drover.spawn(function() wait_remove(run_container { "true" }) end) end
for _, h in ipairs(hs) do assert(h:wait()) end
out("api_many", t() - t0)
t0 = t()
local sid = o:api_ok("service", "POST", "/services/create", { json = { Labels = labels,
  TaskTemplate = { ContainerSpec = { Image = os.getenv("DROVER_DOCKER_BASE_IMAGE"), Command = { "true" } },
    RestartPolicy = { Condition = "none" } },
  Mode = { ReplicatedJob = { MaxConcurrent = 1, TotalCompletions = 1 } } } }).json.ID
while true do
  local tk = o:service_task(sid)
  if tk and tk.Status and tk.Status.State == "complete" then break end
  drover.sleep(0.02)
end
out("api_job", t() - t0)
o:api("DELETE", "/services/" .. sid)
LUA

echo "# drover docker backend bench: engine $(docker version --format '{{.Server.Version}}' 2>/dev/null), RUNS=$RUNS REPS=$REPS"
"$DROVER" "$work/bench.lua" "$RUNS" "$REPS" "$work/wf" >"$work/out" 2>"$work/err" || { cat "$work/err"; exit 1; }
grep -E '^[a-z_0-9]+ [0-9.]+$' "$work/out" >"$work/times"

# 3. the same Engine operations through the docker CLI
now() { date +%s.%N; }
cli() {
  local t0 t1; t0=$(now); "$@"; t1=$(now)
  awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.4f", b - a }'
}
img=$(awk '/^Successfully tagged/ { print $3 }' "$work/err" | tail -1)
[ -n "$img" ] || img=$BASE
inspect20() { for i in $(seq 1 20); do docker image inspect "$img" >/dev/null; done; }
run10() { for i in $(seq 1 10); do docker run --rm --label drover.bench=1 "$BASE" true; done; }
many() { seq 1 "$RUNS" | xargs -P "$RUNS" -I{} docker run --rm --label drover.bench=1 "$BASE" true; }
job() { docker service create -q --detach=false --no-resolve-image --label drover.bench=1 \
          --mode replicated-job --restart-condition none "$BASE" true >/dev/null 2>&1; }
echo "cli_inspect20 $(cli inspect20)" >>"$work/times"
echo "cli_run10 $(cli run10)" >>"$work/times"
echo "cli_many $(cli many)" >>"$work/times"
echo "cli_job $(cli job)" >>"$work/times"

awk -v runs="$RUNS" '
  { v[$1] = $2 }
  END {
    printf "package (cold bundle layer)        %8.3f s\n", v["package_cold"]
    printf "package (same sources, cached)     %8.3f s\n", v["package_cached"]
    printf "deploy (container / swarm)         %8.3f / %.3f s\n", v["deploy_container"], v["deploy_swarm"]
    printf "run -> COMPLETED, container mode   %8.3f s (median)\n", v["run_to_completed_container"]
    printf "run -> COMPLETED, swarm mode       %8.3f s (median)\n", v["run_to_completed_swarm"]
    printf "%d runs at once: all started       %8.3f s\n", runs, v["many_started"]
    printf "%d runs at once: all COMPLETED     %8.3f s\n", runs, v["many_completed"]
    printf "\nreporting to drover serve (api_url)    API    shared  API/shared\n"
    split("run_to_completed_container run_to_completed_swarm many_completed", rk, " ")
    rn["run_to_completed_container"] = "run -> COMPLETED, container"
    rn["run_to_completed_swarm"] = "run -> COMPLETED, swarm"
    rn["many_completed"] = runs " runs at once, all COMPLETED"
    for (i = 1; i <= 3; i++) {
      k = rk[i]; a = v[k "_api"]; b = v[k]
      printf "%-34s %7.3fs %7.3fs %7.2fx\n", rn[k], a, b, (b > 0 ? a / b : 0)
    }
    printf "\n%-34s %10s %10s %8s\n", "engine operation", "drover", "docker CLI", "CLI/drover"
    split("inspect20 run10 many job", ops, " ")
    names["inspect20"] = "image inspect x20"
    names["run10"] = "container create+start+wait+rm x10"
    names["many"] = runs " containers at once (run+wait+rm)"
    names["job"] = "swarm replicated-job to complete"
    for (i = 1; i <= 4; i++) {
      k = ops[i]; a = v["api_" k]; c = v["cli_" k]
      printf "%-34s %9.3fs %9.3fs %7.1fx\n", names[k], a, c, (a > 0 ? c / a : 0)
    }
  }' "$work/times"
