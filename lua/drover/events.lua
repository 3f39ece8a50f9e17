--- Tracking events: the store calls the tracker makes, as values a worker
-- can send to `drover serve` and the server can apply.
--
-- One tracker, two sinks.  In a process that owns the store (`drover exec`,
-- a worker in shared-filesystem mode, the tests) the tracker calls the
-- store directly.  A worker that reports over HTTP gets a sink
-- (drover.reporter) with the same methods, which turns each call into an
-- event here (`M.event`); the server turns each event back into the same
-- store call (`M.apply`).  So both paths produce the same rows.
--
-- On the wire an event is a flat JSON object with a type `t`.  Strings
-- that are not UTF-8 (binary log lines, results) cannot be JSON strings:
-- they travel base64-encoded under the field name with "@b64" appended,
-- and are stored as the same bytes (`M.pack` / `M.unpack`).
local states = require "drover.states"

local M = {}

-- ---- the wire: base64 for bytes that are not UTF-8 ---------------------------------

local B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local B64_INDEX = {}
for i = 1, 64 do B64_INDEX[B64:byte(i)] = i - 1 end

function M.b64encode(s)
  local out, n = {}, #s
  for i = 1, n, 3 do
    local a, b, c = s:byte(i, i + 2)
    local v = (a << 16) | ((b or 0) << 8) | (c or 0)
    out[#out + 1] = string.char(B64:byte((v >> 18) + 1), B64:byte(((v >> 12) & 63) + 1),
      b and B64:byte(((v >> 6) & 63) + 1) or 61, c and B64:byte((v & 63) + 1) or 61)
  end
  return table.concat(out)
end

--- Bytes from base64, or nil and a message.
function M.b64decode(s)
  if #s % 4 ~= 0 then return nil, "base64 length is not a multiple of 4" end
  local out = {}
  for i = 1, #s, 4 do
    local c1, c2, c3, c4 = s:byte(i, i + 3)
    local a, b = B64_INDEX[c1], B64_INDEX[c2]
    local c = c3 ~= 61 and B64_INDEX[c3] or 0
    local d = c4 ~= 61 and B64_INDEX[c4] or 0
    if not (a and b and c and d) or (c3 == 61 and c4 ~= 61) or ((c3 == 61 or c4 == 61) and i + 3 < #s) then
      return nil, "bad base64"
    end
    local v = (a << 18) | (b << 12) | (c << 6) | d
    out[#out + 1] = string.char(v >> 16) .. (c3 ~= 61 and string.char((v >> 8) & 255) or "") ..
      (c4 ~= 61 and string.char(v & 255) or "")
  end
  return table.concat(out)
end

--- `e` ready for JSON: every string that is not UTF-8 moved to FIELD@b64.
function M.pack(e)
  local bytes
  for k, v in pairs(e) do
    if type(v) == "string" and not utf8.len(v) then
      bytes = bytes or {}
      bytes[k] = v
    end
  end
  -- (moved after the traversal: a new key during it is undefined)
  for k, v in pairs(bytes or {}) do
    e[k] = nil
    e[k .. "@b64"] = M.b64encode(v)
  end
  return e
end

--- The inverse of pack (server side); nil and a message for bad base64.
function M.unpack(e)
  local moved
  for k, v in pairs(e) do
    if type(k) == "string" and k:find("@b64", -4, true) then
      if type(v) ~= "string" then return nil, "field '" .. k .. "' must be a string" end
      local bytes, err = M.b64decode(v)
      if not bytes then return nil, "field '" .. k .. "': " .. err end
      moved = moved or {}
      moved[k:sub(1, -5)] = bytes
      e[k] = nil
    end
  end
  for k, v in pairs(moved or {}) do e[k] = v end
  return e
end

-- ---- the vocabulary ------------------------------------------------------------------------

-- Each type: its fields with their Lua types ("?" suffix: optional), and
-- how the server applies it to run `run_id` through the store.
local types = {
  -- `ts`: when the worker made the change (its clock), so a run's start,
  -- end and state history do not depend on when its batch arrived
  state = { fields = { state = "string", message = "string?", result = "string?", ts = "number?" },
    apply = function(store, run_id, e)
      local extra
      if e.result ~= nil or e.ts ~= nil then extra = { result = e.result, ts = e.ts } end
      store:set_flow_state(run_id, e.state, e.message, extra)
    end },
  pid = { fields = { pid = "number" },
    apply = function(store, run_id, e) store:update_flow_run(run_id, { pid = math.tointeger(e.pid) }) end },
  -- a task run's start; while unsent, a worker folds its later changes in
  -- (message ... reused_from): the server inserts the row finished
  task_started = { fields = { id = "string", parent_id = "string?", name = "string", kind = "string",
      call_key = "string", state = "string", params = "string?", params_hash = "string?",
      attempts = "number", cache_key = "string?", tags = "string?", started = "number",
      message = "string?", result = "string?", result_ok = "boolean?", ended = "number?",
      cache_expires = "number?", reused_from = "string?" },
    apply = function(store, run_id, e)
      e.attempts = math.tointeger(e.attempts)
      store:insert_task_run(e, run_id)
    end },
  task_state = { fields = { id = "string", state = "string", message = "string?", attempts = "number" },
    apply = function(store, run_id, e)
      store:task_run_state(e.id, e.state, e.message, math.tointeger(e.attempts), run_id)
    end },
  task_finished = { fields = { id = "string", state = "string", message = "string?", result = "string?",
      result_ok = "boolean", attempts = "number", ended = "number", cache_expires = "number?",
      reused_from = "string?" },
    apply = function(store, run_id, e)
      store:task_run_finished(e.id, e.state, e.message, e.result, e.result_ok, math.tointeger(e.attempts),
        e.ended, e.cache_expires, e.reused_from, run_id)
    end },
  log = { fields = { task_run_id = "string?", stream = "string", line = "string", ts = "number" },
    apply = function(store, run_id, e) store:log(run_id, e.task_run_id, e.stream, e.line, e.ts) end },
}

-- Each type's fields split once, at load: `want` maps a field to its Lua
-- type, `required` lists the fields that must be present (check() runs
-- for every event a server receives, so nothing is parsed there).
for _, spec in pairs(types) do
  spec.want, spec.required = { t = "string" }, {}
  for k, w in pairs(spec.fields) do
    local base, optional = w:match("^(%a+)(%??)$")
    spec.want[k] = base
    if optional == "" then spec.required[#spec.required + 1] = k end
  end
  table.sort(spec.required) -- a stable message for an event missing several
end

--- Whether `s` is one of the run states (the values of drover.states that
-- are their own names: that module also holds sets and functions).
local function is_state(s) return type(s) == "string" and states[s] == s end

--- Check event `e` (decoded from JSON, unpacked); nil and a message naming
-- the field when it is malformed.
function M.check(e)
  if type(e) ~= "table" then return nil, "an event must be an object" end
  local t = e.t
  local spec = types[t]
  if not spec then return nil, "unknown event type '" .. tostring(t) .. "'" end
  local want = spec.want
  for k, v in pairs(e) do
    local w = want[k]
    if type(v) ~= w then
      if not w then return nil, t .. " event: unknown field '" .. tostring(k) .. "'" end
      return nil, t .. " event: field '" .. k .. "' must be a " .. w .. ", got " .. type(v)
    end
  end
  for _, k in ipairs(spec.required) do
    if e[k] == nil then return nil, t .. " event: field '" .. k .. "' is missing" end
  end
  if e.state ~= nil and not is_state(e.state) then return nil, t .. " event: unknown state '" .. e.state .. "'" end
  return e
end

--- Apply a checked event to run `run_id` through `store`.
function M.apply(store, run_id, e) types[e.t].apply(store, run_id, e) end

--- An event of type `t` with `fields` (worker side).
function M.event(t, fields)
  fields.t = t
  return fields
end

return M
