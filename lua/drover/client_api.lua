--- The API v1 endpoints for clients (people and programs with the
-- server's token, or anyone on loopback): what `drover --api URL ...`
-- (lua/drover/remote.lua) uses to package, deploy, run and watch against a
-- remote server.  Handlers are thin: check the input, then call the store
-- or the deployment's backend exactly as the local command line does, so a
-- run created here runs the same way as one `drover run` starts locally.
--
--   POST /api/v1/packages?backend=&module=&class=&entrypoint=
--        body: the bundle (application/x-tar) the client built; header
--        x-drover-sha256: its digest (checked); header x-drover-config:
--        the backend config as JSON (optional).  The backend packages the
--        bundle's sources here, as `drover package` would.  -> 201 package
--   POST /api/v1/deployments                   {name, backend, package, params, schedule,
--                                               max_active, replace, config} -> 201
--   GET  /api/v1/deployments, /api/v1/deployments/NAME
--   POST /api/v1/deployments/NAME/runs         {params, config} -> 201 {id, url}
--   POST /api/v1/deployments/NAME/stop         {config} -> 202 {name, cancelling = [ids]}
--   GET  /api/v1/runs?state=&deployment=&limit=
--   GET  /api/v1/runs/ID[?refresh=1]           the run, task_runs, states; refresh=1 asks
--                                               its backend first (backend_error if it can't)
--   GET  /api/v1/runs/ID/task_runs?state=&name=&limit=&cursor=   a page of task runs (a big
--                                               run's /api/v1/runs/ID has a summary instead)
--   GET  /api/v1/runs/ID/logs?after=N          log lines with id > N (at most 10,000)
--   POST /api/v1/runs/ID/cancel                two-phase cancel (a full run id) -> 202
--
-- Reads reuse the dashboard's handlers in daemon.lua (one view of a run
-- for both).  A run's token gets 403 here: it may use its own run's worker
-- endpoints only.
local drover = require "drover"
local fs = require "drover.fs"
local json = require "drover.json"
local orchestrator = require "drover.orchestrator"
local server = require "drover.server"

local M = {}

--- Seconds a stop request waits for its backend before answering 202
-- (the stop goes on in the daemon; the client watches the runs end).
M.STOP_GRACE = 2

local function err(status, message) return server.json(status, { error = message }) end

--- A backend's error as one line, without the Lua position an error()
-- with a level puts in front of it.
local function one_line(e)
  local s = type(e) == "table" and tostring(e.message or e[1] or "error") or tostring(e)
  s = s:match("^[^\n]*"):gsub("^[^%s:]+%.lua:%d+: ", "")
  return s
end

local function body_object(req)
  if req.body == "" then return {} end
  local v, jerr = json.decode(req.body)
  if v == nil then return nil, "malformed JSON body: " .. tostring(jerr) end
  if type(v) ~= "table" or (next(v) ~= nil and v[1] ~= nil) then return nil, "the body must be a JSON object" end
  return v
end

--- An optional object field of a request: the table, or nil, message.
local function object_field(b, name)
  local v = b[name]
  if v == nil or v == json.null then return {} end
  if type(v) ~= "table" or (next(v) ~= nil and v[1] ~= nil) then return nil, name .. " must be a JSON object" end
  return v
end

--- A backend config a client sent: anything the command line's -c/--set
-- could say, except where the store is (the server's own).
local function client_config(c)
  if c.home ~= nil then return nil, "config key 'home' cannot be set through the API (the store is the server's)" end
  return c
end

--- The request's JSON object with its object fields `...` (absent: {}),
-- or nil and a message.
local function body_with(req, ...)
  local b, berr = body_object(req)
  if not b then return nil, berr end
  for _, name in ipairs { ... } do
    local v, ferr = object_field(b, name)
    if v and name == "config" then v, ferr = client_config(v) end
    if not v then return nil, ferr end
    b[name] = v
  end
  return b
end

--- The single value of query argument `name` (nil if absent), or false
-- when it was repeated or given without a value.
local function arg(req, name)
  local v = req.args[name]
  if v == nil then return nil end
  if type(v) ~= "string" then return false end
  return v
end

--- A backend instance on the daemon's store: `build()` is one of the
-- orchestrator loaders.  Returns it, or nil and the loader's message.
local function backend(daemon, build)
  local ok, o = pcall(build)
  if not ok then return nil, one_line(o) end
  o._store = daemon.store -- the daemon's connection, not one more per request
  return o
end

--- Run fn(...) as a daemon task (it outlives the request: a client that
-- hangs up does not stop it half-way); wait up to `grace` seconds for it.
-- Returns "done", value | "failed", message | "running".
local function background(daemon, grace, fn, ...)
  local args = table.pack(...)
  local t = drover.spawn(function() return fn(table.unpack(args, 1, args.n)) end)
  daemon.tasks[#daemon.tasks + 1] = t
  local deadline = drover.now() + grace
  while drover.now() < deadline do
    local s = t:status()
    if s == "done" or s == "failed" or s == "cancelled" then
      local ok, v = t:wait()
      if ok then return "done", v end
      return "failed", one_line(v)
    end
    drover.sleep(0.02)
  end
  return "running"
end

-- ---- handlers: (daemon, req, captures...) ---------------------------------------------------

local H = {}

function H.upload_package(daemon, req)
  local bk, module = arg(req, "backend"), arg(req, "module")
  local class, entry = arg(req, "class"), arg(req, "entrypoint")
  if bk == false or module == false or class == false or entry == false then
    return err(400, "backend, module, class and entrypoint may be given once each")
  end
  if not module or module == "" then return err(400, "module is required (?module=NAME)") end
  local want = req.headers["x-drover-sha256"]
  if type(want) ~= "string" or not want:match("^%x+$") or #want ~= 64 then
    return err(400, "the x-drover-sha256 header must carry the bundle's SHA-256 (64 hex digits)")
  end
  if req.body == "" then return err(400, "the request needs the bundle (a tar) as its body") end
  local got = fs.sha256_string(req.body)
  if got ~= want:lower() then
    return err(400, "the bundle's SHA-256 is " .. got .. ", not " .. want:lower() .. " (damaged in transit?)")
  end
  local config = {}
  if req.headers["x-drover-config"] then
    local c = json.decode(req.headers["x-drover-config"])
    if type(c) ~= "table" or (next(c) ~= nil and c[1] ~= nil) then
      return err(400, "the x-drover-config header must be a JSON object")
    end
    local cerr
    config, cerr = client_config(c)
    if not config then return err(400, cerr) end
  end
  local o, berr = backend(daemon, function()
    local cfg = { home = daemon.home }
    for k, v in pairs(config) do cfg[k] = v end
    return orchestrator.orchestrator(bk or "local", cfg)
  end)
  if not o then return err(400, berr) end
  local tmp, terr = fs.tempdir("drover-upload-")
  if not tmp then return err(500, "cannot unpack the bundle: " .. tostring(terr)) end
  -- the backend packages the bundle's sources, as `drover package --path` would
  local ok, p = pcall(function()
    local tar = tmp .. "/bundle.tar"
    assert(fs.write(tar, req.body))
    local _, uerr = fs.untar(tar, tmp .. "/x")
    if uerr then error("the bundle is not a valid tar: " .. tostring(uerr), 0) end
    if not fs.exists(tmp .. "/x/manifest.json") then error("the bundle has no manifest.json", 0) end
    return o:package(class, module, entry, { path = tmp .. "/x/src" })
  end)
  fs.remove(tmp, { recursive = true })
  if not ok then return err(400, one_line(p)) end
  return server.json(201, { id = p.id, sha256 = p.sha256, backend = p.backend, module = p.module,
    class = p.class, entrypoint = p.entrypoint, image = p.image })
end

function H.create_deployment(daemon, req)
  local b, berr = body_with(req, "config", "params")
  if not b then return err(400, berr) end
  if type(b.name) ~= "string" or b.name == "" then return err(400, "name is required") end
  if type(b.package) ~= "string" or b.package == "" then return err(400, "package is required (a package id)") end
  if b.backend ~= nil and type(b.backend) ~= "string" then return err(400, "backend must be a string") end
  if b.schedule ~= nil and type(b.schedule) ~= "string" then return err(400, "schedule must be a string") end
  if b.max_active ~= nil and math.type(b.max_active) ~= "integer" then
    return err(400, "max_active must be an integer")
  end
  if daemon.store:deployment(b.name) and b.replace ~= true then
    return err(409, "deployment '" .. b.name .. "' already exists; pass --replace to redeploy it")
  end
  local o, oerr = backend(daemon, function()
    local cfg = { home = daemon.home }
    for k, v in pairs(b.config) do cfg[k] = v end
    return orchestrator.orchestrator(b.backend or "local", cfg)
  end)
  if not o then return err(400, oerr) end
  local ok, d = pcall(o.deploy, o, b.name, { package = b.package, params = b.params, schedule = b.schedule,
    max_active = b.max_active, replace = b.replace == true })
  if not ok then return err(400, one_line(d)) end
  return server.json(201, d or { name = b.name })
end

--- The deployment's backend configured as deployed, plus the request's
-- config on top (as -c/--set do for `drover run`), on the daemon's store.
local function deployment_backend(daemon, name, config)
  local d = daemon.store:deployment(name)
  if not d then return nil, 404, "unknown deployment '" .. name .. "'" end
  local o, oerr = backend(daemon, function() return orchestrator.for_deployment(d, config, daemon.home) end)
  if not o then return nil, 502, "cannot load backend '" .. d.backend .. "': " .. oerr end
  return o
end

function H.create_run(daemon, req, name)
  local b, berr = body_with(req, "params", "config")
  if not b then return err(400, berr) end
  local o, status, oerr = deployment_backend(daemon, name, b.config)
  if not o then return err(status, oerr) end
  local ok, id, url = pcall(o.run, o, name, b.params)
  if not ok then return err(400, one_line(id)) end
  return server.json(201, { id = id, url = url })
end

function H.stop(daemon, req, name)
  local b, berr = body_with(req, "config")
  if not b then return err(400, berr) end
  local o, status, oerr = deployment_backend(daemon, name, b.config)
  if not o then return err(status, oerr) end
  local active = json.array()
  for _, r in ipairs(daemon.store:flow_runs { deployment = name, active = true, limit = 100000 }) do
    active[#active + 1] = r.id
  end
  local how, v = background(daemon, M.STOP_GRACE, o.stop, o, name, {})
  if how == "failed" then return err(502, "stop of '" .. name .. "' failed: " .. v) end
  if how == "done" then
    local ids = json.array()
    for i, id in ipairs(type(v) == "table" and v.cancelled or active) do ids[i] = id end
    return server.json(200, { name = name, cancelled = ids, done = true })
  end
  return server.json(202, { name = name, cancelling = active, done = false })
end

function H.run(daemon, req, id)
  local refresh = arg(req, "refresh")
  local note
  if refresh == "1" then
    local r = daemon:find(id)
    if not r then return err(404, "unknown run '" .. id .. "'") end
    -- as `drover status` does: the backend reconciles the store with what really runs
    local ok, serr = pcall(function()
      local o = assert(backend(daemon, function() return orchestrator.for_run(daemon.store, r) end))
      return o:status(r.id)
    end)
    if not ok then note = one_line(serr) end
  end
  local st, h, body = daemon:get_run(id, "GET")
  if note and st == 200 then
    local v = json.decode(body)
    v.backend_error = note
    return server.json(st, v, h)
  end
  return st, h, body
end

function H.cancel(daemon, _, id)
  -- state-changing: the full id, never a prefix
  if not daemon.store:flow_run(id) then return err(404, "unknown run '" .. id .. "' (a full run id is required)") end
  return daemon:cancel(id, "POST")
end

-- ---- routing ------------------------------------------------------------------------------------

local routes = {
  { "POST", "^/api/v1/packages$", H.upload_package },
  { "GET", "^/api/v1/deployments$", function(daemon) return daemon:get_deployments("GET") end },
  { "POST", "^/api/v1/deployments$", H.create_deployment },
  { "GET", "^/api/v1/deployments/([%w_%.%-]+)$",
    function(daemon, _, name) return daemon:get_deployment(name, "GET") end },
  { "POST", "^/api/v1/deployments/([%w_%.%-]+)/runs$", H.create_run },
  { "POST", "^/api/v1/deployments/([%w_%.%-]+)/stop$", H.stop },
  { "GET", "^/api/v1/runs$", function(daemon, req) return daemon:get_runs(req, "GET") end },
  { "GET", "^/api/v1/runs/(%x+)$", H.run },
  { "GET", "^/api/v1/runs/(%x+)/logs$", function(daemon, req, id) return daemon:get_logs(id, req, "GET") end },
  { "GET", "^/api/v1/runs/(%x+)/task_runs$",
    function(daemon, req, id) return daemon:get_task_runs(id, req, "GET") end },
  { "POST", "^/api/v1/runs/(%x+)/cancel$", H.cancel },
}

--- daemon: the Daemon (store, home, tasks, and the dashboard's handlers).
-- Returns status, headers, body, or nil when no client route matches.
function M.route(daemon, req, who)
  -- two routes may share a path (GET and POST /api/v1/deployments)
  local other
  for _, rt in ipairs(routes) do
    local caps = table.pack(req.path:match(rt[2]))
    if caps[1] then
      if req.method == rt[1] or (rt[1] == "GET" and req.method == "HEAD") then
        if who.run_id then return err(403, "forbidden: a run's token may use its run's worker endpoints only") end
        return rt[3](daemon, req, table.unpack(caps, 1, caps.n))
      end
      other = other and (other .. " or " .. rt[1]) or rt[1]
    end
  end
  if other then return err(405, "method not allowed: use " .. other) end
  return nil
end

return M
