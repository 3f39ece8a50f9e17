--- Components of the example pipeline: each call becomes a task run.
local drover = require "drover"

local M = {}
M.Steps = drover.class("Steps")
M.Steps.integration_type = "component"

function M.Steps:transform(shard, rows)
  -- real work in a real process: a child that sleeps a little
  local r = assert(drover.proc.run({ "sleep", "0.2" }))
  assert(r.code == 0)
  print(string.format("shard %d: %d rows", shard, rows))
  return rows
end

function M.Steps:load(parts)
  local total = 0
  for _, n in ipairs(parts) do total = total + n end
  return total
end

return M
