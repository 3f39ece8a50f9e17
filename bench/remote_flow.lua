--- bench/remote_flow.lua -- the workflow bench/remote.sh deploys: one
-- flow run calling a no-op drover.task `n` times (every call a task run
-- the worker reports), then `sleep` seconds of nothing (so a benchmark can
-- keep many workers alive at once without adding events).
local drover = require "drover"

local RemoteBench = drover.class("RemoteBench")

function RemoteBench:main(params)
  local n = math.tointeger(tonumber(params.n or 0))
  assert(n and n >= 0, "n must be a non-negative integer")
  local noop = drover.task("noop", function() end)
  for _ = 1, n do noop() end
  return n
end

return RemoteBench
