#!/usr/bin/env bash
# bench/json.sh -- drover.json's speed (not a test).
#
# Encodes and decodes three documents in one lua5.4 process and prints MB/s
# (of JSON text, CPU time, best of 3 rounds) for:
#   drover   drover.json: engine/src/json.c
#   cjson    lua-cjson 2.1.0 alone, for scale (it cannot write [], writes
#            integers through %.14g and decodes every number as a float, so
#            it does less work than drover)
#   lua      the pure-Lua encoder and the cjson + fix-up decoder drover.json
#            used before the C one, kept here (only here) as the baseline
# and the ratios drover/cjson and drover/lua.  Documents:
#   api      what the daemon's /api/runs returns: 100 runs (about 31 KB)
#   numbers  20,000 integers and floats
#   strings  2,000 strings with escapes and non-ASCII text
#
#   DROVER_BUILD=build-x bash bench/json.sh        (MIN_TIME=0.3 seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;;"
export LUA_CPATH="$ROOT/$BUILD/lua/?.so;;"
[ -e "$BUILD/lua/drover/core.so" ] || { echo "bench/json.sh: build first (make BUILD=$BUILD)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/drover-bench-json.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

# The Lua implementation drover.json had before engine/src/json.c, verbatim
# but for its name: the baseline.
cat >"$tmp/json_lua.lua" <<'LUA'
--- drover.json: JSON for workflows, over lua-cjson.
--
-- Debian ships lua-cjson 2.1.0 (upstream, not the OpenResty fork), which has
-- no way to mark an empty array, decodes every number as a float (so `1`
-- comes back as `1.0` and prints as "1.0"), encodes integers through "%.14g"
-- (2^53 becomes 9.007199254741e+15), accepts NaN and hex numbers by default
-- and passes invalid UTF-8 through.  This module keeps cjson's C parser and
-- fixes the rest:
--
--   json.encode(value [, opts]) -> string
--       Written in Lua (cjson 2.1.0 cannot express [] at all).  Raises on
--       values JSON cannot hold, naming where they are:
--       "drover.json.encode: value.steps[2].run: cannot encode function".
--       opts.indent: number of spaces or a string, pretty-prints;
--       opts.sort_keys: default true, so the same table always gives the
--       same text (Lua's table order varies from run to run).
--   json.decode(text) -> value | nil, message
--       Never raises on malformed text.  Numbers with an integral value
--       come back as Lua integers, exactly even beyond 2^53 (up to the
--       int64 range); [] comes back marked as an array, so it encodes as []
--       again.  Strict JSON: no NaN, Infinity or hex; UTF-8 is checked.
--   json.null      decode gives it for null; encode writes null.
--   json.array(t)  mark t (default: a new table) to encode as an array, even
--                  when empty; returns t.
--   json.object(t) mark t to encode as an object, even when empty or when
--                  its keys are integers (written as strings); returns t.
--   json.kind(t)   "array", "object" or nil: how t is marked.
--
-- Speed: encode runs at about 8 MB/s (cjson: 130 MB/s, but it cannot write
-- [] and rounds numbers to 14 digits); decode at about 19 MB/s, half of
-- cjson alone (the walk that turns floats into integers).
--
-- How plain (unmarked) tables encode:
--   empty                              -> {}   (as cjson; use json.array)
--   keys all positive integers         -> array; holes become null, but an
--                                         excessively sparse array (largest
--                                         index > 10 and more than twice the
--                                         number of elements) is an error
--   keys all strings                   -> object
--   anything else (mixed, 0, negative, float or boolean keys) -> error
-- Marking uses a weak table, so marked tables keep their own metatable.
local cjson = require "cjson"

local M = {}

local type, next, pairs, tostring, tonumber = type, next, pairs, tostring, tonumber
local mtype, tointeger, huge = math.type, math.tointeger, math.huge
local find, sub, byte, match, format, gsub = string.find, string.sub, string.byte, string.match,
  string.format, string.gsub
local concat, sort = table.concat, table.sort
local utf8len = utf8.len

-- A private cjson instance: its settings do not leak into other users of
-- require "cjson", and theirs do not change ours.
local parser = cjson.new()
parser.decode_invalid_numbers(false) -- reject NaN, Infinity, 0x10
parser.decode_max_depth(1000)

M.null = cjson.null

local kinds = setmetatable({}, { __mode = "k" }) -- table -> "array" | "object"

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

---------------------------------------------------------------------------
-- encode
---------------------------------------------------------------------------

local escapes = { ['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f",
  ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
for i = 0, 31 do
  local c = string.char(i)
  if not escapes[c] then escapes[c] = format("\\u%04x", i) end
end
escapes["\127"] = "\\u007f"

local function encode_number(x)
  if mtype(x) == "integer" then return format("%d", x) end
  if x ~= x or x == huge or x == -huge then return nil end
  -- the shortest of %.14g .. %.17g that reads back as the same double
  for p = 14, 17 do
    local s = format("%." .. p .. "g", x)
    if p == 17 or tonumber(s) == x then return s end
  end
end

local function path_string(path, depth)
  if depth == 0 then return "value" end
  local parts = { "value" }
  for i = 1, depth do
    local k = path[i]
    if type(k) == "string" then
      parts[#parts + 1] = match(k, "^[%a_][%w_]*$") and ("." .. k) or format("[%q]", k)
    else
      parts[#parts + 1] = "[" .. tostring(k) .. "]"
    end
  end
  return concat(parts)
end

local function key_string(k)
  if type(k) == "string" then return format("%q", k) end
  return tostring(k)
end

function M.encode(value, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("drover.json.encode: bad argument 'opts' (table or nil expected, got " .. type(opts) .. ")", 2)
  end
  local indent = opts and opts.indent
  if type(indent) == "number" then indent = string.rep(" ", indent) end
  if indent ~= nil and type(indent) ~= "string" then
    error("drover.json.encode: bad option 'indent' (number or string expected, got " .. type(indent) .. ")", 2)
  end
  if indent == "" then indent = nil end
  local sort_keys = not (opts and opts.sort_keys == false)
  local colon = indent and ": " or ":"

  local buf, n = {}, 0
  local path, depth = {}, 0
  local visiting = {}

  local function fail(what)
    error("drover.json.encode: " .. path_string(path, depth) .. ": " .. what, 0)
  end

  local function newline()
    if indent then
      n = n + 1
      buf[n] = "\n" .. string.rep(indent, depth)
    end
  end

  local function quote(s)
    if not utf8len(s) then fail("invalid UTF-8 in string") end
    if find(s, '[%c"\\]') then s = gsub(s, '[%c"\\]', escapes) end
    return '"' .. s .. '"'
  end

  local encode_value

  local function encode_array(t, len)
    if len == 0 then
      n = n + 1
      buf[n] = "[]"
      return
    end
    n = n + 1
    buf[n] = "["
    depth = depth + 1
    for i = 1, len do
      if i > 1 then
        n = n + 1
        buf[n] = ","
      end
      newline()
      path[depth] = i
      encode_value(t[i])
    end
    depth = depth - 1
    newline()
    n = n + 1
    buf[n] = "]"
  end

  local function encode_object(t, keys, names)
    if #keys == 0 then
      n = n + 1
      buf[n] = "{}"
      return
    end
    if sort_keys then
      sort(keys, function(a, b) return names[a] < names[b] end)
    end
    n = n + 1
    buf[n] = "{"
    depth = depth + 1
    for i, k in ipairs(keys) do
      if i > 1 then
        n = n + 1
        buf[n] = ","
      end
      newline()
      path[depth] = k
      n = n + 1
      buf[n] = quote(names[k])
      n = n + 1
      buf[n] = colon
      encode_value(t[k])
    end
    depth = depth - 1
    newline()
    n = n + 1
    buf[n] = "}"
  end

  local function encode_table(t)
    if visiting[t] then fail("cycle (a table that contains itself)") end
    if depth >= 1000 then fail("nesting deeper than 1000 levels") end
    local kind = kinds[t]
    local count, maxn, strs, others, bad = 0, 0, 0, 0, nil
    for k in next, t do
      count = count + 1
      if mtype(k) == "integer" and k >= 1 then
        if k > maxn then maxn = k end
      elseif type(k) == "string" then
        strs = strs + 1
      else
        others = others + 1
        bad = bad or k
      end
    end
    local ints = count - strs - others
    if kind == nil then
      if count == 0 then
        kind = "object"
      elseif strs == 0 and others == 0 then
        kind = "array"
      elseif ints == 0 and others == 0 then
        kind = "object"
      elseif others > 0 then
        fail(format("table key %s is neither a string nor a positive integer; "
          .. "use json.object to write number keys as strings", key_string(bad)))
      else
        fail("table with both string and integer keys; use json.object (integer keys become "
          .. "strings) or json.array")
      end
    end
    visiting[t] = true
    if kind == "array" then
      if strs > 0 or others > 0 then
        for k in next, t do
          if not (mtype(k) == "integer" and k >= 1) then
            fail("array with a non-index key " .. key_string(k))
          end
        end
      end
      if maxn > 10 and maxn > 2 * count then
        fail(format("excessively sparse array (%d elements, largest index %d); use json.object",
          count, maxn))
      end
      encode_array(t, maxn)
    else
      local keys, names = {}, {}
      for k in next, t do
        local name
        if type(k) == "string" then
          name = k
        elseif type(k) == "number" then
          name = encode_number(k)
          if not name then fail("cannot use NaN or infinity as an object key") end
        else
          fail("object key of type " .. type(k))
        end
        keys[#keys + 1] = k
        names[k] = name
      end
      if strs > 0 and count > strs then -- numbers written as strings may collide
        local seen = {}
        for _, k in ipairs(keys) do
          if seen[names[k]] then fail(format("duplicate object key %q", names[k])) end
          seen[names[k]] = true
        end
      end
      encode_object(t, keys, names)
    end
    visiting[t] = nil
  end

  function encode_value(v)
    local tv = type(v)
    if tv == "string" then
      n = n + 1
      buf[n] = quote(v)
    elseif tv == "number" then
      local s = encode_number(v)
      if not s then fail("cannot encode NaN or infinity") end
      n = n + 1
      buf[n] = s
    elseif tv == "boolean" then
      n = n + 1
      buf[n] = v and "true" or "false"
    elseif tv == "nil" or v == M.null then
      n = n + 1
      buf[n] = "null"
    elseif tv == "table" then
      encode_table(v)
    else
      fail("cannot encode " .. tv)
    end
  end

  local ok, err = pcall(encode_value, value)
  if not ok then error(err, 2) end
  return concat(buf, "", 1, n)
end

---------------------------------------------------------------------------
-- decode
---------------------------------------------------------------------------

local token_names = {
  T_END = "the end of the text", T_ARR_BEGIN = "'['", T_ARR_END = "']'", T_OBJ_BEGIN = "'{'",
  T_OBJ_END = "'}'", T_COLON = "':'", T_COMMA = "','", T_STRING = "a string",
  T_NUMBER = "a number", T_BOOLEAN = "a boolean", T_NULL = "null", T_UNKNOWN = "an invalid token",
}

local function decode_error(text, msg)
  msg = gsub(tostring(msg), "T_[%u_]+", token_names)
  -- cjson reports a byte offset; add line and column for multi-line text
  local at = tonumber(match(msg, "at character (%d+)$"))
  if at then
    local line, col = 1, at
    for nl in text:sub(1, at - 1):gmatch("()\n") do
      line = line + 1
      col = at - nl
    end
    msg = msg .. format(" (line %d, column %d)", line, col)
  end
  return nil, "drover.json.decode: " .. msg
end

-- Integral floats become integers; tables are walked in place.  With
-- `marks`, the sentinels planted by the rewrite below are replaced too.
local fix_table

local function fix_value(v, marks)
  local tv = type(v)
  if tv == "number" then
    return tointeger(v) or v
  elseif tv == "table" then
    return fix_table(v, marks)
  elseif marks and tv == "string" and byte(v, 1) == 0 and sub(v, 1, #marks.prefix) == marks.prefix then
    return marks.bigs[tonumber(sub(v, #marks.prefix + 1))]
  end
  return v
end

function fix_table(t, marks)
  if marks and t[1] == marks.prefix then return M.array({}) end
  for k, v in next, t do
    local tv = type(v)
    if tv == "number" then
      local i = tointeger(v)
      if i then t[k] = i end
    elseif tv == "table" or (marks and tv == "string") then
      t[k] = fix_value(v, marks)
    end
  end
  return t
end

local function has_prefix(v, prefix)
  local tv = type(v)
  if tv == "string" then
    return byte(v, 1) == 0 and sub(v, 1, #prefix) == prefix
  elseif tv == "table" then
    for _, x in next, v do
      if has_prefix(x, prefix) then return true end
    end
  end
  return false
end

--[[
cjson turns [] and {} into the same empty table, and parses every number
with strtod.  When the text has an empty array or an integer of 16 digits
or more (beyond 2^53 a double is not exact), rewrite the text before a
second parse: outside strings, [] becomes ["P"] and a long integer becomes
"P<index>", where P is a prefix that no string of the document starts
with; the fix-up walk then puts back a marked empty array and the exact
integer.  Ordinary documents take only the first parse and the walk.
]]
local function rewrite(text, pjson, bigs)
  local out, nout, i, last = {}, 0, 1, 1
  while true do
    local j = find(text, '[%["%-%d]', i)
    if not j then break end
    local c = byte(text, j)
    if c == 34 then -- a string: skip it (the text is valid, the closing quote exists)
      local k = j + 1
      while true do
        local q = find(text, '["\\]', k)
        if byte(text, q) == 92 then
          k = q + 2
        else
          k = q + 1
          break
        end
      end
      i = k
    elseif c == 91 then -- '['
      local e = match(text, "^[ \t\r\n]*%]()", j + 1)
      if e then
        nout = nout + 1
        out[nout] = sub(text, last, j - 1) .. '["' .. pjson .. '"]'
        last = e
        i = e
      else
        i = j + 1
      end
    else -- a number
      local digits, e = match(text, "^%-?(%d+)()", j)
      local nc = byte(text, e)
      if nc == 46 or nc == 101 or nc == 69 then -- '.', 'e', 'E': a float, left alone
        i = match(text, "^[%d%.eE%+%-]*()", e)
      else
        if #digits >= 16 then
          bigs[#bigs + 1] = tonumber(sub(text, j, e - 1)) -- an integer if it fits in 64 bits
          nout = nout + 1
          out[nout] = sub(text, last, j - 1) .. '"' .. pjson .. #bigs .. '"'
          last = e
        end
        i = e
      end
    end
  end
  nout = nout + 1
  out[nout] = sub(text, last)
  return concat(out, "", 1, nout)
end

local long_int = string.rep("%d", 16)

-- Marker prefixes come from a private generator: drawing from math.random
-- would disturb scripts that seed it to be reproducible.  Unpredictable
-- enough that a document cannot be crafted to collide on purpose (which
-- would only cost extra walks: has_prefix makes collisions harmless).
local seed = (tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0) ~ os.time()
  ~ math.floor(os.clock() * 1e6)
local function next_suffix()
  seed = seed * 6364136223846793005 + 1442695040888963407 -- wraps around, as integers do
  return format("dj%08x:", (seed >> 32) & 0xffffffff)
end

function M.decode(text)
  if type(text) ~= "string" then
    error("drover.json.decode: bad argument 'text' (string expected, got " .. type(text) .. ")", 2)
  end
  local bad, pos = utf8len(text)
  if not bad then return nil, format("drover.json.decode: invalid UTF-8 at byte %d", pos) end
  local ok, v = pcall(parser.decode, text)
  if not ok then return decode_error(text, v) end
  if not (find(text, "%[[ \t\r\n]*%]") or find(text, long_int)) then
    return fix_value(v, nil)
  end
  local suffix, prefix
  repeat
    suffix = next_suffix()
    prefix = "\0" .. suffix
  until not has_prefix(v, prefix)
  local marks = { prefix = prefix, bigs = {} }
  local ok2, v2 = pcall(parser.decode, rewrite(text, "\\u0000" .. suffix, marks.bigs))
  if not ok2 then return decode_error(text, v2) end -- cannot happen for valid text
  return fix_value(v2, marks)
end

return M
LUA

lua5.4 - "$tmp" "${MIN_TIME:-0.3}" <<'LUA'
local dir, MIN_TIME = arg[1], tonumber(arg[2])
package.path = dir .. "/?.lua;" .. package.path
local json = require "drover.json"
local old = require "json_lua"
local cjson = require("cjson").new()

-- documents ------------------------------------------------------------
local function api_doc()
  local states = { "COMPLETED", "COMPLETED", "FAILED", "CRASHED", "CANCELLED" }
  local runs = {}
  for i = 1, 100 do
    runs[i] = {
      id = ("%08x-%04x-4%03x-a%03x-%012x"):format(i * 2654435761 % 2 ^ 32, i, i, i, i * 7919),
      name = "bench", deployment = "bench", backend = "local", state = states[i % #states + 1],
      created = 1790000000.123456 + i, started = 1790000001.25 + i, ended = 1790000003.5 + i,
      params = { i = i, label = "run " .. i }, source = { kind = "deployment" },
      result = { ok = true }, task_runs = 1, attempts = 1, parent = json.null,
    }
  end
  return { runs = runs, total = 1000, limit = 100, offset = 0 }
end

local function numbers_doc()
  local t = {}
  for i = 1, 20000 do t[i] = (i % 2 == 0) and i * 7919 or i / 7 end
  return t
end

local function strings_doc()
  local t = {}
  for i = 1, 2000 do
    t[i] = ("line %d: \"quoted\"\tand a path C:\\tmp\\x — héllo wörld ✓ 😀\n"):format(i)
  end
  return t
end

-- timing ---------------------------------------------------------------
local function rate(fn, bytes)
  local best = math.huge
  for _ = 1, 3 do
    local n, t0 = 0, os.clock()
    repeat
      fn()
      n = n + 1
    until os.clock() - t0 >= MIN_TIME / 3
    best = math.min(best, (os.clock() - t0) / n)
  end
  return bytes / best / 1e6
end

local function row(name, doc)
  local text = json.encode(doc)
  local ctext = cjson.encode(doc)
  local e = {
    drover = rate(function() json.encode(doc) end, #text),
    cjson = rate(function() cjson.encode(doc) end, #ctext),
    lua = rate(function() old.encode(doc) end, #text),
  }
  local d = {
    drover = rate(function() json.decode(text) end, #text),
    cjson = rate(function() cjson.decode(text) end, #text),
    lua = rate(function() old.decode(text) end, #text),
  }
  assert(old.encode(doc) == text, name .. ": the C and Lua encoders disagree")
  assert(old.encode(json.decode(text)) == text and json.encode(old.decode(text)) == text,
    name .. ": the decoders disagree")
  for _, wr in ipairs { { "encode", e }, { "decode", d } } do
    local what, r = wr[1], wr[2]
    print(("%-8s %-7s %7d B  drover %7.1f  cjson %7.1f  lua %6.1f MB/s   drover/cjson %5.2f  drover/lua %6.1f")
      :format(name, what, #text, r.drover, r.cjson, r.lua, r.drover / r.cjson, r.drover / r.lua))
  end
end

row("api", api_doc())
row("numbers", numbers_doc())
row("strings", strings_doc())
LUA
