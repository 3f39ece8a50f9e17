--- bench/remote_bench.lua -- the measurements of bench/remote.sh, run as
--
--   drover bench/remote_bench.lua PART ...    (DROVER_HOME, DROVER_BIN set)
--
--   a SERVE_URL N RUNS     one worker, N tracked no-op tasks: reporting to
--                          `drover serve` (`drover worker ID --api URL`) vs
--                          writing the store itself (`drover worker ID`)
--   b SERVE_URL SERVE_PID WORKERS N
--                          WORKERS workers of N tasks each reporting at once:
--                          events/s the server applied, its CPU per event
--   c COUNT                `drover run` -> first task started, with a daemon
--                          serving the store (the worker reports over HTTP)
--                          vs DROVER_DAEMON=0 (the worker writes the store)
--
-- The runs are rows of deployment `bench` (bench/remote_flow.lua) made
-- here as `drover run` would make them (PENDING, a token for the API
-- path), so the worker process alone is timed: exec, fetching the run and
-- the bundle, the flow, and the delivery of every event (the worker exits
-- only once the server has applied them all, or, direct, once its final
-- flush is in the store).  Every run is checked: COMPLETED, with its N
-- task runs COMPLETED in the store.
local drover = require "drover"
local json = require "drover.json"
local run_token = require "drover.run_token"
local states = require "drover.states"
local store_mod = require "drover.store"

local bin = assert(os.getenv("DROVER_BIN"), "DROVER_BIN must be set")
local store = assert(store_mod.open())
local home = store.home

local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  local m = #s // 2
  return #s % 2 == 1 and s[m + 1] or (s[m] + s[m + 1]) / 2
end

local function fail(...)
  io.stderr:write("bench/remote: ", ...)
  io.stderr:write("\n")
  os.exit(1)
end

--- A PENDING run of deployment `bench` with n tasks; for the API path
-- also its token and the worker's argv and env.
local function new_run(n, url)
  local id = store_mod.new_id()
  local dir = home .. "/runs/" .. id
  drover.fs.mkdir(home .. "/runs")
  drover.fs.mkdir(dir)
  store:create_flow_run { id = id, name = "bench", deployment = "bench", backend = "local",
    state = states.PENDING, params = { n = n }, source = { kind = "deployment" } }
  local argv, env = { bin, "worker", id }, { DROVER_HOME = home }
  if url then
    argv[4], argv[5] = "--api", url
    env = { DROVER_HOME = false, DROVER_RUN_TOKEN = run_token.issue(store, id), DROVER_SPOOL_DIR = dir .. "/spool" }
  end
  return { id = id, argv = argv, env = env, log = dir .. "/worker.log", n = n }
end

local function spawn(r)
  local p, err = drover.proc.spawn(r.argv, { stdin = "", stdout = r.log, stderr = r.log, env = r.env })
  if not p then fail("cannot start a worker: ", tostring(err)) end
  return p
end

--- The run ended COMPLETED with its n noop task runs COMPLETED, or fail.
local function check(r, p_result)
  local row = store:flow_run(r.id)
  local done = store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND name = 'noop' AND state = ?",
    r.id, "COMPLETED")
  if row.state ~= "COMPLETED" or done ~= r.n or (p_result and p_result.code ~= 0) then
    fail(string.format("run %s: state %s, %d of %d task runs COMPLETED, worker exit %s; its log: %s",
      r.id, row.state, done, r.n, p_result and tostring(p_result.code) or "?", drover.fs.read(r.log) or ""))
  end
end

local function timed_worker(r)
  local t0 = drover.now()
  local res = spawn(r):wait()
  local dt = drover.now() - t0
  check(r, res)
  return dt
end

-- ---- a: one worker, API vs the store ---------------------------------------------------------

local function part_a(url, n, runs)
  local api, direct, ratio = {}, {}, {}
  -- one of each first, not counted (page cache, the store's first pages)
  timed_worker(new_run(n, nil))
  timed_worker(new_run(n, url))
  for i = 1, runs do
    -- alternate which goes first, so a drift in the machine's load hits both
    local d, a
    if i % 2 == 1 then
      d = timed_worker(new_run(n, nil)); a = timed_worker(new_run(n, url))
    else
      a = timed_worker(new_run(n, url)); d = timed_worker(new_run(n, nil))
    end
    direct[i], api[i], ratio[i] = d, a, a / d
    print(string.format("  run %d: direct %.3f s, api %.3f s, ratio %.2fx", i, d, a, a / d))
  end
  local r = median(ratio)
  print(string.format("(a) %d tracked no-op tasks in one worker (median of %d): direct %.3f s, api %.3f s", n, runs,
    median(direct), median(api)))
  print(string.format("    ratio api/direct: %.2fx (target <= 1.5x)", r))
  print(string.format("RESULT remote api/direct=%.2fx target=1.5 %s", r, r <= 1.5 and "OK" or "MISSED"))
end

-- ---- b: many workers at once -----------------------------------------------------------------

local function cpu_seconds(pid)
  local text = drover.fs.read("/proc/" .. pid .. "/stat")
  if not text then fail("cannot read /proc/", pid, "/stat (is drover serve still running?)") end
  -- fields after the command (which may hold spaces) in parentheses
  local rest = text:match("%) (.*)$")
  local f = {}
  for x in rest:gmatch("%S+") do f[#f + 1] = x end
  -- utime and stime are fields 14 and 15 of stat, 12 and 13 after ") "
  local ticks = tonumber(drover.proc.output({ "getconf", "CLK_TCK" }) or "100") or 100
  return (tonumber(f[12]) + tonumber(f[13])) / ticks
end

local function part_b(url, pid, workers, n)
  local rs = {}
  for i = 1, workers do rs[i] = new_run(n, url) end
  local ids = {}
  for i, r in ipairs(rs) do ids[i] = "'" .. r.id .. "'" end
  local sum_sql = "SELECT coalesce(sum(event_seq), 0) FROM flow_runs WHERE id IN (" .. table.concat(ids, ",") .. ")"
  local cpu0 = cpu_seconds(pid)
  local t0 = drover.now()
  local ps = {}
  for i, r in ipairs(rs) do ps[i] = spawn(r) end
  -- sample the events applied so far, to see the rate while all report
  local samples = {}
  local waiter = drover.spawn(function()
    for i, p in ipairs(ps) do ps[i] = p:wait() end
  end)
  while waiter:status() ~= "done" and waiter:status() ~= "failed" do
    samples[#samples + 1] = { drover.now() - t0, store:value(sum_sql) }
    drover.sleep(0.1)
  end
  local wall = drover.now() - t0
  local cpu = cpu_seconds(pid) - cpu0
  for i, r in ipairs(rs) do check(r, ps[i]) end
  local total = store:value(sum_sql)
  -- the active window: from the first sample with events to the first with all of them
  local first_t, last_t
  for _, s in ipairs(samples) do
    if s[2] > 0 and not first_t then first_t = s[1] end
    if s[2] >= total and not last_t then last_t = s[1] end
  end
  last_t = last_t or wall
  local window = first_t and (last_t - first_t) or wall
  if window <= 0 then window = wall end
  print(string.format("(b) %d workers x %d tasks reporting at once: %d events applied", workers, n, total))
  print(string.format("    all workers done in %.2f s (start-up included): %.0f events/s", wall, total / wall))
  print(string.format("    while events arrived (%.2f s): %.0f events/s sustained", window, total / window))
  print(string.format("    server CPU %.2f s (%.0f%% of one core over the %.2f s): %.1f us per event", cpu,
    cpu / wall * 100, wall, cpu / total * 1e6))
  print(string.format("RESULT remote 50 workers: %.0f events/s, server %.1f us cpu/event", total / window,
    cpu / total * 1e6))
end

-- ---- c: drover run -> first task ------------------------------------------------------------

local function first_task(env)
  local t0 = store_mod.time()
  local r = assert(drover.proc.run({ bin, "run", "bench", "n=1", "--json" }, { env = env }))
  local t1 = store_mod.time()
  if r.code ~= 0 then fail("drover run: ", r.stderr) end
  local id = json.decode(r.stdout).id
  local started, seen
  local deadline = drover.now() + 60
  repeat
    started = store:value("SELECT min(started) FROM task_runs WHERE flow_run_id = ?", id)
    if not started then drover.sleep(0.001) end
  until started or drover.now() > deadline
  seen = store_mod.time()
  if not started then fail("no task of run ", id, " started") end
  repeat drover.sleep(0.005) until not states.active[store:value("SELECT state FROM flow_runs WHERE id = ?", id)]
    or drover.now() > deadline
  local st = store:value("SELECT state FROM flow_runs WHERE id = ?", id)
  if st ~= "COMPLETED" then fail("run ", id, " ended ", tostring(st)) end
  return started - t1, seen - t1, t1 - t0
end

local function part_c(count)
  local out = {}
  for _, m in ipairs { { "api", { DROVER_HOME = home } }, { "direct", { DROVER_HOME = home, DROVER_DAEMON = "0" } } } do
    local first, seen, call = {}, {}, {}
    first_task(m[2]) -- not counted
    for i = 1, count do first[i], seen[i], call[i] = first_task(m[2]) end
    out[m[1]] = median(first)
    print(string.format("(c) %-6s first task started %6.1f ms after drover run returned, in the store after %6.1f ms;"
      .. " drover run took %6.1f ms (medians of %d)", m[1], median(first) * 1000, median(seen) * 1000,
      median(call) * 1000, count))
  end
  print(string.format("    ratio api/direct (first task started): %.2fx", out.api / out.direct))
end

local part = arg[1]
if part == "a" then
  part_a(arg[2], tonumber(arg[3]), tonumber(arg[4]))
elseif part == "b" then
  part_b(arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]))
elseif part == "c" then
  part_c(tonumber(arg[2]))
else
  fail("unknown part '", tostring(part), "' (a, b or c)")
end
store:close()
