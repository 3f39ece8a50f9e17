--- Run states, after Prefect's model.  CANCELLING is the first phase of a
-- cancel (asked to stop), CANCELLED the second (the work has really ended).
local M = {
  SCHEDULED = "SCHEDULED", PENDING = "PENDING", RUNNING = "RUNNING",
  COMPLETED = "COMPLETED", FAILED = "FAILED", CANCELLING = "CANCELLING",
  CANCELLED = "CANCELLED", CRASHED = "CRASHED",
}

M.final = { COMPLETED = true, FAILED = true, CANCELLED = true, CRASHED = true }
M.active = { SCHEDULED = true, PENDING = true, RUNNING = true, CANCELLING = true }

function M.is_final(s) return M.final[s] == true end

return M
