--- An example workflow in lolpop's shape: a runner class whose entrypoint
-- calls components.  Several tasks, some in parallel, one retried.
--
--   drover package --module pipeline --class Pipeline --entrypoint run --path examples/etl
local drover = require "drover"
local steps = require "steps"

local Pipeline = drover.class("Pipeline")
Pipeline.integration_type = "runner"   -- its methods become flow runs
Pipeline.task_options = {
  -- the flaky download fails on its first attempt and is retried
  download = { retries = 2, retry_delay = 0.2 },
}

function Pipeline:init(params)
  self.params = params or {}
  self.steps = drover.decorate(steps.Steps, drover.orchestrator("local")):new()
end

function Pipeline:download(source)
  self.attempts = (self.attempts or 0) + 1
  if self.attempts == 1 then error("connection reset while downloading " .. source) end
  return { source = source, rows = 1000 }
end

function Pipeline:run(params)
  local n = tonumber(params.shards) or 4
  local data = self:download(params.source or "s3://example/data.csv")
  -- transform the shards in parallel, at most 2 at a time
  local shards = {}
  for i = 1, n do shards[i] = i end
  local parts = drover.map(function(i) return self.steps:transform(i, data.rows // n) end, shards,
    { concurrency = 2 })
  local total = self.steps:load(parts)
  print(string.format("loaded %d rows from %d shards", total, #parts))
  return { rows = total }
end

return Pipeline
