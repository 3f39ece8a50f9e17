--- `drover worker RUN_ID`: run one flow run, wherever a backend started it.
--
-- A worker gets its run from one of two sources, and runs it the same way:
--
--   the store      (shared-filesystem mode) it opens the store under
--                  DROVER_HOME, reads the run, unpacks the package from the
--                  store's directory and tracks into the store directly;
--   the server     (`--api URL` or DROVER_API, with DROVER_RUN_TOKEN) it
--                  needs nothing on its host but the drover binary: it
--                  fetches the run from `drover serve`, downloads the
--                  package's bundle (checking its sha256) and reports
--                  through drover.reporter (batches, sequence numbers,
--                  spool, heartbeats).  See docs/protocol.md.
--
-- Either way the run's own backend, configured as deployed, decorates the
-- workflow class, so its decorator shapes the calls (slurm: tasks with
-- resources become jobs).
local drover = require "drover"
local api_client = require "drover.api_client"
local fs = require "drover.fs"
local json = require "drover.json"
local states = require "drover.states"
local store_mod = require "drover.store"

local M = {}

-- ---- the store as the source ---------------------------------------------------------------

local Direct = {}
Direct.__index = Direct

function M.direct(store, run_id)
  return setmetatable({ store = store, run_id = run_id }, Direct)
end

--- The run, deployment and package rows (JSON columns decoded).
function Direct:job()
  local store = self.store
  local r = store:flow_run(self.run_id)
  if not r then error("unknown run '" .. tostring(self.run_id) .. "'", 0) end
  local d = r.deployment and store:deployment(r.deployment)
  local p = d and d.package_id and store:package(d.package_id)
  r.params = store_mod.decode(r.params) or {}
  if d then
    d.backend_config = store_mod.decode(d.backend_config)
    d.config = store_mod.decode(d.config)
  end
  return { run = r, deployment = d, package = p }
end

--- The reason a canceller recorded with CANCELLING, if it did.
function Direct:cancel_reason()
  local r = self.store:flow_run(self.run_id)
  if r and r.state == states.CANCELLING then return r.message end
end

--- Why the run must not go on, when a canceller got to it before this
-- worker could take a signal (before the backend recorded its pid: the
-- canceller then found no process, and recorded the end itself): the
-- reason of a CANCELLING, or the end already recorded.  nil: run it.  (A
-- worker reporting over HTTP learns the same from the server's answers.)
function Direct:ended_before_start()
  local r = self.store:flow_run(self.run_id)
  if r and (r.state == states.CANCELLING or states.final[r.state]) then return r.message or r.state end
end

function Direct:unpack(p, dir) return fs.untar(p.location, dir) end
function Direct:work_dir() return self.store.home .. "/runs/" .. self.run_id end
function Direct:sink() return self.store end
function Direct:fail(message) self.store:set_flow_state(self.run_id, states.CRASHED, message) end
function Direct:finish() self.store:flush(); return true end

-- ---- the server as the source ---------------------------------------------------------------

local Remote = {}
Remote.__index = Remote

--- opts: url, token, ca_file, and reporter settings (see drover.reporter).
function M.remote(run_id, opts)
  local client = api_client.new { url = opts.url, token = opts.token, ca_file = opts.ca_file }
  return setmetatable({ client = client, run_id = run_id, opts = opts }, Remote)
end

--- A request the server must answer before the run can start: retried
-- with backoff while the server is unreachable or answers 5xx (it may be
-- restarting), for up to `delivery_timeout` seconds.  4xx fails at once.
function Remote:fetch(method, path)
  local delay, deadline = 0.2, drover.now() + (self.opts.delivery_timeout or 300)
  while true do
    local res, err = self.client:call(method, path)
    if not res and api_client.untrusted(err) then error(method .. " " .. self.client.url .. path .. ": " .. err, 0) end
    if res and res.status < 500 then
      if res.status >= 200 and res.status < 300 then return res end
      error(api_client.error_of(res, method, self.client.url .. path), 0)
    end
    if drover.now() > deadline then
      error(method .. " " .. self.client.url .. path .. ": " .. (res and ("HTTP " .. res.status) or tostring(err)), 0)
    end
    drover.sleep(delay)
    delay = math.min(delay * 2, 5)
  end
end

--- The run, fetched once: `drover worker` reads it to build the backend
-- before worker.run() asks again, and by then the reporter runs (a second
-- fetch failing then would leave it reporting forever, and cost a round
-- trip anyway).
function Remote:job()
  if self.info then return self.info end
  local res = self:fetch("GET", "/api/v1/runs/" .. self.run_id .. "/worker")
  local job = res.json
  if type(job) ~= "table" or type(job.run) ~= "table" then
    error("GET " .. self.client.url .. "/api/v1/runs/" .. self.run_id .. "/worker: not a run", 0)
  end
  self.info = job
  if job.run.params == json.null then job.run.params = {} end
  return job
end

--- The reason a canceller recorded with CANCELLING, as the server has it
-- (one request: nil when the server cannot say at once).
function Remote:cancel_reason()
  local ok, res = pcall(self.client.call, self.client, "GET", "/api/v1/runs/" .. self.run_id .. "/worker", nil, nil,
    { timeout = 5 })
  local r = ok and res and res.status == 200 and type(res.json) == "table" and res.json.run
  if type(r) == "table" and r.state == states.CANCELLING and type(r.message) == "string" then return r.message end
end

--- Download the bundle, check it against the package's sha256, unpack it.
-- nil and a message when it cannot be had (the server answered 4xx: 410
-- gone, 403 not this run's package; or it stayed unreachable): the run
-- then ends CRASHED, `bad package: ...`.
function Remote:unpack(p, dir)
  local fok, res = pcall(self.fetch, self, "GET", "/api/v1/packages/" .. p.id .. "/bundle")
  if not fok then return nil, tostring(res) end
  local got = fs.sha256_string(res.body)
  if got ~= p.sha256 then
    return nil, "bundle of package " .. p.id .. " has sha256 " .. got .. ", expected " .. p.sha256
  end
  local tar = dir .. ".tar"
  local ok, err = fs.write(tar, res.body)
  if not ok then return nil, err end
  ok, err = fs.untar(tar, dir)
  fs.remove(tar)
  return ok, err
end

function Remote:work_dir()
  if not self.dir then self.dir = fs.tempdir("drover-worker-" .. self.run_id) end
  return self.dir
end

function Remote:sink(flow_hooks)
  if not self.reporter then
    local o = self.opts
    self.reporter = require("drover.reporter").new {
      client = self.client, run_id = self.run_id,
      first_seq = (self.info and self.info.run.event_seq or 0) + 1,
      heartbeat = o.heartbeat or (self.info and self.info.heartbeat), batch_size = o.batch_size,
      batch_delay = o.batch_delay, delivery_timeout = o.delivery_timeout,
      on_cancel = function() if flow_hooks.cancel then flow_hooks.cancel() end end,
      on_refused = function(msg) if flow_hooks.refused then flow_hooks.refused(msg) end end,
    }
  end
  return self.reporter
end

function Remote:fail(message)
  local sink = self:sink({})
  sink:set_flow_state(self.run_id, states.CRASHED, message)
  self:finish()
end

--- Deliver what is left.  Returns true, or false after saying (one line)
-- where the undelivered events are kept.
function Remote:finish()
  if self.dir then fs.remove(self.dir, { recursive = true }) end
  if not self.reporter then return true end
  local ok, spool, refused = self.reporter:close()
  if ok then return true end
  if spool and refused and refused:find("^the reporter failed") then
    io.stderr:write("drover worker: ", refused, "; the run's events are kept in ", spool,
      " (send them with: drover replay ", spool, ")\n")
  elseif spool and refused then
    io.stderr:write("drover worker: the server refused the run's reports (", refused, "); its events are kept in ",
      spool, " (send them with the server's token: drover replay ", spool, ")\n")
  elseif spool then
    io.stderr:write("drover worker: the server could not be reached; the run's events are kept in ",
      spool, " (send them with: drover replay ", spool, ")\n")
  elseif refused then
    io.stderr:write("drover worker: the server refused the run's reports: ", refused, "\n")
  end
  return false
end

-- ---- running the flow ---------------------------------------------------------------------------

--- The backend that runs `job`'s calls: the deployment's, configured as
-- deployed.  Raises one line naming the backend and where it looked.
function M.backend_of(job, home)
  local d = job.deployment
  local name = (d and d.backend) or job.run.backend or "local"
  local cfg = {}
  for k, v in pairs(d and d.backend_config ~= json.null and d.backend_config or {}) do cfg[k] = v end
  if home then cfg.home = home end
  local ok, o = pcall(require("drover.orchestrator").orchestrator, name, cfg)
  if not ok then error("cannot load backend '" .. name .. "' for run " .. job.run.id .. ": " .. tostring(o), 0) end
  return o
end

--- A worker's module search path: `first` (the bundle's entries), drover's
-- own library, then the absolute entries of `path` (LUA_PATH's or
-- LUA_CPATH's, and Lua's system directories).  Relative entries, such as
-- the default "./?.lua", are dropped: they name the directory the worker
-- was started in (where `drover run` was typed), and a module missing
-- from the bundle must fail to load, not come from there.  `pattern`
-- ("?.lua" for package.path) adds drover's library directory.
function M.search_path(first, path, pattern)
  local out, seen = {}, {}
  local function add(e)
    if not seen[e] then seen[e] = true; out[#out + 1] = e end
  end
  for _, e in ipairs(first) do add(e) end
  local ok, cfg = pcall(require, "drover.config")
  if pattern and ok and type(cfg) == "table" and cfg.lua_dir then
    add(cfg.lua_dir .. "/" .. pattern)
    add(cfg.lua_dir .. "/?/init.lua")
  end
  for e in path:gmatch("[^;]+") do
    if e:sub(1, 1) == "/" then add(e) end
  end
  return table.concat(out, ";")
end

--- Run the flow of `source` (M.direct or M.remote) with backend `o`;
-- returns the exit code (0 the flow COMPLETED, 1 it did not).
function M.run(o, source)
  local tracker = require "drover.tracker"
  local job = source:job()
  local r, p = job.run, job.package
  if states.final[r.state] then
    -- cancelled (or stopped) before this worker started: the run has
    -- ended, and running its flow now would leave work nobody tracks
    io.stderr:write("drover worker: run ", tostring(r.id), " is ", r.state, " already; its flow does not run\n")
    return 1
  end
  -- a cancel already under way (the run stays CANCELLING: Store:set_flow_state)
  local early = r.state == states.CANCELLING and (r.message or "cancel requested") or nil
  if not p then
    source:fail("package of deployment '" .. tostring(r.deployment) .. "' is missing")
    return 1
  end
  local dir = source:work_dir() .. "/bundle"
  fs.remove(dir, { recursive = true })
  fs.mkdir(dir)
  local ok, err = source:unpack(p, dir)
  if not ok then
    source:fail("bad package: " .. tostring(err))
    return 1
  end
  package.path = M.search_path({ dir .. "/src/?.lua", dir .. "/src/?/init.lua" }, package.path, "?.lua")
  package.cpath = M.search_path({}, package.cpath)
  local flow
  local hooks = {
    cancel = function() if flow then flow:cancel("cancelled") end end,
    refused = function() if flow then flow.scope:cancel() end end,
  }
  local sink = source:sink(hooks)
  o.worker_source = source -- for backends that run calls elsewhere (slurm resources)
  local began, berr = pcall(tracker.begin_flow, { id = r.id, name = r.name, store = sink, pid = drover.pid(),
    resumed_from = r.resumed_from })
  if not began then
    -- (e.g. a resume whose old run the server cannot give): end the run,
    -- deliver what the sink holds, and exit -- a live sink would keep
    -- sending heartbeats for a run nobody runs
    source:fail("the flow could not start: " .. tostring(berr))
    return 1
  end
  flow = berr
  -- drover cancel, stop and the dashboard record why (CANCELLING) before
  -- they signal: the run ends with that reason, not a generic one
  local function on_term() flow:cancel(source.cancel_reason and source:cancel_reason() or "stopped") end
  local s1 = drover.on_signal("TERM", on_term)
  local s2 = drover.on_signal("INT", on_term)
  -- a cancel recorded since the job was read, whose signal may have found
  -- no worker to reach: the flow starts cancelled
  early = early or (source.ended_before_start and source:ended_before_start())
  if early then flow:cancel(early) end
  local restore_print = tracker.capture_print()
  local params = r.params or {}
  local run_ok = flow:run(function()
    local mod = require(p.module)
    local cls = mod
    if p.class and type(mod) == "table" and type(mod[p.class]) == "table" then cls = mod[p.class] end
    if type(cls) ~= "table" then error("module '" .. p.module .. "' did not return a class", 0) end
    drover.decorate(cls, o)
    local obj = cls.new and cls:new(params) or cls
    local ep = obj[p.entrypoint]
    if type(ep) ~= "function" then error("class has no method '" .. tostring(p.entrypoint) .. "'", 0) end
    return ep(obj, params)
  end)
  restore_print()
  s1:stop(); s2:stop()
  source:finish()
  return run_ok and 0 or 1
end

return M
