-- The slurm backend on a real Slurm cluster, started by
-- tests/services/slurm.sh (tests/run.sh sources its env: SLURM_CONF,
-- DROVER_SLURM_*).  Without that cluster every test fails, saying so.
--
-- Nodes n1..n3 (partition debug) each run in a mount namespace of their
-- own where /tmp -- and so this spec's DROVER_HOME and staging directory --
-- is an empty tmpfs: the workers there reach the store only through the
-- `drover serve` this spec starts (api_url).  Node n4 (partition shared)
-- sees this host's files: the shared-filesystem fallback runs there.
local drover = require "drover"
local H = require "helper"

local fixture = H.root .. "/tests/fixtures/slurm"
local DEADLINE = 120

local function need(name)
  local v = os.getenv(name)
  if not v or v == "" then
    error("the Slurm test cluster is not available: " .. name .. " is not set " ..
      "(run `bash tests/services/slurm.sh start DIR` and source DIR/env)", 0)
  end
  return v
end

-- The URL of the `drover serve` the spec starts on its store (setup).
local API

--- The backend config for each transport: the workers report to API,
-- unless extra.shared (the shared-filesystem fallback, on node n4).
local function config(transport, extra)
  local c = { partition = need("DROVER_SLURM_PARTITION"), jobcomp_file = need("DROVER_SLURM_JOBCOMP"), api_url = API }
  if transport == "socket" then c.socket = need("DROVER_SLURM_SOCKET")
  elseif transport == "jwt" then c.url = need("DROVER_SLURM_URL"); c.token_file = need("DROVER_SLURM_TOKEN_FILE"); c.user = "root"
  else c.commands = true end
  for k, v in pairs(extra or {}) do c[k] = v end
  if c.shared then
    c.shared, c.api_url, c.partition = nil, nil, need("DROVER_SLURM_SHARED_PARTITION")
  end
  return c
end

--- A JSON config file for the CLI's -c (in the store's directory).
local function config_file(c)
  local path = require("drover.tracker").default_store().home .. "/slurm-" .. math.random(100000, 999999) .. ".json"
  assert(drover.fs.write(path, drover.json.encode(c)))
  return path
end

--- Run a Slurm command of the test cluster; its stdout.
local function slurm(argv)
  local out, err = drover.proc.output(argv, { env = { SLURM_CONF = need("SLURM_CONF") }, timeout = 60 })
  assert(out, err)
  return out
end

local function job_field(job, key)
  -- %f: "NodeList" must not match inside "ReqNodeList"
  return slurm({ "scontrol", "show", "job", "-o", job }):match("%f[%w/]" .. key:gsub("%p", "%%%0") .. "=(%S*)")
end

local function trim_out(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

local function wait_state(orch, id, want)
  local last
  local set = {}
  for _, w in ipairs(type(want) == "table" and want or { want }) do set[w] = true end
  local ok, err = pcall(H.wait_until, function()
    last = orch:status(id)
    return set[last.state]
  end, DEADLINE, "run " .. id .. " to reach " .. table.concat(type(want) == "table" and want or { want }, "/"))
  if not ok then
    error(tostring(err) .. " (last: " .. tostring(last and last.state) .. " " .. tostring(last and last.message) .. ")", 2)
  end
  return last
end

local n = 0
local function fresh(prefix)
  n = n + 1
  return prefix .. "-" .. math.random(100000, 999999) .. "-" .. n
end

--- An orchestrator, a package and a deployment of the fixture.
local function deployed(transport, params, job, extra)
  local orch = drover.orchestrator("slurm", config(transport, extra))
  local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
  local name = fresh("sl-" .. transport)
  orch:deploy(name, { package = pkg.id, params = params, job = job })
  return orch, name
end

describe("slurm backend", function()
  local server

  teardown(function()
    -- the server this spec started (a fallback run may also have started
    -- a dashboard daemon: the same daemon.json names whichever runs)
    if server then server:kill("TERM"); server:wait() end
    H.stop_daemon(require("drover.tracker").default_store().home)
  end)

  setup(function()
    for _, k in ipairs { "SLURM_CONF", "DROVER_SLURM_SOCKET", "DROVER_SLURM_URL", "DROVER_SLURM_TOKEN_FILE",
      "DROVER_SLURM_JOBCOMP", "DROVER_SLURM_DIR", "DROVER_SLURM_SHARED_PARTITION" } do need(k) end
    -- every node must be up before the tests start
    H.wait_until(function()
      local idle = 0
      for _ in slurm({ "sinfo", "-h", "-N", "-o", "%N %t" }):gmatch("idle") do idle = idle + 1 end
      return idle >= 4
    end, DEADLINE, "4 idle Slurm nodes")
    local home = require("drover.tracker").default_store().home
    local info
    server, info = H.serve(home)
    API = info.url
  end)

  for _, transport in ipairs { "socket", "jwt", "commands" } do
    it(transport .. ": a flow runs as a Slurm job on a node and COMPLETES, its tasks tracked", function()
      local orch, name = deployed(transport, { mode = "ok" }, { cpus_per_task = 2, mem = "100M", time = "00:10:00" })
      local id, url = orch:run(name, {})
      assert.matches("^%a[%w+.-]*://", url)
      local st = wait_state(orch, id, "COMPLETED")
      local job = st.external_id
      assert.matches("^%d+$", job)
      -- the job Slurm ran is drover's: its name, comment and template
      assert.are.equal("drover:" .. name, job_field(job, "JobName"))
      assert.are.equal("2", job_field(job, "CPUs/Task"))
      assert.matches("^n%d$", job_field(job, "NodeList"))
      local result = drover.json.decode(st.result)
      assert.are.equal(42, result.value)
      assert.are.equal(job, result.job)
      local names = {}
      for _, t in ipairs(st.task_runs) do names[#names + 1] = t.name .. "=" .. t.state end
      table.sort(names)
      assert.are.same({ "SlurmFlow.double=COMPLETED", "SlurmFlow.main=COMPLETED" }, names)
      assert.matches("slurm flow ran in job " .. job .. " cpus 2", table.concat(orch:logs(id), "\n"))
      local listed = false
      for _, r in ipairs(orch:list()) do if r.id == id then listed = true end end
      assert.is_true(listed)
    end)

    it(transport .. ": an unknown partition is refused at deploy, naming it", function()
      local orch = drover.orchestrator("slurm", config(transport))
      local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
      local ok, err = pcall(orch.deploy, orch, fresh("sl-part"), { package = pkg.id, job = { partition = "nosuchpart" } })
      assert.is_false(ok)
      assert.matches("unknown partition 'nosuchpart'", tostring(err))
    end)

    it(transport .. ": a job that dies FAILS with its exit code", function()
      local orch, name = deployed(transport, { mode = "exit", code = 7 })
      local id = orch:run(name, {})
      local st = wait_state(orch, id, { "FAILED", "CRASHED", "COMPLETED", "CANCELLED" })
      assert.are.equal("FAILED", st.state)
      assert.matches("slurm job " .. st.external_id .. " FAILED %(exit code 7%)", st.message)
    end)

    it(transport .. ": a job cancelled from outside with scancel ends CANCELLED", function()
      local marker = tostring(6000 + math.random(1, 3000)) .. ".5"
      local orch, name = deployed(transport, { mode = "sleep", marker = marker })
      local id = orch:run(name, {})
      wait_state(orch, id, "RUNNING")
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) >= 2 end, DEADLINE, "the job's processes")
      slurm({ "scancel", orch:status(id).external_id })
      -- the worker may record an end while its processes are being killed:
      -- status brings it in line with Slurm's CANCELLED
      local st = wait_state(orch, id, "CANCELLED")
      assert.are.equal("CANCELLED", st.state)
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    end)
  end

  describe("errors name the endpoint and the cause", function()
    it("slurmrestd down: the unix socket", function()
      local dir = H.tempdir()
      local orch = drover.orchestrator("slurm", { socket = dir .. "/nothing.sock", partition = "debug" })
      local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
      local ok, err = pcall(orch.deploy, orch, fresh("sl-down"), { package = pkg.id })
      os.remove(dir)
      assert.is_false(ok)
      assert.matches("slurmrestd at unix:" .. dir:gsub("%p", "%%%0") .. "/nothing.sock is unreachable", tostring(err))
      assert.is_nil(tostring(err):find("\n"))
    end)

    it("slurmrestd down: TCP", function()
      -- port 9 (discard): nothing listens there on a test machine
      local orch = drover.orchestrator("slurm", { url = "http://127.0.0.1:9", token = "x", partition = "debug" })
      local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
      local ok, err = pcall(orch.deploy, orch, fresh("sl-down"), { package = pkg.id })
      assert.is_false(ok)
      assert.matches("slurmrestd at http://127.0.0.1:9 is unreachable %(GET /partition/debug%)", tostring(err))
      assert.matches("onnect", tostring(err))
    end)

    it("a refused token", function()
      local orch = drover.orchestrator("slurm", config("jwt", { token_file = nil, token = "not-a-valid-token" }))
      local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
      local ok, err = pcall(orch.deploy, orch, fresh("sl-tok"), { package = pkg.id })
      assert.is_false(ok)
      assert.matches("slurmrestd at " .. need("DROVER_SLURM_URL"):gsub("%p", "%%%0"), tostring(err))
      assert.matches("token", tostring(err))
      assert.is_nil(tostring(err):find("not%-a%-valid%-token"), "the token is never shown")
    end)

    it("no token at all for TCP", function()
      local ok, err = pcall(function()
        local orch = drover.orchestrator("slurm", { url = need("DROVER_SLURM_URL") })
        return orch:token()
      end)
      assert.is_false(ok)
      assert.matches("needs a token: set token, token_file or token_command", tostring(err))
    end)

    it("a bad job template key or value", function()
      local orch = drover.orchestrator("slurm", config("socket"))
      local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
      local ok, err = pcall(orch.deploy, orch, fresh("sl-bad"), { package = pkg.id, job = { cpus = 2 } })
      assert.is_false(ok)
      assert.matches("unknown job template key 'cpus'", tostring(err))
      ok, err = pcall(orch.deploy, orch, fresh("sl-bad"), { package = pkg.id, job = { mem = "lots" } })
      assert.is_false(ok)
      assert.matches("bad job template value for 'mem': lots", tostring(err))
    end)
  end)

  it("api_url: a job on a node finds the store and staging directories empty; it reports over the API", function()
    local orch = drover.orchestrator("slurm", config("commands"))
    local store = orch:store()
    local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
    local dirs = { store.home, orch:staging() }
    local name = fresh("sl-look")
    orch:deploy(name, { package = pkg.id, params = { mode = "look", dirs = dirs } })
    -- here, both hold the store and the staged bundle
    for _, d in ipairs(dirs) do assert.is_true(#(drover.fs.list(d) or {}) > 0, d .. " is empty here") end
    local id, url = orch:run(name, {})
    assert.are.equal(API .. "/runs/" .. id, url)
    local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
    assert.are.equal("COMPLETED", st.state, tostring(st.message))
    local res = drover.json.decode(st.result)
    assert.matches("^n[123]$", res.node)
    for i, d in ipairs(dirs) do
      assert.is_nil(next(res.seen[i]), "node " .. res.node .. " sees " .. d .. ": " .. drover.json.encode(res.seen[i]))
    end
    assert.are.equal("", res.home, "no DROVER_HOME in the job's environment")
    -- the run has a token (only its hash is kept) and its task runs came over HTTP
    assert.is_true(store:has_run_token(id))
    assert.is_nil(store:flow_run(id).token_hash) -- rows handed out leave the digest out
    assert.are.equal(1, #st.task_runs)
  end)

  it("shared filesystem (no api_url): on a node that sees the store, the worker and the task jobs use it", function()
    local orch = drover.orchestrator("slurm", config("socket", { shared = true }))
    local store = orch:store()
    local pkg = orch:package("SlurmFlow", "slurm_flow", "main", { path = fixture })
    local look = fresh("sl-shared")
    orch:deploy(look, { package = pkg.id, params = { mode = "look", dirs = { store.home } } })
    local id, url = orch:run(look, {})
    assert.matches("^%a[%w+.-]*://", url)
    local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
    assert.are.equal("COMPLETED", st.state, tostring(st.message))
    local res = drover.json.decode(st.result)
    assert.are.equal("n4", res.node)
    assert.are.equal(store.home, res.home)
    assert.is_not_nil(next(res.seen[1]), "the node sees the store")
    assert.is_false(store:has_run_token(id), "no run token in the fallback")
    -- tasks with resources: jobs of their own, their results through the store
    local fan = fresh("sl-shared")
    orch:deploy(fan, { package = pkg.id, params = { mode = "fanout", items = { 1, 2, 3 } } })
    local fid = orch:run(fan, {})
    st = wait_state(orch, fid, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
    assert.are.equal("COMPLETED", st.state, tostring(st.message))
    res = drover.json.decode(st.result)
    for i, r in ipairs(res.squares) do
      assert.are.equal(i * i, r.square)
      assert.are.equal("n4", r.node)
      assert.are_not.equal(res.job, r.job)
    end
  end)

  it("a run that cannot be submitted is not recorded; one never submitted ends CRASHED", function()
    local orch, name = deployed("socket", { mode = "ok" })
    local store = orch:store()
    -- a bad `after` fails before the run is recorded: no run left PENDING
    local ok, err = pcall(orch.run, orch, name, {}, { after = { "no-such-run" } })
    assert.is_false(ok)
    assert.matches("'after' names run 'no%-such%-run', which has no Slurm job", tostring(err))
    assert.are.equal(0, #store:flow_runs { deployment = name })
    -- a run whose submitter died before it recorded a job id: after ten
    -- minutes without one, status ends it
    local id = require("drover.store").new_id()
    store:create_flow_run { id = id, name = name, deployment = name, backend = "slurm", state = "PENDING",
      params = {}, source = { kind = "deployment" } }
    assert.are.equal("PENDING", orch:status(id).state, "a fresh run may still be submitting")
    assert.is_nil(orch:is_alive(store:flow_run(id)), "no job yet: Slurm cannot be asked")
    store:write("UPDATE flow_runs SET created = created - 700 WHERE id = ?", id)
    local st = orch:status(id)
    assert.are.equal("CRASHED", st.state)
    assert.matches("never submitted to Slurm", st.message)
  end)

  it("jwt: a token slurmrestd refuses is read again from token_file and the request retried", function()
    local dir = H.tempdir()
    finally(function() drover.fs.remove(dir, { recursive = true }) end)
    local file = dir .. "/jwt"
    assert(drover.fs.write(file, "SLURM_JWT=expired.not.valid\n"))
    local orch = drover.orchestrator("slurm", config("jwt", { token_file = file }))
    assert.are.equal("expired.not.valid", orch:token()) -- cached now
    -- the token is renewed in the file (as a cron job would)
    assert(drover.fs.write(file, assert(drover.fs.read(need("DROVER_SLURM_TOKEN_FILE")))))
    assert.is_true(orch:partition_exists(need("DROVER_SLURM_PARTITION")))
    assert.are_not.equal("expired.not.valid", orch:token())
    -- a token that stays bad fails after one retry, with one line, never shown
    assert(drover.fs.write(file, "still-not-valid"))
    orch._token = nil
    local ok, err = pcall(orch.partition_exists, orch, need("DROVER_SLURM_PARTITION"))
    assert.is_false(ok)
    assert.matches("token", tostring(err))
    assert.is_nil(tostring(err):find("\n"))
    assert.is_nil(tostring(err):find("still%-not%-valid"))
  end)

  it("per-task resources, chained with afterok: the child runs after its parent", function()
    local orch, name = deployed("socket", { mode = "ok" })
    local a = orch:run(name, {}, { cpus = 3, mem = "200M", time = 5 })
    local b = orch:run(name, {}, { after = { a }, cpus = 1 })
    local ja = orch:status(a).external_id
    local sa = wait_state(orch, a, "COMPLETED")
    local sb = wait_state(orch, b, "COMPLETED")
    assert.are.equal("3", job_field(ja, "CPUs/Task"))
    assert.are.equal("200M", job_field(ja, "MinMemoryNode"))
    assert.are.equal("00:05:00", job_field(ja, "TimeLimit"))
    assert.is_true(sb.started >= sa.ended - 1, "the child started after its parent ended")
  end)

  it("a dependent job whose parent failed is cancelled, not pending forever", function()
    local orch, name = deployed("jwt", { mode = "exit", code = 4 })
    local parent = orch:run(name, {})
    local child = orch:run(name, { mode = "ok" }, { after = { parent } })
    wait_state(orch, parent, "FAILED")
    local st = wait_state(orch, child, { "CANCELLED", "FAILED", "CRASHED", "COMPLETED" })
    assert.are.equal("CANCELLED", st.state)
    assert.matches("Dependency", st.message)
  end)

  for _, transport in ipairs { "socket", "commands" } do
    it(transport .. ": map fans items out as one job array, %N limiting concurrency", function()
      local orch, name = deployed(transport, { mode = "item" })
      local items = {}
      for i = 1, 24 do items[i] = i * 10 end
      local m = orch:map(name, items, { concurrency = 5 })
      assert.matches("^%d+$", m.job_id)
      assert.are.equal(24, #m.runs)
      assert.are.equal("5", slurm({ "scontrol", "show", "job", "-o", m.job_id }):match("ArrayTaskThrottle=(%d+)"))
      local nodes = {}
      for i, id in ipairs(m.runs) do
        local st = wait_state(orch, id, "COMPLETED")
        assert.are.equal(m.job_id .. "_" .. (i - 1), st.external_id)
        local r = drover.json.decode(st.result)
        assert.are.same({ item = i * 10, index = i, doubled = i * 20 }, r)
        assert.are.equal(2, #st.task_runs) -- main and double, recorded on the node
        local node = table.concat(orch:logs(id), "\n"):match("item " .. i * 10 .. " on (n%d)")
        assert.is_string(node)
        nodes[node] = true
      end
      assert.is_true(next(nodes) ~= nil)
      -- once slurmctld forgets the array, the jobcomp file still has each
      -- element, found by the array's id and its index
      local last = H.wait_until(function() return orch:jobcomp(m.job_id, "23") end, DEADLINE,
        "element 23 of array " .. m.job_id .. " in the jobcomp file")
      assert.are.equal("COMPLETED", last.state)
    end)
  end

  it("stop cancels every job of the deployment (runs and arrays), found by name", function()
    local marker = tostring(6000 + math.random(1, 3000)) .. ".75"
    local orch, name = deployed("socket", { mode = "sleep", marker = marker })
    local other_orch, other = deployed("socket", { mode = "sleep", marker = marker .. "1" })
    local r1 = orch:run(name, {})
    local r2 = orch:run(name, {})
    local m = orch:map(name, { 1, 2, 3 }, { param = "unused" })
    local keep = other_orch:run(other, {})
    wait_state(orch, r1, "RUNNING")
    wait_state(other_orch, keep, "RUNNING")
    local res = orch:stop(name, {})
    assert.is_true(#res.jobs >= 3)
    for _, id in ipairs { r1, r2, m.runs[1], m.runs[2], m.runs[3] } do
      assert.are.equal("CANCELLED", orch:status(id).state)
    end
    assert.are.equal("", slurm({ "squeue", "-h", "--name=drover:" .. name, "-o", "%i" }))
    H.wait_until(function() return #H.pids_matching("sleep " .. marker .. " ") == 0 end, DEADLINE, "no process left")
    -- the other deployment's job is untouched
    assert.are.equal("RUNNING", other_orch:status(keep).state)
    other_orch:stop(other, {})
    assert.are.equal("CANCELLED", other_orch:status(keep).state)
  end)

  it("a job whose finished record left slurmctld is read from the jobcomp file", function()
    local orch, name = deployed("commands", { mode = "exit", code = 5 })
    local id = orch:run(name, {})
    local job = orch:status(id).external_id
    H.wait_until(function() return (drover.fs.read(need("DROVER_SLURM_JOBCOMP")) or ""):find("JobId=" .. job .. " ", 1, true) end,
      DEADLINE, "job " .. job .. " in the jobcomp file")
    -- ask for a job id slurmctld has never had: only the jobcomp file can answer
    local info = orch:jobcomp(job)
    assert.are.equal("FAILED", info.state)
    assert.are.equal(5, info.exit_code)
    assert.is_nil(orch:job_info("999999"))
  end)

  --- `drover status ID --json` in a fresh process with env; a table with
  -- state "?" when the backend could not be asked (exit 1).
  local function cli_status(env, id)
    local code, out = H.drover({ "status", id, "--json" }, { env = env })
    drover.sleep(0.2) -- each poll spawns a process: do not spin
    if code ~= 0 then return { state = "?" } end
    return drover.json.decode(out)
  end

  it("the CLI: a deployment keeps its transport; drover status reconciles with Slurm", function()
    local cfg_file = config_file(config("socket"))
    local home = require("drover.tracker").default_store().home
    local env = { SLURM_CONF = need("SLURM_CONF"), DROVER_HOME = home, DROVER_DAEMON = "0" }
    local function drv(args)
      local code, out, err = H.drover(args, { env = env })
      return code, out, err
    end
    local code, out, err = drv({ "package", "-b", "slurm", "-c", cfg_file, "--module", "slurm_flow",
      "--class", "SlurmFlow", "--entrypoint", "main", "--path", fixture, "--json" })
    assert.are.equal(0, code, err)
    local name = fresh("sl-cli")
    local marker = tostring(6000 + math.random(1, 3000)) .. ".25"
    local _
    code, _, err = drv({ "deploy", name, "-b", "slurm", "-c", cfg_file, "--package", drover.json.decode(out).id,
      "mode=sleep", "marker=" .. marker })
    assert.are.equal(0, code, err)
    -- no -c from here on: the deployment remembers its socket
    code, out, err = drv({ "run", name, "--json" })
    assert.are.equal(0, code, err)
    local id = drover.json.decode(out).id
    local function cli_state() return cli_status(env, id) end
    H.wait_until(function() return cli_state().state == "RUNNING" end, DEADLINE, "the run to be RUNNING")
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) >= 1 end, DEADLINE, "the job's processes")
    local job = cli_state().external_id
    -- SIGKILL to the worker itself: it records nothing, so only a look at
    -- Slurm (drover status here) can end the run
    local workers = H.pids_matching("worker " .. id)
    assert.are.equal(1, #workers, "one `drover worker " .. id .. "` process")
    assert.is_true(drover.kill(workers[1], "KILL"))
    local st
    H.wait_until(function()
      st = cli_state()
      return st.state ~= "RUNNING" and st.state ~= "PENDING" and st.state ~= "?"
    end, DEADLINE, "drover status to see the job end")
    assert.is_true(st.state == "FAILED" or st.state == "CRASHED", st.state .. ": " .. tostring(st.message))
    assert.matches("slurm job " .. job, st.message)
    -- the workflow's sleeps, orphaned by the killed worker, escape the job's
    -- cleanup under the test cluster's proctrack/linuxproc (proctrack/cgroup
    -- would end them): end them here
    for _, pid in ipairs(H.pids_matching("sleep " .. marker)) do drover.kill(pid, "KILL") end
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
  end)

  it("the CLI: a commands deployment keeps its slurm.conf; drover status without SLURM_CONF reaches Slurm", function()
    local home = require("drover.tracker").default_store().home
    local with = { SLURM_CONF = need("SLURM_CONF"), DROVER_HOME = home, DROVER_DAEMON = "0" }
    -- false removes the variable from the child's environment
    local without = { SLURM_CONF = false, DROVER_HOME = home, DROVER_DAEMON = "0" }
    local cfg_file = config_file(config("commands"))
    local code, out, err = H.drover({ "package", "-b", "slurm", "-c", cfg_file, "--module", "slurm_flow",
      "--class", "SlurmFlow", "--entrypoint", "main", "--path", fixture, "--json" }, { env = with })
    assert.are.equal(0, code, err)
    local name = fresh("sl-conf")
    local _
    code, _, err = H.drover({ "deploy", name, "-b", "slurm", "-c", cfg_file, "--package", drover.json.decode(out).id,
      "mode=exit", "code=3" }, { env = with })
    assert.are.equal(0, code, err)
    local d = require("drover.tracker").default_store():deployment(name)
    assert.are.equal(need("SLURM_CONF"), drover.json.decode(d.backend_config).slurm_conf)
    -- from here on no SLURM_CONF anywhere: run (sbatch) and status
    -- (scontrol) find the cluster through the deployment's slurm_conf
    code, out, err = H.drover({ "run", name, "--json" }, { env = without })
    assert.are.equal(0, code, err)
    local id = drover.json.decode(out).id
    local st
    H.wait_until(function()
      st = cli_status(without, id)
      return st.state ~= "?" and st.state ~= "RUNNING" and st.state ~= "PENDING"
    end, DEADLINE, "drover status without SLURM_CONF to see the run end")
    assert.are.equal("FAILED", st.state)
    assert.matches("^%d+$", st.external_id)
    -- status asked Slurm (scontrol, through the kept slurm.conf) and got an answer
    code, _, err = H.drover({ "status", id, "--json" }, { env = without })
    assert.are.equal(0, code, err)
    assert.are.equal("", err)
  end)

  -- last: it takes a node down (and brings it back)
  it("a node killed mid-job: the run ends CRASHED or FAILED, never stuck RUNNING", function()
    local marker = tostring(6000 + math.random(1, 3000)) .. ".125"
    local orch, name = deployed("socket", { mode = "sleep", marker = marker })
    local id = orch:run(name, {})
    wait_state(orch, id, "RUNNING")
    local job = orch:status(id).external_id
    local node = job_field(job, "NodeList")
    assert.matches("^n%d$", node)
    local dir = need("DROVER_SLURM_DIR")
    local pidfile = dir .. "/slurmd-" .. node .. ".pid"
    local pid = math.tointeger(tonumber(assert(drover.fs.read(pidfile))))
    assert.is_true(drover.kill(pid, "KILL"))
    H.wait_until(function() return not drover.kill(pid, 0) end, 30, "slurmd " .. node .. " to die")
    local ok, err = pcall(function()
      local st = wait_state(orch, id, { "CRASHED", "FAILED", "CANCELLED", "COMPLETED" })
      assert.is_true(st.state == "CRASHED" or st.state == "FAILED", st.state .. ": " .. tostring(st.message))
      assert.matches("NODE_FAIL", st.message)
    end)
    -- bring the node back (in a namespace of its own again) for whatever
    -- runs next; the service records its new pid
    local r = assert(drover.proc.run({ "bash", H.root .. "/tests/services/slurm.sh", "start-node", dir, node },
      { stdout = "capture", stderr = "capture", timeout = 60 }))
    assert(r.code == 0, "slurm.sh start-node " .. node .. ": " .. tostring(r.stderr))
    H.wait_until(function()
      return slurm({ "sinfo", "-h", "-n", node, "-o", "%t" }):match("^idle")
    end, DEADLINE, "node " .. node .. " back to idle")
    -- the job's orphaned processes: the restarted slurmd reaps them
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    assert(ok, err)
  end)

  describe("cancel ends one run, leaving its deployment active", function()
    local function history(orch, id)
      local h = {}
      for _, s in ipairs(orch:store():flow_run_states(id)) do h[#h + 1] = s.state end
      return table.concat(h, " ")
    end

    for _, transport in ipairs { "socket", "commands" } do
      it(transport .. ": one of two runs ends CANCELLED through CANCELLING; its job is gone, the other runs on", function()
        local marker = tostring(6000 + math.random(1, 3000)) .. ".35"
        local orch, name = deployed(transport, { mode = "sleep", marker = marker })
        local a = orch:run(name, {})
        local b = orch:run(name, {})
        wait_state(orch, a, "RUNNING")
        wait_state(orch, b, "RUNNING")
        local job_a, job_b = orch:status(a).external_id, orch:status(b).external_id
        -- the liveness hook asks Slurm
        assert.is_true(orch:is_alive(orch:status(a)))
        local rec = orch:cancel(a)
        assert.are.equal(a, rec.id)
        assert.are.equal("CANCELLED", rec.state)
        assert.matches("^CANCELLED", orch:status(a).state)
        assert.matches("CANCELLING CANCELLED$", history(orch, a))
        H.wait_until(function() return not orch:job_active(job_a) end, DEADLINE, "job " .. job_a .. " to end")
        assert.is_false(orch:is_alive(orch:status(a)))
        -- the deployment is not paused, the other run and its job go on
        assert.are_not.equal(1, orch:store():deployment(name).paused)
        assert.are.equal("RUNNING", orch:status(b).state)
        assert.is_true(orch:job_active(job_b))
        assert.are.equal(job_b, trim_out(slurm({ "squeue", "-h", "--name=drover:" .. name, "-o", "%A" })))
        -- a finished run, and an unknown one: one line each
        local ok, err = pcall(orch.cancel, orch, a)
        assert.is_false(ok)
        assert.are.equal("run " .. a .. " is CANCELLED: only active runs can be cancelled", err)
        ok, err = pcall(orch.cancel, orch, "nosuchrun-" .. marker)
        assert.is_false(ok)
        assert.are.equal("unknown run 'nosuchrun-" .. marker .. "'", err)
        orch:stop(name, {})
        assert.are.equal("CANCELLED", orch:status(b).state)
        H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
      end)
    end

    it("a run of a map: only its array element is cancelled, waiting or running", function()
      local marker = tostring(6000 + math.random(1, 3000)) .. ".45"
      local orch, name = deployed("socket", { mode = "sleep", marker = marker })
      -- %1: element 0 runs, elements 1 and 2 wait in the array's record
      local m = orch:map(name, { 1, 2, 3 }, { param = "unused", concurrency = 1 })
      wait_state(orch, m.runs[1], "RUNNING")
      local waiting = orch:cancel(m.runs[2])
      assert.are.equal("CANCELLED", waiting.state)
      assert.matches("CANCELLING CANCELLED$", history(orch, m.runs[2]))
      assert.are.equal("RUNNING", orch:status(m.runs[1]).state)
      local running = orch:cancel(m.runs[1])
      assert.are.equal("CANCELLED", running.state)
      -- element 1 was skipped: element 2 runs next
      local st = wait_state(orch, m.runs[3], "RUNNING")
      assert.are.equal(m.job_id .. "_2", st.external_id)
      assert.are.equal("CANCELLED", orch:status(m.runs[2]).state)
      orch:stop(name, {})
      assert.are.equal("CANCELLED", orch:status(m.runs[3]).state)
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    end)
  end)

  describe("tasks with resources run as Slurm jobs of their own", function()
    --- The store's log lines of run `id` as one text.
    local function logs_of(orch, id) return table.concat(orch:logs(id), "\n") end

    --- The Slurm job ids the flow's log names for task `what`.
    local function task_jobs(orch, id, what)
      local jobs, seen = {}, {}
      for j in logs_of(orch, id):gmatch("slurm job (%d+) runs " .. what:gsub("%p", "%%%0")) do
        if not seen[j] then seen[j] = true; jobs[#jobs + 1] = j end
      end
      return jobs
    end

    for _, transport in ipairs { "socket", "commands" } do
      it(transport .. ": drover.map over a resources task fans out as concurrent jobs on several nodes", function()
        local items = { 1, 2, 3, 4, 5, 6 }
        local orch, name = deployed(transport, { mode = "fanout", items = items })
        local id = orch:run(name, {})
        local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
        assert.are.equal("COMPLETED", st.state, tostring(st.message))
        local result = drover.json.decode(st.result)
        assert.are.equal(10, result.doubled) -- the plain task ran in the flow's job
        local flow_job = st.external_id
        assert.are.equal(flow_job, result.job)
        local jobs, nodes, nnodes = {}, {}, 0
        for i, r in ipairs(result.squares) do
          assert.are.equal(items[i], r.x)
          assert.are.equal(items[i] * items[i], r.square)
          assert.matches("^%d+$", r.job)
          assert.are_not.equal(flow_job, r.job)
          assert.is_nil(jobs[r.job], "each call is a job of its own")
          jobs[r.job] = r.node
          if not nodes[r.node] then nodes[r.node] = true; nnodes = nnodes + 1 end
        end
        assert.is_true(nnodes >= 2, "the jobs ran on " .. nnodes .. " node(s)")
        -- every task run COMPLETED; the log names the job of each call
        local count = 0
        for _, t in ipairs(st.task_runs) do
          assert.are.equal("COMPLETED", t.state, t.name)
          if t.name == "SlurmFlow.square" then count = count + 1 end
        end
        assert.are.equal(#items, count)
        local logged = task_jobs(orch, id, "task SlurmFlow.square")
        assert.are.equal(#items, #logged)
        for _, j in ipairs(logged) do
          assert.is_string(jobs[j], "logged job " .. j .. " is one that ran a call")
          -- Slurm's own record: drover's job name, one CPU, the node the call reported, COMPLETED
          assert.are.equal("drover:" .. name, job_field(j, "JobName"))
          assert.are.equal("1", job_field(j, "CPUs/Task"))
          assert.are.equal(jobs[j], job_field(j, "NodeList"))
          H.wait_until(function() return job_field(j, "JobState") == "COMPLETED" end, DEADLINE, "job " .. j .. " to complete")
          assert.matches("slurm job " .. j .. " ran task SlurmFlow.square on " .. jobs[j], logs_of(orch, id))
        end
      end)
    end

    it("a failing resources task FAILS with the job's error; its retry is a new job", function()
      local marker = "m" .. math.random(100000, 999999)
      local orch, name = deployed("socket", { mode = "fail", marker = marker })
      local id = orch:run(name, {})
      local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
      assert.are.equal("FAILED", st.state)
      local boom
      for _, t in ipairs(st.task_runs) do if t.name == "SlurmFlow.boom" then boom = t end end
      assert.is_table(boom)
      assert.are.equal("FAILED", boom.state)
      assert.are.equal(2, boom.attempts)
      assert.matches("^boom " .. marker .. " in job %d+$", boom.message)
      local jobs = task_jobs(orch, id, "task SlurmFlow.boom")
      assert.are.equal(2, #jobs, "one job per attempt")
      assert.are_not.equal(jobs[1], jobs[2])
      assert.are.equal("boom " .. marker .. " in job " .. jobs[2], boom.message)
      assert.matches("boom " .. marker, st.message)
    end)

    it("arguments that are not JSON fail the call before any job, saying so", function()
      local orch, name = deployed("socket", { mode = "badarg" })
      local id = orch:run(name, {})
      local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
      assert.are.equal("FAILED", st.state)
      assert.matches("task SlurmFlow.square: arguments must be JSON%-serialisable to run as a Slurm job: " ..
        ".*cannot encode function", st.message)
      assert.are.equal(0, #task_jobs(orch, id, "task SlurmFlow.square"))
    end)

    it("a resources task that times out cancels its job", function()
      local marker = tostring(6000 + math.random(1, 3000)) .. ".75"
      local orch, name = deployed("socket", { mode = "remote_timeout", marker = marker })
      local id = orch:run(name, {})
      local st = wait_state(orch, id, { "COMPLETED", "FAILED", "CRASHED", "CANCELLED" })
      assert.are.equal("FAILED", st.state)
      assert.matches("timed out after 5 s", st.message)
      local jobs = task_jobs(orch, id, "task SlurmFlow.nap_limited")
      assert.are.equal(1, #jobs)
      H.wait_until(function() return not orch:job_active(jobs[1]) end, DEADLINE, "the task's job to end")
      local info = orch:job_info(jobs[1])
      assert.matches("^CANCELLED", info.state)
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    end)

    it("bad resources are refused when the class is decorated, naming the task and the key", function()
      local orch = drover.orchestrator("slurm", config("socket"))
      local C = drover.class("Bad")
      function C:m() end
      C.task_options = { m = { resources = { gpus = 1 } } }
      local ok, err = pcall(drover.decorate, C, orch)
      assert.is_false(ok)
      assert.matches("task Bad.m: unknown resource 'gpus' %(cpus, mem, time, partition%)", tostring(err))
      C.task_options = { ["*"] = { resources = { mem = "lots" } } }
      ok, err = pcall(drover.decorate, C, orch)
      assert.is_false(ok)
      assert.matches("task Bad.m: bad job template value for 'mem': lots", tostring(err))
      -- outside a slurm run a resources task cannot become a job: it says so
      C.task_options = { m = { resources = { cpus = 1 } } }
      drover.decorate(C, orch)
      ok, err = pcall(C.m, C:new())
      assert.is_false(ok)
      assert.matches("task Bad.m has resources, so it runs as a Slurm job: call it inside a run of a slurm deployment",
        tostring(err))
    end)

    it("cancel of a run cancels its task jobs too (found by their comment), not its deployment's others", function()
      local marker = tostring(6000 + math.random(1, 3000)) .. ".65"
      local orch, name = deployed("commands", { mode = "remote_sleep", marker = marker })
      local id = orch:run(name, {})
      local other = orch:run(name, {})
      local jobs, others
      H.wait_until(function()
        jobs, others = task_jobs(orch, id, "task SlurmFlow.nap"), task_jobs(orch, other, "task SlurmFlow.nap")
        return #jobs == 1 and #others == 1 and job_field(jobs[1], "JobState") == "RUNNING"
          and job_field(others[1], "JobState") == "RUNNING"
      end, DEADLINE, "the tasks' jobs to run")
      assert.matches("of run " .. id .. "$", trim_out(slurm({ "squeue", "-h", "-j", jobs[1], "-o", "%k" })))
      local st = orch:cancel(id)
      assert.are.equal("CANCELLED", st.state)
      for _, t in ipairs(st.task_runs) do assert.are_not.equal("RUNNING", t.state, t.name) end
      H.wait_until(function()
        return not orch:job_active(jobs[1]) and not orch:job_active(st.external_id)
      end, DEADLINE, "no job of the cancelled run left")
      assert.are.equal("RUNNING", orch:status(other).state)
      assert.is_true(orch:job_active(others[1]))
      orch:stop(name, {})
      assert.are.equal("CANCELLED", orch:status(other).state)
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    end)

    it("stop on the flow cancels its task jobs too", function()
      local marker = tostring(6000 + math.random(1, 3000)) .. ".25"
      local orch, name = deployed("commands", { mode = "remote_sleep", marker = marker })
      local id = orch:run(name, {})
      local jobs
      H.wait_until(function()
        jobs = task_jobs(orch, id, "task SlurmFlow.nap")
        return #jobs == 1 and job_field(jobs[1], "JobState") == "RUNNING"
      end, DEADLINE, "the task's job to run")
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) >= 2 end, DEADLINE, "the task's processes")
      local res = orch:stop(name, {})
      assert.are.same({ id }, res.cancelled)
      local st = wait_state(orch, id, "CANCELLED")
      assert.are.equal("CANCELLED", st.state)
      for _, t in ipairs(st.task_runs) do assert.are_not.equal("RUNNING", t.state, t.name) end
      H.wait_until(function()
        return not orch:job_active(jobs[1]) and not orch:job_active(st.external_id)
      end, DEADLINE, "no job of the flow left")
      assert.are.equal("", slurm({ "squeue", "-h", "--name=drover:" .. name }))
      H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, DEADLINE, "no process left")
    end)
  end)
end)
