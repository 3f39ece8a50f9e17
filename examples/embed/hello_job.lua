--- The job the embedding program deploys on the local backend: packaged
-- (this file and what it requires from this directory), deployed, and run
-- by a `drover worker` process.  Host functions do not exist there: the
-- worker is a separate program.
local drover = require "drover"

local HelloJob = drover.class("HelloJob")
HelloJob.integration_type = "pipeline"

function HelloJob:main(params)
  print("hello from a local worker, " .. (params.who or "nobody"))
  return { ok = true }
end

return HelloJob
