-- The scheduler: tasks are coroutines on one libuv loop.
local drover = require "drover"
local H = require "helper"

describe("drover scheduler", function()
  it("spawn/join returns every result of the function", function()
    local a, b, c = drover.run(function()
      local h = drover.spawn(function(x, y) drover.sleep(0.01); return x + y, "two", nil end, 1, 2)
      return h:join()
    end)
    assert.are.equal(3, a)
    assert.are.equal("two", b)
    assert.is_nil(c)
  end)

  it("join re-raises the task's error with its traceback", function()
    local ok, err = pcall(drover.run, function()
      local h = drover.spawn(function() drover.sleep(0.01); error("kaboom") end)
      return h:join()
    end)
    assert.is_false(ok)
    assert.matches("sched_spec.lua:%d+: kaboom", err)
    assert.matches("stack traceback", err)
  end)

  it("wait() is the pcall-style join", function()
    drover.run(function()
      local h = drover.spawn(function() error({ code = 7 }) end)
      local ok, e = h:wait()
      assert.is_false(ok)
      assert.are.equal(7, e.code)
      local h2 = drover.spawn(function() return "fine" end)
      assert.are.same({ true, "fine" }, { h2:wait() })
    end)
  end)

  it("an error in one task does not stop the others", function()
    local got = drover.run(function()
      local bad = drover.spawn(function() error("one task fails") end)
      local good = drover.spawn(function() drover.sleep(0.02); return "others carry on" end)
      bad:wait()
      return good:join()
    end)
    assert.are.equal("others carry on", got)
  end)

  it("tasks run concurrently: sleeps overlap", function()
    local t0 = drover.now()
    drover.run(function()
      local hs = {}
      for i = 1, 50 do hs[i] = drover.spawn(drover.sleep, 0.2) end
      for _, h in ipairs(hs) do h:join() end
    end)
    -- 50 serial sleeps would take 10 s; overlapped they take about 0.2 s.
    assert.is_true(drover.now() - t0 < 5)
  end)

  it("drover.all returns results in order", function()
    local r = drover.run(function()
      return drover.all {
        function() drover.sleep(0.05); return "slow" end,
        function() return "fast" end,
        function() drover.sleep(0.01); return 3 end,
      }
    end)
    assert.are.same({ "slow", "fast", 3 }, r)
  end)

  it("drover.all raises the first failure and cancels the rest", function()
    local finished = false
    local ok, err = pcall(drover.run, function()
      return drover.all {
        function() error("first fails") end,
        function() drover.sleep(30); finished = true end,
      }
    end)
    assert.is_false(ok)
    assert.matches("first fails", err)
    assert.is_false(finished)
  end)

  it("drover.all checks its argument", function()
    assert.has_error(function() drover.all(42) end,
      "drover.all: bad argument 'fns' (table expected, got number)")
    assert.has_error(function() drover.all({ 1 }) end,
      "drover.all: bad argument 'fns[1]' (function expected, got number)")
  end)

  it("drover.run waits for tasks spawned and not joined", function()
    local done = 0
    drover.run(function()
      for _ = 1, 5 do drover.spawn(function() drover.sleep(0.02); done = done + 1 end) end
    end)
    assert.are.equal(5, done)
  end)

  it("cancel stops a sleeping task, which ends cancelled", function()
    drover.run(function()
      local h = drover.spawn(function() drover.sleep(60) end)
      drover.sleep(0.01)
      assert.is_true(h:cancel())
      local ok, err = h:wait()
      assert.is_false(ok)
      assert.matches("cancelled", err)
      assert.are.equal("cancelled", h:status())
      assert.is_false(h:cancel()) -- already finished
    end)
  end)

  it("cancel of a task that never ran finishes it without running", function()
    local ran = false
    drover.run(function()
      local h = drover.spawn(function() ran = true end)
      h:cancel()
      assert.is_false((h:wait()))
    end)
    assert.is_false(ran)
  end)

  it("a cancelled task can clean up and still wait once", function()
    local cleaned = false
    drover.run(function()
      local h = drover.spawn(function()
        local ok = pcall(drover.sleep, 60)
        if not ok then drover.sleep(0.01); cleaned = true end
        return "cleaned"
      end)
      drover.sleep(0.01)
      h:cancel()
      assert.are.equal("cleaned", h:join())
    end)
    assert.is_true(cleaned)
  end)

  it("cancelling a joiner leaves the joined task alone", function()
    drover.run(function()
      local target = drover.spawn(function() drover.sleep(0.1); return "target done" end)
      local joiner = drover.spawn(function() return target:join() end)
      drover.sleep(0.01)
      joiner:cancel()
      assert.is_false((joiner:wait()))
      assert.are.equal("target done", target:join())
    end)
  end)

  it("handles report id and status, and print nicely", function()
    drover.run(function()
      local h = drover.spawn(function() drover.sleep(0.01) end)
      assert.is_number(h.id)
      assert.are.equal("ready", h:status())
      drover.yield()
      assert.are.equal("waiting", h:status())
      h:join()
      assert.are.equal("done", h:status())
      assert.matches("drover.task%(%d+, done%)", tostring(h))
    end)
  end)

  it("current() is the running task, nil outside", function()
    assert.is_nil(drover.current())
    drover.run(function()
      local me
      local h = drover.spawn(function() me = drover.current() end)
      h:join()
      assert.are.equal(h, me)
    end)
  end)

  it("coroutine.yield inside a task yields to other tasks", function()
    local order = {}
    drover.run(function()
      local a = drover.spawn(function()
        for i = 1, 3 do order[#order + 1] = "a" .. i; coroutine.yield() end
      end)
      local b = drover.spawn(function()
        for i = 1, 3 do order[#order + 1] = "b" .. i; drover.yield() end
      end)
      a:join(); b:join()
    end)
    assert.are.same({ "a1", "b1", "a2", "b2", "a3", "b3" }, order)
  end)

  it("primitives work outside any task (plain script mode)", function()
    local t0 = drover.now()
    drover.sleep(0.05)
    assert.is_true(drover.now() - t0 >= 0.04)
    local h = drover.spawn(function() drover.sleep(0.01); return 42 end)
    assert.are.equal(42, h:join())
  end)

  it("waiting inside a coroutine drover does not manage is a clear error", function()
    drover.run(function()
      local co = coroutine.wrap(function() drover.sleep(0.01) end)
      local ok, err = pcall(co)
      assert.is_false(ok)
      assert.matches("coroutine drover does not manage", err)
    end)
  end)

  it("waiting across a C-call boundary is a clear error", function()
    drover.run(function()
      local ok, err = pcall(table.sort, { 3, 1, 2 }, function(a, b) drover.sleep(0); return a < b end)
      assert.is_false(ok)
      assert.matches("C%-call boundary", err)
    end)
  end)

  it("a task cannot join itself", function()
    drover.run(function()
      local h
      h = drover.spawn(function() drover.yield(); return pcall(h.join, h) end)
      local ok, err = h:join()
      assert.is_false(ok)
      assert.matches("cannot join itself", err)
    end)
  end)

  it("checks argument types", function()
    assert.has_error(function() drover.spawn(42) end,
      "drover.spawn: bad argument 'fn' (function expected, got number)")
    assert.has_error(function() drover.sleep("x") end,
      "drover.sleep: bad argument 'seconds' (number expected, got string)")
    assert.has_error(function() drover.sleep(-1) end)
    assert.has_error(function() drover.spawn(print).join(nil) end)
  end)

  it("callable tables can be spawned", function()
    local callable = setmetatable({}, { __call = function(_, x) return x * 2 end })
    assert.are.equal(14, drover.run(callable, 7))
  end)

  it("now() is monotonic and in seconds", function()
    local a = drover.now()
    drover.sleep(0.02)
    local b = drover.now()
    assert.is_true(b > a and b - a < 5)
  end)

  it("10,000 tasks run and finish", function()
    local n = 0
    drover.run(function()
      for _ = 1, 10000 do drover.spawn(function() drover.yield(); n = n + 1 end) end
    end)
    assert.are.equal(10000, n)
  end)

  it("the drover binary runs scripts inside the scheduler with arg set", function()
    local dir = H.tempdir()
    local f = io.open(dir .. "/s.lua", "w")
    f:write([[
      local drover = require "drover"
      assert(drover.current(), "main chunk should be a task")
      local h = drover.spawn(function() drover.sleep(0.01); return #arg end)
      print(arg[0]:match("s.lua$"), arg[1], arg[2], h:join())
    ]])
    f:close()
    local p = io.popen(H.drover_bin .. " " .. dir .. "/s.lua x y 2>&1; echo rc=$?")
    local out = p:read("a"); p:close()
    os.execute("rm -rf " .. dir)
    assert.are.equal("s.lua\tx\ty\t2\nrc=0\n", out)
  end)

  it("the drover binary reports a script error as file:line with a traceback, exit 1", function()
    local dir = H.tempdir()
    local f = io.open(dir .. "/bad.lua", "w")
    f:write("local x = 1\nerror('broken here')\n")
    f:close()
    local p = io.popen(H.drover_bin .. " " .. dir .. "/bad.lua 2>&1; echo rc=$?")
    local out = p:read("a"); p:close()
    os.execute("rm -rf " .. dir)
    assert.matches("bad.lua:2: broken here", out)
    assert.matches("stack traceback", out)
    assert.matches("rc=1\n$", out)
  end)

  it("the drover binary reports a syntax error as file:line, exit 1", function()
    local dir = H.tempdir()
    local f = io.open(dir .. "/syn.lua", "w")
    f:write("local x = = 1\n")
    f:close()
    local p = io.popen(H.drover_bin .. " " .. dir .. "/syn.lua 2>&1; echo rc=$?")
    local out = p:read("a"); p:close()
    os.execute("rm -rf " .. dir)
    assert.matches("syn.lua:1:", out)
    assert.matches("rc=1\n$", out)
  end)

  it("drover -e runs a string", function()
    local p = io.popen(H.drover_bin .. " -e 'print(require(\"drover\").version, ...)' a b 2>&1; echo rc=$?")
    local out = p:read("a"); p:close()
    assert.matches("^%d+%.%d+%.%d+\ta\tb\nrc=0\n$", out)
  end)
end)

describe("drover.event", function()
  it("wakes every waiter on set and stays set until clear", function()
    drover.run(function()
      local ev, n = drover.event(), 0
      for _ = 1, 3 do drover.spawn(function() ev:wait(); n = n + 1 end) end
      drover.sleep(0.02)
      assert.are.equal(0, n)
      ev:set()
      H.wait_until(function() return n == 3 end, 10, "waiters")
      assert.is_true(ev:is_set())
      ev:wait() -- returns at once while set
      ev:clear()
      assert.is_false(ev:is_set())
    end)
  end)

  it("a waiter can be cancelled; the error is exactly 'cancelled'", function()
    drover.run(function()
      local ev = drover.event()
      local h = drover.spawn(function() ev:wait() end)
      drover.sleep(0.01)
      h:cancel()
      local ok, err = h:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
      ev:set() -- no stale waiter left behind
    end)
  end)
end)
