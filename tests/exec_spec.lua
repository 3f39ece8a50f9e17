-- `drover exec` runs: the exec process is the run's process.  Killed, it
-- is reaped CRASHED; cancelled from elsewhere, it stops; an os.exit in the
-- workflow ends the run first; a store whose disk fills up mid-run ends
-- the run FAILED or CRASHED with one line on stderr.  Real processes,
-- a real `drover serve`, a real full filesystem.
local drover = require "drover"
local H = require "helper"
local store_mod = require "drover.store"

local function write(path, text)
  local f = assert(io.open(path, "w"))
  f:write(text)
  f:close()
end

-- A workflow of N tasks that each sleep a little (at most 4 at a time).
local function sleeper(n, nap)
  return ([[
    local drover = require "drover"
    local nap = drover.task("nap", function(i) drover.sleep(%g) return i end)
    local items = {}
    for i = 1, %d do items[i] = i end
    return #drover.map(nap, items, { concurrency = 4 })
  ]]):format(nap, n)
end

describe("drover exec", function()
  local home, work, store
  local function env() return { DROVER_HOME = home } end

  before_each(function()
    home = H.tempdir()
    work = H.tempdir()
  end)
  after_each(function()
    if store then store:close(); store = nil end
    H.stop_daemon(home)
    os.execute("rm -rf " .. home .. " " .. work)
  end)

  --- Start `drover exec FILE` in the background; returns the process and,
  -- once it has printed it, the run's id.
  local function start_exec(file, n)
    local err = work .. "/exec" .. (n or 0) .. ".err"
    local p = assert(drover.proc.spawn({ H.drover_bin, "exec", file },
      { cwd = work, env = env(), stdout = work .. "/exec" .. (n or 0) .. ".out", stderr = err }))
    local id = H.wait_until(function()
      return (drover.fs.read(err) or ""):match("flow run (%x+) started")
    end, 60, "the exec's run id")
    return p, id
  end

  local function db()
    store = store or assert(store_mod.open(home))
    return store
  end
  local function task_states(id)
    local counts = {}
    for _, t in ipairs(db():task_runs(id)) do counts[t.state] = (counts[t.state] or 0) + 1 end
    return counts
  end
  local function wait_tasks(id, state, n)
    H.wait_until(function() return (task_states(id)[state] or 0) >= n end, 60,
      n .. " task runs of " .. id .. " " .. state)
  end

  it("killed with SIGKILL, ends CRASHED in drover ls and status, no task run left RUNNING", function()
    write(work .. "/sl.lua", sleeper(400, 0.05))
    local p, id = start_exec("sl.lua")
    wait_tasks(id, "COMPLETED", 4)
    assert.are.equal("RUNNING", db():flow_run(id).state)
    drover.kill(p.pid, "KILL")
    p:wait(30)
    local code, out, err = H.drover({ "ls", "--json" }, { env = env() })
    assert.are.equal(0, code, err)
    local listed = drover.json.decode(out)[1]
    assert.are.equal(id, listed.id)
    assert.are.equal("CRASHED", listed.state)
    assert.matches("drover exec process " .. p.pid .. " died", listed.message)
    code, out = H.drover({ "status", id, "--json" }, { env = env() })
    assert.are.equal(0, code)
    local run = drover.json.decode(out)
    assert.are.equal("CRASHED", run.state)
    for _, t in ipairs(run.task_runs) do
      assert.is_true(t.state == "COMPLETED" or t.state == "CRASHED", t.state)
    end
    assert.is_nil(task_states(id).RUNNING)
  end)

  it("killed execs are reaped CRASHED by drover serve within seconds", function()
    local serve = H.serve(home)
    write(work .. "/sl.lua", sleeper(400, 0.05))
    local N, procs, ids = 5, {}, {}
    for i = 1, N do procs[i], ids[i] = start_exec("sl.lua", i) end
    for i = 1, N do wait_tasks(ids[i], "COMPLETED", 2) end
    local killed_at = drover.now()
    for i = 1, N do drover.kill(procs[i].pid, "KILL") end
    local crashed_after = {}
    -- read the store directly: drover ls and status would reap it themselves
    H.wait_until(function()
      local done = 0
      for i = 1, N do
        if not crashed_after[i] and db():flow_run(ids[i]).state == "CRASHED" then
          crashed_after[i] = drover.now() - killed_at
        end
        if crashed_after[i] then done = done + 1 end
      end
      return done == N
    end, 60, "the daemon's reaper to end every killed exec")
    local worst, left = 0, 0
    for i = 1, N do
      worst = math.max(worst, crashed_after[i])
      left = left + (task_states(ids[i]).RUNNING or 0)
    end
    assert.are.equal(0, left)
    print(string.format("# killed execs: %d killed, all CRASHED within %.1f s (reap interval %g s), " ..
      "task runs left RUNNING: %d", N, worst, require("drover.daemon").REAP_INTERVAL, left))
    serve:kill("TERM")
    serve:wait(30)
  end)

  it("a pid taken over by another process does not keep the run alive, nor get its signals", function()
    -- a run recorded as exec'd by the process with this pid, started at a
    -- time the live process with that pid was not
    local stranger = assert(drover.proc.spawn({ "sleep", "300" }))
    local s = db()
    local id = s:create_flow_run { name = "old", backend = "local", state = "RUNNING",
      pid = stranger.pid, external_id = "proc:" .. stranger.pid .. ":1", source = { kind = "exec" } }
    local code, _, err = H.drover({ "cancel", id }, { env = env() })
    assert.are.equal("CRASHED", s:flow_run(id).state, err)
    assert.are_not.equal(0, code)
    assert.matches("is CRASHED: only active runs can be cancelled", err)
    assert.is_true(stranger:is_running())
    stranger:kill("KILL")
    stranger:wait(10)
  end)

  it("os.exit(3) in a workflow ends the run FAILED first; os.exit(0) COMPLETED", function()
    write(work .. "/exit.lua", [[
      local drover = require "drover"
      local code = tonumber((...).code)
      local t = drover.task("t", function(i)
        if i == 6 then os.exit(code) end
        drover.sleep(0.01)
        return i
      end)
      local items = {}
      for i = 1, 50 do items[i] = i end
      drover.map(t, items, { concurrency = 3 })
    ]])
    for _, c in ipairs { { 3, "FAILED" }, { 0, "COMPLETED" } } do
      local r = drover.proc.run({ H.drover_bin, "exec", "exit.lua", "code=" .. c[1] }, { cwd = work, env = env() })
      assert.are.equal(c[1], r.code, r.stderr)
      local id = r.stderr:match("flow run (%x+) started")
      local run = db():flow_run(id)
      assert.are.equal(c[2], run.state)
      assert.are.equal("the workflow called os.exit(" .. c[1] .. ")", run.message)
      assert.matches("flow run " .. id .. " " .. c[2] .. " in .*os%.exit%(" .. c[1] .. "%)", r.stderr)
      local st = task_states(id)
      assert.is_nil(st.RUNNING)
      assert.is_true((st.COMPLETED or 0) >= 3)
    end
  end)

  it("drover cancel reaches the exec: it stops early and ends CANCELLED", function()
    write(work .. "/sl.lua", sleeper(200, 0.05))
    local p, id = start_exec("sl.lua")
    wait_tasks(id, "COMPLETED", 8)
    local code, out, err = H.drover({ "cancel", id }, { env = env() })
    assert.are.equal(0, code, err)
    assert.matches("cancelled " .. id .. " %(CANCELLED%)", out)
    local r = p:wait(60)
    assert.are_not.equal(0, r.code)
    local run = db():flow_run(id)
    assert.are.equal("CANCELLED", run.state)
    assert.are.equal("cancelled", run.message)
    local st = task_states(id)
    assert.is_true((st.COMPLETED or 0) < 200, "all 200 tasks ran to COMPLETED")
    assert.is_nil(st.RUNNING)
  end)

  it("POST /api/runs/ID/cancel reaches the exec the same way", function()
    local serve, info = H.serve(home)
    write(work .. "/sl.lua", sleeper(200, 0.05))
    local p, id = start_exec("sl.lua")
    wait_tasks(id, "COMPLETED", 8)
    local res = assert(drover.http.request { method = "POST", url = info.url .. "/api/runs/" .. id .. "/cancel",
      body = "{}", headers = { ["content-type"] = "application/json" } })
    assert.are.equal(202, res.status, res.body)
    p:wait(60)
    H.wait_run_state(info.url, id, "CANCELLED")
    assert.is_true((task_states(id).COMPLETED or 0) < 200)
    assert.is_nil(task_states(id).RUNNING)
    serve:kill("TERM")
    serve:wait(30)
  end)

  it("a disk that fills up mid-run: one line on stderr, FAILED or CRASHED, nothing left RUNNING", function()
    -- DROVER_HOME is a small tmpfs mounted in a mount namespace of the
    -- exec's own; the test fills it through /proc/PID/root once the run
    -- is under way.  Afterwards, in the same namespace, the filler goes,
    -- `drover status` looks at the run, and the store is copied out.
    local mnt, out = home .. "/mnt", work .. "/out"
    assert(drover.fs.mkdir(mnt))
    assert(drover.fs.mkdir(out))
    write(work .. "/big.lua", [[
      local drover = require "drover"
      local t = drover.task("step", function(i)
        if i == 300 then io.open(os.getenv("OUT") .. "/under-way", "w"):close() end
        print(("line %d "):format(i) .. ("x"):rep(2000))
        drover.sleep(0.01)
        return ("r"):rep(1000)
      end)
      local items = {}
      for i = 1, 20000 do items[i] = i end
      drover.map(t, items, { concurrency = 8 })
    ]])
    local script = [[
      mount -t tmpfs -o size=64m tmpfs "$MNT" || exit 90
      "$DROVER" exec "$WORK/big.lua" >"$OUT/stdout" 2>"$OUT/stderr" &
      echo $! >"$OUT/pid"
      wait $!
      echo $? >"$OUT/code"
      rm -f "$MNT/filler"
      id=$(sed -n 's/.*flow run \([0-9a-f]*\) started.*/\1/p' "$OUT/stderr")
      "$DROVER" status "$id" --json >"$OUT/status.json" 2>"$OUT/status.err"
      cp "$MNT"/drover.db* "$OUT/"
    ]]
    local ns = assert(drover.proc.spawn({ "unshare", "-m", "sh", "-c", script }, {
      env = { DROVER_HOME = mnt, MNT = mnt, OUT = out, WORK = work, DROVER = H.drover_bin,
        PATH = os.getenv("PATH") } }))
    local pid = H.wait_until(function()
      return math.tointeger(tonumber(drover.fs.read(out .. "/pid") or ""))
    end, 60, "the exec in the namespace")
    -- under way: a few hundred task runs have run (and been stored)
    H.wait_until(function() return drover.fs.exists(out .. "/under-way") end, 60, "the run to be under way")
    local filler = assert(io.open("/proc/" .. pid .. "/root" .. mnt .. "/filler", "wb"))
    local chunk = ("\0"):rep(65536)
    while filler:write(chunk) and filler:flush() do end
    filler:close()
    local r = ns:wait(120)
    assert.are.equal(0, r.code, r.stderr)
    local code = tonumber(drover.fs.read(out .. "/code"))
    local stderr = drover.fs.read(out .. "/stderr")
    assert.are.equal(1, code, stderr)
    local lines = {}
    for l in stderr:gmatch("[^\n]+") do lines[#lines + 1] = l end
    assert.are.equal(2, #lines, stderr) -- "started", then the one line
    assert.matches("^drover: flow run %x+ FAILED in .*: the store could not be written %(database or disk is full%)",
      lines[2])
    local status = drover.json.decode(drover.fs.read(out .. "/status.json"))
    assert.is_true(status.state == "FAILED" or status.state == "CRASHED", status.state)
    local running = 0
    for _, t in ipairs(status.task_runs) do
      if t.state == "RUNNING" or t.state == "PENDING" or t.state == "SCHEDULED" then running = running + 1 end
    end
    assert.are.equal(0, running)
    -- the copy taken in the namespace says the same
    store = assert(store_mod.open(out))
    assert.are.equal(status.state, store:flow_run(status.id).state)
    assert.is_nil(task_states(status.id).RUNNING)
    print(string.format("# disk full: stderr %q; final state %s (%d task runs: %s)", lines[2], status.state,
      #status.task_runs, (function()
        local parts = {}
        for k, v in pairs(task_states(status.id)) do parts[#parts + 1] = k .. " " .. v end
        table.sort(parts)
        return table.concat(parts, ", ")
      end)()))
  end)
end)

-- (here, not in tracker_spec: that one also runs against an installed rock, without the binary)
describe("drover exec of a task that fails, then succeeds on a retry", function()
  local work
  before_each(function() work = H.tempdir() end)
  after_each(function() os.execute("rm -rf " .. work) end)

  it("prints one line per failed attempt, and keeps the tracebacks in the run's logs", function()
    local home, flow_file = work .. "/home", work .. "/flaky.lua"
    local f = assert(io.open(flow_file, "w"))
    f:write([[
      local drover = require "drover"
      local calls = 0
      local fetch = drover.task("fetch", function()
        calls = calls + 1
        if calls < 3 then error("connection reset (try " .. calls .. ")") end
        return "fetched"
      end, { retries = 2, retry_delay = 0.01 })
      return fetch()
    ]])
    f:close()
    local code, _, err = H.drover({ "exec", flow_file }, { env = { DROVER_HOME = home } })
    assert.are.equal(0, code, err)
    local attempts = {}
    for l in err:gmatch("[^\n]+") do
      if l:find("attempt", 1, true) then attempts[#attempts + 1] = l end
    end
    assert.are.same({
      "drover: task fetch attempt 1/3 failed: " .. flow_file .. ":5: connection reset (try 1); retrying in 0.01s",
      "drover: task fetch attempt 2/3 failed: " .. flow_file .. ":5: connection reset (try 2); retrying in 0.01s",
    }, attempts)
    assert.is_nil(err:find("stack traceback", 1, true), err)
    assert.is_nil(err:find("\t", 1, true), err)

    local id = assert(err:match("flow run (%x+) started"), err)
    local store = assert(store_mod.open(home))
    local traces = {}
    for _, l in ipairs(store:logs(id)) do
      if l.stream == "error" then traces[#traces + 1] = l.line end
    end
    local run = store:flow_run(id)
    store:close()
    assert.are.equal("COMPLETED", run.state)
    assert.are.equal(2, #traces)
    for i, t in ipairs(traces) do
      assert.matches("^attempt " .. i .. " of fetch failed: [^\n]*:5: connection reset %(try " .. i .. "%)\n" ..
        "stack traceback:\n", t)
    end
  end)
end)
