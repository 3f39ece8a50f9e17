--- The `local` backend: drover's embedded default.  Runs each flow run in a
-- detached, supervised worker process on this machine, tracked in the
-- store under DROVER_HOME.
--
--   package  a content-addressed bundle: a deterministic tar of the workflow
--            module and the project Lua files it requires, plus manifest.json
--   deploy   a name, a package, default parameters, an optional schedule and
--            limit on concurrent runs
--   run      a worker process (`drover worker RUN_ID`) in its own process
--            group, outliving the terminal; returns id, url
--   stop     cancels the deployment's active runs (CANCELLING, the worker's
--            process group ends, CANCELLED) and pauses the deployment
--   cancel   the same for one run; the deployment stays active
local drover = require "drover"
local fs = require "drover.fs"
local states = require "drover.states"
local store_mod = require "drover.store"

local Local = drover.BaseOrchestrator:extend("local")
Local.backend_name = "local"
Local.config_keys = {
  drover_bin = "string",   -- the drover binary workers run (default: found automatically)
  stop_timeout = "number", -- seconds stop waits for a worker to end before SIGKILL
}

-- ---- package ---------------------------------------------------------------------

local function module_file(root, module)
  local rel = module:gsub("%.", "/")
  for _, cand in ipairs { rel .. ".lua", rel .. "/init.lua" } do
    if fs.exists(root .. "/" .. cand) then return cand end
  end
end

--- The module's file and every project file it requires, transitively
-- (found by reading `require "x"` calls: modules outside the project, such
-- as drover itself, are left to the worker's own path).
local function collect(root, module)
  local files, seen, todo = {}, {}, { module }
  while #todo > 0 do
    local m = table.remove(todo)
    local rel = module_file(root, m)
    if rel and not seen[rel] then
      seen[rel] = true
      files[#files + 1] = rel
      local src = assert(fs.read(root .. "/" .. rel))
      for dep in src:gmatch("require%s*%(?%s*[\"']([%w_%.%-]+)[\"']") do todo[#todo + 1] = dep end
    end
  end
  table.sort(files)
  return files
end

function Local:package(class_name, module, entrypoint, opts)
  opts = opts or {}
  if type(module) ~= "string" or module == "" then
    error("local.package: bad argument 'module' (Lua module name expected, got " .. type(module) .. ")", 2)
  end
  local root = opts.path or "."
  local first = module_file(root, module)
  if not first then
    error("local.package: module '" .. module .. "' not found under " .. root, 2)
  end
  local files = collect(root, module)
  local manifest = { module = module, class = class_name, entrypoint = entrypoint or "run",
    drover_version = drover.version, files = {} }
  local entries = {}
  for _, rel in ipairs(files) do
    manifest.files[rel] = fs.sha256(root .. "/" .. rel)
    entries[#entries + 1] = { name = "src/" .. rel, path = root .. "/" .. rel }
  end
  entries[#entries + 1] = { name = "manifest.json", data = require("drover.tracker").canonical(manifest) }
  local store = self:store()
  local dir = store.home .. "/packages"
  fs.mkdir(dir)
  local tmp = dir .. "/.pkg-" .. store_mod.new_id() .. ".tar"
  local ok, err = fs.tar(tmp, entries)
  if not ok then error("local.package: " .. tostring(err), 2) end
  local sha = fs.sha256(tmp)
  local location = dir .. "/" .. sha .. ".tar"
  assert(fs.rename(tmp, location))
  local p = { id = sha, sha256 = sha, backend = "local", class = class_name, module = module,
    entrypoint = manifest.entrypoint, location = location, manifest = manifest }
  store:put_package(p)
  return p
end

-- ---- deploy ------------------------------------------------------------------------

function Local:deploy(name, opts)
  opts = opts or {}
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    error(self.backend_name .. ".deploy: bad deployment name '" .. tostring(name) .. "' (letters, digits, _ . - only)", 2)
  end
  local store = self:store()
  if not opts.package then error(self.backend_name .. ".deploy: a package id is required (drover package prints one)", 2) end
  local p = store:package(opts.package)
  if not p then error(self.backend_name .. ".deploy: unknown package '" .. tostring(opts.package) .. "'", 2) end
  if opts.schedule ~= nil then
    -- the daemon's scheduler reads it back: refuse what it could not fire
    local ok_s, serr = require("drover.cron").parse(opts.schedule)
    if not ok_s then error(self.backend_name .. ".deploy: " .. serr, 0) end
  end
  if opts.max_active ~= nil and (math.type(opts.max_active) ~= "integer" or opts.max_active < 1) then
    error(self.backend_name .. ".deploy: bad max_active '" .. tostring(opts.max_active) .. "' (a positive integer expected)", 0)
  end
  local ok, err = store:put_deployment({ name = name, backend = self.backend_name, package_id = p.id,
    params = opts.params, schedule = opts.schedule, max_active = opts.max_active,
    backend_config = self:saved_config() }, opts.replace)
  if not ok then error(err, 0) end
  return { name = name, package = p.id }
end

-- ---- run -------------------------------------------------------------------------------

--- The drover binary workers run.
function Local:drover_bin()
  if self.config.drover_bin then return self.config.drover_bin end
  local env = os.getenv("DROVER_BIN")
  if env and env ~= "" then return env end
  local exe = drover.exepath()
  if exe and exe:match("/drover$") then return exe end
  local cfg_ok, cfg = pcall(require, "drover.config")
  local lua_dir = cfg_ok and type(cfg) == "table" and cfg.lua_dir
  if not lua_dir then
    lua_dir = debug.getinfo(1, "S").source:match("^@(.*)/backends/local%.lua$")
    lua_dir = lua_dir and (lua_dir .. "/lua")
  end
  if lua_dir then
    for _, cand in ipairs { lua_dir .. "/../build/drover", lua_dir .. "/../../../bin/drover" } do
      if fs.exists(cand) then return cand end
    end
  end
  return "drover"
end

--- The URL of the daemon serving this store (started here, detached, if
-- none runs: `drover serve --port 0 --auto`), or nil and why there is none
-- (DROVER_DAEMON=0, or it did not start in time).  Third value: the CA
-- file a worker verifies it with, when it serves HTTPS.
function Local:daemon_url()
  local home = self:store().home
  if os.getenv("DROVER_DAEMON") == "0" then return nil, "DROVER_DAEMON=0" end
  local ok, url, ca_file = pcall(function()
    local daemon = require "drover.daemon"
    local info = daemon.running(home)
    if not info then
      local p = drover.proc.spawn({ self:drover_bin(), "serve", "--port", "0", "--auto" }, {
        detach = true, stdin = "", stdout = home .. "/daemon.log", stderr = home .. "/daemon.log",
        env = { DROVER_HOME = home },
      })
      if not p then return nil end
      local deadline = drover.now() + (tonumber(os.getenv("DROVER_DAEMON_TIMEOUT") or "") or 10)
      repeat
        drover.sleep(0.02)
        info = daemon.running(home)
      until info or drover.now() > deadline or not p:is_running()
      info = info or daemon.running(home)
    end
    if info and type(info.url) == "string" then return info.url, info.ca_file end
    return nil
  end)
  if ok and url then return url, nil, ca_file end
  return nil, "no daemon started for " .. home .. (ok and "" or (": " .. tostring(url)))
end

--- Where to watch run `id`: its page on the daemon's dashboard, or the
-- worker's log file when no daemon can be had.  Never fails the run.
function Local:run_url(id, daemon)
  if daemon then return daemon .. "/runs/" .. id end
  return "file://" .. self:store().home .. "/runs/" .. id .. "/worker.log"
end

--- Deployment NAME's row; raises "unknown deployment 'NAME'" when there is none.
function Local:deployment_of(name)
  local d = self:store():deployment(name)
  if not d then error("unknown deployment '" .. tostring(name) .. "'", 0) end
  return d
end

--- Run `run_id`, brought in line with what really runs (self:status: the
-- backend's reap or reconcile), if it can still be cancelled; else one line
-- saying what state it is in.  Every backend's cancel starts here.
function Local:cancellable_run(run_id)
  local r = self:status(run_id)
  if not states.active[r.state] then
    error("run " .. r.id .. " is " .. tostring(r.state) .. ": only active runs can be cancelled", 0)
  end
  return r
end

--- Deployment NAME, ready for a new run: raises one clear line if it is
-- unknown, stopped, or already has max_active active runs.  Every
-- backend's run starts here.
function Local:runnable_deployment(name)
  local store = self:store()
  local d = self:deployment_of(name)
  if d.backend ~= self.backend_name then
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

function Local:run(name, params, opts)
  opts = opts or {}
  if params ~= nil and type(params) ~= "table" then
    error("local.run: bad argument 'params' (table expected, got " .. type(params) .. ")", 2)
  end
  local store = self:store()
  local d = self:runnable_deployment(name)
  local merged = store_mod.decode(d.params) or {}
  for k, v in pairs(params or {}) do merged[k] = v end
  local id = store_mod.new_id()
  local dir = store.home .. "/runs/" .. id
  fs.mkdir(dir)
  -- a daemon serves the store: the worker reports to it over HTTP (the
  -- same path as a worker on another host), with a token of its own run
  local api, why, ca_file = self:daemon_url()
  local url = self:run_url(id, api)
  store:create_flow_run { id = id, name = name, deployment = name, backend = "local",
    state = states.PENDING, params = merged, source = opts.source or { kind = "deployment" },
    resumed_from = opts.resumed_from, url = url }
  local argv, env = { self:drover_bin(), "worker", id }, { DROVER_HOME = store.home }
  if api then
    argv[#argv + 1] = "--api"
    argv[#argv + 1] = api
    env = { DROVER_HOME = false, DROVER_RUN_TOKEN = require("drover.run_token").issue(store, id),
      DROVER_SPOOL_DIR = dir .. "/spool", DROVER_CA_FILE = ca_file }
  elseif why ~= "DROVER_DAEMON=0" then -- (asked for: nothing to explain)
    store:log(id, nil, "info", "the worker writes the store directly: " .. why)
  end
  local proc, err = drover.proc.spawn(argv, {
    detach = true, stdin = "", stdout = dir .. "/worker.log", stderr = dir .. "/worker.log", env = env,
  })
  if not proc then
    store:set_flow_state(id, states.CRASHED, "worker did not start: " .. tostring(err))
    error("local.run: " .. tostring(err), 0)
  end
  store:update_flow_run(id, { pid = proc.pid })
  return id, url
end

--- The store's record of run `run_id` (an id or a unique prefix of one);
-- raises "unknown run 'ID'" when there is none.
function Local:find_run(run_id)
  local r = self:store():find_flow_run(run_id)
  if not r then error("unknown run '" .. tostring(run_id) .. "'", 0) end
  return r
end

function Local:resume(run_id)
  local store = self:store()
  local r = self:find_run(run_id)
  local d = store:deployment(r.deployment)
  if d and d.paused == 1 then store:set_paused(d.name, false) end
  return self:run(r.deployment, store_mod.decode(r.params) or {}, { resumed_from = r.id })
end

-- ---- status, logs, list, and the reaper -------------------------------------------------

--- A run whose worker died without recording an end becomes CRASHED.
function Local:reap(run)
  if run and states.active[run.state] and run.pid and run.backend == "local" then
    if not drover.kill(math.tointeger(run.pid), 0) then
      local store = self:store()
      local fresh = store:flow_run(run.id)
      if states.active[fresh.state] then
        store:end_flow_run(run.id, states.CRASHED, "worker process " .. run.pid .. " died")
      end
      return store:flow_run(run.id)
    end
  end
  return run
end

function Local:status(run_id)
  local store = self:store()
  local r = self:find_run(run_id)
  r = self:reap(r)
  r.task_runs = store:task_runs(r.id)
  return r
end

function Local:logs(run_id, opts)
  local store = self:store()
  local r = self:find_run(run_id)
  local lines = {}
  for _, l in ipairs(store:logs(r.id, opts and opts.after or 0)) do lines[#lines + 1] = l.line end
  return lines
end

function Local:list(opts)
  local runs = self:store():flow_runs { backend = self.backend_name, deployment = opts and opts.deployment, limit = 1000 }
  for i, r in ipairs(runs) do runs[i] = self:reap(r) end
  return runs
end

-- ---- stop -------------------------------------------------------------------------------

--- How this backend reaches a run's work (tmux overrides these): TERM to
-- the worker's process group lets it cancel its flow run and end the
-- groups it started; KILL when it will not end.
function Local:interrupt(r) if r.pid then drover.kill(-math.tointeger(r.pid), "TERM") end end
function Local:is_alive(r) return r.pid ~= nil and drover.kill(-math.tointeger(r.pid), 0) == true end
function Local:kill_run(r) if r.pid then drover.kill(-math.tointeger(r.pid), "KILL") end end

--- Two-phase cancel of active runs `runs`, for stop (all of a deployment's)
-- and cancel (one): CANCELLING at once and every run interrupted, then, run
-- by run, wait up to stop_timeout for its work to end (killed after that)
-- and record CANCELLED with `why` (the worker records it itself when it
-- can; an end it recorded first is kept).  Returns the run ids.
function Local:cancel_runs(runs, why, requested)
  local store = self:store()
  for _, r in ipairs(runs) do
    if r.state ~= states.CANCELLING then store:set_flow_state(r.id, states.CANCELLING, requested) end
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

function Local:stop(name, _opts)
  local store = self:store()
  self:deployment_of(name)
  store:set_paused(name, true)
  local runs = store:flow_runs { deployment = name, active = true, limit = 100000 }
  return { name = name, cancelled = self:cancel_runs(runs, "stopped", "stop requested") }
end

--- Cancel one active run (the deployment stays active); returns its record
-- once the run has really ended.
function Local:cancel(run_id)
  local r = self:cancellable_run(run_id)
  self:cancel_runs({ r }, "cancelled", "cancel requested")
  return self:store():flow_run(r.id)
end

-- ---- the worker side --------------------------------------------------------------------

--- Runs inside `drover worker RUN_ID` in shared-filesystem mode (the store
-- under DROVER_HOME); `drover worker --api` runs drover.worker's remote
-- source instead.  Returns the exit code.
function Local:work(run_id)
  local worker = require "drover.worker"
  return worker.run(self, worker.direct(self:store(), run_id))
end

return Local
