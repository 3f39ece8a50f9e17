-- The conformance kit: the BaseOrchestrator contract, end to end, for one
-- backend.  Run it on any backend:
--
--   tests/conformance/run.sh BACKEND [CONFIG.json]
--
-- DROVER_BACKEND names the backend (default: local); DROVER_BACKEND_CONFIG
-- is an optional JSON file with its config.
local drover = require "drover"
local H = require "helper"

local backend = os.getenv("DROVER_BACKEND") or "local"
local config = {}
if os.getenv("DROVER_BACKEND_CONFIG") then
  config = assert(drover.json.decode(assert(drover.fs.read(os.getenv("DROVER_BACKEND_CONFIG")))))
end
local fixture = (os.getenv("DROVER_ROOT") or ".") .. "/tests/conformance/fixture"
local deadline = tonumber(os.getenv("DROVER_CONFORMANCE_TIMEOUT") or "120")


describe("conformance: backend '" .. backend .. "'", function()
  local orch, pkg
  local suffix = tostring(math.random(100000, 999999))

  local function wait_state(id, want)
    local last
    local ok, err = pcall(H.wait_until, function()
      last = orch:status(id)
      if type(want) == "table" then
        for _, w in ipairs(want) do if last.state == w then return true end end
        return false
      end
      return last.state == want
    end, deadline, "run " .. id .. " to reach " .. (type(want) == "table" and table.concat(want, "/") or want))
    -- the last state seen, known only once the wait is over
    if not ok then error(tostring(err) .. " (last: " .. tostring(last and last.state) .. ", "
      .. tostring(last and last.message) .. ")", 2) end
    return last
  end

  -- Liveness through the backend, wherever its workers run: the run's
  -- status, then its is_alive hook (docs/backends.md), which must answer
  -- true or false for a run of this backend (nil: it cannot tell).
  local function alive(id)
    local r = orch:store():flow_run(id)
    local v = orch:is_alive(r)
    assert(v == true or v == false, "backend '" .. backend .. "': is_alive(run) must answer true or false (got " ..
      tostring(v) .. "); see docs/backends.md")
    return v
  end

  -- A long run is RUNNING, has said it holds its processes, and its
  -- backend says its work is going.
  local function wait_holding(id)
    wait_state(id, "RUNNING")
    H.wait_until(function()
      return table.concat(orch:logs(id), "\n"):find("fixture holds", 1, true) ~= nil
    end, deadline, "run " .. id .. " to start its processes")
    assert.is_true(alive(id), "is_alive says the running run's work is going")
  end

  local function wait_ended(id)
    H.wait_until(function() return alive(id) == false end, 60, "the backend to say run " .. id ..
      "'s work has ended (is_alive)")
  end

  setup(function()
    orch = drover.orchestrator(backend, config)
    -- a config that reports to "the daemon serving this store" (docker's
    -- api_url "auto", slurm's "daemon") gets one, as `drover run` would
    -- start it: a backend only looks for the daemon
    if config.api_url == "auto" or config.api_url == "daemon" then
      H.serve(orch:store().home, { "--port", "0" })
    end
  end)

  teardown(function()
    if not orch then return end
    -- what the kit deployed goes (a backend may keep finished containers
    -- or jobs until stop), then the daemon setup started
    for _, d in ipairs(orch:store():deployments()) do
      if d.name:sub(-#suffix - 1) == "-" .. suffix then pcall(orch.stop, orch, d.name, {}) end
    end
    H.stop_daemon(orch:store().home)
  end)

  it("package builds a record with an id and a content hash", function()
    pkg = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
    assert.is_string(pkg.id)
    assert.is_string(pkg.sha256)
    local again = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
    assert.are.equal(pkg.id, again.id) -- same sources, same package
  end)

  it("deploy registers deployments; a duplicate name is refused", function()
    orch:deploy("conf-ok-" .. suffix, { package = pkg.id, params = { mode = "ok" } })
    orch:deploy("conf-fail-" .. suffix, { package = pkg.id, params = { mode = "fail" } })
    orch:deploy("conf-long-" .. suffix, { package = pkg.id, params = { mode = "long" } })
    local ok, err = pcall(orch.deploy, orch, "conf-ok-" .. suffix, { package = pkg.id })
    assert.is_false(ok)
    assert.matches("already exists", tostring(err))
  end)

  it("run returns an id and a URL; the run COMPLETES and its logs hold the output", function()
    local id, url = orch:run("conf-ok-" .. suffix, {})
    assert.is_string(id)
    assert.matches("^%a[%w+.-]*://", url)
    local st = wait_state(id, "COMPLETED")
    assert.are.equal("COMPLETED", st.state)
    local logs = table.concat(orch:logs(id), "\n")
    assert.matches("fixture says HELLO", logs)
    local listed = false
    for _, r in ipairs(orch:list()) do if r.id == id then listed = true end end
    assert.is_true(listed)
  end)

  it("a failing workflow reaches FAILED with its error", function()
    local id = orch:run("conf-fail-" .. suffix, {})
    local st = wait_state(id, { "FAILED" })
    assert.matches("fixture failed on purpose", st.message or "")
  end)

  it("stop cancels a long run: CANCELLING then CANCELLED, and its backend says its work has ended", function()
    local marker = tostring(5000 + math.random(1, 4000)) .. ".25"
    local id = orch:run("conf-long-" .. suffix, { marker = marker })
    wait_holding(id)
    orch:stop("conf-long-" .. suffix, {})
    local st = wait_state(id, "CANCELLED")
    assert.are.equal("CANCELLED", st.state)
    local store = orch:store()
    local history = {}
    for _, s in ipairs(store:flow_run_states(id)) do history[#history + 1] = s.state end
    local seen_cancelling = false
    for i, s in ipairs(history) do
      if s == "CANCELLING" then seen_cancelling = true end
      if s == "CANCELLED" then assert.is_true(seen_cancelling, "CANCELLING came before CANCELLED") ; assert.are.equal(#history, i) end
    end
    wait_ended(id)
  end)

  it("cancel ends one run (CANCELLING then CANCELLED, its work ended); the deployment stays runnable", function()
    local name = "conf-cancel-" .. suffix
    orch:deploy(name, { package = pkg.id, params = { mode = "long" } })
    local marker = tostring(5000 + math.random(1, 4000)) .. ".75"
    local id = orch:run(name, { marker = marker })
    wait_holding(id)
    local r = orch:cancel(id)
    assert.are.equal("CANCELLED", r.state)
    assert.are.equal("CANCELLED", orch:status(id).state)
    local history = {}
    for _, s in ipairs(orch:store():flow_run_states(id)) do history[#history + 1] = s.state end
    assert.are.same({ "CANCELLING", "CANCELLED" }, { history[#history - 1], history[#history] })
    wait_ended(id)
    -- not paused: a new run of the deployment starts (and is cancelled too)
    local again = orch:run(name, { marker = marker })
    wait_state(again, "RUNNING")
    assert.are.equal("CANCELLED", orch:cancel(again).state)
    wait_ended(again)
    local ok, err = pcall(orch.cancel, orch, again)
    assert.is_false(ok)
    assert.matches("only active runs can be cancelled", tostring(err))
    ok, err = pcall(orch.cancel, orch, "ffffffffffff")
    assert.is_false(ok)
    assert.matches("unknown run", tostring(err))
  end)

  it("an unknown deployment gives a clear error naming it", function()
    local ok, err = pcall(orch.run, orch, "no-such-deployment-" .. suffix, {})
    assert.is_false(ok)
    assert.matches("unknown deployment 'no%-such%-deployment%-" .. suffix .. "'", tostring(err))
  end)

  it("status of an unknown run gives a clear error", function()
    local ok, err = pcall(orch.status, orch, "ffffffffffff")
    assert.is_false(ok)
    assert.matches("unknown run", tostring(err))
  end)
end)
