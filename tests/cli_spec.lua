-- The drover command line, run as a real process against a real store.
local drover = require "drover"
local H = require "helper"
local _ -- the values a test ignores

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
    local code, _, err = drv({ "exec", "syntax.lua" })
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

  it("status shows a big run grouped by task name, with the task runs that did not complete", function()
    write(work .. "/big.lua", [[
      local drover = require "drover"
      local fetch = drover.task("fetch", function(i) return i end)
      local check = drover.task("check", function(i)
        if i % 40 == 0 then error("item " .. i .. " is bad") end
      end, { catch = true })
      for i = 1, 120 do fetch(i); check(i) end
    ]])
    local code, _, err = drv({ "exec", work .. "/big.lua" })
    assert.are.equal(0, code, err)
    local id = err:match("flow run (%x+) started")
    local out
    code, out, err = drv({ "status", id })
    assert.are.equal(0, code, err)
    assert.matches("240 task runs: COMPLETED 237  FAILED 3\n", out, 1, true)
    assert.matches("\nfetch +120 +COMPLETED 120 ", out)
    assert.matches("\ncheck +120 +COMPLETED 117  FAILED 3 ", out)
    assert.matches("task runs that did not complete (3):", out, 1, true)
    for _, i in ipairs { 40, 80, 120 } do assert.matches("FAILED +1 +%S+ +%S+ item " .. i .. " is bad\n", out) end
    assert.matches("drover status " .. id .. " --all", out, 1, true)
    local lines = select(2, out:gsub("\n", ""))
    assert.is_true(lines < 20, out)
    -- --all: each one, as a run of fewer task runs is shown
    code, out = drv({ "status", id, "--all" })
    assert.are.equal(0, code)
    assert.are.equal(240, select(2, out:gsub("\n%x+ +%a+ +task ", "")))
    -- JSON: every task run, whatever the size
    code, out = drv({ "status", id, "--json" })
    assert.are.equal(0, code)
    assert.are.equal(240, #drover.json.decode(out).task_runs)
  end)

  it("a worker does not load modules from where drover run was typed", function()
    -- the package has sidecar_flow; the module it requires at run time is
    -- not in the project, only in the directory `drover run` is typed in
    local project = work .. "/project"
    assert(drover.fs.mkdir(project))
    write(project .. "/sidecar_flow.lua", [[
      local F = { integration_type = "pipeline" }
      function F.main() local name = "sidecar_mod"; return require(name).value end
      return F
    ]])
    write(work .. "/sidecar_mod.lua", 'return { value = "loaded from the working directory" }')
    local code, out, err = drv({ "package", "--module", "sidecar_flow", "--entrypoint", "main",
      "--path", project, "--json" })
    assert.are.equal(0, code, err)
    local deployed
    code, deployed, err = drv({ "deploy", "sidecar", "--package", drover.json.decode(out).id })
    assert.are.equal(0, code, err .. deployed)
    code, out, err = drv({ "run", "sidecar" }) -- in `work`, next to sidecar_mod.lua
    assert.are.equal(0, code, err)
    local id = out:match("^(%x+)")
    local run = H.wait_until(function()
      local _, s = drv({ "status", id, "--json" })
      local r = drover.json.decode(s)
      return (r.state == "FAILED" or r.state == "COMPLETED") and r
    end, 60, "the run to end")
    assert.are.equal("FAILED", run.state, run.message)
    assert.matches("module 'sidecar_mod' not found", run.message)
  end)

  it("a read-only DROVER_HOME is named as such, not called 'not a drover store'", function()
    drv({ "ls" }) -- create the store
    -- as another user: the store is root's (the suite runs as root, whom
    -- permission bits do not stop)
    os.execute("chmod 755 " .. home .. " " .. work .. " && chmod 644 " .. home .. "/drover.db*")
    local as_nobody = { "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", H.drover_bin, "ls" }
    local r = drover.proc.run(as_nobody, { env = env(), cwd = "/" })
    assert.are_not.equal(0, r.code)
    assert.are.equal("drover: cannot open the drover store " .. home .. "/drover.db: Permission denied " ..
      "(the store must be writable)\n", r.stderr)
    local empty = work .. "/empty"
    assert(drover.fs.mkdir(empty))
    r = drover.proc.run(as_nobody, { env = { DROVER_HOME = empty }, cwd = "/" })
    assert.are_not.equal(0, r.code)
    assert.are.equal("drover: cannot write in the drover home " .. empty .. ": Permission denied " ..
      "(the store needs a writable directory)\n", r.stderr)
    -- a read-only mount: the same, with the system's reason
    r = drover.proc.run({ "unshare", "-m", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && ' ..
      'DROVER_HOME="$1" exec "$2" ls', "sh", home, H.drover_bin })
    assert.are_not.equal(0, r.code)
    assert.are.equal("drover: cannot open the drover store " .. home .. "/drover.db: Read-only file system " ..
      "(the store must be writable)\n", r.stderr)
  end)

  it("drover serve names a repeated query argument instead of showing a Lua table", function()
    local serve, info = H.serve(home)
    local cases = {
      { "/api/runs?limit=1&limit=2", "query argument 'limit' given 2 times: give it once" },
      { "/api/runs?state=RUNNING&state=FAILED", "query argument 'state' given 2 times: give it once" },
      { "/api/runs?limit", "query argument 'limit' has no value (a non-negative integer expected)" },
      { "/api/runs?limit=x", "bad limit 'x' (a non-negative integer expected)" },
      { "/api/events?after=1&after=2&after=3", "query argument 'after' given 3 times: give it once" },
    }
    for _, c in ipairs(cases) do
      local r = assert(drover.http.get(info.url .. c[1]))
      assert.are.equal(400, r.status, c[1])
      assert.are.equal(c[2], r.json.error, c[1])
    end
    serve:kill("TERM")
    serve:wait(30)
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
    assert.are.equal(1, code) -- a failure at run time, not the caller's mistake
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

describe("drover exit codes and command names", function()
  local home, work
  local function drv(args, env)
    local e = { DROVER_HOME = home, DROVER_DAEMON = "0" }
    for k, v in pairs(env or {}) do e[k] = v end
    return H.drover(args, { env = e, cwd = work })
  end
  -- exits `code` with one line "drover: ..." on stderr matching `pattern`
  local function exits(code, args, pattern, env)
    local got, out, err = drv(args, env)
    assert.are.equal(code, got, table.concat(args, " ") .. ": stdout: " .. out .. " stderr: " .. err)
    assert.matches("^drover: ", err)
    if pattern then assert.matches(pattern, err) end
    return err
  end

  before_each(function()
    home = H.tempdir()
    work = H.tempdir()
  end)
  after_each(function() os.execute("rm -rf " .. home .. " " .. work) end)

  it("2 for usage and configuration errors, each in one line", function()
    write(work .. "/ok.lua", "return 1\n")
    local function usage(args, pattern)
      local err = exits(2, args, pattern)
      assert.are.equal(1, select(2, err:gsub("\n", "")), err)
    end
    usage({ "exec", "--frobnicate", "ok.lua" }, "unknown option '%-%-frobnicate'")
    usage({ "status" }, "missing RUN_ID")
    usage({ "frobnicate" }, "unknown command 'frobnicate'")
    usage({ "exec", "missing.lua" }, "cannot open missing.lua")
    usage({ "status", "0f0f0f0f" }, "unknown run '0f0f0f0f'")
    usage({ "logs", "0f0f0f0f" }, "unknown run '0f0f0f0f'")
    usage({ "run", "nosuch" }, "unknown deployment 'nosuch'")
    usage({ "ls", "-b", "no_such_backend", "--deployments" }, nil)
    usage({ "stop", "nosuch" }, "unknown deployment 'nosuch'")
    usage({ "package", "-b", "no_such_backend", "--module", "m" }, "unknown backend 'no_such_backend'")
    usage({ "package", "-c", work .. "/nope.json", "--module", "m" }, "cannot read config file")
    usage({ "package", "--set", "colour=red", "--module", "m" }, "unknown config key 'colour'")
    -- what the store's state does not allow: the backend refuses it
    local code, _, err = drv({ "exec", "ok.lua" })
    assert.are.equal(0, code, err)
    local id = err:match("flow run (%x+) started")
    usage({ "cancel", id }, "is COMPLETED: only active runs can be cancelled")
    local out
    code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture", "--entrypoint", "main",
      "--path", root .. "/tests/conformance/fixture", "--json" })
    assert.are.equal(0, code, err)
    local pkg = drover.json.decode(out).id
    usage({ "deploy", "d", "--package", pkg, "--schedule", "61 * * * *" }, "bad schedule '61 %* %* %* %*'")
    usage({ "deploy", "d", "--package", "0f0f0f" }, "unknown package '0f0f0f'")
    code, _, err = drv({ "deploy", "d", "--package", pkg })
    assert.are.equal(0, code, err)
    usage({ "deploy", "d", "--package", pkg }, "deployment 'd' already exists")
  end)

  it("1 when the workflow fails or the operation fails at run time", function()
    write(work .. "/fail.lua", "error('broke on purpose')\n")
    write(work .. "/syntax.lua", "local x =\n")
    write(work .. "/ok.lua", "return 1\n")
    exits(1, { "exec", "fail.lua" }, "FAILED")
    exits(1, { "exec", "syntax.lua" }, "syntax.lua:2:")
    local code, _, err = drv({ "exec", "ok.lua" })
    assert.are.equal(0, code, err)
    local id = err:match("flow run (%x+) started")
    -- a backend whose operation fails while it runs
    assert(drover.fs.mkdir(work .. "/backends"))
    write(work .. "/backends/failing.lua", "local B = require('drover').BaseOrchestrator:extend('failing')\n" ..
      "B.backend_name = 'failing'\n" ..
      "function B:package() error('the cluster is unreachable', 0) end\n" ..
      "return B\n")
    exits(1, { "package", "-b", "failing", "--module", "m" }, "^drover: the cluster is unreachable\n$")
    -- a server that is not there any more
    local gone = assert(drover.server.listen { handler = function() return 200, "" end })
    local url = gone.url
    gone:close()
    exits(1, { "ls" }, "cannot reach the drover server", { DROVER_API = url })
    exits(1, { "status", id }, "cannot reach the drover server", { DROVER_API = url })
  end)

  it("a word is a command even when a file of that name is here; a script needs ./ or .lua", function()
    write(work .. "/status", "print('the file ran')\n")
    write(work .. "/mytool", "print('mytool ran')\n")
    local code, out, err = drv({ "status" })
    assert.are.equal(2, code, out .. err)
    assert.are.equal("", out)
    assert.matches("missing RUN_ID", err)
    code, out = drv({ "./status" })
    assert.are.equal(0, code)
    assert.are.equal("the file ran\n", out)
    write(work .. "/status.lua", "print('status.lua ran')\n")
    code, out = drv({ "status.lua" })
    assert.are.equal(0, code)
    assert.are.equal("status.lua ran\n", out)
    -- not a command: say how to run the file
    code, out, err = drv({ "mytool" })
    assert.are.equal(2, code)
    assert.are.equal("", out)
    assert.matches("unknown command 'mytool' %(drover help lists them; to run the file mytool, write %./mytool%)", err)
  end)
end)
