-- The docker backend on Podman's Docker-compatible API (tests/services/
-- podman.sh starts `podman system service` and exports
-- DROVER_PODMAN_SOCKET).  Without it this spec fails: it does not skip.
-- The conformance kit runs on Podman too; this spec holds what is Podman's
-- own: its containers' rlimits, which it sets itself (nofile 1048576,
-- nproc 4194304 when rootful) unless the backend asks for others.
local drover = require "drover"
local H = require "helper"

local SOCKET = os.getenv("DROVER_PODMAN_SOCKET")
local DEADLINE = 120
local fixture = H.root .. "/tests/conformance/fixture"
local suffix = tostring(math.random(100000, 999999))

local function engine(method, path)
  return assert(drover.http.request { url = "http://podman" .. path, method = method, unix_socket = SOCKET,
    timeout = 60 })
end

--- Hard limits of process `pid` by HostConfig.Ulimits name (nofile, nproc).
local function hard_limits(pid)
  local text = assert(drover.fs.read("/proc/" .. pid .. "/limits"))
  return { nofile = tonumber(text:match("\nMax open files%s+%S+%s+(%d+)")),
    nproc = tonumber(text:match("\nMax processes%s+%S+%s+(%d+)")) }
end

--- A container's HostConfig.Ulimits by name (Podman says "RLIMIT_NOFILE"
-- where dockerd says "nofile").
local function ulimits_of(cid)
  local out = {}
  for _, u in ipairs(engine("GET", "/containers/" .. cid .. "/json").json.HostConfig.Ulimits or {}) do
    out[(u.Name:lower():gsub("^rlimit_", ""))] = { soft = u.Soft, hard = u.Hard }
  end
  return out
end

describe("docker backend on Podman", function()
  local orch, pkg, home, server, server_proc, service_pid
  local deployments = {}

  local function deploy(name, opts, o)
    local full = name .. "-" .. suffix
    ;(o or orch):deploy(full, opts)
    deployments[#deployments + 1] = full
    return full
  end

  local function wait_state(o, id, want)
    local last
    H.wait_until(function()
      last = o:status(id)
      return last.state == want
    end, DEADLINE, "run " .. id .. " to reach " .. want)
    return last
  end

  setup(function()
    assert(SOCKET and SOCKET ~= "", "DROVER_PODMAN_SOCKET is not set: the podman service " ..
      "(tests/services/podman.sh start) did not run, so there is no Podman to test against")
    local ping = drover.http.get("http://podman/_ping", { unix_socket = SOCKET, timeout = 10 })
    assert(ping and ping.status == 200, "no Podman answers on " .. SOCKET)
    -- podman.sh keeps the service's pid beside its socket
    service_pid = assert(drover.fs.read((SOCKET:gsub("podman%.sock$", "podman.pid"))), "no podman.pid"):match("%d+")
    local o = drover.orchestrator("docker", { socket = SOCKET, stop_timeout = 5 })
    home = o:store().home
    server_proc, server = H.serve(home)
    orch = drover.orchestrator("docker", { socket = SOCKET, stop_timeout = 5, api_url = server.url })
    pkg = orch:package("Fixture", "fixture_flow", "main", { path = fixture })
  end)

  teardown(function()
    if not orch then return end
    for _, name in ipairs(deployments) do pcall(orch.stop, orch, name, {}) end
    if server_proc then server_proc:kill("TERM"); server_proc:wait() end
  end)

  it("a run's container gets nofile and nproc within the service's hard limits, and Init", function()
    local name = deploy("limits", { package = pkg.id, params = { mode = "ok" } })
    local id = orch:run(name, {})
    wait_state(orch, id, "COMPLETED")
    local cid = orch:store():flow_run(id).external_id:match("^container:(.+)$")
    local got, limits = ulimits_of(cid), hard_limits(service_pid)
    for _, k in ipairs { "nofile", "nproc" } do
      assert.is_table(got[k], "the container has no " .. k .. " ulimit")
      assert.is_true(got[k].hard <= limits[k], k .. " " .. got[k].hard .. " is above podman's hard limit " .. limits[k])
      assert.is_true(got[k].soft <= got[k].hard)
    end
    assert.is_true(engine("GET", "/containers/" .. cid .. "/json").json.HostConfig.Init)
  end)

  it("the config's ulimits go on top; one above the engine's limits fails the run in one line saying what to do", function()
    local o = drover.orchestrator("docker", { home = home, socket = SOCKET, stop_timeout = 5, api_url = server.url,
      ulimits = { nofile = { soft = 512, hard = 1024 }, core = 0 } })
    local name = deploy("own-limits", { package = pkg.id, params = { mode = "ok" } }, o)
    local id = o:run(name, {})
    wait_state(o, id, "COMPLETED")
    local got = ulimits_of(o:store():flow_run(id).external_id:match("^container:(.+)$"))
    assert.are.same({ soft = 512, hard = 1024 }, got.nofile)
    assert.are.same({ soft = 0, hard = 0 }, got.core)
    -- above the service's hard limit, which runc (no CAP_SYS_RESOURCE) cannot raise
    local too_many = hard_limits(service_pid).nofile + 1
    local big = drover.orchestrator("docker", { home = home, socket = SOCKET, api_url = server.url,
      ulimits = { nofile = too_many } })
    local ok, err = pcall(big.run, big, name, {})
    assert.is_false(ok)
    assert.matches("^docker%.run: .*rlimit.*set the 'ulimits' config key within them", tostring(err))
    assert.is_nil(tostring(err):find("\n", 1, true))
    local crashed
    for _, r in ipairs(o:store():flow_runs { deployment = name, limit = 10 }) do
      if r.state == "CRASHED" then crashed = r end
    end
    assert.matches("^did not start: docker%.run: ", crashed and crashed.message or "(no CRASHED run)")
  end)

  it("a bad ulimits config is refused where it is given, naming the key", function()
    for _, case in ipairs {
      { { nofiles = 10 }, "bad ulimits: unknown rlimit 'nofiles' %(one of core, " },
      { { nofile = -1 }, "bad ulimits: 'nofile' must be a non%-negative integer" },
      { { nofile = { soft = 10, hard = 5 } }, "bad ulimits: 'nofile': soft 10 is above hard 5" },
      { { nproc = 1.5 }, "bad ulimits: 'nproc' must be a non%-negative integer" },
    } do
      local ok, err = pcall(drover.orchestrator, "docker", { socket = SOCKET, ulimits = case[1] })
      assert.is_false(ok)
      assert.matches("^backend 'docker': " .. case[2], tostring(err))
    end
  end)
end)
