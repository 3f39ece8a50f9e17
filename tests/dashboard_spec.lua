-- The dashboard in a real browser: installs Chromium (Debian) and
-- playwright-core (npm) when missing, then runs tests/dashboard/dashboard.test.js
-- against real local runs and the daemon `drover run` starts.  Nothing is
-- skipped: when the browser or the library cannot be installed, this fails.
local drover = require "drover"
local json = require "drover.json"
local H = require "helper"

local root = os.getenv("DROVER_ROOT") or "."
local dir = root .. "/tests/dashboard"
local dir_of_tests = dir
local child_env = { LD_PRELOAD = "" }

local function sh(argv, timeout)
  local r = assert(drover.proc.run(argv, { env = child_env, timeout = timeout or 900 }))
  return r.code, (r.stdout or "") .. (r.stderr or "")
end

local pids_matching = H.pids_matching

describe("dashboard in a browser", function()
  local home

  setup(function()
    home = H.tempdir()
  end)

  teardown(function()
    H.stop_daemon(home)
    os.execute("rm -rf " .. home)
  end)

  it("has Chromium and playwright-core (installed when missing)", function()
    if not drover.fs.exists("/usr/bin/chromium") then
      local code, out = sh({ "apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "chromium" })
      assert.are.equal(0, code, "apt-get install chromium failed:\n" .. out:sub(-2000))
    end
    assert.is_true(drover.fs.exists("/usr/bin/chromium"), "/usr/bin/chromium")
    if not drover.fs.exists(dir .. "/node_modules/playwright-core/package.json") then
      -- npm ci: the lockfile's version, and package.json and the lockfile
      -- left as they are (npm install rewrote them with the newest release)
      local code, out = sh({ "npm", "ci", "--no-audit", "--no-fund", "--prefix", dir })
      assert.are.equal(0, code, "npm ci (playwright-core) failed:\n" .. out:sub(-2000))
    end
    assert.is_true(drover.fs.exists(dir .. "/node_modules/playwright-core/package.json"))
  end)

  it("shows a run reach COMPLETED, cancels a long run, lists runs and deployments; screenshot; a 20,000-task run", function()
    local env = { DROVER_HOME = home }
    local code, out, err = H.drover({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", root .. "/tests/conformance/fixture", "--json" }, { env = env })
    assert.are.equal(0, code, err)
    local pkg = json.decode(out).id
    assert.are.equal(0, (H.drover({ "deploy", "ok", "--package", pkg, "mode=ok" }, { env = env })))
    assert.are.equal(0, (H.drover({ "deploy", "long", "--package", pkg, "mode=long" }, { env = env })))
    -- issue 13: a run of 20,000 task runs beside them (its pid, this
    -- process, is alive: the daemon's reaper leaves it RUNNING)
    local B = dofile(root .. "/tests/bigrun_fixture.lua")
    local store = assert(require("drover.store").open(home))
    local big = B.make(store, { tasks = 20000, pid = drover.pid() })
    store:close()
    -- the screenshot goes to the test's home: a test does not write into
    -- the checkout (DROVER_SCREENSHOT=$PWD/docs/dashboard.png refreshes the README's)
    local shot = os.getenv("DROVER_SCREENSHOT") or (home .. "/dashboard.png")
    local started = drover.time()
    local r = assert(drover.proc.run({ "node", dir .. "/dashboard.test.js" }, {
      env = { LD_PRELOAD = "", DROVER_HOME = home, DROVER_BIN = H.drover_bin, SCREENSHOT = shot, BIG = big,
        BIG_NAMES = tostring(B.NAMES), BIGRUN_FIXTURE = root .. "/tests/bigrun_fixture.lua" },
      timeout = 600 }))
    local report = r.stdout .. r.stderr
    -- whatever happened, leave no workflow process of the cancelled run behind
    local marker = report:match("# cancelled run %x+ marker (%S+)")
    if marker then
      H.wait_until(function() return #pids_matching("sleep " .. marker) == 0 end, 30, "no process left")
    end
    assert.are.equal(0, r.code, report)
    assert.matches("ok 10 %- no JavaScript errors", report)
    print(report:match("# time to first content[^\n]*"))
    assert.is_nil(report:find("not ok", 1, true), report)
    local st = assert(drover.fs.stat(shot))
    assert.is_true(st.mtime >= math.floor(started) and st.size > 1000)
    assert.are.equal("\137PNG", drover.fs.read(shot):sub(1, 4))
  end)
  -- issue 12, item 1 (and 4 in the page): a page of another site may not
  -- cancel a run, nor read the API by rebinding its name to 127.0.0.1.
  it("refuses a cross-site POST and a DNS-rebinding read; shows bytes that are not UTF-8", function()
    local sdir = H.tempdir()
    local env = { DROVER_HOME = sdir }
    local p, info = H.serve(sdir, { "--port", "0" }, env)
    local ok, err = pcall(function()
      local store = assert(require("drover.store").open(sdir))
      local victim = store:create_flow_run { name = "victim", backend = "local", state = "RUNNING",
        pid = drover.pid() } -- a live pid: the reaper leaves it running
      store:close()
      local flow = sdir .. "/binary_flow.lua"
      assert(drover.fs.write(flow, [[
local drover = require "drover"
print("bad \255\254 line")
drover.task("t", function(x) return #x end)("\255\254")
return "\0\255binary"
]]))
      local code, _, xerr = H.drover({ "exec", flow, "y=\255\254" }, { env = env })
      assert.are.equal(0, code, xerr)
      store = assert(require("drover.store").open(sdir))
      local binary = store:flow_runs { limit = 1 }[1].id
      store:close()
      local r = assert(drover.proc.run({ "node", dir_of_tests .. "/hardening.test.js" }, {
        env = { LD_PRELOAD = "", DAEMON = info.url, VICTIM = victim, BINARY = binary }, timeout = 300 }))
      local report = r.stdout .. r.stderr
      assert.are.equal(0, r.code, report)
      assert.matches("ok 3 %- the run page shows bytes", report)
      assert.is_nil(report:find("not ok", 1, true), report)
    end)
    drover.kill(p.pid, "TERM")
    p:wait(60)
    os.execute("rm -rf " .. sdir)
    assert(ok, err)
  end)
end)
