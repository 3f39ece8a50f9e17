--- The Lua side of the C API (engine/include/drover.h), and the one path
-- that runs a workflow file as a tracked flow run (drover_exec, `drover
-- exec`, `drover resume`).
--
-- engine/src/api.c calls the box functions below (load, call, exec) as
-- tasks.  They never raise for the caller's mistakes: each fills
-- box.code ("arg", "load", "notimpl", "run"), box.err and box.out, so
-- that the C side maps every kind of mistake to its own DROVER_E* code.
local M = {}

--- The backend contract operations drover_backend_call reaches.
M.operations = { "package", "deploy", "run", "stop", "cancel", "status", "logs", "list" }
local is_operation = {}
for _, op in ipairs(M.operations) do is_operation[op] = true end

--- Operations whose first result is a list: an empty one is still `[]`.
local returns_list = { list = true, logs = true }

-- Errors raised for the caller (level 2 or 3) by what this module calls
-- can point into it ("drover/api.lua:40: unknown backend ..."): that
-- position means nothing to an embedder.
local function fail(box, code, msg)
  box.code = code
  box.err = (tostring(msg):gsub("^[^\n]-drover/api%.lua:%d+: ", ""))
end

-- drover.json.decode marks [] as an array and leaves {} unmarked; a
-- non-empty array has keys 1..n, an object string keys.
local function is_array(json, v)
  if json.kind(v) == "array" then return true end
  local n = 0
  for _ in pairs(v) do n = n + 1 end
  return n > 0 and n == #v
end

--- `text` (JSON or nil) as a table of kind `want` ("array" or "object");
-- nil after fail() when it is not one.
local function decode(box, what, text, want)
  if text == nil then return want == "object" and {} or { n = 0 } end
  local json = require "drover.json"
  local v, err = json.decode(text)
  if v == nil and err then
    fail(box, "arg", what .. " is not valid JSON: " .. err)
    return nil
  end
  if type(v) ~= "table" or (want == "array") ~= is_array(json, v) then
    fail(box, "arg", what .. " must be a JSON " .. want)
    return nil
  end
  if want == "array" then v.n = #v end
  return v
end

--- drover_backend_load: box.out is the file the backend came from.
function M.load(box, name)
  local ok, cls = pcall(require("drover.orchestrator").backend_class, name)
  if not ok then return fail(box, "load", cls) end
  box.out = cls.backend_path
end

-- One backend instance per (backend, config_json) for the engine's life.
local instances = {}

--- drover_backend_call: box.out is the JSON array of what OP returned.
function M.call(box, name, config_json, op, args_json)
  local orch = require "drover.orchestrator"
  if not is_operation[op] then
    return fail(box, "arg", "drover_backend_call: unknown operation '" .. op .. "' ("
      .. table.concat(M.operations, ", ") .. ")")
  end
  local config = decode(box, "drover_backend_call: config_json", config_json, "object")
  if not config then return end
  local args = decode(box, "drover_backend_call: args_json", args_json, "array")
  if not args then return end
  local ok, cls = pcall(orch.backend_class, name)
  if not ok then return fail(box, "load", cls) end
  local key = name .. "\0" .. (config_json or "")
  local o = instances[key]
  if not o then
    local made, inst = pcall(orch.orchestrator, name, config)
    if not made then return fail(box, "arg", inst) end
    o = inst
    instances[key] = o
  end
  local r = table.pack(pcall(o[op], o, table.unpack(args, 1, args.n)))
  if not r[1] then
    -- BaseOrchestrator's stand-in for what a backend must implement says
    -- so in these words, for OP or for a hook OP needs
    local bare = tostring(r[2]):gsub("^[^\n]-%.lua:%d+: ", "")
    return fail(box, bare:match("^backend '[^']*' does not implement [%w_]+$") and "notimpl" or "run", bare)
  end
  local json = require "drover.json"
  local first = r[2]
  if returns_list[op] and type(first) == "table" and json.kind(first) == nil then json.array(first) end
  local encoded, text = pcall(json.encode, json.array({ table.unpack(r, 2, r.n) }))
  if not encoded then
    return fail(box, "run", op .. " returned what JSON cannot hold: " .. tostring(text))
  end
  box.out = text
end

--- Run the workflow file `file` as one tracked flow run, with `params`
-- as the chunk's argument; print() inside goes to stdout and to the run's
-- logs.  o: name (default: the file's name), resumed_from (a run id),
-- started(flow) (called once the run exists, before its body runs).
-- Returns the run {id, name, state, message, result} (result: what the
-- body returned, decoded from the store), then ok, value-or-error of the
-- body.  nil, message when the file does not load: "cannot open FILE"
-- (missing == true) or FILE:LINE: message.
function M.exec_file(file, params, o)
  o = o or {}
  local chunk, err = loadfile(file)
  if not chunk then
    local f = io.open(file, "r")
    if f then f:close() end
    return nil, err, f == nil
  end
  local drover = require "drover"
  local tracker = require "drover.tracker"
  local store_mod = require "drover.store"
  local abs = file:sub(1, 1) == "/" and file or (drover.cwd() .. "/" .. file)
  local flow = tracker.begin_flow {
    name = o.name or file:match("([^/]+)%.lua$") or file, params = params, backend = "local",
    source = { kind = "exec", file = abs, params = params }, resumed_from = o.resumed_from,
  }
  if o.started then o.started(flow) end
  local restore_print = tracker.capture_print()
  local ok, value = flow:run(chunk, params)
  restore_print()
  flow.store:flush()
  local row = flow.store:flow_run(flow.id)
  local run = { id = row.id, name = row.name, state = row.state, message = row.message,
    result = store_mod.decode(row.result) }
  return run, ok, value
end

--- drover_exec: box.out is {"id", "name", "state", "message", "result"}
-- (null for an absent message or result).
function M.exec(box, path, params_json, name)
  local json = require "drover.json"
  local params = decode(box, "drover_exec: params_json", params_json, "object")
  if not params then return end
  local run, ok, value = M.exec_file(path, params, { name = name })
  if not run then return fail(box, "load", ok) end
  local function null(v) if v == nil then return json.null end return v end
  box.out = json.encode { id = run.id, name = run.name, state = run.state, message = null(run.message),
    result = null(run.result) }
  if run.state ~= "COMPLETED" then
    fail(box, "run", "flow run " .. run.id .. " " .. run.state ..
      (run.message and (": " .. run.message) or (not ok and (": " .. tostring(value)) or "")))
  end
end

--- drover_start: spawn `chunk` as a task and return its handle at once; its
-- error goes to the engine's log with a traceback.
function M.start(chunk)
  local core = require "drover.core"
  return require("drover").spawn(function()
    local ok, err = xpcall(chunk, debug.traceback)
    if not ok then core.log("error", tostring(err)) end
  end)
end

return M
