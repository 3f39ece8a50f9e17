--- BaseOrchestrator: lolpop's orchestrator contract as a Lua class, and the
-- loader that finds backends by name.
--
-- A backend is a file backends/NAME.lua returning a subclass:
--
--   local drover = require "drover"
--   local B = drover.BaseOrchestrator:extend("mybackend")
--   B.backend_name = "mybackend"
--   B.config_keys = { queue = "string" }      -- the config it accepts
--   function B:run(deployment_name, params) ... return id, url end
--   return B
--
-- The five lolpop operations keep their names, arguments and meaning:
-- decorator(func, cls), package(class, module, entrypoint, opts),
-- deploy(deployment_name, opts), run(deployment_name, params) -> id, url,
-- stop(deployment_name, opts).  drover adds cancel(run_id) (one run,
-- two-phase; the deployment stays active), status(run_id), logs(run_id,
-- opts) and list().  Everything but `run` is inherited, over the store
-- (drover/orchestrator/runs.lua, drover/orchestrator/bundle.lua): a backend
-- adds `run`, `reap` and the cancel hooks `interrupt`, `is_alive` and
-- `kill_run`.  An operation or hook a backend leaves out raises
-- "backend 'NAME' does not implement OP".
local class = require "drover.class"
local tracker = require "drover.tracker"
local store_mod = require "drover.store"
local config_check = require "drover.orchestrator.config"

local M = {}

local Base = class("BaseOrchestrator")
M.BaseOrchestrator = Base

--- Config keys every backend accepts, with their types.
Base.common_config_keys = {
  home = "string",            -- the store directory (DROVER_HOME)
  flow_types = "table",       -- integration types whose methods become flow runs
  task_types = "table",       -- ... and task runs
  limits = "table",           -- tag -> max concurrent task runs
  task_options = "table",     -- default task options for every decorated call
}
Base.config_keys = {}
--- Config keys never written to the store (a deployment keeps the rest of
-- its backend's config); a backend adds its own secrets here.
Base.secret_config_keys = { token = true }

function Base:init(config)
  config = config or {}
  if type(config) ~= "table" then
    error("drover.orchestrator: config for backend '" .. self.name .. "' must be a table, got " .. type(config), 3)
  end
  local err = config_check.check(config, self.config_keys, Base.common_config_keys)
  if err then error("backend '" .. self.name .. "': " .. err, 3) end
  self.config = config
  self.flow_types = {}
  for _, t in ipairs(config.flow_types or { "runner", "pipeline" }) do self.flow_types[t] = true end
  self.task_types = {}
  for _, t in ipairs(config.task_types or { "component" }) do self.task_types[t] = true end
  if config.limits then
    for tag, n in pairs(config.limits) do tracker.set_limit(tag, n) end
  end
  if config.task_options then tracker.check_options(config.task_options, "backend '" .. self.name .. "'") end
end

--- The tracking store this orchestrator writes to (opened on first use).
function Base:store()
  if not self._store then
    if self.config.home then
      local s, err = store_mod.open(self.config.home)
      if not s then error(err, 0) end
      self._store = s
    else
      self._store = tracker.default_store()
    end
  end
  return self._store
end

--- The config to keep with a deployment: this orchestrator's config minus
-- `home` (the store is where it is kept) and the secret keys, so that
-- later commands (run, stop, status, the daemon) reach the backend the way
-- deploy did without being told again.  Secrets come back from the
-- caller's own config, or from token files and commands.
function Base:saved_config()
  local out, secret = {}, self.secret_config_keys or Base.secret_config_keys
  for k, v in pairs(self.config) do
    if k ~= "home" and not secret[k] and not Base.secret_config_keys[k] then out[k] = v end
  end
  return next(out) and out or nil
end

local function unimplemented(op)
  return function(self)
    error("backend '" .. tostring(self.name) .. "' does not implement " .. op, 2)
  end
end
-- what every backend does its own way: start a run, and reach its work
-- (stop and cancel: interrupt it, watch it end, kill it if it will not)
for _, op in ipairs { "run", "interrupt", "kill_run" } do
  Base[op] = unimplemented(op)
end

--- The liveness hook: is the work of run `r` (a store row) still going,
-- as far as this backend can tell?  true or false; nil when it cannot say
-- (the default).  The server asks it before it ends a run whose worker
-- stopped sending heartbeats, stop and cancel wait on it, and the
-- conformance kit uses it to see that a cancelled run's work has really
-- ended, wherever the work runs.
function Base:is_alive(_run) return nil end

-- package (the bundle `drover worker` unpacks), deploy, status, logs,
-- list, resume, stop, cancel and the helpers they share
for _, mixin in ipairs { "drover.orchestrator.bundle", "drover.orchestrator.runs" } do
  for k, f in pairs(require(mixin).methods) do Base[k] = f end
end

--- Is a method of a class of this integration type a flow or a task run?
function Base:kind_of(cls)
  local t = cls and rawget(cls, "integration_type")
  if t == nil and cls then t = cls.integration_type end
  if t and self.flow_types[t] then return "flow" end
  return "task"
end

--- lolpop's decorator(func, cls): func wrapped so each call is tracked.
-- drover passes the method name as a third argument when it knows it
-- (drover.decorate does); options come from the backend's task_options,
-- the class's task_options["*"] and task_options[name].
function Base:decorator(func, cls, name)
  if type(func) ~= "function" then
    error("decorator: bad argument 'func' (function expected, got " .. type(func) .. ")", 2)
  end
  local cname = cls and (rawget(cls, "__name") or cls.__name) or nil
  local full = (cname and (cname .. ".") or "") .. (name or "call")
  local opts = {}
  local function merge(src, where)
    if src then
      tracker.check_options(src, where)
      for k, v in pairs(src) do opts[k] = v end
    end
  end
  merge(self.config.task_options, "backend '" .. self.name .. "' task_options")
  local per_class = cls and cls.task_options
  if per_class then
    merge(per_class["*"], full)
    if name then merge(per_class[name], full) end
  end
  local spec = { name = opts.name or full, kind = opts.kind or self:kind_of(cls), opts = opts,
    method = cls ~= nil }
  return function(...) return tracker.call(spec, func, ...) end
end

-- ---- decorating whole classes --------------------------------------------------

local skip = { init = true, new = true, extend = true, is_a = true, super = true }
local wrapped = setmetatable({}, { __mode = "k" })

--- Apply orchestrator:decorator to every public method of cls (and the
-- methods it inherits), as lolpop's decorate_class does.  Returns cls.
function M.decorate(cls, orchestrator)
  if type(cls) ~= "table" then
    error("drover.decorate: bad argument 'cls' (class expected, got " .. type(cls) .. ")", 2)
  end
  if type(orchestrator) ~= "table" or type(orchestrator.decorator) ~= "function" then
    error("drover.decorate: bad argument 'orchestrator' (orchestrator expected, got " ..
      type(orchestrator) .. ")", 2)
  end
  local seen = {}
  local c = cls
  while type(c) == "table" do
    for k, v in pairs(c) do
      if type(k) == "string" and type(v) == "function" and not seen[k] and not skip[k]
          and not k:find("^_") and not wrapped[v] then
        seen[k] = true
        local w = orchestrator:decorator(v, cls, k)
        wrapped[w] = true
        rawset(cls, k, w)
      end
    end
    c = rawget(c, "super")
  end
  return cls
end

-- ---- loading backends by name ------------------------------------------------------

--- Directories searched for backends, in order.
function M.backend_dirs()
  local dirs = {}
  local ok, cfg = pcall(require, "drover.config")
  if ok and type(cfg) == "table" then
    if cfg.backends_dir then dirs[#dirs + 1] = cfg.backends_dir end
  end
  local root = os.getenv("DROVER_ROOT")
  if root and root ~= "" then dirs[#dirs + 1] = root .. "/backends" end
  local function add_path(p)
    if p then for d in p:gmatch("[^:]+") do dirs[#dirs + 1] = d end end
  end
  add_path(os.getenv("DROVER_PATH"))
  if ok and type(cfg) == "table" then add_path(cfg.path) end
  dirs[#dirs + 1] = "./backends"
  -- stock lua5.4: the backends next to the Lua library this file came from
  local src = debug.getinfo(1, "S").source:match("^@(.*)/drover/orchestrator%.lua$")
  if src then
    dirs[#dirs + 1] = src .. "/../backends"
    dirs[#dirs + 1] = src .. "/drover/backends" -- a LuaRocks tree (rockspec/)
  end
  local out, dup = {}, {}
  for _, d in ipairs(dirs) do if not dup[d] then dup[d] = true; out[#out + 1] = d end end
  return out
end

local loaded = {}

--- Is backend reference `name` a path to a file (not a name to look up)?
local function is_path(name) return name:find("/") ~= nil or name:find("%.lua$") ~= nil end

--- Load backend class NAME (or a path to a .lua file).
function M.backend_class(name)
  if type(name) ~= "string" or name == "" then
    error("drover.orchestrator: bad argument 'name' (backend name expected, got " .. type(name) .. ")", 3)
  end
  if loaded[name] then return loaded[name] end
  local path
  if is_path(name) then
    path = name
  else
    if not name:match("^[%w_%-]+$") then
      error("drover.orchestrator: bad backend name '" .. name .. "'", 3)
    end
    for _, d in ipairs(M.backend_dirs()) do
      local p = d .. "/" .. name .. ".lua"
      local f = io.open(p, "r")
      if f then f:close(); path = p; break end
    end
    if not path then
      error("unknown backend '" .. name .. "' (looked in " .. table.concat(M.backend_dirs(), ", ") .. ")", 3)
    end
  end
  local chunk, err = loadfile(path)
  if not chunk then error("backend '" .. name .. "': " .. err, 3) end
  local ok, cls = pcall(chunk)
  if not ok then error("backend '" .. name .. "': " .. tostring(cls), 3) end
  if type(cls) ~= "table" or not (cls == Base or Base.is_a(setmetatable({}, cls), Base)) then
    error("backend '" .. name .. "' (" .. path .. ") must return a subclass of drover.BaseOrchestrator", 3)
  end
  cls.backend_path = path
  loaded[name] = cls
  return cls
end

--- The backend name of reference `ref` (a name, or a path to a backend's
-- file: the name its class declares, else the file's).
function M.name_of(ref)
  if type(ref) ~= "string" or not is_path(ref) then return ref end
  local ok, cls = pcall(M.backend_class, ref)
  return ok and rawget(cls, "backend_name") or ref:match("([%w_%-]+)%.lua$") or ref
end

--- drover.orchestrator(name, config) -> a backend instance.  `name` may be a
-- path to the backend's file: its deployments then keep the absolute path
-- (o.deployed_as), so that later commands find it without DROVER_PATH.
function M.orchestrator(name, config)
  local cls = M.backend_class(name)
  local o = setmetatable({ name = rawget(cls, "backend_name") or (name:match("([%w_%-]+)%.lua$") or name) }, cls)
  if o.backend_name == nil then o.backend_name = o.name end
  if is_path(name) then
    o.deployed_as = name:sub(1, 1) == "/" and name or (require("drover.core").cwd() .. "/" .. name)
  end
  o:init(config)
  return o
end

--- The backend of deployment row `d` (from store:deployment), configured
-- as it was deployed, with `overrides` (the caller's config) on top.
local function merged_config(kept, overrides, home)
  local cfg = {}
  for k, v in pairs(kept or {}) do cfg[k] = v end
  for k, v in pairs(overrides or {}) do cfg[k] = v end
  if home and cfg.home == nil then cfg.home = home end
  return cfg
end

function M.for_deployment(d, overrides, home)
  return M.orchestrator(d.backend, merged_config(store_mod.decode(d.backend_config), overrides, home))
end

--- The backend of flow run `run`: its deployment's, when it has one
-- (kept by name, or by path: then the run's backend is the name).
function M.for_run(store, run, overrides)
  local d = run.deployment and store:deployment(run.deployment)
  if d and (d.backend == run.backend or M.name_of(d.backend) == run.backend) then
    return M.for_deployment(d, overrides, store.home)
  end
  return M.orchestrator(run.backend, merged_config(nil, overrides, store.home))
end

--- Names of the backends found, with their paths.
function M.available()
  local out, seen = {}, {}
  for _, d in ipairs(M.backend_dirs()) do
    local names = require("drover.fs").list(d) or {}
    table.sort(names)
    for _, f in ipairs(names) do
      local n = f:match("^([%w_%-]+)%.lua$")
      if n and not seen[n] then seen[n] = true; out[#out + 1] = { name = n, path = d .. "/" .. n .. ".lua" } end
    end
  end
  table.sort(out, function(a, b) return a.name < b.name end)
  return out
end

return M
