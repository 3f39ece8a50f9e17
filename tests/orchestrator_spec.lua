-- BaseOrchestrator: what a backend inherits (deployments, runs, two-phase
-- stop and cancel over its hooks), the config declarations it checks, and
-- the fixes around them: a backend deployed by path, a cancel that reads
-- as a cancel, daemon auto-start in the CLI and not in the backend.
local drover = require "drover"
local H = require "helper"

local root = os.getenv("DROVER_ROOT") or "."
local fixture = root .. "/tests/conformance/fixture"
local examples = root .. "/examples/backends"

-- A backend class, declared here as a backend file would declare it.
local function backend(name, decls)
  local B = drover.BaseOrchestrator:extend(name)
  B.backend_name = name
  B.config_keys = decls or {}
  return B
end

local function new(cls, config)
  local o = setmetatable({ name = cls.backend_name }, cls)
  o:init(config)
  return o
end

local function refused(cls, config)
  local ok, err = pcall(new, cls, config)
  assert.is_false(ok, "config accepted: " .. drover.json.encode(config))
  return tostring(err)
end

describe("BaseOrchestrator config_keys", function()
  local B = backend("cfg", {
    port = { "integer", min = 1, max = 65535 },
    mode = { "string", enum = { "container", "swarm" } },
    partition = { "string", required = true },
    argv = "strings",
    retries = "integer",
    ratio = "number",
  })

  it("takes what the declarations allow (22.0 is the integer 22)", function()
    local o = new(B, { port = 22.0, mode = "swarm", partition = "p", argv = { "scontrol", "token" }, retries = 0,
      ratio = 0.5 })
    assert.are.equal("integer", math.type(o.config.port))
    assert.are.equal(22, o.config.port)
  end)

  it("refuses, in one line naming the key, a port of 22.5 and the other misfits", function()
    assert.matches("backend 'cfg': config key 'port' must be an integer, got 22.5",
      refused(B, { port = 22.5, partition = "p" }), nil, true)
    assert.matches("config key 'port' must be an integer, got string", refused(B, { port = "22", partition = "p" }),
      nil, true)
    assert.matches("config key 'port' must be at most 65535, got 70000", refused(B, { port = 70000, partition = "p" }),
      nil, true)
    assert.matches("config key 'port' must be at least 1, got 0", refused(B, { port = 0, partition = "p" }), nil, true)
    assert.matches("config key 'mode' must be one of container, swarm, got 'pod'",
      refused(B, { mode = "pod", partition = "p" }), nil, true)
    assert.matches("config key 'partition' is required", refused(B, {}), nil, true)
    assert.matches("config key 'argv' must be a list of strings, got a list with a number at 2",
      refused(B, { argv = { "a", 2 }, partition = "p" }), nil, true)
    assert.matches("config key 'argv' must be a list of strings, got a table with key 'x'",
      refused(B, { argv = { x = "a" }, partition = "p" }), nil, true)
    assert.matches("config key 'retries' must be an integer, got 1.5", refused(B, { retries = 1.5, partition = "p" }),
      nil, true)
    assert.matches("unknown config key 'prt'", refused(B, { prt = 22, partition = "p" }), nil, true)
    -- the keys every backend takes keep their types
    assert.matches("config key 'limits' must be a table, got string", refused(B, { limits = "x", partition = "p" }),
      nil, true)
  end)

  it("says when a backend declares a kind there is none of", function()
    assert.matches("config_keys.q: unknown kind 'float'", refused(backend("bad", { q = "float" }), { q = 1 }), nil, true)
  end)
end)

describe("a backend extending BaseOrchestrator directly", function()
  local home, Sleeper, orch, pkg

  -- All it brings: run (a detached `sleep`, standing in for the work), and
  -- the hooks stop and cancel reach it through.
  setup(function()
    home = H.tempdir()
    Sleeper = backend("sleeper", { stop_timeout = "number" })
    function Sleeper:run(name, params, opts)
      local id, url = self:create_run(name, params, opts)
      local p = assert(drover.proc.spawn({ "sleep", "300" }, { detach = true, stdin = "" }))
      self:store():update_flow_run(id, { pid = p.pid })
      self:store():set_flow_state(id, "RUNNING")
      return id, url
    end
    function Sleeper:interrupt(r) drover.kill(math.tointeger(r.pid), "TERM") end
    function Sleeper:is_alive(r) return drover.kill(math.tointeger(r.pid), 0) == true end
    function Sleeper:kill_run(r) drover.kill(math.tointeger(r.pid), "KILL") end
    orch = new(Sleeper, { home = home, stop_timeout = 30 })
    pkg = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
  end)
  teardown(function() os.execute("rm -rf " .. home) end)

  it("inherits package, deploy, status, logs, list, cancel and stop", function()
    assert.are.equal(pkg.id, orch:package("Fixture", "fixture_flow", "main", { path = fixture }).id)
    orch:deploy("sl", { package = pkg.id, params = { a = 1 } })
    local ok, err = pcall(orch.deploy, orch, "sl", { package = pkg.id })
    assert.is_false(ok)
    assert.matches("already exists", tostring(err))
    assert.are.equal("sleeper", orch:store():deployment("sl").backend)

    local id, url = orch:run("sl", { b = 2 })
    assert.matches("^file://", url) -- no daemon serves this store
    local r = orch:status(id)
    assert.are.equal("RUNNING", r.state)
    assert.are.equal("sleeper", r.backend)
    assert.are.same({ a = 1, b = 2 }, drover.json.decode(r.params))
    assert.are.same({}, orch:logs(id))
    assert.are.equal(id, orch:list()[1].id)

    -- cancel: two phases over the hooks; the deployment stays runnable
    local pid = math.tointeger(r.pid)
    local c = orch:cancel(id)
    assert.are.equal("CANCELLED", c.state)
    assert.are.equal("cancelled", c.message)
    assert.is_falsy(drover.kill(pid, 0))
    local hist = {}
    for _, s in ipairs(orch:store():flow_run_states(id)) do hist[#hist + 1] = s.state .. ":" .. tostring(s.message) end
    assert.are.same({ "PENDING:nil", "RUNNING:nil", "CANCELLING:cancel requested", "CANCELLED:cancelled" }, hist)
    ok, err = pcall(orch.cancel, orch, id)
    assert.is_false(ok)
    assert.matches("is CANCELLED: only active runs can be cancelled", tostring(err))

    -- stop: every active run, and the deployment paused
    local id2 = orch:run("sl", {})
    local pid2 = math.tointeger(orch:status(id2).pid)
    assert.are.same({ id2 }, orch:stop("sl").cancelled)
    assert.are.equal("CANCELLED", orch:status(id2).state)
    assert.is_falsy(drover.kill(pid2, 0))
    ok, err = pcall(orch.run, orch, "sl", {})
    assert.is_false(ok)
    assert.matches("deployment 'sl' is stopped", tostring(err))
  end)

  it("gives one clear line for an unknown deployment or run, and names a hook it lacks", function()
    local ok, err = pcall(orch.run, orch, "ghost", {})
    assert.is_false(ok)
    assert.are.equal("unknown deployment 'ghost'", err)
    ok, err = pcall(orch.status, orch, "ffffffffffff")
    assert.is_false(ok)
    assert.are.equal("unknown run 'ffffffffffff'", err)
    local Bare = backend("bare")
    local b = new(Bare, { home = home })
    ok, err = pcall(b.run, b, "sl", {})
    assert.is_false(ok)
    assert.matches("backend 'bare' does not implement run", tostring(err))
  end)
end)

describe("the local backend and the daemon", function()
  local home, pkg
  local function env(extra)
    local e = { DROVER_HOME = home, DROVER_PATH = false }
    for k, v in pairs(extra or {}) do e[k] = v end
    return e
  end
  local function drv(args, extra) return H.drover(args, { env = env(extra) }) end
  local function wait_state(o, id, want)
    local last
    H.wait_until(function()
      last = o:store():flow_run(id)
      return last.state == want
    end, 120, "run " .. id .. " to reach " .. want)
    return last
  end

  before_each(function()
    home = H.tempdir()
    local o = drover.orchestrator("local", { home = home })
    pkg = o:package("Fixture", "fixture_flow", "main", { path = fixture })
  end)
  after_each(function()
    H.stop_daemon(home)
    os.execute("rm -rf " .. home)
  end)

  it("called directly (an embedder), starts no daemon: its worker writes the store and says why", function()
    local o = drover.orchestrator("local", { home = home })
    o:deploy("direct", { package = pkg.id, params = { mode = "ok" } })
    local id, url = o:run("direct", {})
    assert.are.equal("file://" .. home .. "/runs/" .. id .. "/worker.log", url)
    wait_state(o, id, "COMPLETED")
    assert.is_nil(H.daemon_info(home), "the backend started a daemon")
    local logs = table.concat(o:logs(id), "\n")
    assert.matches("the worker writes the store directly: no daemon serves " .. home, logs, nil, true)
  end)

  it("drover run starts the daemon; the worker reports to it, and the URL is its page", function()
    local code, _, err = drv({ "deploy", "viahttp", "--package", pkg.id, "mode=ok" })
    assert.are.equal(0, code, err)
    local out
    code, out, err = drv({ "run", "viahttp" })
    assert.are.equal(0, code, err)
    local id, url = out:match("^(%x+)%s+(%S+)")
    local info = assert(H.daemon_info(home), "drover run started no daemon")
    assert.are.equal(info.url .. "/runs/" .. id, url)
    local o = drover.orchestrator("local", { home = home })
    wait_state(o, id, "COMPLETED")
    assert.is_nil(table.concat(o:logs(id), "\n"):find("writes the store directly", 1, true))
  end)

  -- bug: a cancel ended the run with the worker's generic "stopped"
  for _, mode in ipairs { "over HTTP", "writing the store" } do
    it("drover cancel ends the run as a cancel, not 'stopped' (worker " .. mode .. ")", function()
      local extra = mode == "writing the store" and { DROVER_DAEMON = "0" } or nil
      local marker = tostring(6000 + math.random(1, 999)) .. ".25"
      local code, _, err = drv({ "deploy", "long", "--package", pkg.id, "mode=long", "marker=" .. marker }, extra)
      assert.are.equal(0, code, err)
      local out
      code, out, err = drv({ "run", "long" }, extra)
      assert.are.equal(0, code, err)
      local id = out:match("^(%x+)")
      local o = drover.orchestrator("local", { home = home })
      wait_state(o, id, "RUNNING")
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) >= 2 end, 60, "the run's processes")
      code, _, err = drv({ "cancel", id }, extra)
      assert.are.equal(0, code, err)
      local r = wait_state(o, id, "CANCELLED")
      assert.are.equal("cancel requested", r.message)
      local hist = {}
      for _, s in ipairs(o:store():flow_run_states(id)) do hist[#hist + 1] = tostring(s.message) end
      assert.is_nil(table.concat(hist, ","):find("stopped", 1, true))
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, 30, "no process left")
    end)
  end

  -- bug: deploy -b PATH kept only the backend's name, so run could not load it
  it("drover deploy -b PATH/backend.lua keeps the path: run and status find it without DROVER_PATH", function()
    local path = examples .. "/nohup.lua"
    local code, _, err = drv({ "deploy", "-b", path, "bypath", "--package", pkg.id, "mode=ok", "--json" })
    assert.are.equal(0, code, err)
    local out
    local o = drover.orchestrator("local", { home = home })
    assert.are.equal(path, o:store():deployment("bypath").backend)
    code, out, err = drv({ "run", "bypath" }, { DROVER_DAEMON = "0" })
    assert.are.equal(0, code, err)
    local id = out:match("^(%x+)")
    local r = wait_state(o, id, "COMPLETED")
    assert.are.equal("nohup", r.backend)
    code, out, err = drv({ "status", id, "--json" })
    assert.are.equal(0, code, err)
    assert.are.equal("COMPLETED", drover.json.decode(out).state)
    -- a relative path is kept absolute
    code, _, err = H.drover({ "deploy", "-b", "examples/backends/nohup.lua", "rel", "--package", pkg.id },
      { env = env(), cwd = root })
    assert.are.equal(0, code, err)
    assert.are.equal(root .. "/examples/backends/nohup.lua",
      o:store():deployment("rel").backend)
  end)
end)

describe("the local backend on a store several hosts share", function()
  it("reaps only runs whose pid belongs to this host", function()
    local home = H.tempdir()
    local o = drover.orchestrator("local", { home = home })
    local store = o:store()
    local identity = require "drover.process_identity"
    -- a pid that names no process here
    local gone = assert(drover.proc.spawn({ "true" }))
    gone:wait(30)
    local here = store:create_flow_run { name = "here", state = "RUNNING", pid = gone.pid }
    store:update_flow_run(here, { host = identity.host() })
    local there = store:create_flow_run { name = "there", state = "RUNNING", pid = gone.pid }
    store:update_flow_run(there, { host = "another-host-boot-id" })
    local legacy = store:create_flow_run { name = "legacy", state = "RUNNING", pid = gone.pid }
    assert.are.equal("CRASHED", o:reap(store:flow_run(here)).state)
    assert.are.equal("CRASHED", o:reap(store:flow_run(legacy)).state) -- no host recorded: this host's
    assert.are.equal("RUNNING", o:reap(store:flow_run(there)).state)
    assert.is_false(o:is_alive(store:flow_run(there))) -- nothing here shows it alive
    assert.is_false(o:is_alive(store:flow_run(here)))
    assert.truthy(identity.host():match("^%x+%-%x+%-%x+%-%x+%-%x+$"))
    store:close()
    drover.fs.remove(home, { recursive = true })
  end)
end)

-- bug: a worker killed when stop_timeout ran out left the process groups
-- it had started running (each leads a group of its own, in a session of
-- its own, so KILL to the worker's group missed them) after the run was
-- recorded CANCELLED.  stop_timeout 0: KILL follows TERM at once.
describe("the local backend's KILL after stop_timeout", function()
  for _, how in ipairs { "cancel", "stop" } do
    it("ends the process groups the worker started too (drover " .. how .. ")", function()
      local home = H.tempdir()
      local marker = tostring(7000 + math.random(1, 999)) .. ".625"
      finally(function()
        -- whatever the outcome, nothing of this test outlives it
        for _, pid in ipairs(H.pids_matching("sleep " .. marker)) do drover.kill(pid, "KILL") end
        H.stop_daemon(home)
        os.execute("rm -rf " .. home)
      end)
      local function drv(args) return H.drover(args, { env = { DROVER_HOME = home, DROVER_PATH = false } }) end
      local o = drover.orchestrator("local", { home = home })
      local pkg = o:package("Fixture", "fixture_flow", "main", { path = fixture })
      local code, _, err = drv({ "deploy", "impatient", "--package", pkg.id, "--set", "stop_timeout=0",
        "mode=long", "marker=" .. marker })
      assert.are.equal(0, code, err)
      local out
      code, out, err = drv({ "run", "impatient" })
      assert.are.equal(0, code, err)
      local id = out:match("^(%x+)")
      -- the worker's shell and its two sleeps, in a group that is not the worker's
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) >= 3 end, 60, "the run's processes")
      local worker = o:store():flow_run(id).pid
      for _, pid in ipairs(H.pids_matching("sleep " .. marker)) do
        assert.are_not.equal(worker, require("drover.process_identity").stat(pid).pgrp)
      end
      -- a worker that will not end in time: stopped, it cannot take its TERM
      assert(drover.kill(worker, "STOP"))
      code, _, err = drv(how == "cancel" and { "cancel", id } or { "stop", "impatient" })
      assert.are.equal(0, code, err)
      assert.are.equal("CANCELLED", o:store():flow_run(id).state)
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, 30, "no process of the run left")
      H.wait_until(function() return not drover.kill(worker, 0) end, 30, "the worker to be gone")
      o:store():close()
    end)
  end
end)

-- bug: a cancel that came before the worker could be signalled (before
-- `run` recorded its pid, the canceller found no process and ended the run
-- itself) left the worker to run the whole flow of a CANCELLED run
describe("a worker whose run was cancelled before it started", function()
  local home, o, pkg
  before_each(function()
    home = H.tempdir()
    o = drover.orchestrator("local", { home = home })
    pkg = o:package("Fixture", "fixture_flow", "main", { path = fixture })
  end)
  after_each(function()
    o:store():close()
    os.execute("rm -rf " .. home)
  end)

  --- `drover worker ID` on the store, as the local backend starts it; the
  -- timeout only bounds a worker that wrongly runs the long flow
  local function work(id)
    local r = assert(drover.proc.run({ H.drover_bin, "worker", id },
      { env = { DROVER_HOME = home, DROVER_PATH = false }, timeout = 60 }))
    return r
  end
  local function held(id)
    return table.concat(o:logs(id), "\n"):find("fixture holds", 1, true) ~= nil
  end

  for _, state in ipairs { "CANCELLED", "CANCELLING" } do
    it("does not run its flow (" .. state .. ")", function()
      local marker = tostring(8000 + math.random(1, 999)) .. ".875"
      finally(function()
        for _, pid in ipairs(H.pids_matching("sleep " .. marker)) do drover.kill(pid, "KILL") end
      end)
      o:deploy("early", { package = pkg.id, params = { mode = "long", marker = marker } })
      local id = o:create_run("early", {})
      if state == "CANCELLED" then
        o:store():end_flow_run(id, "CANCELLED", "cancelled")
      else
        o:store():set_flow_state(id, "CANCELLING", "cancel requested")
      end
      local r = work(id)
      assert.is_false(r.timed_out, "the worker ran the flow of a cancelled run")
      assert.are.equal(1, r.code)
      local run = o:store():flow_run(id)
      assert.are.equal("CANCELLED", run.state)
      assert.is_false(held(id))
      if state == "CANCELLED" then
        assert.matches("is CANCELLED already; its flow does not run", r.stderr, nil, true)
        assert.are.equal("cancelled", run.message)
      else
        assert.are.equal("cancel requested", run.message) -- the canceller's reason, not a generic one
      end
    end)
  end
end)
