--- What every backend inherits from BaseOrchestrator about deployments and
-- runs, over the store: deploy, status, logs, list, resume, stop, cancel,
-- and the helpers a backend's own `run` starts from.  A backend adds how
-- its work starts and is reached: `run`, `reap` (a run whose work died
-- without recording an end), and the cancel hooks `interrupt`,
-- `is_alive` and `kill_run`.  docs/backends.md shows it in use.
local fs = require "drover.fs"
local json = require "drover.json"
local states = require "drover.states"
local store_mod = require "drover.store"

local M = { methods = {} }
local B = M.methods

-- ---- the daemon and the drover binary, as facts (nothing is started here) -------------

--- The daemon.json of the live daemon serving store `home`, or nil.  The
-- CLI's `drover run` starts one; a backend only looks.
function M.daemon_serving(home)
  local text = fs.read(home .. "/daemon.json")
  local info = text and json.decode(text)
  if type(info) ~= "table" or math.type(info.pid) ~= "integer" or info.pid <= 0 then return nil end
  if not require("drover").kill(info.pid, 0) then return nil end
  return info
end

--- The drover binary to run (workers, `drover serve`): DROVER_BIN, this
-- program when it is drover, else the build or LuaRocks tree next to the
-- Lua library, else "drover" on PATH.
function M.drover_bin()
  local drover = require "drover"
  local env = os.getenv("DROVER_BIN")
  if env and env ~= "" then return env end
  local exe = drover.exepath()
  if exe and exe:match("/drover$") then return exe end
  local cfg_ok, cfg = pcall(require, "drover.config")
  local lua_dir = cfg_ok and type(cfg) == "table" and cfg.lua_dir
  if not lua_dir then lua_dir = debug.getinfo(1, "S").source:match("^@(.*)/drover/orchestrator/runs%.lua$") end
  if lua_dir then
    for _, cand in ipairs { lua_dir .. "/../build/drover", lua_dir .. "/../../../bin/drover" } do
      if fs.exists(cand) then return cand end
    end
  end
  return "drover"
end

--- The drover binary this backend's workers run (config key drover_bin,
-- when the backend declares it, else M.drover_bin()).
function B:drover_bin() return self.config.drover_bin or M.drover_bin() end

--- The URL of the daemon serving this store, or nil and why there is none
-- ("DROVER_DAEMON=0": asked for, nothing to explain).  Third value: the CA
-- file a worker verifies it with, when it serves HTTPS.
function B:daemon_url()
  if os.getenv("DROVER_DAEMON") == "0" then return nil, "DROVER_DAEMON=0" end
  local home = self:store().home
  local info = M.daemon_serving(home)
  if info and type(info.url) == "string" then return info.url, nil, info.ca_file end
  return nil, "no daemon serves " .. home .. " (drover run starts one; or drover serve)"
end

--- Where to watch run `id`: its page on the dashboard of `daemon` (a URL;
-- default: the daemon serving the store), or the worker's log file.
function B:run_url(id, daemon)
  daemon = daemon or self:daemon_url()
  if daemon then return daemon .. "/runs/" .. id end
  return "file://" .. self:store().home .. "/runs/" .. id .. "/worker.log"
end

-- ---- deployments -------------------------------------------------------------------------

--- deploy(name, opts): a deployment row of this backend, which keeps the
-- backend's config (saved_config) for later commands and the daemon.
-- opts: package (required), params, schedule, max_active, replace.
function B:deploy(name, opts)
  opts = opts or {}
  local who = tostring(self.backend_name) .. ".deploy"
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    error(who .. ": bad deployment name '" .. tostring(name) .. "' (letters, digits, _ . - only)", 2)
  end
  local store = self:store()
  if not opts.package then error(who .. ": a package id is required (drover package prints one)", 2) end
  local p = store:package(opts.package)
  if not p then error(who .. ": unknown package '" .. tostring(opts.package) .. "'", 2) end
  if opts.schedule ~= nil then
    -- the daemon's scheduler reads it back: refuse what it could not fire
    local ok_s, serr = require("drover.cron").parse(opts.schedule)
    if not ok_s then error(who .. ": " .. serr, 0) end
  end
  if opts.max_active ~= nil and (math.type(opts.max_active) ~= "integer" or opts.max_active < 1) then
    error(who .. ": bad max_active '" .. tostring(opts.max_active) .. "' (a positive integer expected)", 0)
  end
  -- a backend loaded from a file is kept by its path: later commands and
  -- the daemon load it the same way, without DROVER_PATH
  local ok, err = store:put_deployment({ name = name, backend = self.deployed_as or self.backend_name,
    package_id = p.id, params = opts.params, schedule = opts.schedule, max_active = opts.max_active,
    backend_config = self:saved_config() }, opts.replace)
  if not ok then error(err, 0) end
  return { name = name, package = p.id }
end

--- Deployment NAME's row; raises "unknown deployment 'NAME'" when there is none.
function B:deployment_of(name)
  local d = self:store():deployment(name)
  if not d then error("unknown deployment '" .. tostring(name) .. "'", 0) end
  return d
end

--- Deployment NAME, ready for a new run: raises one clear line if it is
-- unknown, another backend's, stopped, or already has max_active active
-- runs.  create_run starts here.
function B:runnable_deployment(name)
  local store = self:store()
  local d = self:deployment_of(name)
  if d.backend ~= self.backend_name and d.backend ~= self.deployed_as
      and require("drover.orchestrator").name_of(d.backend) ~= self.backend_name then
    error("deployment '" .. name .. "' belongs to backend '" .. d.backend .. "', not '" .. self.backend_name .. "'", 0)
  end
  if d.paused == 1 then
    error("deployment '" .. name .. "' is stopped; deploy it again (drover deploy --replace) to run it", 0)
  end
  if d.max_active then
    local active = #store:flow_runs { deployment = name, active = true, limit = 100000 }
    if active >= d.max_active then
      error("deployment '" .. name .. "' already has " .. active .. " active run(s) (max " .. d.max_active .. ")", 0)
    end
  end
  return d
end

-- ---- runs --------------------------------------------------------------------------------

--- The start of every `run`: checks the deployment (runnable_deployment),
-- merges `params` over its defaults and records the run PENDING, so that
-- status works from the first moment.  `url` is the run's URL, or a
-- function of the new id returning it (default: run_url).  opts: source,
-- resumed_from (resume passes them).  Returns the id, the URL and the
-- deployment row.  Every failure after this must end the run
-- (store:end_flow_run), or it stays PENDING forever.
function B:create_run(name, params, opts, url)
  opts = opts or {}
  if params ~= nil and type(params) ~= "table" then
    error(tostring(self.backend_name) .. ".run: bad argument 'params' (table expected, got " .. type(params) .. ")", 3)
  end
  local store = self:store()
  local d = self:runnable_deployment(name)
  local merged = store_mod.decode(d.params) or {}
  for k, v in pairs(params or {}) do merged[k] = v end
  local id = store_mod.new_id()
  if type(url) == "function" then url = url(id) end
  url = url or self:run_url(id)
  store:create_flow_run { id = id, name = name, deployment = name, backend = self.backend_name,
    state = states.PENDING, params = merged, source = opts.source or { kind = "deployment" },
    resumed_from = opts.resumed_from, url = url }
  return id, url, d
end

--- The store's record of run `run_id` (an id or a unique prefix of one);
-- raises "unknown run 'ID'" when there is none.
function B:find_run(run_id)
  local r = self:store():find_flow_run(run_id)
  if not r then error("unknown run '" .. tostring(run_id) .. "'", 0) end
  return r
end

--- A new run of run `run_id`'s deployment with its parameters (its
-- deployment unpaused): resume(id) -> id, url.
function B:resume(run_id)
  local store = self:store()
  local r = self:find_run(run_id)
  local d = store:deployment(r.deployment)
  if d and d.paused == 1 then store:set_paused(d.name, false) end
  return self:run(r.deployment, store_mod.decode(r.params) or {}, { resumed_from = r.id })
end

--- The reaper hook: run `r` (a store row) brought in line with its work --
-- a run still active whose work died without recording an end becomes
-- CRASHED (store:end_flow_run).  Returns the fresh row.  The default
-- changes nothing.
function B:reap(r) return r end

function B:status(run_id)
  local r = self:reap(self:find_run(run_id))
  r.task_runs = self:store():task_runs(r.id)
  return r
end

function B:logs(run_id, opts)
  local r = self:find_run(run_id)
  local lines = {}
  for _, l in ipairs(self:store():logs(r.id, opts and opts.after or 0)) do lines[#lines + 1] = l.line end
  return lines
end

--- This backend's runs (opts.deployment: one deployment's), each reaped.
function B:list(opts)
  local runs = self:store():flow_runs { backend = self.backend_name, deployment = opts and opts.deployment, limit = 1000 }
  for i, r in ipairs(runs) do runs[i] = self:reap(r) end
  return runs
end

-- ---- stop and cancel -----------------------------------------------------------------------

--- Run `run_id`, brought in line with what really runs (self:status: the
-- backend's reap), if it can still be cancelled; else one line saying
-- what state it is in.  Every backend's cancel starts here.
function B:cancellable_run(run_id)
  local r = self:status(run_id)
  if not states.active[r.state] then
    error("run " .. r.id .. " is " .. tostring(r.state) .. ": only active runs can be cancelled", 0)
  end
  return r
end

--- Two-phase cancel of active runs `runs`, for stop (all of a deployment's)
-- and cancel (one): CANCELLING at once with `requested` (the reason the
-- worker ends its flow with: recorded before the signal), every run
-- interrupted; then, run by run, wait up to stop_timeout for its work to
-- end (killed after that) and record CANCELLED with `why` (the worker
-- records it itself when it can; an end it recorded first is kept).
-- Returns the run ids.
function B:cancel_runs(runs, why, requested)
  local drover = require "drover"
  local store = self:store()
  for i, r in ipairs(runs) do
    if r.state ~= states.CANCELLING then store:set_flow_state(r.id, states.CANCELLING, requested) end
    -- read again after CANCELLING is recorded: a worker that recorded its
    -- pid meanwhile is signalled, and one that records it later finds
    -- CANCELLING (worker.lua), so the two can never miss each other
    local fresh = store:flow_run(r.id)
    if fresh then r = fresh; runs[i] = fresh end
    self:interrupt(r)
  end
  local timeout = self.config.stop_timeout or 20
  local ids = {}
  for _, r in ipairs(runs) do
    local deadline = drover.now() + timeout
    while self:is_alive(r) and drover.now() < deadline do drover.sleep(0.05) end
    if self:is_alive(r) then self:kill_run(r) end
    store:end_flow_run(r.id, states.CANCELLED, why)
    ids[#ids + 1] = r.id
  end
  return ids
end

--- The first step of every stop: deployment NAME (or "unknown
-- deployment") paused, so nothing starts it again; returns its active runs.
function B:pause_deployment(name)
  local store = self:store()
  self:deployment_of(name)
  store:set_paused(name, true)
  return store:flow_runs { deployment = name, active = true, limit = 100000 }
end

--- stop(name): pause the deployment and cancel its active runs.
function B:stop(name, _opts)
  return { name = name, cancelled = self:cancel_runs(self:pause_deployment(name), "stopped", "stop requested") }
end

--- cancel(run_id): cancel one active run (the deployment stays active);
-- returns its record once the run has really ended.
function B:cancel(run_id)
  local r = self:cancellable_run(run_id)
  self:cancel_runs({ r }, "cancelled", "cancel requested")
  return self:store():flow_run(r.id)
end

return M
