-- Fuzz harness: drover.json.decode (engine/src/json.c).  Properties:
--   decode never raises: it returns a value, or nil and one line;
--   what it returns encodes, and decode(encode(v)) encodes to the same
--   text with the same number types (a float stays a float, an integer an
--   integer, [] stays an array).
local json = require "drover.json"

local function same_types(a, b, where)
  if type(a) ~= type(b) then error(where .. ": " .. type(a) .. " became " .. type(b)) end
  if type(a) == "number" and math.type(a) ~= math.type(b) then
    error(where .. ": " .. math.type(a) .. " " .. tostring(a) .. " became " .. math.type(b) .. " " .. tostring(b))
  end
  if type(a) == "table" then
    if json.kind(a) ~= json.kind(b) then error(where .. ": " .. tostring(json.kind(a)) .. " became " .. tostring(json.kind(b))) end
    for k, v in pairs(a) do same_types(v, b[k], where .. "." .. tostring(k)) end
    for k in pairs(b) do
      if a[k] == nil then error(where .. ": key " .. tostring(k) .. " appeared") end
    end
  end
end

return function(data)
  local ok, v, err = pcall(json.decode, data)
  if not ok then error("decode raised: " .. tostring(v)) end
  if v == nil then
    if type(err) ~= "string" or not err:find("^drover%.json%.decode: ") or err:find("\n") then
      error("decode failed without one line naming it: " .. tostring(err))
    end
    return
  end
  local ok1, text = pcall(json.encode, v)
  if not ok1 then error("a decoded value does not encode: " .. tostring(text)) end
  local back, berr = json.decode(text)
  if back == nil then error("encode wrote text decode refuses: " .. tostring(berr) .. " in " .. text:sub(1, 200)) end
  same_types(v, back, "value")
  local again = json.encode(back)
  if again ~= text then error("round trip changed the text: " .. text:sub(1, 200) .. " -> " .. again:sub(1, 200)) end
end
