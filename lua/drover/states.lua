--- Run states, after Prefect's model.  CANCELLING is the first phase of a
-- cancel (asked to stop), CANCELLED the second (the work has really ended).
--
-- The one place that lists them: the store's SQL (`sql_list`), the daemon's
-- loops and metrics, and every backend take their lists from here.
local M = {
  SCHEDULED = "SCHEDULED", PENDING = "PENDING", RUNNING = "RUNNING",
  COMPLETED = "COMPLETED", FAILED = "FAILED", CANCELLING = "CANCELLING",
  CANCELLED = "CANCELLED", CRASHED = "CRASHED",
}

--- Every state, in the order a run goes through them.
M.all = { "SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED", "CRASHED" }

-- The sets below as lists, in the order of `all` (stable SQL text, so the
-- store's statement cache keeps one statement per query).
M.final_list = { "COMPLETED", "FAILED", "CANCELLED", "CRASHED" }
M.active_list = { "SCHEDULED", "PENDING", "RUNNING", "CANCELLING" }
--- The active states in which a worker is (or was) running: it heartbeats.
M.working_list = { "RUNNING", "CANCELLING" }
--- The final states a worker records itself (a cancel may turn them into
-- CANCELLED afterwards: Slurm's cancelled_after_all).
M.ended_by_worker_list = { "COMPLETED", "FAILED" }

local function set(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end

M.final = set(M.final_list)
M.active = set(M.active_list)

function M.is_final(s) return M.final[s] == true end
function M.is_active(s) return M.active[s] == true end

--- A list of states as SQL string literals for `state IN (...)`:
-- sql_list(states.active_list) --> "'SCHEDULED','PENDING','RUNNING','CANCELLING'".
-- Only known state names pass: the text goes into SQL unbound.
function M.sql_list(list)
  local out = {}
  for i, s in ipairs(list) do
    if M[s] ~= s then error("states.sql_list: '" .. tostring(s) .. "' is not a run state", 2) end
    out[i] = "'" .. s .. "'"
  end
  if #out == 0 then error("states.sql_list: empty list", 2) end
  return table.concat(out, ",")
end

return M
