-- Fuzz harness: drover.cron (lua/drover/cron.lua), the schedule parser the
-- daemon runs every second on every deployed schedule.  Properties:
--   parse never raises: a schedule, or nil and one line starting "bad schedule";
--   it is bounded: a parse costs at most a fixed number of Lua instructions
--   per byte (run.sh adds libFuzzer's -timeout for time spent in string
--   patterns, which no instruction count sees);
--   a schedule's next() never raises and returns nil or a later time, and
--   an @every interval is positive and at most cron.MAX_INTERVAL.
local cron = require "drover.cron"

-- Fri 2026-01-02 10:17:30 UTC, fixed so a crash replays the same way.
local T0 = 1767349050
local BUDGET_PER_BYTE, BUDGET_BASE = 2000, 200000

local helpers = ...

-- pcall(fn, ...) within `budget` VM instructions (the driver's count hook)
local function bounded(fn, budget, ...)
  helpers.budget(budget)
  local r = table.pack(pcall(fn, ...))
  helpers.budget(nil)
  return table.unpack(r, 1, r.n)
end

return function(data)
  local ok, sch, err = bounded(cron.parse, BUDGET_BASE + BUDGET_PER_BYTE * #data, data)
  if not ok then error("parse raised: " .. tostring(sch)) end
  if not sch then
    if type(err) ~= "string" or not err:find("^bad schedule") or err:find("\n", 1, true) and not data:find("\n", 1, true) then
      error("parse failed without one line naming it: " .. tostring(err))
    end
    return
  end
  if sch.kind == "every" then
    if math.type(sch.interval) ~= "integer" or sch.interval <= 0 or sch.interval > cron.MAX_INTERVAL then
      error("bad interval " .. tostring(sch.interval))
    end
  end
  -- next(): up to 100,000 steps of os.time each, by its own bound
  local ok2, n = bounded(sch.next, 50000000, sch, T0)
  if not ok2 then error("next raised: " .. tostring(n)) end
  if n ~= nil and (math.type(n) ~= "integer" or n <= T0) then error("next gave " .. tostring(n) .. " after " .. T0) end
end
