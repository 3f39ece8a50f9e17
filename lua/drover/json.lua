--- drover.json: JSON for workflows, in C (engine/src/json.c).
--
-- Debian ships lua-cjson 2.1.0 (upstream, not the OpenResty fork), which has
-- no way to mark an empty array, decodes every number as a float (so `1`
-- comes back as `1.0` and prints as "1.0"), encodes integers through "%.14g"
-- (2^53 becomes 9.007199254741e+15), accepts NaN and hex numbers by default
-- and passes invalid UTF-8 through.  So drover has its own encoder and
-- decoder (drover.core.json); this module is their interface:
--
--   json.encode(value [, opts]) -> string
--       Raises on values JSON cannot hold, naming where they are:
--       "drover.json.encode: value.steps[2].run: cannot encode function".
--       opts.indent: number of spaces or a string, pretty-prints;
--       opts.sort_keys: default true, so the same table always gives the
--       same text (Lua's table order varies from run to run).
--       opts.bytes: a string that is not UTF-8 (a binary result, a log
--       line with stray bytes) encodes as {"$bytes": "BASE64"} instead of
--       raising; a key that is not UTF-8 has its stray bytes written \xNN.
--   json.decode(text [, opts]) -> value | nil, message
--       opts.bytes: an object whose only key is "$bytes" (a string of
--       base64) decodes as those bytes: the inverse of encode's bytes.
--       Never raises on malformed text.  Numbers with an integral value
--       come back as Lua integers, exactly even beyond 2^53 (up to the
--       int64 range; beyond it, floats); [] comes back marked as an array,
--       so it encodes as [] again.  Strict JSON: no NaN, Infinity, hex,
--       "1." or ".5"; UTF-8 is checked, \u escapes too (surrogates only in
--       pairs); nesting is limited to 1000 levels.  The one leniency, kept
--       from cjson: raw control characters inside strings are accepted.
--       Messages give the byte ("at character N"), the line and column.
--   json.null      decode gives it for null; encode writes null.  The same
--                  value as cjson.null.
--   json.array(t)  mark t (default: a new table) to encode as an array, even
--                  when empty; returns t.
--   json.object(t) mark t to encode as an object, even when empty or when
--                  its keys are integers (written as strings); returns t.
--   json.kind(t)   "array", "object" or nil: how t is marked.
--
-- Speed (bench/json.sh, side by side with cjson): encode 85-850 MB/s,
-- decode 170-500 MB/s depending on the document, about cjson's own speed;
-- 8-20 times the pure-Lua encoder and the cjson + fix-up decoder drover
-- used before.
--
-- How plain (unmarked) tables encode:
--   empty                              -> {}   (as cjson; use json.array)
--   keys all positive integers         -> array; holes become null, but an
--                                         excessively sparse array (largest
--                                         index > 10 and more than twice the
--                                         number of elements) is an error
--   keys all strings                   -> object
--   anything else (mixed, 0, negative, float or boolean keys) -> error
-- Tables are read raw: metatables (__index, __pairs) play no part.
-- Marking uses a weak table, so marked tables keep their own metatable.
local cjson = require("drover.core").json
  or error("drover.json: this drover.core has no json functions (an old build? run make)")

local M = {}

local type, pcall, error, format = type, pcall, error, string.format
local c_encode, c_decode = cjson.encode, cjson.decode

M.null = cjson.null

-- table -> "array" | "object"; the C side reads it (encode) and writes it
-- (decode marks empty arrays)
local kinds = setmetatable({}, { __mode = "k" })

local function mark(fname, kind, t)
  if t == nil then t = {} end
  if type(t) ~= "table" then
    error(format("drover.json.%s: bad argument 't' (table expected, got %s)", fname, type(t)), 3)
  end
  kinds[t] = kind
  return t
end

function M.array(t) return mark("array", "array", t) end
function M.object(t) return mark("object", "object", t) end

--- "array", "object" or nil: how t was marked (decode marks empty arrays).
function M.kind(t) return kinds[t] end

-- ---- bytes that are not UTF-8 -----------------------------------------------------------

local BYTES_KEY = "$bytes"

local function b64() return require "drover.events" end

--- A copy of `v` with every string that is not UTF-8 replaced by
-- {"$bytes": BASE64} (keys: stray bytes written \xNN).  Tables are copied
-- once each, keeping their array/object marks.
local function mark_bytes(v, seen)
  if type(v) == "string" then
    if utf8.len(v) then return v end
    return { [BYTES_KEY] = b64().b64encode(v) }
  end
  if type(v) ~= "table" then return v end
  if seen[v] then return seen[v] end
  local copy = {}
  seen[v] = copy
  kinds[copy] = kinds[v]
  for k, x in next, v do
    if type(k) == "string" and not utf8.len(k) then
      k = k:gsub("[\128-\255]", function(c) return format("\\x%02X", c:byte()) end)
      -- (a valid multi-byte character next to a stray byte is escaped too:
      -- a key is a name for people, not data to restore)
    end
    copy[k] = mark_bytes(x, seen)
  end
  return copy
end

local function unmark_bytes(v)
  if type(v) ~= "table" then return v end
  local s = v[BYTES_KEY]
  if type(s) == "string" and next(v, next(v)) == nil then
    local bytes = b64().b64decode(s)
    if bytes then return bytes end
  end
  for k, x in next, v do
    if type(x) == "table" then v[k] = unmark_bytes(x) end
  end
  return v
end

function M.encode(value, opts)
  local indent, sort_keys, bytes = nil, true, false
  if opts ~= nil then
    if type(opts) ~= "table" then
      error("drover.json.encode: bad argument 'opts' (table or nil expected, got " .. type(opts) .. ")", 2)
    end
    indent = opts.indent
    if type(indent) == "number" then indent = string.rep(" ", indent) end
    if indent ~= nil and type(indent) ~= "string" then
      error("drover.json.encode: bad option 'indent' (number or string expected, got " .. type(indent) .. ")", 2)
    end
    sort_keys = opts.sort_keys ~= false
    bytes = opts.bytes == true
  end
  -- the C encoder raises without a position; re-raise at the caller's line
  local ok, s = pcall(c_encode, value, kinds, indent, sort_keys, M.null)
  if not ok and bytes and s:find("invalid UTF-8", 1, true) then
    -- the rare case pays for the copy, not every call
    ok, s = pcall(c_encode, mark_bytes(value, {}), kinds, indent, sort_keys, M.null)
  end
  if not ok then error(s, 2) end
  return s
end

function M.decode(text, opts)
  if type(text) ~= "string" then
    error("drover.json.decode: bad argument 'text' (string expected, got " .. type(text) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("drover.json.decode: bad argument 'opts' (table or nil expected, got " .. type(opts) .. ")", 2)
  end
  local v, err = c_decode(text, kinds, M.null)
  if opts and opts.bytes and type(v) == "table" and text:find('"$bytes"', 1, true) then v = unmark_bytes(v) end
  return v, err
end

return M
