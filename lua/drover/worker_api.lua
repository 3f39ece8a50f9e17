--- The server's side of the worker protocol (docs/protocol.md): the
-- endpoints a worker started anywhere uses to fetch its run and package
-- and to report events, heartbeats and the results of remote calls.
-- Handlers are thin: check the input, call the store, encode.
--
--   GET  /api/v1/runs/ID/worker              the run, its deployment, package, heartbeat interval
--   POST /api/v1/runs/ID/events              a batch {first_seq, [last_seq], events}
--   GET  /api/v1/runs/ID/reusable            COMPLETED task runs of the run it resumes
--   POST /api/v1/runs/ID/calls               a remote call {task_run_id, spec} -> {id}
--   GET  /api/v1/runs/ID/calls/CALL          the call, with its result once recorded
--   POST /api/v1/runs/ID/calls/CALL/result   {ok, result | error, node, job}
--   GET  /api/v1/packages/SHA/bundle         the package's bundle (a tar)
--   GET  /api/v1/cache?name=&key=            a cached result, or null
--
-- A run's token may use these for its own run only (403 for another's);
-- the server's token (or none, on loopback) may use them for any run, as
-- `drover replay` does.
local event_batch = require "drover.event_batch"
local fs = require "drover.fs"
local json = require "drover.json"
local server = require "drover.server"
local states = require "drover.states"
local store_mod = require "drover.store"

local M = {}

local function err(status, message, extra)
  local body = { error = message }
  for k, v in pairs(extra or {}) do body[k] = v end
  return server.json(status, body)
end

local function decode(text)
  local v = text and json.decode(text)
  if v == nil or v == json.null then return nil end
  return v
end

local function body_object(req)
  if req.body == "" then return nil, "the request needs a JSON body" end
  local v, jerr = json.decode(req.body)
  if v == nil then return nil, "malformed JSON body: " .. tostring(jerr) end
  if type(v) ~= "table" then return nil, "the body must be a JSON object" end
  return v
end

-- ---- handlers: each gets (api, req, principal, captures...) ----------------------------------

local H = {}

function H.worker(api, _, _, id)
  local store = api.store
  local r = store:flow_run(id)
  if not r then return err(404, "unknown run '" .. id .. "'") end
  local d = r.deployment and store:deployment(r.deployment)
  local p = d and d.package_id and store:package(d.package_id)
  local out = {
    run = { id = r.id, name = r.name, deployment = r.deployment, backend = r.backend, state = r.state,
      message = r.message, params = decode(r.params) or json.object(), resumed_from = r.resumed_from, event_seq = r.event_seq },
    heartbeat = api.heartbeat, server_time = store_mod.time(),
  }
  if d then
    out.deployment = { name = d.name, backend = d.backend, package_id = d.package_id,
      params = decode(d.params), config = decode(d.config), backend_config = decode(d.backend_config) }
  end
  if p then
    out.package = { id = p.id, sha256 = p.sha256, module = p.module, class = p.class,
      entrypoint = p.entrypoint, backend = p.backend }
  end
  return server.json(200, out)
end

--- A batch of events: the rules are event_batch.lua's.
function H.events(api, req, _, id)
  local b, berr = body_object(req)
  if not b then return err(400, berr) end
  -- base64 fields (bytes that are not UTF-8) are rare: look for them in
  -- the events only when the body names one at all
  return server.json(event_batch.apply(api.store, id, b, req.body:find("@b64", 1, true) ~= nil))
end

function H.reusable(api, _, _, id)
  local r = api.store:flow_run(id)
  if not r then return err(404, "unknown run '" .. id .. "'") end
  local out = json.array()
  if r.resumed_from then
    for _, c in pairs(api.store:completed_calls(r.resumed_from)) do out[#out + 1] = c end
  end
  return server.json(200, out)
end

function H.create_call(api, req, _, id)
  local b, berr = body_object(req)
  if not b then return err(400, berr) end
  if type(b.spec) ~= "table" then return err(400, "spec must be an object") end
  if b.task_run_id ~= nil and type(b.task_run_id) ~= "string" then return err(400, "task_run_id must be a string") end
  if not api.store:flow_run(id) then return err(404, "unknown run '" .. id .. "'") end
  local call = api.store:create_call { flow_run_id = id, task_run_id = b.task_run_id, spec = json.encode(b.spec) }
  return server.json(201, { id = call })
end

function H.get_call(api, _, _, id, call_id)
  local c = api.store:call(id, call_id)
  if not c then return err(404, "unknown call '" .. call_id .. "' of run '" .. id .. "'") end
  return server.json(200, { id = c.id, state = c.state, spec = decode(c.spec), result = decode(c.result),
    task_run_id = c.task_run_id, ended = c.ended })
end

function H.call_result(api, req, _, id, call_id)
  local b, berr = body_object(req)
  if not b then return err(400, berr) end
  if type(b.ok) ~= "boolean" then return err(400, "ok must be a boolean") end
  if not api.store:call(id, call_id) then return err(404, "unknown call '" .. call_id .. "' of run '" .. id .. "'") end
  if not api.store:finish_call(id, call_id, b.ok and states.COMPLETED or states.FAILED, req.body) then
    return err(409, "call " .. call_id .. " already has a result")
  end
  return server.json(200, { id = call_id })
end

function H.bundle(api, _, who, sha)
  local p = api.store:package(sha)
  if not p or p.id ~= sha then return err(404, "unknown package '" .. sha .. "'") end
  if who.run_id then
    local r = api.store:flow_run(who.run_id)
    local d = r and r.deployment and api.store:deployment(r.deployment)
    if not d or d.package_id ~= p.id then return err(403, "forbidden: not the package of this token's run") end
  end
  local data, rerr
  if p.location then data, rerr = fs.read(p.location) end
  if not data then return err(410, "the bundle of package " .. p.id .. " is gone: " .. tostring(rerr)) end
  return 200, { ["content-type"] = "application/x-tar", ["x-drover-sha256"] = p.sha256 }, data
end

function H.cache(api, req)
  local name, key = req.args.name, req.args.key
  if type(name) ~= "string" or type(key) ~= "string" then return err(400, "name and key are required, once each") end
  local hit = api.store:cached_result(name, key, store_mod.time())
  return server.json(200, hit or json.null)
end

-- ---- routing ------------------------------------------------------------------------------------

-- method, pattern, handler, and whether the captured run id is the run a
-- run token must match (`run = 1`); `worker` routes are open to run tokens.
local routes = {
  { "GET", "^/api/v1/runs/(%x+)/worker$", H.worker, run = 1 },
  { "POST", "^/api/v1/runs/(%x+)/events$", H.events, run = 1 },
  { "GET", "^/api/v1/runs/(%x+)/reusable$", H.reusable, run = 1 },
  { "POST", "^/api/v1/runs/(%x+)/calls$", H.create_call, run = 1 },
  { "GET", "^/api/v1/runs/(%x+)/calls/(%x+)$", H.get_call, run = 1 },
  { "POST", "^/api/v1/runs/(%x+)/calls/(%x+)/result$", H.call_result, run = 1 },
  { "GET", "^/api/v1/packages/(%x+)/bundle$", H.bundle, worker = true },
  { "GET", "^/api/v1/cache$", H.cache, worker = true },
}

--- api: { store, heartbeat }.  Returns status, headers, body, or nil when
-- no worker route matches the path.
function M.route(api, req, who)
  for _, rt in ipairs(routes) do
    local caps = table.pack(req.path:match(rt[2]))
    if caps[1] then
      if req.method ~= rt[1] and not (rt[1] == "GET" and req.method == "HEAD") then
        return err(405, "method not allowed: use " .. rt[1])
      end
      if who.run_id and not rt.worker and caps[rt.run or 0] ~= who.run_id then
        return err(403, "forbidden: this token belongs to another run")
      end
      return rt[3](api, req, who, table.unpack(caps, 1, caps.n))
    end
  end
  return nil
end

return M
