--- A backend's config declaration (BaseOrchestrator.config_keys) and the
-- check of a config against it, so that a bad value is refused where the
-- config is given, in one line naming the key, not deep in a run.
--
-- Each key declares a kind, or a table with the kind and more:
--
--   "string", "number", "boolean", "table"   that Lua type
--   "integer"    a whole number: 22, not 22.5 (22.0 is taken, as 22)
--   "strings"    a list of strings (an argv, a list of names)
--   { "integer", min = 1, max = 65535 }       bounds, for numbers
--   { "string", enum = { "container", "swarm" } }   one of these values
--   { "string", required = true }             the config must have it
local M = {}

local lua_types = { string = true, number = true, boolean = true, table = true }

local function kind_of(decl)
  if type(decl) == "table" then return decl[1] or decl.type end
  return decl
end

--- Does value `v` fit kind `kind`?  true, or what it is instead.
local function fits(kind, v)
  if kind == "integer" then
    if math.type(v) == "integer" or (math.type(v) == "float" and math.tointeger(v)) then return true end
    return false, type(v) == "number" and tostring(v) or type(v)
  elseif kind == "strings" then
    if type(v) ~= "table" then return false, type(v) end
    local n = #v
    for k, item in pairs(v) do
      if math.type(k) ~= "integer" or k < 1 or k > n then return false, "a table with key '" .. tostring(k) .. "'" end
      if type(item) ~= "string" then return false, "a list with a " .. type(item) .. " at " .. k end
    end
    return true
  end
  if type(v) == kind then return true end
  return false, type(v)
end

local article = { integer = "an integer", strings = "a list of strings" }

--- Check declaration `decls` itself: a backend's mistake, said at load.
local function check_decl(key, decl)
  local kind = kind_of(decl)
  if not (lua_types[kind] or article[kind]) then
    return "config_keys." .. tostring(key) .. ": unknown kind '" .. tostring(kind) ..
      "' (string, number, integer, boolean, table or strings)"
  end
end

--- The first thing wrong with `config` against the declarations `decls`
-- (then `common`, the keys every backend takes), or nil.  Keys are
-- checked in sorted order, so the same config gets the same message.
-- An integral float for an "integer" key becomes an integer in `config`.
function M.check(config, decls, common)
  local keys = {}
  for k in pairs(config) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  for _, k in ipairs(keys) do
    local decl = decls[k]
    if decl == nil and common then decl = common[k] end
    if decl == nil then return "unknown config key '" .. tostring(k) .. "'" end
    local bad = check_decl(k, decl)
    if bad then return bad end
    local kind, v = kind_of(decl), config[k]
    local ok, got = fits(kind, v)
    if not ok then
      return "config key '" .. k .. "' must be " .. (article[kind] or ("a " .. kind)) .. ", got " .. got
    end
    if kind == "integer" then config[k] = math.tointeger(v) end
    if type(decl) == "table" then
      if decl.enum then
        local found = false
        for _, e in ipairs(decl.enum) do if e == v then found = true end end
        if not found then
          return "config key '" .. k .. "' must be one of " .. table.concat(decl.enum, ", ") ..
            ", got '" .. tostring(v) .. "'"
        end
      end
      if decl.min and v < decl.min then
        return "config key '" .. k .. "' must be at least " .. decl.min .. ", got " .. tostring(v)
      end
      if decl.max and v > decl.max then
        return "config key '" .. k .. "' must be at most " .. decl.max .. ", got " .. tostring(v)
      end
    end
  end
  local required = {}
  for k, decl in pairs(decls) do
    if type(decl) == "table" and decl.required and config[k] == nil then required[#required + 1] = k end
  end
  table.sort(required)
  if required[1] then return "config key '" .. required[1] .. "' is required" end
end

return M
