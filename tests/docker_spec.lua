-- The docker backend on a real Docker Engine (tests/services/docker.sh
-- starts one and exports DROVER_DOCKER_SOCKET).  Without it this spec fails:
-- it does not skip.
--
-- The spec starts `drover serve` on its store and deploys with api_url:
-- containers get no mount of the store and report to the server over the
-- host's network.  The shared-store fallback (no api_url, DROVER_HOME
-- bind-mounted) keeps tests of its own.
local drover = require "drover"
local H = require "helper"

local SOCKET = os.getenv("DROVER_DOCKER_SOCKET")
local DEADLINE = 120
local fixture = H.root .. "/tests/conformance/fixture"
local suffix = tostring(math.random(100000, 999999))

local function engine(method, path, opts)
  opts = opts or {}
  local r = assert(drover.http.request { url = "http://docker" .. path, method = method,
    unix_socket = SOCKET, json = opts.json, timeout = 60 })
  return r
end

local function filters(label)
  local q = drover.json.encode { label = { label } }
  return "filters=" .. q:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end)
end

--- The value of NAME in an engine's Env list ("NAME=value" strings).
local function env_value(list, name)
  for _, e in ipairs(list or {}) do
    local v = e:match("^" .. name .. "=(.*)$")
    if v then return v end
  end
end

--- Does any string in `list` (a JSON array, or null) contain `s`?
local function in_any(list, s)
  for _, a in ipairs(type(list) == "table" and list or {}) do if tostring(a):find(s, 1, true) then return true end end
  return false
end

describe("docker backend", function()
  local orch, shared, pkg, probe, home, server, server_proc
  local deployments = {}

  --- Deploy with `o` (default: orch, reporting to the server).
  local function deploy(name, opts, o)
    local full = name .. "-" .. suffix
    ;(o or orch):deploy(full, opts)
    deployments[#deployments + 1] = full
    return full
  end

  --- The probe workflow's package (tests/fixtures/docker), built once.
  local function probe_package()
    probe = probe or orch:package("Probe", "probe_flow", "main", { path = H.root .. "/tests/fixtures/docker" })
    return probe
  end

  local function wait_state(id, want)
    local last
    H.wait_until(function()
      last = orch:status(id)
      for _, w in ipairs(type(want) == "table" and want or { want }) do
        if last.state == w then return true end
      end
      return false
    end, DEADLINE, "run " .. id .. " to reach " .. (type(want) == "table" and table.concat(want, "/") or want))
    return last
  end

  --- The container a run lives in (container mode: its own; swarm: its task's).
  local function container_of(id)
    local r = orch:store():flow_run(id)
    local kind, eid = r.external_id:match("^(%a+):(.+)$")
    if kind == "container" then return eid end
    local cid
    H.wait_until(function()
      local t = orch:service_task(eid)
      cid = t and t.Status and t.Status.ContainerStatus and t.Status.ContainerStatus.ContainerID
      return cid
    end, DEADLINE, "the swarm task's container of run " .. id)
    return cid
  end

  setup(function()
    assert(SOCKET and SOCKET ~= "", "DROVER_DOCKER_SOCKET is not set: the docker service " ..
      "(tests/services/docker.sh start) did not run, so there is no Docker Engine to test against")
    local ping = drover.http.get("http://docker/_ping", { unix_socket = SOCKET, timeout = 10 })
    assert(ping and ping.status == 200, "no Docker Engine answers on " .. SOCKET)
    shared = drover.orchestrator("docker", { socket = SOCKET, stop_timeout = 5 })
    home = shared:store().home
    server_proc, server = H.serve(home)
    orch = drover.orchestrator("docker", { socket = SOCKET, stop_timeout = 5, api_url = server.url })
  end)

  teardown(function()
    if not orch then return end
    for _, name in ipairs(deployments) do pcall(orch.stop, orch, name, {}) end
    if server_proc then server_proc:kill("TERM"); server_proc:wait() end
    -- run() in the fallback mode may start a daemon for the store: stop it
    H.stop_daemon(home)
  end)

  it("package builds a labelled, tagged image; the same sources give the same image", function()
    pkg = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
    assert.matches("^%x+$", pkg.id)
    assert.are.equal("drover/fixture_flow:" .. pkg.id:sub(1, 12), pkg.image)
    local img = engine("GET", "/images/" .. pkg.image .. "/json")
    assert.are.equal(200, img.status)
    assert.are.equal(pkg.image_id, img.json.Id)
    assert.are.equal(pkg.id, img.json.Config.Labels["drover.package"])
    assert.are.equal("fixture_flow", img.json.Config.Labels["drover.module"])
    local again = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
    assert.are.equal(pkg.id, again.id)
    assert.are.equal(pkg.image, again.image)
    assert.are.equal(pkg.image_id, again.image_id)
  end)

  it("a failing Dockerfile step fails package with Docker's error", function()
    local ok, err = pcall(orch.package, orch, "Fixture", "fixture_flow", "main",
      { path = fixture, dockerfile_lines = { "RUN sh -c 'echo step-fails-on-purpose; exit 7'" } })
    assert.is_false(ok)
    assert.matches("docker.package: the build of drover/fixture_flow:%x+ failed: .*returned a non%-zero code: 7",
      tostring(err))
  end)

  it("deploy refuses an image the engine does not have, naming it", function()
    local ok, err = pcall(orch.deploy, orch, "noimage-" .. suffix, { package = pkg.id, image = "drover/no-such-image:nope" })
    assert.is_false(ok)
    assert.matches("image 'drover/no%-such%-image:nope' does not exist in the Docker Engine at " ..
      SOCKET:gsub("%p", "%%%0"), tostring(err))
    assert.is_nil(orch:store():deployment("noimage-" .. suffix))
  end)

  for _, mode in ipairs { "container", "swarm" } do
    it("a run in " .. mode .. " mode COMPLETES, tracked through the server; the container has no mount " ..
        "of the store and its token in no argv", function()
      local name = deploy("ok-" .. mode, { package = pkg.id, params = { mode = "ok" }, mode = mode,
        memory = "256m", cpus = 0.5, env = { FIXTURE_ENV = "yes" } })
      local id, url = orch:run(name, {})
      assert.are.equal(server.url .. "/runs/" .. id, url)
      local st = wait_state(id, "COMPLETED")
      local names = {}
      for _, t in ipairs(st.task_runs) do names[#names + 1] = t.name .. "=" .. t.state end
      table.sort(names)
      assert.are.same({ "Fixture.main=COMPLETED", "Fixture.shout=COMPLETED" }, names)
      local r = orch:store():flow_run(id)
      assert.matches("^" .. (mode == "swarm" and "service:" or "container:"), r.external_id)
      -- the limits reached the engine
      local c = engine("GET", "/containers/" .. container_of(id) .. "/json").json
      assert.are.equal(256 * 1024 * 1024, c.HostConfig.Memory)
      assert.are.equal(id, c.Config.Labels["drover.run"])
      assert.are.equal(name, c.Config.Labels["drover.deployment"])
      -- nothing mounted, the host's network (the server listens on loopback),
      -- `drover worker ID --api URL`; the token in the environment only
      assert.are.same({}, c.Mounts)
      local binds = c.HostConfig.Binds
      assert.is_true(binds == nil or binds == drover.json.null or next(binds) == nil)
      assert.are.equal("host", c.HostConfig.NetworkMode)
      -- (a swarm service's Command becomes its containers' Entrypoint)
      assert.are.same({ "/opt/drover/bin/drover", "worker", id, "--api", server.url },
        mode == "swarm" and c.Config.Entrypoint or c.Config.Cmd)
      assert.is_nil(env_value(c.Config.Env, "DROVER_HOME"))
      local token = env_value(c.Config.Env, "DROVER_RUN_TOKEN")
      assert.matches("^%S+$", token)
      assert.is_false(in_any(c.Config.Cmd, token) or in_any(c.Args, token) or in_any({ c.Path }, token)
        or in_any(c.Config.Entrypoint, token))
      assert.is_true(orch:store():has_run_token(id))
      assert.is_nil(orch:store():flow_run(id).token_hash) -- rows handed out leave the digest out
      if mode == "swarm" then
        local _, sid = r.external_id:match("^(%a+):(.+)$")
        local spec = engine("GET", "/services/" .. sid).json.Spec.TaskTemplate.ContainerSpec
        assert.is_nil(spec.Mounts)
        assert.is_false(in_any(spec.Command, token) or in_any(spec.Args, token))
      end
      assert.matches("fixture says HELLO", table.concat(orch:logs(id), "\n"))
      local ok, err = pcall(orch.cancel, orch, id)
      assert.is_false(ok)
      assert.are.equal("run " .. id .. " is COMPLETED: only active runs can be cancelled", err)
    end)

    it("in " .. mode .. " mode a workflow in the container finds the store's directory absent and its " ..
        "token in its environment, in no process's argv", function()
      local name = deploy("probe-" .. mode, { package = probe_package().id, mode = mode, params = { path = home } })
      local id = orch:run(name, {})
      local st = wait_state(id, { "COMPLETED", "FAILED", "CRASHED" })
      assert.are.equal("COMPLETED", st.state, st.message)
      -- the lines the worker reported to the server, as the store holds them
      local lines = {}
      for _, l in ipairs(orch:store():logs(id, 0)) do lines[#lines + 1] = l.line end
      local text = table.concat(lines, "\n")
      assert.truthy(text:find("probe: " .. home .. " does not exist", 1, true), text)
      assert.truthy(text:find("probe: DROVER_HOME is unset", 1, true), text)
      assert.truthy(text:find("probe: the run token is in the environment", 1, true), text)
      assert.truthy(text:find("probe: processes with the token in their argv: 0", 1, true), text)
    end)

    it("a container exiting non-zero makes the run FAILED with its exit code (" .. mode .. ")", function()
      local name = deploy("exit3-" .. mode, { package = pkg.id, mode = mode, command = { "sh", "-c", "exit 3" } })
      local id = orch:run(name, {})
      local st = wait_state(id, { "FAILED", "COMPLETED", "CRASHED" })
      assert.are.equal("FAILED", st.state)
      assert.matches("exited with code 3", st.message)
    end)

    it("a container killed from outside makes the run CRASHED or FAILED, not RUNNING (" .. mode .. ")", function()
      local name = deploy("killed-" .. mode, { package = pkg.id, mode = mode,
        params = { mode = "long", marker = tostring(3000 + math.random(1, 1000)) .. ".5" } })
      local id = orch:run(name, {})
      wait_state(id, "RUNNING")
      local cid = container_of(id)
      -- the liveness hook sees it running; no process on this host (the
      -- container's included) has the run's token in its command line
      assert.is_true(orch:is_alive(orch:store():flow_run(id)))
      local token = env_value(engine("GET", "/containers/" .. cid .. "/json").json.Config.Env, "DROVER_RUN_TOKEN")
      assert.matches("^%S+$", token)
      assert.are.same({}, H.pids_matching(token))
      assert.is_true(#H.pids_matching("worker " .. id .. " --api") >= 1)
      assert.are.equal(204, engine("POST", "/containers/" .. cid .. "/kill").status)
      local st = wait_state(id, { "CRASHED", "FAILED", "COMPLETED", "CANCELLED" })
      assert.is_true(st.state == "CRASHED" or st.state == "FAILED", "state " .. st.state)
      assert.matches("killed by signal 9", st.message)
      assert.is_false(orch:is_alive(orch:store():flow_run(id)))
    end)

    it("stop removes every container and service of the deployment, by label (" .. mode .. ")", function()
      local name = deploy("stop-" .. mode, { package = pkg.id, mode = mode,
        params = { mode = "long", marker = tostring(2000 + math.random(1, 1000)) .. ".5" } })
      local a = orch:run(name, {})
      local b = orch:run(name, {})
      wait_state(a, "RUNNING"); wait_state(b, "RUNNING")
      local res = orch:stop(name, {})
      assert.are.equal(0, res.left)
      for _, id in ipairs { a, b } do
        local states = {}
        for _, s in ipairs(orch:store():flow_run_states(id)) do states[#states + 1] = s.state end
        assert.are.equal("CANCELLED", states[#states])
        assert.truthy(table.concat(states, " "):find("CANCELLING", 1, true))
      end
      local label = "drover.deployment=" .. name
      assert.are.same({}, engine("GET", "/containers/json?all=1&" .. filters(label)).json)
      assert.are.same({}, engine("GET", "/services?" .. filters(label)).json)
    end)

    it("cancel ends one run CANCELLED and removes its " .. (mode == "swarm" and "service" or "container") ..
        "; the other run and the deployment go on (" .. mode .. ")", function()
      local name = deploy("cancel-" .. mode, { package = pkg.id, mode = mode,
        params = { mode = "long", marker = tostring(6000 + math.random(1, 1000)) .. ".5" } })
      local a = orch:run(name, {})
      local b = orch:run(name, {})
      wait_state(a, "RUNNING"); wait_state(b, "RUNNING")
      local a_cid, b_cid = container_of(a), container_of(b)
      local a_kind, a_eid = orch:store():flow_run(a).external_id:match("^(%a+):(.+)$")
      local r = orch:cancel(a)
      assert.are.equal(a, r.id)
      assert.are.equal("CANCELLED", r.state)
      local history = {}
      for _, s in ipairs(orch:store():flow_run_states(a)) do history[#history + 1] = s.state end
      assert.are.equal("CANCELLED", history[#history])
      assert.truthy(table.concat(history, " "):find("CANCELLING", 1, true), table.concat(history, " "))
      -- a's container (and service) are gone from the engine
      assert.are.equal(404, engine("GET", "/containers/" .. a_cid .. "/json").status)
      assert.are.same({}, engine("GET", "/containers/json?all=1&" .. filters("drover.run=" .. a)).json)
      if a_kind == "service" then
        assert.are.equal(404, engine("GET", "/services/" .. a_eid).status)
        assert.are.same({}, engine("GET", "/services?" .. filters("drover.run=" .. a)).json)
      end
      -- b still runs, in its container; the deployment is not paused
      assert.are.equal("RUNNING", orch:status(b).state)
      assert.is_true(engine("GET", "/containers/" .. b_cid .. "/json").json.State.Running)
      assert.are.equal(0, orch:store():deployment(name).paused)
      -- a finished run cannot be cancelled again
      local ok, err = pcall(orch.cancel, orch, a)
      assert.is_false(ok)
      assert.are.equal("run " .. a .. " is CANCELLED: only active runs can be cancelled", err)
      -- clean up: stop takes b
      local res = orch:stop(name, {})
      assert.are.equal(0, res.left)
      assert.are.equal("CANCELLED", orch:store():flow_run(b).state)
    end)
  end

  it("the shared-store fallback (no api_url): the container tracks into the store, bind-mounted", function()
    local name = deploy("shared", { package = pkg.id, params = { mode = "ok" }, mode = "container" }, shared)
    local id = shared:run(name, {})
    local st = wait_state(id, { "COMPLETED", "FAILED", "CRASHED" })
    assert.are.equal("COMPLETED", st.state, st.message)
    assert.are.equal(2, #st.task_runs)
    local c = engine("GET", "/containers/" .. container_of(id) .. "/json").json
    assert.are.same({ home .. ":" .. home }, c.HostConfig.Binds)
    assert.are.same({ "/opt/drover/bin/drover", "worker", id }, c.Config.Cmd)
    assert.are.equal(home, env_value(c.Config.Env, "DROVER_HOME"))
    assert.is_nil(env_value(c.Config.Env, "DROVER_RUN_TOKEN"))
    assert.is_false(shared:store():has_run_token(id))
  end)

  it("api_url \"auto\" reports to the daemon serving the store", function()
    local o = drover.orchestrator("docker", { socket = SOCKET, stop_timeout = 5, api_url = "auto" })
    local name = deploy("auto", { package = pkg.id, params = { mode = "ok" }, mode = "container" }, o)
    local id, url = o:run(name, {})
    assert.are.equal(server.url .. "/runs/" .. id, url)
    local st = wait_state(id, { "COMPLETED", "FAILED", "CRASHED" })
    assert.are.equal("COMPLETED", st.state, st.message)
    local c = engine("GET", "/containers/" .. container_of(id) .. "/json").json
    assert.are.same({}, c.Mounts)
    assert.are.same({ "/opt/drover/bin/drover", "worker", id, "--api", server.url }, c.Config.Cmd)
  end)

  it("over TLS: the CA file is the container's one mount, read-only, named by DROVER_CA_FILE", function()
    local dir = H.tempdir()
    local function openssl(args)
      local argv = { "openssl" }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      local r = assert(drover.proc.run(argv, { cwd = dir }))
      assert(r.code == 0, "openssl " .. args[1] .. ": " .. tostring(r.stderr))
    end
    openssl { "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
      "-days", "2", "-subj", "/CN=drover docker spec CA" }
    openssl { "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1" }
    assert(drover.fs.write(dir .. "/ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"))
    openssl { "x509", "-req", "-in", "srv.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
      "-out", "srv.pem", "-days", "2", "-extfile", "ext" }
    -- a store and a server of its own, serving https
    local home2 = dir .. "/home"
    drover.fs.mkdir(home2)
    local p2, info = H.serve(home2, { "--port", "0", "--tls-cert", dir .. "/srv.pem", "--tls-key", dir .. "/srv.key" })
    local o = drover.orchestrator("docker", { home = home2, socket = SOCKET, stop_timeout = 5,
      api_url = info.url, ca_file = dir .. "/ca.pem" })
    local ok, err = pcall(function()
      assert.matches("^https://", info.url)
      local p = o:package("Fixture", "fixture_flow", "main", { path = fixture })
      o:deploy("tls", { package = p.id, params = { mode = "ok" }, mode = "container" })
      local id = o:run("tls", {})
      local st
      H.wait_until(function()
        st = o:status(id)
        return st.state == "COMPLETED" or st.state == "FAILED" or st.state == "CRASHED"
      end, DEADLINE, "the TLS run to end")
      assert.are.equal("COMPLETED", st.state, st.message)
      local c = engine("GET", "/containers/" .. o:store():flow_run(id).external_id:match(":(.+)$") .. "/json").json
      assert.are.equal(1, #c.Mounts)
      assert.are.equal(dir .. "/ca.pem", c.Mounts[1].Source)
      assert.are.equal("/run/drover/ca.pem", c.Mounts[1].Destination)
      assert.is_false(c.Mounts[1].RW)
      assert.are.equal("/run/drover/ca.pem", env_value(c.Config.Env, "DROVER_CA_FILE"))
    end)
    pcall(o.stop, o, "tls", {})
    p2:kill("TERM"); p2:wait()
    drover.fs.remove(dir, { recursive = true })
    assert(ok, err)
  end)

  it("bad api_url, ca_file and network values are refused in one line each", function()
    local function refused(cfg)
      cfg.socket = SOCKET
      local ok, err = pcall(drover.orchestrator, "docker", cfg)
      assert.is_false(ok)
      assert.is_nil(tostring(err):find("\n", 1, true))
      return tostring(err)
    end
    assert.matches("bad api_url 'ftp://x' %(the http:// or https:// URL of drover serve", refused { api_url = "ftp://x" })
    assert.matches("bad ca_file 'ca.pem' %(an absolute path", refused { api_url = "http://h:1", ca_file = "ca.pem" })
    assert.matches("ca_file is set but api_url is not", refused { ca_file = "/etc/ca.pem" })
    assert.matches("bad network 'a b'", refused { api_url = "http://h:1", network = "a b" })
    -- a CA file that is not there: the run is refused before anything is recorded
    local o = drover.orchestrator("docker", { socket = SOCKET, api_url = server.url, ca_file = "/nonexistent/ca.pem" })
    local name = deploy("noca", { package = pkg.id, mode = "container" }, o)
    local ok, err = pcall(o.run, o, name, {})
    assert.is_false(ok)
    assert.matches("ca_file '/nonexistent/ca.pem' cannot be read", tostring(err))
    assert.are.same({}, o:store():flow_runs { deployment = name, limit = 100 })
  end)

  it("cancel of an unknown run is one line naming it", function()
    local ok, err = pcall(orch.cancel, orch, "ffffffffffff")
    assert.is_false(ok)
    assert.are.equal("unknown run 'ffffffffffff'", err)
  end)

  it("the CLI: drover status reconciles a run whose container was killed from outside", function()
    local name = deploy("cli-killed", { package = pkg.id, mode = "container",
      params = { mode = "long", marker = tostring(3000 + math.random(1, 1000)) .. ".25" } })
    local id = orch:run(name, {})
    local store = orch:store()
    H.wait_until(function() return store:flow_run(id).state == "RUNNING" end, DEADLINE, "the run to be RUNNING")
    assert.are.equal(204, engine("POST", "/containers/" .. container_of(id) .. "/kill").status)
    -- only `drover status` asks the engine here (the deployment kept the socket)
    local env = { DROVER_HOME = store.home, DROVER_DAEMON = "0" }
    local st
    H.wait_until(function()
      local code, out = H.drover({ "status", id, "--json" }, { env = env })
      st = code == 0 and drover.json.decode(out)
      return st and (st.state == "CRASHED" or st.state == "FAILED")
    end, DEADLINE, "drover status to see the container end")
    assert.matches("killed by signal 9", st.message)
  end)

  it("the CLI: drover cancel RUN_ID cancels a docker run through its backend; the deployment stays active", function()
    local name = deploy("cli-cancel", { package = pkg.id, mode = "container",
      params = { mode = "long", marker = tostring(7000 + math.random(1, 1000)) .. ".25" } })
    local id = orch:run(name, {})
    local store = orch:store()
    H.wait_until(function() return store:flow_run(id).state == "RUNNING" end, DEADLINE, "the run to be RUNNING")
    local cid = container_of(id)
    local env = { DROVER_HOME = store.home, DROVER_DAEMON = "0" }
    local code, out, err = H.drover({ "cancel", id, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    assert.are.equal("CANCELLED", drover.json.decode(out).state)
    assert.are.equal(404, engine("GET", "/containers/" .. cid .. "/json").status)
    assert.are.equal(0, store:deployment(name).paused)
    local code2, _, err2 = H.drover({ "cancel", id }, { env = env })
    assert.are_not.equal(0, code2)
    assert.matches("run " .. id .. " is CANCELLED: only active runs can be cancelled", err2)
  end)

  it("the CLI: drover deploy --set api_url=URL; drover run's container reports through the server", function()
    local env = { DROVER_HOME = home }
    local name = "cli-api-" .. suffix
    local code, _, err = H.drover({ "deploy", "--backend", "docker", "--set", "api_url=" .. server.url,
      "--package", pkg.id, name, "mode=ok" }, { env = env })
    assert.are.equal(0, code, err)
    deployments[#deployments + 1] = name
    local id, url = H.run(env, name)
    assert.are.equal(server.url .. "/runs/" .. id, url)
    local st = wait_state(id, { "COMPLETED", "FAILED", "CRASHED" })
    assert.are.equal("COMPLETED", st.state, st.message)
    local c = engine("GET", "/containers/" .. container_of(id) .. "/json").json
    assert.are.same({}, c.Mounts)
    assert.are.same({ "/opt/drover/bin/drover", "worker", id, "--api", server.url }, c.Config.Cmd)
  end)

  it("a deployment keeps the socket taken from DROVER_DOCKER_SOCKET; status elsewhere asks that engine", function()
    -- this orchestrator has no socket key: the env (docker.sh's) gives it
    local o = drover.orchestrator("docker", { home = orch:store().home })
    local name = "envsock-" .. suffix
    o:deploy(name, { package = pkg.id, mode = "container",
      params = { mode = "long", marker = tostring(4000 + math.random(1, 1000)) .. ".5" } })
    deployments[#deployments + 1] = name
    local store = orch:store()
    local kept = drover.json.decode(store:deployment(name).backend_config)
    assert.are.equal(SOCKET, kept.socket)
    assert.are.equal(os.getenv("DROVER_DOCKER_BASE_IMAGE"), kept.base_image)
    local id = o:run(name, {})
    H.wait_until(function() return store:flow_run(id).state == "RUNNING" end, DEADLINE, "the run to be RUNNING")
    -- a process whose env names another (absent) socket still asks the kept one
    local dir = H.tempdir()
    local env = { DROVER_HOME = store.home, DROVER_DAEMON = "0", DROVER_DOCKER_SOCKET = dir .. "/none.sock" }
    local code, out, err = H.drover({ "status", id, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    assert.are.equal("RUNNING", drover.json.decode(out).state)
    drover.fs.remove(dir, { recursive = true })
  end)

  it("an engine that cannot be reached makes status raise one line and changes no run", function()
    local name = deploy("noengine", { package = pkg.id, mode = "container",
      params = { mode = "long", marker = tostring(5000 + math.random(1, 1000)) .. ".5" } })
    local id = orch:run(name, {})
    local store = orch:store()
    H.wait_until(function() return store:flow_run(id).state == "RUNNING" end, DEADLINE, "the run to be RUNNING")
    local dir = H.tempdir()
    local o = drover.orchestrator("docker", { home = store.home, socket = dir .. "/docker.sock" })
    local ok, err = pcall(o.status, o, id)
    assert.is_false(ok)
    assert.are.equal("docker: the Docker Engine is not running: no socket at " .. dir ..
      "/docker.sock (start dockerd, or set the 'socket' config key or DROVER_DOCKER_SOCKET)", tostring(err))
    assert.are.equal("RUNNING", store:flow_run(id).state)
    -- the liveness hook cannot say
    assert.is_nil(o:is_alive(store:flow_run(id)))
    -- cancel too: one line, the run untouched, its container still running
    ok, err = pcall(o.cancel, o, id)
    assert.is_false(ok)
    assert.are.equal("docker: the Docker Engine is not running: no socket at " .. dir ..
      "/docker.sock (start dockerd, or set the 'socket' config key or DROVER_DOCKER_SOCKET)", tostring(err))
    assert.are.equal("RUNNING", store:flow_run(id).state)
    for _, h in ipairs(store:flow_run_states(id)) do assert.are_not.equal("CANCELLING", h.state) end
    assert.is_true(engine("GET", "/containers/" .. container_of(id) .. "/json").json.State.Running)
    drover.fs.remove(dir, { recursive = true })
  end)

  it("a run the engine refuses to create ends CRASHED at once, with one line of the engine's error", function()
    -- the engine refuses a memory limit under 6 MB when creating the container
    local name = deploy("refused", { package = pkg.id, mode = "container", memory = 1024 * 1024 })
    local ok, err = pcall(orch.run, orch, name, {})
    assert.is_false(ok)
    assert.matches("docker.run: creating the container: .*memory", tostring(err))
    assert.is_nil(tostring(err):find("\n", 1, true))
    local runs = orch:store():flow_runs { deployment = name, limit = 100 }
    assert.are.equal(1, #runs)
    assert.are.equal("CRASHED", runs[1].state)
    assert.matches("^did not start: docker.run: creating the container", runs[1].message)
  end)

  it("a PENDING run without a container: adopted by name if the engine has it, else CRASHED after 10 min", function()
    local name = deploy("orphan", { package = pkg.id, mode = "container" })
    local store = orch:store()
    local function pending_run()
      local id = require("drover.store").new_id()
      store:create_flow_run { id = id, name = name, deployment = name, backend = "docker", state = "PENDING" }
      return id
    end
    -- a fresh one may still be starting: left alone
    local fresh = pending_run()
    assert.are.equal("PENDING", orch:status(fresh).state)
    -- an old one with nothing in the engine never started
    local old = pending_run()
    store:write("UPDATE flow_runs SET created = created - 700 WHERE id = ?", old)
    local st = orch:status(old)
    assert.are.equal("CRASHED", st.state)
    assert.matches("^never started", st.message)
    -- one whose submitter died after the engine created its container: adopted
    local adopted = pending_run()
    store:write("UPDATE flow_runs SET created = created - 700 WHERE id = ?", adopted)
    local c = engine("POST", "/containers/create?name=drover-" .. adopted, { json = { Image = pkg.image,
      Cmd = { "sleep", "300" }, Labels = { drover = "1", ["drover.deployment"] = name, ["drover.run"] = adopted } } })
    assert.are.equal(201, c.status)
    st = orch:status(adopted)
    assert.are.equal("PENDING", st.state, st.message)
    assert.are.equal("container:" .. c.json.Id, st.external_id)
  end)

  it("engine text in errors is one line of at most ~200 characters", function()
    local long = ("word\n  "):rep(100) .. "the end: code 7"
    local s = orch.one_line(long)
    assert.is_nil(s:find("\n", 1, true))
    assert.is_true(#s <= 200, "length " .. #s)
    assert.matches("the end: code 7$", s)
    assert.are.equal("short message", orch.one_line("  short\n message \n"))
  end)

  it("logs demultiplex stdout and stderr, and follow streams until the container ends", function()
    local name = deploy("logs", { package = pkg.id,
      command = { "sh", "-c", "echo out-line-1; echo err-line-1 >&2; sleep 1; echo out-line-2" } })
    local id = orch:run(name, {})
    -- two pipes: the order within a stream holds, not across streams
    local seen = { stdout = {}, stderr = {} }
    orch:logs(id, { follow = true, on_line = function(line, stream) table.insert(seen[stream], line) end })
    assert.are.same({ stdout = { "out-line-1", "out-line-2" }, stderr = { "err-line-1" } }, seen)
    local r = orch:store():flow_run(id)
    local got = { stdout = {}, stderr = {} }
    for _, e in ipairs(orch:engine_logs(r)) do table.insert(got[e.stream], e.line) end
    assert.are.same({ stdout = { "out-line-1", "out-line-2" }, stderr = { "err-line-1" } }, got)
    local lines = orch:logs(id)
    assert.are.equal(3, #lines)
  end)

  it("the demultiplexer reassembles frames split anywhere", function()
    local frames = string.pack(">BxxxI4", 1, 6) .. "ab\ncd\n" .. string.pack(">BxxxI4", 2, 4) .. "err\n"
      .. string.pack(">BxxxI4", 1, 3) .. "tai"
    local out = {}
    local feed, finish = orch.demuxer(function(s, l) out[#out + 1] = s .. ":" .. l end)
    for i = 1, #frames do feed(frames:sub(i, i)) end
    finish()
    assert.are.same({ "stdout:ab", "stdout:cd", "stderr:err", "stdout:tai" }, out)
  end)

  it("a missing socket gives a clear error naming where drover looked", function()
    local dir = H.tempdir()
    local o = drover.orchestrator("docker", { socket = dir .. "/docker.sock" })
    local ok, err = pcall(o.deploy, o, "x-" .. suffix, { package = pkg.id })
    assert.is_false(ok)
    assert.are.equal("docker: the Docker Engine is not running: no socket at " .. dir ..
      "/docker.sock (start dockerd, or set the 'socket' config key or DROVER_DOCKER_SOCKET)", tostring(err))
    drover.fs.remove(dir, { recursive = true })
  end)

  it("a socket nobody listens on gives a clear error naming it", function()
    local dir = H.tempdir()
    local path = dir .. "/docker.sock"
    -- a unix socket file left by a process that is gone: connections are refused
    local r = assert(drover.proc.run({ "python3", "-c",
      "import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])", path }))
    assert.are.equal(0, r.code)
    local o = drover.orchestrator("docker", { socket = path })
    local ok, err = pcall(o.status, o, "ffffffffffff")  -- unknown run: the store answers, no engine needed
    assert.is_false(ok)
    assert.matches("unknown run", tostring(err))
    ok, err = pcall(o.package, o, "Fixture", "fixture_flow", "main", { path = fixture })
    assert.is_false(ok)
    assert.matches("the Docker Engine is not running: " .. path:gsub("%p", "%%%0") .. " refuses connections",
      tostring(err))
    drover.fs.remove(dir, { recursive = true })
  end)
end)
