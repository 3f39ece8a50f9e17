-- `drover serve --tls-cert --tls-key`: HTTPS with a certificate from a CA
-- made here with the openssl command, checked by real clients (drover.http,
-- curl) and by real workers reporting over HTTPS.
local drover = require "drover"
local http = require "drover.http"
local json = require "drover.json"
local H = require "helper"

local root = os.getenv("DROVER_ROOT") or "."
local fixture = root .. "/tests/conformance/fixture"

-- openssl ARGS in dir; raises with its stderr when it fails.
local function openssl(dir, args)
  local argv = { "openssl" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = assert(drover.proc.run(argv, { cwd = dir, stdout = "capture", stderr = "capture", timeout = 120 }))
  assert(r.code == 0, "openssl " .. args[1] .. " exited " .. tostring(r.code) .. ": " .. tostring(r.stderr))
end

-- A CA, and a server certificate it signed for 127.0.0.1 and localhost.
local function make_pki(dir)
  openssl(dir, { "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=drover test CA",
    "-keyout", "ca.key", "-out", "ca.pem" })
  openssl(dir, { "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
    "-keyout", "server.key", "-out", "server.csr" })
  assert(drover.fs.write(dir .. "/ext.cnf", "subjectAltName = IP:127.0.0.1, DNS:localhost\n"))
  openssl(dir, { "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
    "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem" })
  -- a second CA that signed nothing here: trusting it must not do
  openssl(dir, { "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=other CA",
    "-keyout", "other.key", "-out", "other.pem" })
  return dir .. "/ca.pem", dir .. "/server.pem", dir .. "/server.key", dir .. "/other.pem"
end

describe("drover serve over TLS", function()
  local dir, home, ca, cert, key, other_ca, daemon, info
  local procs = {}
  local runs = {} -- runs started through the local backend: their workers are detached

  local function drv(args, env) return H.drover(args, { env = env or { DROVER_HOME = home } }) end

  setup(function()
    dir = H.tempdir()
    home = dir .. "/home"
    assert(drover.fs.mkdir(home))
    ca, cert, key, other_ca = make_pki(dir)
    local code, out, err = drv({ "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" })
    assert.are.equal(0, code, err)
    assert.are.equal(0, (drv({ "deploy", "ok", "--package", json.decode(out).id, "mode=ok" })))
    daemon, info = H.serve(home, { "--port", "0", "--tls-cert", cert, "--tls-key", key })
    procs[#procs + 1] = daemon
  end)

  teardown(function()
    local store = home and require("drover.store").open(home)
    for _, id in ipairs(runs) do
      local r = store and store:flow_run(id)
      if r and r.pid and (r.state == "PENDING" or r.state == "RUNNING") then drover.kill(math.tointeger(r.pid), "KILL") end
    end
    if store then store:close() end
    for _, p in ipairs(procs) do
      if p:is_running() then drover.kill(p.pid, "KILL"); p:wait(30) end
    end
    local d = home and H.daemon_info(home)
    if d and d.pid then drover.kill(d.pid, "KILL") end
    if dir then os.execute("rm -rf " .. dir) end
  end)

  local function get(path, opts)
    local o = { ca_file = ca }
    for k, v in pairs(opts or {}) do o[k] = v end
    return http.get(info.url .. path, o)
  end

  it("writes an https:// URL and its certificate into daemon.json and says so", function()
    assert.are.equal("https://127.0.0.1:" .. info.port, info.url)
    assert.are.equal(cert, info.ca_file)
    -- daemon.json is written first, the line right after it
    H.wait_until(function()
      return (drover.fs.read(home .. "/serve.err") or ""):find("listening on https://127.0.0.1:" .. info.port, 1, true)
    end, 30, "the listening line")
  end)

  it("answers a client that trusts the CA", function()
    local r = assert(get("/api/runs"))
    assert.are.equal(200, r.status)
    assert.are.equal("table", type(r.json))
    -- and through localhost, the certificate's other name
    r = assert(http.get("https://localhost:" .. info.port .. "/api/deployments", { ca_file = ca }))
    assert.are.equal(200, r.status)
  end)

  it("fails a client without the CA with a certificate error", function()
    local r, err = http.get(info.url .. "/api/runs")
    assert.is_nil(r)
    assert.matches("certificate", err)
    r, err = get("/api/runs", { ca_file = other_ca })
    assert.is_nil(r)
    assert.matches("certificate", err)
  end)

  it("answers plain http:// on the TLS port with a 400 that says to use https://", function()
    local r = assert(http.get("http://127.0.0.1:" .. info.port .. "/api/runs"))
    assert.are.equal(400, r.status)
    assert.matches("use an https:// URL", r.body, 1, true)
    -- the server goes on serving HTTPS
    assert.are.equal(200, assert(get("/api/runs")).status)
  end)

  -- `drover run ok` with env; waits for the run to end and checks it
  -- COMPLETED (else: the worker's log says why).
  local function run_completes(env)
    env.DROVER_HOME = home
    local id, url = H.run(env, "ok")
    runs[#runs + 1] = id
    local r
    H.wait_until(function()
      r = assert(get("/api/runs/" .. id)).json
      return r.state == "COMPLETED" or r.state == "CRASHED" or r.state == "FAILED"
    end, 120, "run " .. id .. " to end")
    assert.are.equal("COMPLETED", r.state, drover.fs.read(home .. "/runs/" .. id .. "/worker.log"))
    return r, url
  end

  it("runs a local run whose worker reports over HTTPS (DROVER_CA_FILE)", function()
    local r, url = run_completes { DROVER_CA_FILE = ca }
    assert.are.equal(info.url .. "/runs/" .. r.id, url)
    assert.are.equal(2, #r.task_runs)
  end)

  it("runs a local run whose worker trusts the daemon's certificate by itself", function()
    -- no DROVER_CA_FILE: the local backend hands the worker daemon.json's ca_file
    assert.are.equal(2, #run_completes({ DROVER_CA_FILE = false }).task_runs)
  end)

  describe("drover worker --api https://", function()
    -- A run created in the store as a remote backend would, whose worker
    -- this test starts itself: --ca-file is the only way it trusts the CA.
    local function new_run()
      local store = assert(require("drover.store").open(home))
      local id = require("drover.store").new_id()
      store:create_flow_run { id = id, name = "ok", deployment = "ok", backend = "local", state = "PENDING",
        params = { mode = "ok" }, source = { kind = "deployment" } }
      local token = require("drover.run_token").issue(store, id)
      store:close()
      return id, token
    end

    local function worker(id, token, args, env)
      local argv = { H.drover_bin, "worker", id, "--api", info.url }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      local e = { DROVER_HOME = false, DROVER_RUN_TOKEN = token, DROVER_CA_FILE = false,
        DROVER_SPOOL_DIR = dir .. "/spool-" .. id }
      for k, v in pairs(env or {}) do e[k] = v end
      local r = assert(drover.proc.run(argv, { env = e, stdout = "capture", stderr = "capture", timeout = 120 }))
      return r
    end

    it("reports the run with --ca-file", function()
      local id, token = new_run()
      local r = worker(id, token, { "--ca-file", ca })
      assert.are.equal(0, r.code, r.stderr)
      local run = assert(get("/api/runs/" .. id)).json
      assert.are.equal("COMPLETED", run.state)
      assert.are.equal(2, #run.task_runs)
    end)

    it("fails without the CA, at once, saying it is the certificate", function()
      local id, token = new_run()
      -- (the default delivery timeout, 300 s: a trust failure is not retried)
      local r = worker(id, token, {})
      assert.are_not.equal(0, r.code)
      assert.matches("certificate", r.stderr)
      assert.are.equal("PENDING", assert(get("/api/runs/" .. id)).json.state)
    end)
  end)

  describe("a certificate or key that cannot be used", function()
    local tries = 0
    local function serve_fails(args, file)
      tries = tries + 1
      local d = dir .. "/bad-" .. tries
      assert(drover.fs.mkdir(d))
      local argv = { "serve", "--port", "0" }
      for _, a in ipairs(args) do argv[#argv + 1] = a end
      local code, _, err = drv(argv, { DROVER_HOME = d })
      assert.are.equal(2, code)
      local lines = {}
      for l in err:gmatch("[^\n]+") do lines[#lines + 1] = l end
      assert.are.equal(1, #lines, err)
      assert.matches(file, lines[1], 1, true)
      assert.is_nil(H.daemon_info(d))
      return lines[1]
    end

    it("exits 2 with one line naming a missing file", function()
      local line = serve_fails({ "--tls-cert", dir .. "/nope.pem", "--tls-key", key }, dir .. "/nope.pem")
      assert.matches("tls.cert: cannot read .*No such file or directory", line)
      line = serve_fails({ "--tls-cert", cert, "--tls-key", dir .. "/nokey.pem" }, dir .. "/nokey.pem")
      assert.matches("tls.key: cannot read .*No such file or directory", line)
    end)

    it("exits 2 with one line for a file that is not a certificate, or a key that does not match", function()
      local line = serve_fails({ "--tls-cert", key, "--tls-key", key }, key)
      assert.matches("tls.cert: .* holds no usable PEM certificate", line)
      line = serve_fails({ "--tls-cert", cert, "--tls-key", dir .. "/other.key" }, dir .. "/other.key")
      assert.matches("tls.key: " .. dir .. "/other.key is not the key of the certificate in " .. cert, line, 1, true)
    end)

    it("needs both --tls-cert and --tls-key", function()
      local code, _, err = drv({ "serve", "--port", "0", "--tls-cert", cert }, { DROVER_HOME = dir })
      assert.are.equal(2, code)
      assert.matches("--tls-cert and --tls-key go together", err, 1, true)
    end)
  end)
end)

-- A script that serves (TLS or not) to curl clients in every state -- TLS
-- handshakes, slow and fast streamed responses, requests whose handler
-- waits, plain HTTP on the TLS port -- and ends (closing the engine, and
-- every connection with it) once most are under way.  arg: cert, key, tls.
local CLOSE_WITH_CLIENTS = [[
local drover = require "drover"
local cert, key, tls = arg[1], arg[2], arg[3] == "tls"
drover.run(function()
  local srv = assert(drover.server.listen { tls = tls and { cert = cert, key = key } or nil,
    handler = function(req, res)
      if req.path == "/stream" then
        res:start(200)
        for _ = 1, 100000 do if not res:write(("x"):rep(4000)) then return end end
        return res:finish()
      end
      if req.path == "/wait" then drover.sleep(120) end
      return 200, {}, "ok"
    end })
  local plain = "http://127.0.0.1:" .. srv.port
  local function curl(url, ...)
    local argv = { "curl", "-s", "-o", "/dev/null", "--cacert", cert, "--max-time", "120", url, ... }
    assert(drover.proc.spawn(argv, { env = { LD_PRELOAD = "" }, stdout = "null", stderr = "null" }))
  end
  for i = 1, 6 do
    curl(srv.url .. "/stream", "--limit-rate", "200k")
    curl(srv.url .. "/stream")
    curl(srv.url .. "/wait")
    curl(srv.url .. "/small" .. i)
    if tls then curl(plain .. "/plain") end
  end
  local deadline = drover.now() + 60
  while srv:stats().active < 12 and drover.now() < deadline do drover.sleep(0.01) end
  io.write("active ", srv:stats().active, "\n")
  io.stdout:flush()
  os.exit(0, true)
end)
]]

describe("closing the engine with connections in flight", function()
  local dir, cert, key

  setup(function()
    dir = H.tempdir()
    local _
    _, cert, key = make_pki(dir)
    assert(drover.fs.write(dir .. "/close.lua", CLOSE_WITH_CLIENTS))
  end)

  teardown(function() if dir then os.execute("rm -rf " .. dir) end end)

  for _, mode in ipairs { "tls", "plain" } do
    it("closes every " .. mode .. " connection and exits cleanly", function()
      for _ = 1, 3 do
        local r = assert(drover.proc.run({ H.drover_bin, dir .. "/close.lua", cert, key, mode },
          { stdout = "capture", stderr = "capture", timeout = 120 }))
        assert.are.equal(0, r.code, r.stderr)
        assert.matches("^active %d+", r.stdout)
        assert.are.equal("", r.stderr)
      end
    end)
  end
end)

describe("drover.server.listen{ tls = }", function()
  local server = require "drover.server"

  local function err_of(f, ...)
    local ok, e = pcall(f, ...)
    assert.is_false(ok)
    return tostring(e)
  end

  it("rejects unknown options and bad tls tables", function()
    local h = function() end
    assert.matches("unknown option 'tsl'", err_of(server.listen, { handler = h, tsl = {} }), 1, true)
    assert.matches("unknown option 'tls.ca'", err_of(server.listen, { handler = h, tls = { cert = "a", key = "b",
      ca = "c" } }), 1, true)
    assert.matches("bad option 'tls' (table expected, got string)", err_of(server.listen,
      { handler = h, tls = "cert.pem" }), 1, true)
    assert.matches("bad option 'tls.key' (a file name expected, got nil)", err_of(server.listen,
      { handler = h, tls = { cert = "a" } }), 1, true)
  end)

  it("serves HTTPS in this process: server.url is https://", function()
    local dir = H.tempdir()
    local _, cert, key = make_pki(dir)
    local ok, err = pcall(drover.run, function()
      local srv = assert(server.listen { tls = { cert = cert, key = key },
        handler = function(req) return 200, {}, "hello " .. req.path end })
      assert.is_true(srv.tls)
      assert.are.equal("https://127.0.0.1:" .. srv.port, srv.url)
      assert.matches("drover.server%(https://", tostring(srv))
      local r = assert(http.get(srv.url .. "/x", { ca_file = dir .. "/ca.pem" }))
      assert.are.equal("hello /x", r.body)
      -- TLS 1.3 only (see server.c): a client held to TLS 1.2 is refused
      local c = assert(drover.proc.run({ "curl", "-s", "-o", "/dev/null", "--cacert", dir .. "/ca.pem",
        "--tls-max", "1.2", srv.url .. "/x" }, { env = { LD_PRELOAD = "" } }))
      assert.are_not.equal(0, c.code)
      srv:close()
    end)
    os.execute("rm -rf " .. dir)
    assert(ok, err)
  end)

  it("returns nil and a message naming the file it cannot read", function()
    drover.run(function()
      local srv, err = server.listen { handler = function() end, tls = { cert = "/nonexistent/c.pem",
        key = "/nonexistent/k.pem" } }
      assert.is_nil(srv)
      assert.are.equal("drover.server.listen: tls.cert: cannot read /nonexistent/c.pem: No such file or directory", err)
    end)
  end)
end)
