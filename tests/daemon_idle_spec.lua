-- An auto-started daemon (`drover serve --auto`, which `drover run` starts)
-- exits once idle -- no active run, no request, no scheduled deployment --
-- for DROVER_DAEMON_IDLE seconds (2 here); a `drover serve` started by hand
-- never does.  No fixed sleeps: an idle auto daemon on a store of its own
-- is the clock that shows 2 idle seconds have passed.
local drover = require "drover"
local json = require "drover.json"
local H = require "helper"

local fixture = H.root .. "/tests/conformance/fixture"
local IDLE = "2"

local function alive(pid) return drover.kill(pid, 0) end

describe("auto-started daemon idle exit", function()
  local dirs, procs = {}, {}

  local function tempdir()
    local d = H.tempdir()
    dirs[#dirs + 1] = d
    return d
  end

  local function serve(home, args, idle)
    local p, info = H.serve(home, args, { DROVER_HOME = home, DROVER_DAEMON_IDLE = idle or IDLE })
    procs[#procs + 1] = p
    return p, info
  end

  --- Start an auto daemon on a store of its own, idle after three times
  -- IDLE, and wait until it exits: every daemon started before has been
  -- idle IDLE seconds, with time to spare for its next check.
  local function idle_clock()
    local p = serve(tempdir(), { "--port", "0", "--auto" }, tostring(3 * tonumber(IDLE)))
    H.wait_until(function() return not p:is_running() end, 120, "the idle auto daemon to exit")
    return p
  end

  teardown(function()
    for _, p in ipairs(procs) do
      if p:is_running() then drover.kill(p.pid, "KILL"); p:wait(30) end
    end
    for _, d in ipairs(dirs) do
      H.stop_daemon(d)
      os.execute("rm -rf '" .. d .. "'")
    end
  end)

  it("an auto daemon with nothing to do exits; one started by hand stays", function()
    local mhome = tempdir()
    local manual = serve(mhome, { "--port", "0" })
    local ahome = tempdir()
    local auto = serve(ahome, { "--port", "0", "--auto" })
    H.wait_until(function() return not auto:is_running() end, 120, "the idle auto daemon to exit")
    local r = auto:wait(30)
    assert.are.equal(0, r.code)
    assert.is_nil(H.daemon_info(ahome)) -- daemon.json removed: the next drover run starts a new one
    assert.matches("idle for 2 s", drover.fs.read(ahome .. "/serve.err"))
    -- the manual one was started first: it has been idle at least as long
    assert.is_true(manual:is_running())
    assert.is_truthy(H.daemon_info(mhome))
  end)

  it("stays while a run is active, exits once it has ended", function()
    local home = tempdir()
    -- DROVER_DAEMON=0: the worker writes the store itself, sending the
    -- daemon no requests: the active run alone keeps the daemon up
    local env = { DROVER_HOME = home, DROVER_DAEMON_IDLE = IDLE, DROVER_DAEMON = "0" }
    local code, out, err = H.drover({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    assert.are.equal(0, (H.drover({ "deploy", "long", "--package", json.decode(out).id, "mode=long" },
      { env = env })))
    local id = H.run(env, "long", { "marker=300" })
    local _, info = serve(home, { "--port", "0", "--auto" })
    H.wait_run_state(info.url, id, "RUNNING")
    idle_clock()
    assert.is_true(alive(info.pid), "the daemon exited with a run active")
    local ccode, _, cerr = H.drover({ "cancel", id }, { env = { DROVER_HOME = home } })
    assert.are.equal(0, ccode, cerr)
    H.wait_until(function() return not alive(info.pid) end, 120, "the auto daemon to exit after the run")
    assert.is_nil(H.daemon_info(home))
  end)

  it("stays while a deployment has a schedule", function()
    local home = tempdir()
    local env = { DROVER_HOME = home, DROVER_DAEMON_IDLE = IDLE }
    local code, out, err = H.drover({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    -- yearly: it never fires during the test
    local dcode, _, derr = H.drover({ "deploy", "yearly", "--package", json.decode(out).id, "--schedule", "0 0 1 1 *" },
      { env = env })
    assert.are.equal(0, dcode, derr)
    local auto = serve(home, { "--port", "0", "--auto" })
    idle_clock()
    assert.is_true(auto:is_running(), "the daemon exited with a scheduled deployment")
  end)
end)
