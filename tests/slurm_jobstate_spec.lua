-- The slurm backend's job-state parsing (backends/slurm/jobstate.lua) on
-- outputs recorded from the Slurm 22.05 cluster of tests/services/slurm.sh:
-- `scontrol show job -o ID` (*.scontrol.txt) and slurmrestd's GET
-- /slurm/v0.0.38/job/ID (*.rest.json) for the same job at the same moment,
-- plus squeue, GET /jobs and the jobcomp/filetxt file.  No cluster needed.
--
-- Recorded jobs: completed (true), failed (exit 3), signalled (the batch
-- shell killed by SIGKILL), running then cancelled (scancel), timeout
-- (--time=0:01), PENDING until a begin time (--begin=now+3600), held (-H),
-- an array 0-5%2 with two elements running and the rest PENDING
-- (array_running), an array
-- 1-3 whose elements exit with their index (array_failed), and an unknown
-- job id.
local H = require "helper"
local json = require "drover.json"
local states = require "drover.states"

local jobstate = assert(loadfile(H.root .. "/backends/slurm/jobstate.lua"))()
local dir = H.root .. "/tests/fixtures/slurm/recorded/"

local function read(name)
  local f = assert(io.open(dir .. name, "rb"))
  local s = f:read("a")
  f:close()
  return s
end

local function scontrol(name) return jobstate.parse_scontrol(read(name .. ".scontrol.txt")) end
local function rest(name) return jobstate.parse_rest(assert(json.decode(read(name .. ".rest.json")))) end

--- The records of both sources, with the fields both give.
local function both(name)
  return { scontrol = scontrol(name), rest = rest(name) }
end

local function fields(rec)
  return { state = rec.state, reason = rec.reason, exit_code = rec.exit_code, signal = rec.signal,
    task = rec.task, tasks = rec.tasks, job_id = rec.job_id }
end

describe("slurm job-state parsing on recorded outputs", function()
  -- one job, one record, the same from scontrol and slurmrestd
  local single = {
    completed = { state = "COMPLETED", reason = "None", exit_code = 0, signal = 0, job_id = "1" },
    failed = { state = "FAILED", reason = "NonZeroExitCode", exit_code = 3, signal = 0, job_id = "2" },
    cancelled = { state = "CANCELLED", reason = "None", exit_code = 0, signal = 15, job_id = "3" },
    running = { state = "RUNNING", reason = "None", exit_code = 0, signal = 0, job_id = "3" },
    timeout = { state = "TIMEOUT", reason = "TimeLimit", exit_code = 0, signal = 15, job_id = "4" },
    waiting = { state = "PENDING", reason = "BeginTime", exit_code = 0, signal = 0, job_id = "5" },
    held = { state = "PENDING", reason = "JobHeldUser", exit_code = 0, signal = 0, job_id = "6" },
    signalled = { state = "FAILED", reason = "JobLaunchFailure", exit_code = 0, signal = 9, job_id = "9" },
  }
  for name, want in pairs(single) do
    it(name .. ": scontrol and slurmrestd give the same record", function()
      local got = both(name)
      for source, recs in pairs(got) do
        assert.are.equal(1, #recs, source)
        assert.are.same(want, fields(recs[1]), source)
      end
    end)
  end

  it("a pending array: the rest of the range in one record, split-out elements in their own", function()
    for source, recs in pairs(both("array_running")) do
      assert.are.equal(3, #recs, source)
      local rest_rec = jobstate.pick(recs, "4")
      assert.are.same({ state = "PENDING", reason = "JobArrayTaskLimit", tasks = "2-5%2", job_id = "7",
        exit_code = 0, signal = 0 }, fields(rest_rec), source)
      local e0, e1 = jobstate.pick(recs, "0"), jobstate.pick(recs, "1")
      assert.are.equal("0", e0.task, source)
      assert.are.equal("RUNNING", e0.state, source)
      assert.are.equal("1", e1.task, source)
      assert.is_truthy(e0.node, source)
      assert.is_nil(jobstate.pick(recs, "6"), source) -- outside 0-5
      assert.are.equal("PENDING", jobstate.pick(recs, nil).state, source) -- the array's own record first
    end
  end)

  it("an array whose elements failed: each element's own exit code", function()
    for source, recs in pairs(both("array_failed")) do
      assert.are.equal(3, #recs, source)
      for t = 1, 3 do
        local rec = jobstate.pick(recs, tostring(t))
        assert.are.equal("FAILED", rec.state, source)
        assert.are.equal(t, rec.exit_code, source)
        assert.truthy(rec.job_id:match("^%d+$"), source)
      end
    end
  end)

  it("an unknown job: scontrol's error text, slurmrestd's empty list", function()
    assert.truthy(read("unknown.scontrol.txt"):find("Invalid job id", 1, true))
    assert.are.same({}, scontrol("unknown"))
    assert.are.same({}, rest("unknown"))
  end)

  it("squeue -o %A|%T|%k rows and GET /jobs filtered by name", function()
    local rows = jobstate.parse_squeue(read("squeue_named.txt"))
    assert.are.same({ { id = "14", state = "RUNNING", comment = "drover run R1 of deployment demo" } }, rows)
    local all = jobstate.parse_squeue(read("squeue.txt"))
    assert.is_true(#all >= 5)
    for _, r in ipairs(all) do assert.is_true(jobstate.ACTIVE[r.state], r.state) end
    local named = jobstate.active_named(assert(json.decode(read("jobs.rest.json"))), "drover:demo")
    assert.are.same(rows, named)
    assert.are.same({}, jobstate.active_named(assert(json.decode(read("jobs.rest.json"))), "drover:none"))
  end)

  it("the jobcomp file: a plain job by its id, an array element by its array and index", function()
    local content = read("jobcomp.txt")
    local c = jobstate.parse_jobcomp(content, "2", nil)
    assert.are.same({ "FAILED", 3, 0, "jobcomp" }, { c.state, c.exit_code, c.signal, c.source })
    local t = jobstate.parse_jobcomp(content, "8", "2")
    assert.are.same({ "FAILED", 2 }, { t.state, t.exit_code })
    assert.are.equal("TIMEOUT", jobstate.parse_jobcomp(content, "4", nil).state)
    assert.is_nil(jobstate.parse_jobcomp(content, "999", nil))
    assert.is_nil(jobstate.parse_jobcomp(content, "8", "9"))
  end)

  it("how a run still active ends, from its job's record", function()
    local function run_end(name, task)
      local recs = scontrol(name)
      return jobstate.run_end(name, jobstate.pick(recs, task))
    end
    assert.are.same({ states.FAILED, "slurm job failed FAILED (exit code 3): NonZeroExitCode" }, { run_end("failed") })
    assert.are.same({ states.CANCELLED, "slurm job cancelled CANCELLED (exit code 0, signal 15)" },
      { run_end("cancelled") })
    assert.are.same({ states.FAILED, "slurm job timeout TIMEOUT (exit code 0, signal 15): TimeLimit" }, { run_end("timeout") })
    -- COMPLETED, but the worker recorded no end of its own
    assert.are.same({ states.CRASHED, "slurm job completed COMPLETED" }, { run_end("completed") })
    assert.are.same({}, { run_end("running") })
    assert.are.same({}, { run_end("waiting") })
    assert.are.same({}, { run_end("held") })
    assert.are.same({}, { run_end("array_running", "5") })
    assert.are.equal(states.CRASHED, (jobstate.run_end("999", nil)))
  end)

  it("active and final job states, flags stripped", function()
    assert.is_true(jobstate.is_active("RUNNING"))
    assert.is_true(jobstate.is_active("PENDING"))
    assert.is_false(jobstate.is_active("CANCELLED by 0"))
    assert.is_false(jobstate.is_active(nil))
    assert.are.equal("CANCELLED", jobstate.name("CANCELLED by 0"))
    for st in pairs(jobstate.FINAL) do
      assert.is_true(states.final[jobstate.FINAL[st]], st)
    end
  end)

  it("array ranges and ids", function()
    assert.is_true(jobstate.in_ranges("2-5%2", 5))
    assert.is_false(jobstate.in_ranges("2-5%2", 1))
    assert.is_true(jobstate.in_ranges("1,3-7:2", 5))
    assert.is_false(jobstate.in_ranges("1,3-7:2", 4))
    assert.are.same({ "7", "4" }, { jobstate.split_id("7_4") })
    assert.are.same({ "12" }, { jobstate.split_id("12") })
  end)
end)
