-- Tracked calls: decorators, nesting, retries, timeouts, cache, tags,
-- catch, hooks, cancel and resume -- against a real SQLite store.
local drover = require "drover"
local H = require "helper"
local store_mod = require "drover.store"
local tracker = require "drover.tracker"

local function fresh_store()
  local dir = H.tempdir()
  local s = assert(store_mod.open(dir))
  return s, dir
end

local function task_by_name(store, flow_id, name)
  for _, t in ipairs(store:task_runs(flow_id)) do if t.name == name then return t end end
end

local function alive(pattern)
  -- "[s]leep" matches sleep but not the shell running pgrep itself
  local p = io.popen("pgrep -f '[" .. pattern:sub(1, 1) .. "]" .. pattern:sub(2) .. "'")
  local out = p:read("a")
  p:close()
  return out ~= ""
end

describe("tracked calls", function()
  local store, dir
  local notices, real_notice -- the one-line notices of failed attempts, kept off busted's output
  before_each(function()
    store, dir = fresh_store()
    notices, real_notice = {}, tracker.notice
    tracker.notice = function(line) notices[#notices + 1] = line end
  end)
  after_each(function()
    tracker.notice = real_notice
    store:close(); os.execute("rm -rf " .. dir)
  end)

  local function run_flow(fn, info)
    info = info or {}
    info.store = store
    info.name = info.name or "test-flow"
    local flow = tracker.begin_flow(info)
    local ok, value = drover.run(function() return flow:run(fn) end)
    store:flush()
    return flow, ok, value
  end

  it("decorated classes: runner methods are flows, component methods tasks, nested with parents", function()
    local orch = drover.orchestrator("local", { home = dir })
    local Comp = drover.class("Comp")
    Comp.integration_type = "component"
    function Comp:double(x) return x * 2 end
    local Runner = drover.class("Runner")
    Runner.integration_type = "runner"
    function Runner:go(n)
      local c = drover.decorate(Comp, orch):new()
      return c:double(n) + c:double(1)
    end
    drover.decorate(Runner, orch)
    local flow, ok, value = run_flow(function() return Runner:new():go(20) end)
    assert.is_true(ok)
    assert.are.equal(42, value)
    local runs = store:task_runs(flow.id)
    assert.are.equal(3, #runs)
    local go = task_by_name(store, flow.id, "Runner.go")
    assert.are.equal("flow", go.kind)
    assert.are.equal("COMPLETED", go.state)
    assert.are.equal("[20]", go.params)
    assert.are.equal("42", go.result)
    local doubles = 0
    for _, t in ipairs(runs) do
      if t.name == "Comp.double" then
        doubles = doubles + 1
        assert.are.equal("task", t.kind)
        assert.are.equal(go.id, t.parent_id)
        assert.is_true(t.ended >= t.started)
      end
    end
    assert.are.equal(2, doubles)
    assert.are.equal("COMPLETED", store:flow_run(flow.id).state)
  end)

  it("retries until success, recording attempts", function()
    local calls, line_of_transient = 0, nil
    local flaky = drover.task("flaky", function()
      calls = calls + 1
      line_of_transient = debug.getinfo(1, "l").currentline + 1
      if calls < 3 then error("transient " .. calls) end
      return "ok"
    end, { retries = 3, retry_delay = { 0.01, 0.02 } })
    local flow, ok = run_flow(function() return flaky() end)
    assert.is_true(ok)
    local t = task_by_name(store, flow.id, "flaky")
    assert.are.equal("COMPLETED", t.state)
    assert.are.equal(3, t.attempts)
    assert.are.equal(3, calls)
    assert.are.same({ "task flaky attempt 1/4 failed: " .. debug.getinfo(1, "S").short_src ..
      ":" .. line_of_transient .. ": transient 1; retrying in 0.01s",
      "task flaky attempt 2/4 failed: " .. debug.getinfo(1, "S").short_src ..
      ":" .. line_of_transient .. ": transient 2; retrying in 0.02s" }, notices)
  end)

  it("keeps each call's traceback: two tasks failing at once each log their own", function()
    local go = drover.event()
    local line = {}
    local function failing(name, opts)
      return drover.task(name, function()
        go:wait()
        if name == "left" then
          line.left = debug.getinfo(1, "l").currentline + 1
          error("left broke")
        end
        line.right = debug.getinfo(1, "l").currentline + 1
        error("right broke")
      end, opts)
    end
    -- "right" runs under a timeout, in a task of its own: the other path
    local left = failing("left", { catch = true })
    local right = failing("right", { catch = true, timeout = 30 })
    local flow, ok = run_flow(function()
      local both = drover.all {
        function() return left() end,
        function() return right() end,
        function() drover.sleep(0.01); go:set() end,
      }
      return both
    end)
    assert.is_true(ok)
    local logs = store:logs(flow.id)
    for _, name in ipairs { "left", "right" } do
      local other = name == "left" and "right" or "left"
      local t = task_by_name(store, flow.id, name)
      assert.are.equal("FAILED", t.state)
      local trace
      for _, l in ipairs(logs) do
        if l.task_run_id == t.id and l.stream == "error" then
          assert.is_nil(trace, "one traceback for " .. name)
          trace = l.line
        end
      end
      assert.is_string(trace, "a traceback for " .. name)
      assert.matches("^attempt 1 of " .. name .. " failed: [^\n]*:" .. line[name] .. ": " .. name .. " broke\n", trace)
      assert.matches("stack traceback:", trace, 1, true)
      assert.is_nil(trace:find(other .. " broke", 1, true))
      assert.is_nil(trace:find(":" .. line[other] .. ":", 1, true))
    end
  end)

  it("fails after the last retry with the error as message, and the flow fails", function()
    local boom = drover.task("boom", function() error("always broken") end, { retries = 1 })
    local flow, ok, err = run_flow(function() return boom() end)
    assert.is_false(ok)
    assert.matches("always broken", err)
    local t = task_by_name(store, flow.id, "boom")
    assert.are.equal("FAILED", t.state)
    assert.are.equal(2, t.attempts)
    assert.matches("always broken", t.message)
    local fr = store:flow_run(flow.id)
    assert.are.equal("FAILED", fr.state)
    assert.matches("always broken", fr.message)
  end)

  it("retry delays: numbers, lists and backoff functions", function()
    assert.are.equal(2, tracker.retry_delay({ retry_delay = 2 }, 1))
    assert.are.equal(5, tracker.retry_delay({ retry_delay = { 1, 5 } }, 3))
    local b = drover.backoff(1, 2, 10)
    assert.are.equal(1, b(1)); assert.are.equal(4, b(3)); assert.are.equal(10, b(9))
    for _ = 1, 50 do
      local d = tracker.retry_delay({ retry_delay = 10, retry_jitter = 0.5 }, 1)
      assert.is_true(d >= 5 and d <= 15)
    end
  end)

  it("a timeout ends the call and kills the processes it started", function()
    local marker = tostring(3000 + math.random(1, 5000)) .. ".5"
    local slow = drover.task("slow", function()
      return drover.proc.run({ "sh", "-c", "sleep " .. marker .. "; echo never" })
    end, { timeout = 0.5 })
    local flow, ok, err = run_flow(function() return slow() end)
    assert.is_false(ok)
    assert.matches("timed out after 0.5 s", err)
    assert.are.equal("FAILED", task_by_name(store, flow.id, "slow").state)
    H.wait_until(function() return not alive("sleep " .. marker) end, 10, "sleep process gone")
  end)

  it("cache_key: a COMPLETED result is reused until it expires", function()
    local runs = 0
    local expensive = drover.task("expensive", function(x) runs = runs + 1; return x * 10 end,
      { cache_key = function(x) return "x=" .. x end, cache_expiration = 0.3 })
    local _, ok, v = run_flow(function() return expensive(4) + expensive(4) end)
    assert.is_true(ok)
    assert.are.equal(80, v)
    assert.are.equal(1, runs)
    run_flow(function() return expensive(5) end)
    assert.are.equal(2, runs)
    drover.sleep(0.4)
    run_flow(function() return expensive(4) end)
    assert.are.equal(3, runs)
  end)

  it("tags limit how many task runs run at once", function()
    drover.limit("db-" .. dir, 2)
    local running, peak = 0, 0
    local query = drover.task("query", function()
      running = running + 1
      peak = math.max(peak, running)
      drover.sleep(0.05)
      running = running - 1
    end, { tags = { "db-" .. dir } })
    local _, ok = run_flow(function()
      drover.map(query, { 1, 2, 3, 4, 5, 6 })
    end)
    assert.is_true(ok)
    assert.are.equal(2, peak)
  end)

  it("tags hand their slots over in the order tasks asked; one cancelled while it waits leaves the queue", function()
    local tag = "fifo-" .. dir
    drover.limit(tag, 1)
    local order = {}
    local gate = drover.event()
    local step = drover.task("step", function(name)
      order[#order + 1] = name
      if name == "first" then gate:wait() end
    end, { tags = { tag }, catch = true })
    local _, ok = run_flow(function()
      local hs = { drover.spawn(step, "first") }
      drover.sleep(0.05) -- "first" holds the slot
      for i = 1, 300 do hs[#hs + 1] = drover.spawn(step, "w" .. i) end
      drover.sleep(0.05) -- all 300 wait, in order
      hs[3]:cancel() -- "w2"
      hs[200]:cancel() -- "w199"
      gate:set()
      for _, h in ipairs(hs) do pcall(h.join, h) end
    end)
    assert.is_true(ok)
    assert.are.equal(299, #order)
    assert.are.equal("first", order[1])
    local k = 2
    for i = 1, 300 do
      if i ~= 2 and i ~= 199 then
        assert.are.equal("w" .. i, order[k])
        k = k + 1
      end
    end
  end)

  it("catch records the failure and lets the flow go on", function()
    local bad = drover.task("bad", function() error("nope") end, { catch = true })
    local flow, ok, v = run_flow(function()
      local r, err = bad()
      assert(r == nil and err:match("nope"))
      return "carried on"
    end)
    assert.is_true(ok)
    assert.are.equal("carried on", v)
    assert.are.equal("FAILED", task_by_name(store, flow.id, "bad").state)
    assert.are.equal("COMPLETED", store:flow_run(flow.id).state)
  end)

  it("hooks run on completion and on failure", function()
    local seen = {}
    local opts = {
      on_completion = function(info, result) seen[#seen + 1] = "done:" .. info.name .. ":" .. result end,
      on_failure = function(info) seen[#seen + 1] = "failed:" .. info.name end,
      catch = true,
    }
    local good = drover.task("good", function() return "r" end, opts)
    local bad = drover.task("bad", function() error("x") end, opts)
    run_flow(function() good(); bad() end)
    assert.are.same({ "done:good:r", "failed:bad" }, seen)
  end)

  it("drover.map runs items concurrently, results in order, tracked under the flow", function()
    local sq = drover.task("square", function(x) drover.sleep(0.01 * (5 - x)); return x * x end)
    local flow, ok, v = run_flow(function() return drover.map(sq, { 1, 2, 3, 4 }, { concurrency = 2 }) end)
    assert.is_true(ok)
    assert.are.same({ 1, 4, 9, 16 }, v)
    local n = 0
    for _, t in ipairs(store:task_runs(flow.id)) do
      if t.name == "square" then n = n + 1; assert.are.equal("COMPLETED", t.state) end
    end
    assert.are.equal(4, n)
  end)

  it("cancel is two-phase: CANCELLING, then CANCELLED once processes are gone", function()
    local marker = tostring(4000 + math.random(1, 5000)) .. ".5"
    local long = drover.task("long", function()
      return drover.proc.run({ "sh", "-c", "sleep " .. marker })
    end)
    local flow = tracker.begin_flow { store = store, name = "cancel-me" }
    local ok
    drover.run(function()
      local h = drover.spawn(function() return flow:run(function() return long() end) end)
      H.wait_until(function() return alive("sleep " .. marker) end, 20, "sleep started")
      flow:cancel("test cancel")
      ok = h:join()
    end)
    assert.is_false(ok)
    store:flush()
    local history = {}
    for _, st in ipairs(store:flow_run_states(flow.id)) do history[#history + 1] = st.state end
    assert.are.same({ "RUNNING", "CANCELLING", "CANCELLED" }, history)
    assert.are.equal("CANCELLED", task_by_name(store, flow.id, "long").state)
    assert.is_false(alive("sleep " .. marker))
  end)

  it("resume reuses COMPLETED task runs and reruns what failed", function()
    local ran = {}
    local broken = true
    local step = function(name)
      return drover.task(name, function(x)
        ran[#ran + 1] = name
        if name == "three" and broken then error("step three broke") end
        return x + 1
      end)
    end
    local one, two, three = step("one"), step("two"), step("three")
    local body = function() return three(two(one(0))) end
    local flow1, ok1 = run_flow(body)
    assert.is_false(ok1)
    assert.are.same({ "one", "two", "three" }, ran)
    broken, ran = false, {}
    local flow2, ok2, v = run_flow(body, { resumed_from = flow1.id })
    assert.is_true(ok2)
    assert.are.equal(3, v)
    assert.are.same({ "three" }, ran)
    assert.are.equal(flow1.id, store:flow_run(flow2.id).resumed_from)
    assert.are.equal(task_by_name(store, flow1.id, "one").id, task_by_name(store, flow2.id, "one").reused_from)
  end)

  it("resume does not reuse a call whose parameters changed", function()
    local ran = 0
    local t = drover.task("t", function(x) ran = ran + 1; return x end)
    local f1 = run_flow(function() t(1); error("later failure") end)
    run_flow(function() return t(2) end, { resumed_from = f1.id })
    assert.are.equal(2, ran)
  end)

  it("checks task options", function()
    assert.has_error(function() drover.task("x", function() end, { retires = 3 }) end,
      "drover.task: unknown task option 'retires'")
    assert.has_error(function() drover.task("x", function() end, { retries = "3" }) end,
      "drover.task: task option 'retries' must be number, got string")
    assert.has_error(function() drover.task(42, function() end) end)
  end)

  it("print-free logging: drover.log writes to the run's logs", function()
    local flow = run_flow(function() drover.log("a line", 42) end)
    local logs = store:logs(flow.id)
    assert.are.equal("a line 42", logs[#logs].line)
  end)
end)

describe("the store", function()
  it("is SQLite in WAL mode with a schema version", function()
    local s, dir = fresh_store()
    assert.are.equal("wal", s.db:value("PRAGMA journal_mode"))
    assert.are.equal(store_mod.SCHEMA_VERSION, s.db:user_version())
    s:close()
    -- reopening migrates nothing and keeps data
    local s2 = assert(store_mod.open(dir))
    s2:close()
    os.execute("rm -rf " .. dir)
  end)

  it("refuses a file that is not a drover store", function()
    local dir = H.tempdir()
    local f = io.open(dir .. "/drover.db", "w")
    f:write(string.rep("this is not sqlite\n", 100))
    f:close()
    local s, err = store_mod.open(dir)
    assert.is_nil(s)
    assert.matches("not a drover store: " .. dir:gsub("%-", "%%-") .. "/drover.db", err)
    os.execute("rm -rf " .. dir)
  end)

  it("refuses an SQLite database of another application", function()
    local dir = H.tempdir()
    os.execute("sqlite3 " .. dir .. "/drover.db 'CREATE TABLE other(x)'")
    local s, err = store_mod.open(dir)
    assert.is_nil(s)
    assert.matches("not a drover store", err)
    os.execute("rm -rf " .. dir)
  end)
end)
