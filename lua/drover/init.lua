--- drover: the Lua face of the runtime.
--
-- `require "drover"` works the same in the drover binary (where drover.core
-- is linked in) and in stock lua5.4 (where drover/core.so is loaded from
-- package.cpath).  Submodules load on first use, so a script that only
-- spawns processes pays nothing for HTTP or JSON.
local core = require "drover.core"

local M = {
  version = core.version,
  spawn = core.spawn,
  run = core.run,
  sleep = core.sleep,
  now = core.now,
  current = core.current,
  yield = core.yield,
  on_signal = core.on_signal,
  event = core.event,
}

--- Run functions concurrently; return their first results in order.
-- If one fails, the others are cancelled and its error is raised.
function M.all(fns)
  if type(fns) ~= "table" then
    error("drover.all: bad argument 'fns' (table expected, got " .. type(fns) .. ")", 2)
  end
  local handles = {}
  for i, fn in ipairs(fns) do
    if type(fn) ~= "function" then
      error("drover.all: bad argument 'fns[" .. i .. "]' (function expected, got " .. type(fn) .. ")", 2)
    end
    handles[i] = core.spawn(fn)
  end
  local results, failure = {}, nil
  for i, h in ipairs(handles) do
    local ok, value, trace = h:wait()
    if ok then
      results[i] = value
    elseif not failure then
      failure = trace or value
      for j = i + 1, #handles do handles[j]:cancel() end
    end
  end
  if failure then error(failure, 0) end
  return results
end

local lazy = { proc = true, http = true, fs = true, json = true, db = true }

return setmetatable(M, {
  __index = function(t, k)
    if lazy[k] then
      local m = require("drover." .. k)
      rawset(t, k, m)
      return m
    end
  end,
})
