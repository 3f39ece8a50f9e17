-- drover.proc again, with children started by libuv's uv_spawn: the
-- fallback drover uses when the kernel has no pidfd_open (Linux < 5.3),
-- forced here with DROVER_SPAWN=uv so that it stays tested on any kernel.
--
-- The way children are started is chosen once, when the engine starts, and
-- Lua cannot set an environment variable of its own process: so this file
-- runs tests/proc_spec.lua in a second busted (same interpreter, same
-- LUA_PATH/LUA_CPATH) with DROVER_SPAWN=uv in its environment, and reports
-- each of its tests here under its own name, failing with its message.
local drover = require "drover"
local H = require "helper"

local function interpreter()
  -- the interpreter busted runs on (lua5.4, or an instrumented build of it)
  local f = io.open("/proc/self/cmdline", "rb")
  local cmdline = f and f:read("a") or ""
  if f then f:close() end
  local exe = cmdline:match("^([^%z]+)")
  return exe and exe:match("lua") and exe or "lua5.4"
end

local spec = H.root .. "/tests/proc_spec.lua"
local r, err = drover.proc.run({ "busted", "--lua=" .. interpreter(), "-o", "json", spec },
  { cwd = H.root, env = { DROVER_SPAWN = "uv" }, timeout = 1200 })
local json = r and r.stdout:match("(%b{})%s*$")
local ok, results = pcall(function() return json and drover.json.decode(json) end)

describe("drover.proc with DROVER_SPAWN=uv (uv_spawn)", function()
  it("runs tests/proc_spec.lua in a second busted", function()
    assert.is_not_nil(r, err)
    assert.is_false(r.timed_out)
    assert.is_true(ok and type(results) == "table",
      "no busted JSON report (code " .. tostring(r.code) .. "):\n" .. r.stdout:sub(-2000) .. r.stderr:sub(-2000))
    assert.is_true(#results.successes >= 45, "only " .. #results.successes .. " tests passed")
    -- and the children there really were started by uv_spawn: the stdio test
    -- is named after the kind of pipe the child found
    local seen
    for _, t in ipairs(results.successes) do
      if t.name:match("socketpairs %(uv_spawn%)") then seen = true end
    end
    assert.is_true(seen, "the stdio test did not see uv_spawn's socketpairs")
  end)

  -- each test of the second busted under its own name (none when it gave
  -- no report: the case above fails then)
  local report = ok and type(results) == "table" and results or { successes = {}, failures = {}, errors = {} }
  for _, t in ipairs(report.successes) do
    it(t.name, function() assert.is_string(t.name) end)
  end
  for _, kind in ipairs({ "failures", "errors" }) do
    for _, t in ipairs(report[kind]) do
      it(t.name or "(unnamed)", function()
        error(tostring(t.message) .. "\n" .. tostring(t.trace and t.trace.traceback or ""), 0)
      end)
    end
  end
end)
