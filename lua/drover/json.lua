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
--   json.decode(text) -> value | nil, message
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

function M.encode(value, opts)
  local indent, sort_keys = nil, true
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
  end
  -- the C encoder raises without a position; re-raise at the caller's line
  local ok, s = pcall(c_encode, value, kinds, indent, sort_keys, M.null)
  if not ok then error(s, 2) end
  return s
end

function M.decode(text)
  if type(text) ~= "string" then
    error("drover.json.decode: bad argument 'text' (string expected, got " .. type(text) .. ")", 2)
  end
  return c_decode(text, kinds, M.null)
end

return M
