--- Job-state parsing of the slurm backend: Slurm's answers (`scontrol show
-- job -o`, slurmrestd's GET /job/ID, `squeue`, the jobcomp/filetxt file)
-- into job records, and what a job's state means for a drover run.  Pure
-- functions of text and decoded JSON: tests/slurm_jobstate_spec.lua checks
-- them on recorded outputs, without a cluster.
--
-- A job record: { job_id, task = "3" | nil (an array element), tasks =
-- "2-5%2" | nil (the array's elements not yet split out), state, reason,
-- exit_code, signal, node, source = "jobcomp" | nil }.
local states = require "drover.states"

local M = {}

-- Slurm's job states that still hold or wait for resources.
-- (Slurm 22.05's job state names, as squeue/scontrol/slurmrestd print them;
-- held ones included: `stop` cancels them too.)
M.ACTIVE = { PENDING = true, RUNNING = true, CONFIGURING = true, COMPLETING = true, SUSPENDED = true,
  REQUEUED = true, RESIZING = true, SIGNALING = true, STAGE_OUT = true, STOPPED = true,
  REQUEUE_HOLD = true, REQUEUE_FED = true, RESV_DEL_HOLD = true, SPECIAL_EXIT = true }

-- Slurm's final job states and the drover state a run left active ends in.
M.FINAL = {
  COMPLETED = states.CRASHED, -- the job ended well but the worker recorded no end
  FAILED = states.FAILED, TIMEOUT = states.FAILED, OUT_OF_MEMORY = states.FAILED, DEADLINE = states.FAILED,
  CANCELLED = states.CANCELLED, PREEMPTED = states.CANCELLED,
  NODE_FAIL = states.CRASHED, BOOT_FAIL = states.CRASHED,
  -- held after a special exit code (the job waits for an admin's release),
  -- or a federation sibling revoked: this run's job will not run its end
  SPECIAL_EXIT = states.FAILED, REVOKED = states.FAILED,
  -- STOPPED (SIGSTOP) still holds its allocation: not final
}

--- The state's name without its flags: "CANCELLED by 1000" and
-- "RUNNING+..." give "CANCELLED" and "RUNNING"; nil for nil or "".
function M.name(state)
  return (tostring(state or "")):match("^(%u[%u_]*)")
end

--- Does a job in `state` still hold or wait for resources?
function M.is_active(state) return M.ACTIVE[M.name(state)] == true end

--- "KEY=VALUE KEY=VALUE" (scontrol -o, jobcomp lines) into a table; the
-- first of a repeated key wins.
function M.keyvals(line)
  local t = {}
  for k, v in line:gmatch("(%w+)=(%S*)") do if t[k] == nil then t[k] = v end end
  return t
end

local function exit_status(s)
  local code, sig = (s or "0:0"):match("^(%d+):(%d+)$")
  return tonumber(code) or 0, tonumber(sig) or 0
end

--- The records of `scontrol show job -o JOB`'s output (one line per
-- record: an array gives one per element split out, and one for the rest).
function M.parse_scontrol(out)
  local recs = {}
  for line in out:gmatch("[^\n]+") do
    local kv = M.keyvals(line)
    if kv.JobId then
      local code, sig = exit_status(kv.ExitCode)
      local t = kv.ArrayTaskId
      recs[#recs + 1] = { task = t and t:match("^%d+$") and t or nil, tasks = t and not t:match("^%d+$") and t or nil,
        state = kv.JobState, reason = kv.Reason, exit_code = code, signal = sig,
        job_id = kv.JobId, node = kv.NodeList ~= "(null)" and kv.NodeList or nil }
    end
  end
  return recs
end

--- The records of slurmrestd's GET /job/JOB (decoded JSON).
function M.parse_rest(body)
  local recs = {}
  for _, j in ipairs(body.jobs or {}) do
    local ec = math.tointeger(j.exit_code) or 0
    local t = math.tointeger(j.array_task_id)
    local ts = j.array_task_string
    -- exit_code is a wait status: the code in the high byte, the signal in the low
    recs[#recs + 1] = { task = t and tostring(t) or nil,
      tasks = type(ts) == "string" and ts ~= "" and ts or nil, state = j.job_state, reason = j.state_reason,
      exit_code = ec >> 8, signal = ec & 0x7f, job_id = tostring(math.tointeger(j.job_id) or j.job_id),
      node = type(j.nodes) == "string" and j.nodes ~= "" and j.nodes or nil }
  end
  return recs
end

--- The final record of job `jobid` (array element `task` when given) in the
-- jobcomp/filetxt file's `content`, or nil.
function M.parse_jobcomp(content, jobid, task)
  -- an array element by its array's id and its index (22.05's filetxt
  -- records both), a plain job by its own id
  local want = task and (" ArrayJobId=" .. jobid .. " ArrayTaskId=" .. task .. " ")
  local found
  for line in content:gmatch("[^\n]+") do
    if want then
      if line:find(want, 1, true) then found = line end
    elseif line:find("JobId=" .. jobid .. " ", 1, true) == 1 then found = line end
  end
  if not found then return nil end
  local kv = M.keyvals(found)
  local code, sig = exit_status(kv.ExitCode)
  return { state = kv.JobState, reason = nil, exit_code = code, signal = sig, node = kv.NodeList, source = "jobcomp" }
end

--- Is task number `n` in an array range expression ("0-5%2", "1,3-7:2")?
function M.in_ranges(expr, n)
  expr = tostring(expr or ""):gsub("%%.*$", "")
  for piece in expr:gmatch("[^,]+") do
    local a, b, step = piece:match("^(%d+)%-(%d+):?(%d*)$")
    if a then
      a, b, step = tonumber(a), tonumber(b), tonumber(step) or 1
      if n >= a and n <= b and (n - a) % step == 0 then return true end
    elseif tonumber(piece) == n then
      return true
    end
  end
  return false
end

--- "123" or "123_4" (an array element) into the job id and the task.
function M.split_id(ext)
  local job, task = tostring(ext):match("^(%d+)_(%d+)$")
  return job or tostring(ext), task
end

--- The record of `task` (nil: the job itself, the first record) among a
-- job's `recs`: its own, or the array's pending rest holding it; nil if
-- none.
function M.pick(recs, task)
  local pending
  for _, rec in ipairs(recs) do
    if not task or rec.task == task then return rec end
    -- a task not yet split out of the array's record: still pending
    if rec.tasks and M.in_ranges(rec.tasks, tonumber(task)) then pending = rec end
  end
  return pending
end

--- `squeue -h -o "%A|%T|%k"` output into { id, state, comment } rows.
function M.parse_squeue(out)
  local jobs = {}
  for line in out:gmatch("[^\n]+") do
    local id, st, comment = line:match("^%s*(%d+)|([%u_]+)|(.*)$")
    if id then jobs[#jobs + 1] = { id = id, state = st, comment = comment } end
  end
  return jobs
end

--- The active jobs named `name` in slurmrestd's GET /jobs (decoded JSON),
-- as { id, state, comment } rows.
function M.active_named(body, name)
  local jobs = {}
  for _, j in ipairs(body.jobs or {}) do
    local st = M.name(j.job_state)
    if j.name == name and M.ACTIVE[st] then
      jobs[#jobs + 1] = { id = tostring(math.tointeger(j.job_id) or j.job_id), state = st,
        comment = type(j.comment) == "string" and j.comment or "" }
    end
  end
  return jobs
end

--- How a run still active in the store ends, given its job `ext`'s record
-- `info` (nil: Slurm has no record of it): the drover final state and the
-- message, or nil while the job still holds or waits for resources.
function M.run_end(ext, info)
  if not info then
    return states.CRASHED, "slurm job " .. ext .. " is unknown to slurmctld and the jobcomp file"
  end
  local st = M.name(info.state)
  local final = M.FINAL[st]
  if not final then return nil end
  local why = "slurm job " .. ext .. " " .. st
  if info.exit_code ~= 0 or info.signal ~= 0 then
    why = why .. " (exit code " .. info.exit_code .. (info.signal ~= 0 and (", signal " .. info.signal) or "") .. ")"
  end
  if info.reason and info.reason ~= "None" and info.reason ~= "" then why = why .. ": " .. info.reason end
  return final, why
end

return M
