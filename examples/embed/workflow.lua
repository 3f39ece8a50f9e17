-- A workflow file the embedding program runs with drover_exec: one tracked
-- flow run whose task runs call back into the host program through
-- drover.host (functions the program registered with drover_register).
local drover = require "drover"
local params = ...

local shout = drover.task("shout", function(word)
  drover.sleep(0.01) -- tasks wait without blocking each other
  return drover.host.shout(word)
end)

local words = drover.map(shout, params.words or { "hello", "embedded", "drover" })
drover.log("workflow shouted " .. #words .. " words")
print(table.concat(words, " "))
return words -- drover_exec hands it back as "result"
