-- The drover command line, run as a real process against a real store.
local drover = require "drover"
local H = require "helper"

local root = os.getenv("DROVER_ROOT") or "."

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

describe("drover CLI", function()
  local home, work
  local function env() return { DROVER_HOME = home } end
  local function drv(args, opts)
    opts = opts or {}
    opts.env = opts.env or env()
    opts.cwd = opts.cwd or work
    return H.drover(args, opts)
  end
  local function count_runs()
    local code, out = drv({ "ls", "--json", "-n", "10000" })
    if code ~= 0 then return -1 end
    return #drover.json.decode(out)
  end

  before_each(function()
    home = H.tempdir()
    work = H.tempdir()
  end)
  after_each(function()
    -- `drover run` starts a daemon for the store (local backend): stop it
    H.stop_daemon(home)
    os.execute("rm -rf " .. home .. " " .. work)
  end)

  it("exec runs a workflow as a tracked flow run and exits 0", function()
    local code, out, err = drv({ "exec", root .. "/examples/hello.lua", "name=tester" })
    assert.are.equal(0, code, err)
    assert.matches("hello, tester", out)
    assert.matches("COMPLETED", err)
    local id = err:match("flow run (%x+) started")
    local _, status = drv({ "status", id, "--json" })
    local run = drover.json.decode(status)
    assert.are.equal("COMPLETED", run.state)
    assert.are.equal(3, #run.task_runs)
    local _, logs = drv({ "logs", id })
    assert.matches("hello, tester", logs)
  end)

  it("exec shows live progress of task runs when stderr is a terminal", function()
    -- script(1) runs drover on a pseudo-terminal
    local r = assert(drover.proc.run({ "script", "-qec", H.drover_bin .. " exec " .. root .. "/examples/hello.lua",
      "/dev/null" }, { cwd = work, env = env() }))
    assert.are.equal(0, r.code)
    local out = r.stdout:gsub("\27%[%d+m", "")
    assert.matches("> greet", out)
    assert.matches("v greet %(%d+ms%)", out)
    -- and not when it is not a terminal
    local code, _, err = drv({ "exec", root .. "/examples/hello.lua" })
    assert.are.equal(0, code)
    assert.is_nil(err:find("> greet", 1, true))
  end)

  it("exec of a failing workflow exits 1 and the run is FAILED", function()
    write(work .. "/fail.lua", "local drover = require 'drover'\nerror('the workflow broke')\n")
    local code, _, err = drv({ "exec", "fail.lua" })
    assert.are.equal(1, code)
    assert.matches("fail.lua:2: the workflow broke", err)
    local _, out = drv({ "ls", "--json" })
    assert.are.equal("FAILED", drover.json.decode(out)[1].state)
  end)

  it("a syntax error in a workflow file is one line with file:line, nothing stored", function()
    write(work .. "/syntax.lua", "local x = \n")
    local before = count_runs()
    local code, out, err = drv({ "exec", "syntax.lua" })
    assert.are_not.equal(0, code)
    assert.matches("syntax.lua:%d+:", err)
    assert.are.equal(1, select(2, err:gsub("\n", "")))
    assert.are.equal(before, count_runs())
  end)

  it("bad parameters are a usage error (exit 2)", function()
    local code, _, err = drv({ "exec", root .. "/examples/hello.lua", "novalue" })
    assert.are.equal(2, code)
    assert.matches("bad parameter 'novalue': expected key=value", err)
    code, _, err = drv({ "exec", root .. "/examples/hello.lua", "--params", "{not json" })
    assert.are.equal(2, code)
    assert.matches("bad %-%-params", err)
  end)

  it("an unknown backend is one clear line naming it and where drover looked", function()
    local code, _, err = drv({ "package", "-b", "nosuch", "--module", "m" })
    assert.are.equal(2, code)
    assert.matches("unknown backend 'nosuch' %(looked in .*backends", err)
  end)

  it("unknown backend config keys are refused, naming the key and the backend", function()
    local code, _, err = drv({ "package", "-b", "local", "--set", "colour=blue", "--module", "m" })
    assert.are.equal(2, code)
    assert.matches("backend 'local': unknown config key 'colour'", err)
  end)

  it("an unknown deployment is a clear error", function()
    local code, _, err = drv({ "run", "ghost" })
    assert.are.equal(2, code)
    assert.matches("unknown deployment 'ghost'", err)
  end)

  it("package, deploy, run, status, logs, stop through the local backend", function()
    local path = root .. "/tests/conformance/fixture"
    local code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", path, "--json" })
    assert.are.equal(0, code, err)
    local pkg = drover.json.decode(out)
    code, _, err = drv({ "deploy", "cli-demo", "--package", pkg.id, "mode=ok" })
    assert.are.equal(0, code, err)
    code, _, err = drv({ "deploy", "cli-demo", "--package", pkg.id })
    assert.are.equal(2, code)
    assert.matches("deployment 'cli%-demo' already exists", err)
    code, out, err = drv({ "run", "cli-demo" })
    assert.are.equal(0, code, err)
    local id, url = out:match("^(%x+)%s+(%S+)")
    assert.is_truthy(id)
    assert.matches("://", url)
    H.wait_until(function()
      local _, s = drv({ "status", id, "--json" })
      return drover.json.decode(s).state == "COMPLETED"
    end, 60, "run to complete")
    local _, logs = drv({ "logs", id })
    assert.matches("fixture says HELLO", logs)
    local _, table_out = drv({ "status", id })
    assert.matches("Fixture.main", table_out)
    code = drv({ "stop", "cli-demo" })
    assert.are.equal(0, code)
    code, _, err = drv({ "run", "cli-demo" })
    assert.are.equal(2, code)
    assert.matches("stopped", err)
  end)

  it("a deployment keeps its backend config, so run and stop need not repeat it", function()
    local path = root .. "/tests/conformance/fixture"
    local code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", path, "--json" })
    assert.are.equal(0, code, err)
    local pkg = drover.json.decode(out)
    code, _, err = drv({ "deploy", "kept", "--package", pkg.id, "--set", "stop_timeout=7",
      "--set", "drover_bin=" .. H.drover_bin, "mode=long", "marker=" .. (4000 + math.random(1, 999)) .. ".5" })
    assert.are.equal(0, code, err)
    local store = assert(require("drover.store").open(home))
    local d = store:deployment("kept")
    assert.are.same({ stop_timeout = 7, drover_bin = H.drover_bin }, drover.json.decode(d.backend_config))
    -- run and stop load the backend with that config; a bad key given now is still refused
    code, _, err = drv({ "run", "kept", "--set", "nonsense=1" })
    assert.are.equal(2, code)
    assert.matches("unknown config key 'nonsense'", err)
    code, out, err = drv({ "run", "kept" })
    assert.are.equal(0, code, err)
    local id = out:match("^(%x+)")
    local function wait_running(rid)
      H.wait_until(function()
        local _, s = drv({ "status", rid, "--json" })
        return drover.json.decode(s).state == "RUNNING"
      end, 60, "run to start")
    end
    wait_running(id)
    -- drover cancel: that run only, through the backend as deployed
    code, out, err = drv({ "cancel", id })
    assert.are.equal(0, code, err)
    assert.matches("cancelled " .. id .. " %(CANCELLED%)", out)
    code, _, err = drv({ "cancel", id })
    assert.are.equal(2, code)
    assert.matches("is CANCELLED: only active runs can be cancelled", err)
    -- the deployment is still runnable; stop cancels the new run and pauses it
    code, out, err = drv({ "run", "kept" })
    assert.are.equal(0, code, err)
    local id2 = out:match("^(%x+)")
    wait_running(id2)
    code, _, err = drv({ "stop", "kept" })
    assert.are.equal(0, code, err)
    local _, s = drv({ "status", id2, "--json" })
    assert.are.equal("CANCELLED", drover.json.decode(s).state)
    store:close()
  end)

  it("secrets in a backend config are never stored with the deployment", function()
    local o = drover.orchestrator("slurm", { url = "http://127.0.0.1:9", token = "s3cret-token",
      partition = "debug", home = home })
    local kept = o:saved_config()
    assert.are.equal("http://127.0.0.1:9", kept.url)
    assert.are.equal("debug", kept.partition)
    assert.is_nil(kept.token)
    assert.is_nil(kept.home)
    assert.is_nil(drover.json.encode(kept):find("s3cret", 1, true))
  end)

  it("resume reruns a failed exec, reusing completed tasks", function()
    write(work .. "/resumable.lua", [[
      local drover = require "drover"
      local counter = ...
      local a = drover.task("a", function() print("ran a"); return 1 end)
      local b = drover.task("b", function(x)
        local f = io.open("broken")
        if f then f:close(); error("b is broken") end
        print("ran b")
        return x + 1
      end)
      return b(a())
    ]])
    write(work .. "/broken", "")
    local code, _, err = drv({ "exec", "resumable.lua" })
    assert.are.equal(1, code)
    local id = err:match("flow run (%x+) started")
    os.remove(work .. "/broken")
    local out
    code, out, err = drv({ "resume", id })
    assert.are.equal(0, code, err)
    assert.matches("ran b", out)
    assert.is_nil(out:match("ran a"))
    local new_id = err:match("flow run (%x+) started")
    assert.are_not.equal(id, new_id)
    code, _, err = drv({ "resume", new_id })
    assert.are.equal(2, code)
    assert.matches("only FAILED or CRASHED runs can be resumed", err)
  end)

  it("Ctrl-C cancels two-phase: the run ends CANCELLED and its processes are gone", function()
    local marker = tostring(6000 + math.random(1, 3000)) .. ".75"
    write(work .. "/long.lua", [[
      local drover = require "drover"
      local t = drover.task("long", function() return drover.proc.run({ "sleep", "]] .. marker .. [[" }) end)
      return t()
    ]])
    local p = drover.proc.spawn({ H.drover_bin, "exec", "long.lua" }, { cwd = work, env = env() })
    H.wait_until(function()
      local r = drover.proc.run({ "pgrep", "-f", "sleep " .. marker })
      return r.code == 0
    end, 30, "the task's process")
    drover.kill(p.pid, "INT")
    local r = p:wait(60)
    assert.are_not.equal(0, r.code)
    assert.matches("CANCELLED", r.stderr)
    local _, out = drv({ "ls", "--json" })
    assert.are.equal("CANCELLED", drover.json.decode(out)[1].state)
    assert.are.equal(1, drover.proc.run({ "pgrep", "-f", "sleep " .. marker }).code)
  end)

  it("a store that is not a drover store is one clear line, and is left untouched", function()
    write(home .. "/drover.db", "garbage garbage garbage")
    local code, _, err = drv({ "ls" })
    assert.are.equal(2, code)
    assert.matches("not a drover store: .*drover.db", err)
    assert.are.equal("garbage garbage garbage", drover.fs.read(home .. "/drover.db"))
  end)

  it("a locked store gives a clear error naming it", function()
    drv({ "ls" }) -- create it
    local holder = drover.proc.spawn({ "sqlite3", home .. "/drover.db" }, { stdin = true })
    -- (.timeout: a daemon an earlier test started may be writing at this moment)
    holder:write(".timeout 30000\nBEGIN EXCLUSIVE;\nINSERT INTO meta VALUES('lock','x');\n")
    H.wait_until(function() -- until sqlite3 really holds the lock
      return drover.proc.run({ "sqlite3", "-cmd", ".timeout 10", home .. "/drover.db",
        "BEGIN IMMEDIATE; ROLLBACK;" }).code ~= 0
    end, 30, "the lock")
    -- readers are never blocked in WAL mode; a run has to write
    local code, _, err = drv({ "exec", root .. "/examples/hello.lua" },
      { env = { DROVER_HOME = home, DROVER_BUSY_TIMEOUT = "300" } })
    holder:write("ROLLBACK;\n")
    holder:close()
    holder:wait(10)
    assert.are.equal(2, code)
    assert.matches("database is locked", err)
    assert.are.equal(1, select(2, err:gsub("\n", "")))
    assert.are.equal(0, (drv({ "exec", root .. "/examples/hello.lua" })))
  end)

  it("every command documents its flags with --help", function()
    for _, cmd in ipairs { "exec", "package", "deploy", "run", "stop", "status", "logs", "ls", "resume", "backends" } do
      local code, out = drv({ cmd, "--help" })
      assert.are.equal(0, code)
      assert.matches("usage: drover " .. cmd, out)
    end
    local code, out = drv({ "help" })
    assert.are.equal(0, code)
    assert.matches("exec", out)
    code = drv({ "frobnicate" })
    assert.are.equal(2, code)
  end)

  it("backends lists the local backend", function()
    local code, out = drv({ "backends", "--json" })
    assert.are.equal(0, code)
    local found = false
    for _, b in ipairs(drover.json.decode(out)) do if b.name == "local" then found = true end end
    assert.is_true(found)
  end)
end)
