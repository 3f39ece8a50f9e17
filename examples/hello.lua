-- drover exec examples/hello.lua name=world
-- A workflow script: the file is the flow run; drover.task functions are
-- its task runs.
local drover = require "drover"
local params = ... or {}

local greet = drover.task("greet", function(name)
  drover.sleep(0.05)
  return "hello, " .. name
end, { retries = 1 })

local results = drover.map(greet, { params.name or "world", "drover", "lua" }, { concurrency = 2 })
for _, r in ipairs(results) do print(r) end
return results
