-- `drover serve`: the daemon as a real process on a real store, driven by
-- real local runs (worker processes) and real HTTP clients (drover.http and
-- the curl command line for server-sent events).
local drover = require "drover"
local http = require "drover.http"
local json = require "drover.json"
local H = require "helper"
local _ -- the values a test ignores

local root = os.getenv("DROVER_ROOT") or "."
local fixture = root .. "/tests/conformance/fixture"
-- Children run without the sanitizer run's LD_PRELOAD (curl deadlocks under it).
local child_env = { LD_PRELOAD = "" }

local pids_matching = H.pids_matching
local function processes_matching(s) return #pids_matching(s) end

local read_info = H.daemon_info

describe("drover serve", function()
  local home, daemon, info
  local daemons = {} -- every daemon process a test started, stopped in teardown

  local function drv(args, env)
    return H.drover(args, { env = env or { DROVER_HOME = home } })
  end

  -- Start `drover serve ARGS` on `dir`; wait until it wrote daemon.json.
  local function serve(args, dir, env)
    dir = dir or home
    local e = { DROVER_HOME = dir }
    for k, v in pairs(env or {}) do e[k] = v end
    local p, i = H.serve(dir, args, e)
    daemons[#daemons + 1] = p
    return p, i
  end

  local function get(path, opts) return assert(http.get(info.url .. path, opts)) end

  local function wait_state(id, want, timeout) return H.wait_run_state(info.url, id, want, timeout) end
  local function run(name, params) return H.run({ DROVER_HOME = home }, name, params) end

  setup(function()
    home = H.tempdir()
    local code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" })
    assert.are.equal(0, code, err)
    local pkg = json.decode(out).id
    assert.are.equal(0, (drv({ "deploy", "ok", "--package", pkg, "mode=ok" })))
    assert.are.equal(0, (drv({ "deploy", "long", "--package", pkg, "mode=long" })))
    daemon, info = serve()
  end)

  teardown(function()
    for _, p in ipairs(daemons) do
      if p:is_running() then drover.kill(p.pid, "KILL"); p:wait(30) end
    end
    local d = home and read_info(home)
    if d and d.pid then drover.kill(d.pid, "KILL") end
    H.remove_worker_dirs(home)
    os.execute("rm -rf " .. home)
  end)

  it("writes daemon.json {pid, port, url} and serves the dashboard", function()
    assert.are.equal(daemon.pid, info.pid)
    assert.is_true(math.type(info.port) == "integer" and info.port > 0)
    assert.are.equal("http://127.0.0.1:" .. info.port, info.url)
    local r = get("/")
    assert.are.equal(200, r.status)
    assert.matches("text/html", r.headers["content-type"])
    assert.matches('<script src="/app.js">', r.body)
    assert.matches("EventSource", get("/app.js").body)
    assert.matches("text/css", get("/style.css").headers["content-type"])
    -- the JS routes: every run and deployment page is index.html
    assert.are.equal(r.body, get("/runs/abc123").body)
    assert.are.equal(r.body, get("/deployments/ok").body)
    assert.are.equal(404, get("/nope/x").status)
    local e = get("/api/nope")
    assert.are.equal(404, e.status)
    assert.matches("no such endpoint", e.json.error)
  end)

  it("runs list, run detail and logs of a completed local run; drover run prints the dashboard URL", function()
    local id, url = run("ok")
    assert.are.equal(info.url .. "/runs/" .. id, url)
    local r = wait_state(id, "COMPLETED")
    assert.are.equal("ok", r.deployment)
    assert.are.same({ mode = "ok" }, r.params)
    assert.are.same({ mode = "ok", word = "HELLO" }, r.result)
    assert.are.equal(2, #r.task_runs)
    local names = {}
    for _, t in ipairs(r.task_runs) do names[t.name] = t.state end
    assert.are.same({ ["Fixture.main"] = "COMPLETED", ["Fixture.shout"] = "COMPLETED" }, names)
    local hist = {}
    for _, s in ipairs(r.states) do hist[#hist + 1] = s.state end
    assert.are.same({ "PENDING", "RUNNING", "COMPLETED" }, hist)

    local logs = get("/api/runs/" .. id .. "/logs").json
    assert.are.equal("fixture says HELLO", logs[1].line)
    assert.are.equal(0, #get("/api/runs/" .. id .. "/logs?after=" .. logs[#logs].id).json)
    assert.are.equal(400, get("/api/runs/" .. id .. "/logs?after=x").status)

    local found = false
    for _, x in ipairs(get("/api/runs").json) do if x.id == id then found = true end end
    assert.is_true(found)
    for _, x in ipairs(get("/api/runs?state=completed&deployment=ok").json) do
      assert.are.equal("COMPLETED", x.state)
      assert.are.equal("ok", x.deployment)
    end
    assert.are.equal(0, #get("/api/runs?deployment=long&state=COMPLETED").json)
    assert.are.equal(1, #get("/api/runs?limit=1").json)
    assert.are.equal("[]", get("/api/runs?limit=0").body)
    local bad = get("/api/runs?state=SLEEPY")
    assert.are.equal(400, bad.status)
    assert.matches("unknown state", bad.json.error)
    local missing = get("/api/runs/ffffffffffff")
    assert.are.equal(404, missing.status)
    assert.are.equal("unknown run 'ffffffffffff'", missing.json.error)
  end)

  it("deployments list and one deployment with its recent runs", function()
    local ds = get("/api/deployments").json
    assert.are.equal(2, #ds)
    assert.are.equal("long", ds[1].name)
    assert.are.equal("ok", ds[2].name)
    local d = get("/api/deployments/ok").json
    assert.are.equal("local", d.backend)
    assert.are.same({ mode = "ok" }, d.params)
    assert.is_true(#d.runs >= 1)
    for _, r in ipairs(d.runs) do assert.are.equal("ok", r.deployment) end
    local e = get("/api/deployments/ghost")
    assert.are.equal(404, e.status)
    assert.are.equal("unknown deployment 'ghost'", e.json.error)
  end)

  it("POST cancel stops a long run two-phase: CANCELLING, then CANCELLED, no process left", function()
    local marker = tostring(5000 + math.random(1, 4000)) .. ".125"
    local id = run("long", { "marker=" .. marker })
    wait_state(id, "RUNNING")
    H.wait_until(function() return processes_matching("sleep " .. marker) >= 2 end, 60, "the run's processes")
    assert.are.equal(405, get("/api/runs/" .. id .. "/cancel").status)
    local r = assert(http.post(info.url .. "/api/runs/" .. id .. "/cancel", ""))
    assert.are.equal(202, r.status)
    assert.are.equal("CANCELLING", r.json.state)
    local final = wait_state(id, "CANCELLED")
    local hist = {}
    for _, s in ipairs(final.states) do hist[#hist + 1] = s.state end
    assert.are.equal("CANCELLING", hist[3])
    assert.are.equal("CANCELLED", hist[#hist])
    H.wait_until(function() return processes_matching("sleep " .. marker) == 0 end, 30, "no process left")
    local again = assert(http.post(info.url .. "/api/runs/" .. id .. "/cancel", ""))
    assert.are.equal(400, again.status)
    assert.matches("is CANCELLED: only active runs", again.json.error)
    assert.are.equal(404, assert(http.post(info.url .. "/api/runs/ffffffffffff/cancel", "")).status)
  end)

  it("cancel of a run whose worker is gone marks it CANCELLED", function()
    local store = assert(require("drover.store").open(home))
    local id = store:create_flow_run { name = "ghost", deployment = "ok", backend = "local", state = "RUNNING" }
    store:close()
    local r = assert(http.post(info.url .. "/api/runs/" .. id .. "/cancel", ""))
    assert.are.equal(202, r.status)
    assert.are.equal("CANCELLING", r.json.state)
    assert.are.equal("cancelled", wait_state(id, "CANCELLED").message)
  end)

  it("metrics: flow and task runs by state, task run duration summary", function()
    local body = get("/metrics")
    assert.are.equal(200, body.status)
    assert.matches("^text/plain; version=0.0.4", body.headers["content-type"])
    local text = body.body
    local store = assert(require("drover.store").open(home))
    local completed = store:value("SELECT count(*) FROM flow_runs WHERE state = 'COMPLETED'")
    local tasks_done = store:value("SELECT count(*) FROM task_runs WHERE state = 'COMPLETED'")
    store:close()
    assert.is_true(completed >= 1)
    assert.matches("# TYPE drover_flow_runs gauge\n", text, 1, true)
    assert.matches('\ndrover_flow_runs{state="COMPLETED"} ' .. completed .. "\n", text, 1, true)
    assert.matches('\ndrover_flow_runs{state="CANCELLED"} ', text, 1, true)
    assert.matches('\ndrover_task_runs{state="COMPLETED"} ' .. tasks_done .. "\n", text, 1, true)
    assert.matches("# TYPE drover_task_run_duration_seconds summary\n", text, 1, true)
    assert.matches("\ndrover_task_run_duration_seconds_count " .. tasks_done .. "\n", text, 1, true)
    local sum = tonumber(text:match("drover_task_run_duration_seconds_sum (%S+)"))
    assert.is_true(sum > 0)
    -- every sample line is "name{labels} value" or "name value"
    for line in text:gmatch("[^\n]+") do
      if line:sub(1, 1) ~= "#" then assert.matches("^[%a_:][%w_:]*[{%s]", line) end
    end
  end)

  it("server-sent events: run events on state changes, log events of ?run=", function()
    local missing = get("/api/events?run=ffffffffffff")
    assert.are.equal(404, missing.status)
    -- a stream watching every run, opened before the run starts
    local all = {}
    local c1 = assert(drover.proc.spawn({ "curl", "-sN", "--max-time", "120", info.url .. "/api/events" },
      { env = child_env, stdout = function(chunk) all[#all + 1] = chunk end }))
    H.wait_until(function() return table.concat(all):find("retry: 2000", 1, true) end, 30, "the stream to open")
    local id = run("ok")
    H.wait_until(function()
      local s = table.concat(all)
      return s:find('"id":"' .. id .. '"', 1, true) and s:find('"state":"COMPLETED"', 1, true)
    end, 60, "run events of " .. id)
    assert.matches("event: run\ndata: {", table.concat(all), 1, true)
    -- a stream of that run's logs, from the start
    local one = {}
    local c2 = assert(drover.proc.spawn({ "curl", "-sN", "--max-time", "120",
      info.url .. "/api/events?run=" .. id .. "&after=0" }, { env = child_env, stdout = function(chunk) one[#one + 1] = chunk end }))
    H.wait_until(function() return table.concat(one):find("fixture says HELLO", 1, true) end, 30, "the log event")
    local s = table.concat(one)
    local log_id, data = s:match("event: log\nid: (%d+)\ndata: ([^\n]+)\n\n")
    assert.is_truthy(log_id)
    local l = json.decode(data)
    assert.are.equal(tonumber(log_id), l.id)
    assert.are.equal("fixture says HELLO", l.line)
    c1:kill("TERM"); c2:kill("TERM")
    c1:wait(30); c2:wait(30)
  end)

  it("the reaper marks a run whose worker was killed CRASHED within seconds", function()
    local marker = tostring(5000 + math.random(1, 4000)) .. ".375"
    local id = run("long", { "marker=" .. marker })
    local r = wait_state(id, "RUNNING")
    assert.is_true(math.type(r.pid) == "integer")
    H.wait_until(function() return processes_matching("sleep " .. marker) >= 2 end, 60, "the run's processes")
    drover.kill(r.pid, "KILL") -- the worker, without a chance to record anything
    local ok, crashed = pcall(wait_state, id, "CRASHED", 30)
    -- the workflow's own processes (their own process groups) outlive a killed worker
    for _, pid in ipairs(pids_matching("sleep " .. marker)) do drover.kill(pid, "KILL") end
    assert(ok, crashed)
    assert.matches("worker process " .. r.pid .. " died", crashed.message)
    for _, t in ipairs(crashed.task_runs) do
      if t.state ~= "COMPLETED" then assert.are.equal("CRASHED", t.state) end
    end
  end)

  it("a daemon killed with SIGKILL is replaced by a new one; nothing is lost", function()
    local before = get("/api/runs?limit=10000").json
    assert.is_true(#before >= 4)
    drover.kill(daemon.pid, "KILL")
    daemon:wait(30)
    assert.are.equal(daemon.pid, read_info(home).pid) -- stale: nobody removed it
    assert.is_nil(require("drover.daemon").running(home))
    daemon, info = serve()
    local after = get("/api/runs?limit=10000").json
    assert.are.equal(#before, #after)
    for i, r in ipairs(before) do
      assert.are.equal(r.id, after[i].id)
      assert.are.equal(r.state, after[i].state)
    end
    -- and runs go on being served and tracked
    local id, url = run("ok")
    assert.are.equal(info.url .. "/runs/" .. id, url)
    wait_state(id, "COMPLETED")
  end)

  it("SIGTERM stops the daemon cleanly and removes daemon.json", function()
    local dir = H.tempdir()
    local p, i = serve(nil, dir)
    assert.are.equal(200, assert(http.get(i.url .. "/api/runs")).status)
    -- an open event stream must not keep it from stopping
    local c = assert(drover.proc.spawn({ "curl", "-sN", "--max-time", "120", i.url .. "/api/events" },
      { env = child_env, stdout = "null" }))
    drover.sleep(0.3)
    drover.kill(p.pid, "TERM")
    local r = p:wait(60)
    assert.are.equal(0, r.code)
    assert.is_false(drover.fs.exists(dir .. "/daemon.json"))
    assert.matches("stopped", drover.fs.read(dir .. "/serve.err"))
    c:wait(60)
    os.execute("rm -rf " .. dir)
  end)

  it("a non-loopback address needs a token; requests without it get 401; the token is never logged", function()
    local dir = H.tempdir()
    local code, _, err = drv({ "serve", "--port", "0", "--bind", "127.0.0.2" }, { DROVER_HOME = dir, DROVER_TOKEN = "" })
    assert.are.equal(2, code)
    assert.matches("requires a token", err)
    assert.is_false(drover.fs.exists(dir .. "/daemon.json"))

    local secret = "s3cret-" .. math.random(100000, 999999)
    local p, i = serve({ "--port", "0", "--bind", "127.0.0.2", "--token", secret }, dir)
    assert.are.equal("http://127.0.0.2:" .. i.port, i.url)
    local r = assert(http.get(i.url .. "/api/runs"))
    assert.are.equal(401, r.status)
    assert.matches("unauthorized", r.json.error)
    assert.are.equal(401, assert(http.get(i.url .. "/")).status)
    assert.are.equal(401, assert(http.get(i.url .. "/metrics")).status)
    assert.are.equal(401, assert(http.get(i.url .. "/api/runs", { headers = { authorization = "Bearer wrong" } })).status)
    assert.are.equal(401, assert(http.get(i.url .. "/api/runs?token=" .. secret .. "x")).status)
    assert.are.equal(200, assert(http.get(i.url .. "/api/runs", { headers = { authorization = "Bearer " .. secret } })).status)
    local q = assert(http.get(i.url .. "/?token=" .. secret))
    assert.are.equal(200, q.status)
    -- the browser gets a cookie so the page's assets and API calls pass too
    local cookie = q.headers["set-cookie"]:match("^(drover_token=[^;]+)")
    assert.are.equal(200, assert(http.get(i.url .. "/app.js", { headers = { cookie = cookie } })).status)
    drover.kill(p.pid, "TERM")
    p:wait(60)
    local logged = (drover.fs.read(dir .. "/serve.err") or "") .. (drover.fs.read(dir .. "/serve.out") or "")
    assert.is_nil(logged:find(secret, 1, true))
    assert.is_nil(H.store_text(dir):find(secret, 1, true))

    -- DROVER_TOKEN works as --token
    local p2, i2 = serve({ "--port", "0", "--bind", "127.0.0.2" }, dir, { DROVER_TOKEN = secret })
    assert.are.equal(401, assert(http.get(i2.url .. "/api/runs")).status)
    assert.are.equal(200, assert(http.get(i2.url .. "/api/runs", { headers = { authorization = "Bearer " .. secret } })).status)
    drover.kill(p2.pid, "TERM")
    p2:wait(60)
    os.execute("rm -rf " .. dir)
  end)

  it("an automatic daemon (serve --auto) leaves the store to another live daemon", function()
    local dir = H.tempdir()
    local p1, i1 = serve({ "--port", "0", "--auto" }, dir)
    -- a second automatic one sees the first and exits at once
    local code = drv({ "serve", "--port", "0", "--auto" }, { DROVER_HOME = dir })
    assert.are.equal(0, code)
    assert.are.equal(i1.pid, read_info(dir).pid)
    -- a daemon started by hand takes over; the automatic one steps aside
    local p2, i2 = serve({ "--port", "0" }, dir)
    local r = p1:wait(30)
    assert.are.equal(0, r.code)
    assert.are.equal(i2.pid, read_info(dir).pid) -- not removed by the one that left
    drover.kill(p2.pid, "TERM")
    assert.are.equal(0, p2:wait(30).code)
    assert.is_false(drover.fs.exists(dir .. "/daemon.json"))
    os.execute("rm -rf " .. dir)
  end)

  it("bad flags are usage errors", function()
    local code, _, err = drv({ "serve", "--port", "http" })
    assert.are.equal(2, code)
    assert.matches("%-%-port must be a port number", err)
    code, _, err = drv({ "serve", "--port", tostring(info.port) })
    assert.are.equal(2, code)
    assert.matches("127.0.0.1:" .. info.port, err)
    code = drv({ "serve", "--help" })
    assert.are.equal(0, code)
  end)

  it("checks other backends' active runs through their status, configured as deployed", function()
    -- a backend of the test's own (found through DROVER_PATH by the daemon):
    -- its status ends the run once a marker file exists; the marker's path
    -- reaches the daemon only through the config the deployment kept
    local dir = H.tempdir()
    assert(drover.fs.mkdir(dir .. "/backends"))
    assert(drover.fs.write(dir .. "/backends/probe.lua", [[
      local Local = require("drover.orchestrator").backend_class("local")
      local Probe = Local:extend("probe")
      Probe.backend_name = "probe"
      Probe.config_keys = { marker = "string", broken = "boolean" }
      function Probe:status(id)
        if self.config.broken then error("probe backend is down") end
        local r = self:find_run(id)
        if require("drover.fs").exists(self.config.marker) then
          self:store():end_flow_run(r.id, "CRASHED", "probe saw it end")
        end
        return self:store():flow_run(r.id)
      end
      return Probe
    ]]))
    local phome = H.tempdir()
    local store = assert(require("drover.store").open(phome))
    local marker = dir .. "/ended"
    assert(store:put_deployment { name = "probed", backend = "probe", backend_config = { marker = marker } })
    assert(store:put_deployment { name = "down", backend = "probe", backend_config = { broken = true } })
    local probed = store:create_flow_run { name = "probed", deployment = "probed", backend = "probe", state = "RUNNING" }
    local down = store:create_flow_run { name = "down", deployment = "down", backend = "probe", state = "RUNNING" }
    -- a local run whose worker is long gone: the reaper must not wait on the broken backend
    local gone = store:create_flow_run { name = "gone", backend = "local", state = "RUNNING", pid = 999999 }
    store:close()
    local p, pinfo = serve(nil, phome, { DROVER_PATH = dir .. "/backends" })
    local function state_of(id) return assert(http.get(pinfo.url .. "/api/runs/" .. id)).json.state end
    H.wait_until(function() return state_of(gone) == "CRASHED" end, 60, "the local run to be reaped")
    assert.are.equal("RUNNING", state_of(probed)) -- no marker yet: the backend says it still runs
    assert(drover.fs.write(marker, "x"))
    H.wait_until(function() return state_of(probed) == "CRASHED" end, 60, "the daemon to ask the probe backend")
    assert.are.equal("probe saw it end", assert(http.get(pinfo.url .. "/api/runs/" .. probed)).json.message)
    assert.are.equal("RUNNING", state_of(down)) -- a backend that fails changes nothing
    H.wait_until(function()
      return (drover.fs.read(phome .. "/serve.err") or ""):find("probe backend is down", 1, true)
    end, 60, "the failure to be reported")
    -- one more sweep (a new run to end), then count: the same failure is reported once
    store = assert(require("drover.store").open(phome))
    local later = store:create_flow_run { name = "probed", deployment = "probed", backend = "probe", state = "RUNNING" }
    store:close()
    H.wait_until(function() return state_of(later) == "CRASHED" end, 60, "a later sweep")
    local _, reports = (drover.fs.read(phome .. "/serve.err") or ""):gsub("probe backend is down", "")
    assert.is_true(drover.kill(p.pid, "TERM"))
    p:wait(30)
    assert.are.equal(1, reports)
    os.execute("rm -rf " .. dir .. " " .. phome)
  end)

  it("drover run starts a daemon when none runs, and reuses it", function()
    local dir = H.tempdir()
    local env = { DROVER_HOME = dir }
    local code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" }, env)
    assert.are.equal(0, code, err)
    assert.are.equal(0, (drv({ "deploy", "ok", "--package", json.decode(out).id }, env)))
    code, out, err = drv({ "run", "ok" }, env)
    assert.are.equal(0, code, err)
    local auto = require("drover.daemon").running(dir)
    assert.is_truthy(auto, "a daemon runs")
    local ok, cleanup_err = pcall(function()
      local id, url = out:match("^(%x+)%s+(%S+)")
      assert.are.equal(auto.url .. "/runs/" .. id, url)
      H.wait_until(function()
        return assert(http.get(auto.url .. "/api/runs/" .. id)).json.state == "COMPLETED"
      end, 60, "the run")
      local _, out2 = drv({ "run", "ok" }, env)
      assert.matches(auto.url .. "/runs/", out2, 1, true)
      assert.are.equal(auto.pid, read_info(dir).pid)
      -- no daemon wanted: the worker's log file
      local _, out3 = drv({ "run", "ok" }, { DROVER_HOME = dir, DROVER_DAEMON = "0" })
      assert.matches("file://" .. dir .. "/runs/", out3, 1, true)
    end)
    drover.kill(auto.pid, "TERM")
    H.wait_until(function() return not drover.kill(auto.pid, 0) end, 30, "the daemon to stop")
    os.execute("rm -rf " .. dir)
    assert(ok, cleanup_err)
  end)

  describe("the scheduler", function()
    local dir, env, d1, i1
    local sched_fixture = root .. "/tests/fixtures/sched"

    local function api(i, path) return assert(http.get(i.url .. path)).json end
    local function runs_of(i, name) return api(i, "/api/runs?limit=10000&deployment=" .. name) end
    local function completed(i, name)
      local n = 0
      for _, r in ipairs(runs_of(i, name)) do if r.state == "COMPLETED" then n = n + 1 end end
      return n
    end
    -- the fire times of a deployment's runs: each distinct, each from the schedule
    local function fire_times(i, name)
      local seen, list = {}, {}
      for _, r in ipairs(runs_of(i, name)) do
        assert.are.equal("schedule", r.source.kind)
        assert.are.equal("@every 1s", r.source.schedule)
        local t = r.source.fire_time
        assert.is_true(math.type(t) == "integer", "integer fire time")
        assert.is_nil(seen[t], "fire time " .. tostring(t) .. " fired twice")
        seen[t] = true
        list[#list + 1] = t
      end
      return list
    end

    setup(function()
      dir = H.tempdir()
      env = { DROVER_HOME = dir }
      local code, out, err = drv({ "package", "--module", "sched_flow", "--class", "Sched",
        "--entrypoint", "main", "--path", sched_fixture, "--json" }, env)
      assert.are.equal(0, code, err)
      local pkg = json.decode(out).id
      code, _, err = drv({ "deploy", "bad", "--package", pkg, "--schedule", "61 * * * *" }, env)
      assert.are.equal(2, code)
      assert.are.equal("drover: local.deploy: bad schedule '61 * * * *': bad minute field '61': "
        .. "61 is out of range (0-59)\n", err)
      code, _, err = drv({ "deploy", "bad", "--package", pkg, "--schedule", "@every soon" }, env)
      assert.are.equal(2, code)
      assert.matches("^drover: local.deploy: bad schedule '@every soon': interval 'soon'", err)
      assert.are.equal(0, (drv({ "deploy", "tick", "--package", pkg, "--schedule", "@every 1s", "tag=tick" }, env)))
      assert.are.equal(0, (drv({ "deploy", "tock", "--package", pkg, "--schedule", "@every 1s", "tag=tock" }, env)))
      assert.are.equal(0, (drv({ "deploy", "manual", "--package", pkg }, env)))
      -- a deployment of another backend (the nohup example, kept by its path)
      assert.are.equal(0, (drv({ "deploy", "nick", "-b", root .. "/examples/backends/nohup.lua", "--package", pkg,
        "--schedule", "@every 1s", "tag=nick" }, env)))
      d1, i1 = serve(nil, dir)
    end)

    teardown(function()
      if dir then
        drv({ "stop", "tick" }, env)
        drv({ "stop", "tock" }, env)
        drv({ "stop", "nick" }, env)
        local d = read_info(dir)
        if d and d.pid then drover.kill(d.pid, "KILL") end
        H.remove_worker_dirs(dir)
        os.execute("rm -rf " .. dir)
      end
    end)

    it("an @every 1s deployment gets scheduled runs that complete; the API shows the schedule", function()
      H.wait_until(function() return completed(i1, "tick") >= 3 end, 90, "3 completed scheduled runs of tick")
      assert.is_true(#fire_times(i1, "tick") >= 3)
      local r = runs_of(i1, "tick")[1]
      local full = api(i1, "/api/runs/" .. r.id)
      assert.are.same({ tag = "tick" }, full.params)
      local d = api(i1, "/api/deployments/tick")
      assert.are.equal("@every 1s", d.schedule)
      local now = require("drover.store").time()
      assert.is_true(math.type(d.next_fire) == "integer" and d.next_fire > now - 5 and d.next_fire <= now + 5)
      assert.is_true(d.last_fire >= r.source.fire_time)
      local m = api(i1, "/api/deployments/manual")
      assert.is_nil(m.schedule)
      assert.is_nil(m.next_fire)
      assert.are.equal(0, #runs_of(i1, "manual"))
      assert.is_nil(drover.fs.read(dir .. "/serve.err"):find("bad minute", 1, true)) -- never deployed
      assert.matches("schedule of 'tick': fire at [%d%- :+]+ started run %x+", drover.fs.read(dir .. "/serve.err"))
    end)

    it("schedules fire for every backend, through the deployment's own backend", function()
      H.wait_until(function() return completed(i1, "nick") >= 2 end, 90, "2 completed scheduled runs of nick")
      assert.is_true(#fire_times(i1, "nick") >= 2)
      assert.are.equal("nohup", runs_of(i1, "nick")[1].backend)
    end)

    it("drover stop pauses a scheduled deployment: no new runs after", function()
      local code, _, err = drv({ "stop", "tick" }, env)
      assert.are.equal(0, code, err)
      local before = #runs_of(i1, "tick")
      H.wait_until(function()
        for _, r in ipairs(runs_of(i1, "tick")) do
          if r.state == "PENDING" or r.state == "RUNNING" or r.state == "CANCELLING" then return false end
        end
        return true
      end, 60, "tick's runs to end")
      assert.is_nil(api(i1, "/api/deployments/tick").next_fire)
      -- proof the scheduler went on ticking: tock gets three more runs
      local tock = completed(i1, "tock")
      H.wait_until(function() return completed(i1, "tock") >= tock + 3 end, 90, "3 more runs of tock")
      assert.are.equal(before, #runs_of(i1, "tick"))
    end)

    it("each fire time is claimed once across daemons; late ones are skipped; max_active is respected", function()
      -- two daemon objects on the store, ticked by hand at chosen times
      -- around the next New Year (a yearly schedule the live daemon will
      -- not fire during the suite)
      local daemon_mod = require "drover.daemon"
      local cron = require "drover.cron"
      local store = assert(require("drover.store").open(dir))
      local pkg = store:deployment("tick").package_id
      local go = dir .. "/go_capped"
      assert.are.equal(0, (drv({ "deploy", "yearly", "--package", pkg, "--schedule", "0 0 1 1 *", "tag=y" }, env)))
      assert.are.equal(0, (drv({ "deploy", "capped", "--package", pkg, "--schedule", "0 0 1 1 *",
        "--max-active", "1", "go=" .. go }, env)))
      local A, B = assert(daemon_mod.new { home = dir }), assert(daemon_mod.new { home = dir })
      local Y = cron.parse("0 0 1 1 *"):next(os.time())
      local Y2 = cron.parse("0 0 1 1 *"):next(Y)
      local function n(name) return store:value("SELECT count(*) FROM flow_runs WHERE deployment = ?", name) end
      -- tick only these two (tick and tock belong to the live daemon)
      local function at(D, now)
        for _, name in ipairs { "yearly", "capped" } do D:schedule_one(store:deployment(name), now) end
      end
      local ok, e = pcall(function()
        at(A, Y - 30) -- first sight: counting starts here
        at(A, Y - 1)
        assert.are.equal(0, n("yearly"))
        local stale = store:first("SELECT * FROM daemon_schedule WHERE deployment = 'yearly'")
        at(B, Y + 0.5)
        assert.are.equal(1, n("yearly"))
        -- a daemon that read the row before B claimed Y does not fire it again
        A:schedule_one(store:deployment("yearly"), Y + 0.6, stale)
        assert.are.equal(1, n("yearly"))
        assert.are.equal(1, n("capped"))
        at(A, Y + 0.7) -- the other daemon: already claimed
        at(B, Y + 0.9)
        assert.are.equal(1, n("yearly"))
        local r = store:flow_runs { deployment = "yearly" }[1]
        assert.are.same({ kind = "schedule", schedule = "0 0 1 1 *", fire_time = Y }, json.decode(r.source))
        -- capped's first run holds (no go file): its next fire is skipped
        H.wait_until(function()
          return store:value("SELECT count(*) FROM flow_runs WHERE deployment = 'capped' AND state = 'RUNNING'") == 1
        end, 60, "capped's run to hold")
        at(A, Y2 + 0.5)
        assert.are.equal(2, n("yearly"))
        assert.are.equal(1, n("capped"))
        assert.are.equal(Y2, store:value("SELECT last_fire FROM daemon_schedule WHERE deployment = 'capped'"))
        -- a year later, but the daemon comes an hour late: skipped, not replayed
        local Y3 = cron.parse("0 0 1 1 *"):next(Y2)
        at(A, Y3 + 3600)
        assert.are.equal(2, n("yearly"))
        assert.are.equal(Y3 + 3600 - daemon_mod.MISFIRE_GRACE,
          store:value("SELECT last_fire FROM daemon_schedule WHERE deployment = 'yearly'"))
        assert.are.equal(0, (drv({ "stop", "yearly" }, env)))
      end)
      drover.fs.write(go, "go")
      drv({ "stop", "capped" }, env)
      A.store:close(); B.store:close(); store:close()
      assert(ok, e)
    end)

    it("two daemons at once, then a restarted daemon, never fire a time twice", function()
      local start = #fire_times(i1, "tock")
      -- a second daemon on the same store while the first still runs
      local d2, i2 = serve(nil, dir)
      H.wait_until(function() return #runs_of(i2, "tock") >= start + 3 end, 90, "3 runs under two daemons")
      fire_times(i2, "tock")
      -- the first dies, the second is killed, a third starts
      drover.kill(d1.pid, "KILL")
      d1:wait(30)
      local mid = #runs_of(i2, "tock")
      drover.kill(d2.pid, "KILL")
      d2:wait(30)
      local d3, i3 = serve(nil, dir)
      H.wait_until(function() return completed(i3, "tock") >= mid + 3 end, 90, "3 runs after the restart")
      local times = fire_times(i3, "tock")
      table.sort(times)
      -- strictly increasing: no fire time was started twice (fire_times checks it too)
      for k = 2, #times do
        assert.is_true(times[k] - times[k - 1] >= 1)
      end
      assert.is_true(drover.kill(d3.pid, "TERM"))
      assert.are.equal(0, d3:wait(60).code)
    end)
  end)
end)

describe("the daemon's cached run list (Daemon:runs_fast, in process)", function()
  local daemon_mod = require "drover.daemon"
  local store_mod = require "drover.store"
  local dir, d

  setup(function()
    -- on SQLite whatever DROVER_TEST_STORE says: these check the cache
    -- against SQLite's exact change mark (data_version); PostgreSQL's is a
    -- snapshot kept for MARK_TTL (store/postgresql.lua), which
    -- two_servers_spec checks across servers
    dir = H.tempdir()
    os.remove(dir .. "/store.conf")
    d = assert(daemon_mod.new { home = dir })
  end)

  teardown(function()
    if d then d.store:close() end
    os.execute("rm -rf " .. dir)
  end)

  -- a GET /api/runs?limit=5 as the server hands it to fast, received at `t`
  local function req(t, host)
    return { method = "GET", path = "/api/runs", query = "limit=5", args = { limit = "5" }, body = "",
      time = t, headers = { host = host or "127.0.0.1:8765" } }
  end

  -- a run committed by another connection (another process's write)
  local function insert_run()
    local other = assert(store_mod.open(dir))
    local id = other:create_flow_run { name = "outside", state = "COMPLETED" }
    other:close()
    return id
  end

  it("answers from the page made for the mark read after req.time, reading the mark once a batch", function()
    local first = insert_run()
    local t0 = drover.now()
    local st, _, body = d:get_runs(req(t0), "GET") -- the handler makes the page
    assert.are.equal(200, st)
    assert.matches(first, body:bytes(), 1, true)
    local reads, real = 0, d.store.change_mark
    d.store.change_mark = function(...) reads = reads + 1; return real(...) end
    local h
    st, h, body = d:runs_fast(req(drover.now()))
    assert.are.equal(200, st)
    assert.matches(first, body:bytes(), 1, true)
    assert.are.equal("application/json", h["content-type"])
    assert.are.equal(1, reads)
    -- requests in before that read (the rest of a pass): no read of their own
    for _ = 1, 3 do assert.are.equal(200, (d:runs_fast(req(t0)))) end
    assert.are.equal(1, reads)
    -- another process commits: a request sent after it gets no cached page
    local second = insert_run()
    assert.is_nil(d:runs_fast(req(drover.now())))
    assert.are.equal(2, reads)
    -- the handler's new page has the run, and fast answers with it
    st, _, body = d:get_runs(req(drover.now()), "GET")
    assert.are.equal(200, st)
    assert.matches(second, body:bytes(), 1, true)
    st, _, body = d:runs_fast(req(drover.now()))
    assert.are.equal(200, st)
    assert.matches(second, body:bytes(), 1, true)
    d.store.change_mark = nil
  end)

  it("gives a request sent after another process's commit no page made before it, in any order of reads", function()
    local t0 = drover.now()
    assert.are.equal(200, (d:get_runs(req(drover.now()), "GET"))) -- the handler reads the mark
    local id = insert_run()
    local t1 = drover.now() -- a request sent after the commit
    -- a request from before the handler's read comes first: the mark it
    -- reads must be as of now, not as of that older read
    d:runs_fast(req(t0))
    assert.is_nil(d:runs_fast(req(t1)))
    local _, _, body = d:get_runs(req(drover.now()), "GET")
    assert.matches(id, body:bytes(), 1, true)
  end)

  it("answers no request the guard refuses, however many Host spellings it has seen", function()
    local t = drover.now()
    assert.are.equal(200, (d:get_runs(req(t), "GET")))
    for port = 1, 100 do assert.are.equal(200, (d:runs_fast(req(t, "LocalHost:" .. port)))) end
    assert.are.equal(200, (d:runs_fast(req(t, "[::1]"))))
    for _, host in ipairs { "evil.example", "evil.example:8765", "127.0.0.1/x", "127.0.0.2:8765" } do
      assert.is_nil(d:runs_fast(req(t, host)), host)
      local who, refusal = require("drover.request_guard").check(d.guard, req(t, host), function() end)
      assert.is_nil(who)
      assert.are.equal(421, refusal.status, host)
    end
    local no_host = req(t)
    no_host.headers.host = nil
    assert.is_nil(d:runs_fast(no_host))
  end)
end)
