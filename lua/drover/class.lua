--- A minimal class system: single inheritance, `Class:new(...)` calls
-- `init`, `Class:extend(name)` makes a subclass.  Enough for lolpop-style
-- class hierarchies (BaseOrchestrator and its backends, workflow classes)
-- without pulling in a library.
local Object = { __name = "Object" }
Object.__index = Object

function Object:extend(name, fields)
  if type(name) ~= "string" then
    error("class:extend: bad argument 'name' (string expected, got " .. type(name) .. ")", 2)
  end
  local cls = fields or {}
  for k, v in pairs(self) do
    -- metamethods are not inherited through __index: copy them
    if type(k) == "string" and k:find("^__") and k ~= "__index" and k ~= "__name" and cls[k] == nil then
      cls[k] = v
    end
  end
  cls.__name = name
  cls.__index = cls
  cls.super = self
  return setmetatable(cls, { __index = self, __call = function(c, ...) return c:new(...) end,
    __tostring = function(c) return "class " .. c.__name end })
end

function Object:new(...)
  local o = setmetatable({}, self)
  if o.init then o:init(...) end
  return o
end

--- True if obj is an instance of cls or of one of its subclasses.
function Object.is_a(obj, cls)
  local mt = getmetatable(obj)
  while mt do
    if mt == cls then return true end
    mt = rawget(mt, "super")
  end
  return false
end

--- Make a new root class.
local function class(name, parent)
  return (parent or Object):extend(name)
end

return setmetatable({ Object = Object }, { __call = function(_, ...) return class(...) end })
