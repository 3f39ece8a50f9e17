-- bench/tracking.lua -- the workflow bench/tracking.sh runs with
--
--   drover exec bench/tracking.lua n=100000 mode=tracked|plain
--
-- One flow run that calls a no-op function n times: a drover.task
-- (mode=tracked: every call is a task run written to the store) or a plain
-- Lua function (mode=plain: the peer, the same loop without tracking).
-- With n=0 it measures what every run pays anyway (startup, the flow run's
-- own rows).  The store's final flush happens inside the exec process
-- (Flow:run flushes before recording the flow's end state), so timing the
-- whole process includes every write.
local drover = require "drover"
local params = ...
local n = math.tointeger(params.n or 100000)
local mode = params.mode or "tracked"
assert(n and n >= 0, "n must be a non-negative integer")

local f
if mode == "tracked" then
  f = drover.task("noop", function() end)
elseif mode == "plain" then
  f = function() end
else
  error("mode must be 'tracked' or 'plain', got " .. tostring(mode))
end

for _ = 1, n do f() end
