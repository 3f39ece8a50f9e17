-- The client commands against a remote server: a real `drover serve` with
-- a token on a store of its own, and the command line run from another
-- DROVER_HOME that has no store (and must never get one), reaching the
-- server only through DROVER_API with the token in DROVER_TOKEN or
-- DROVER_TOKEN_FILE.  Malformed answers come from a real HTTP server in
-- this process that answers what a drover server never would.
local drover = require "drover"
local fs = require "drover.fs"
local http = require "drover.http"
local json = require "drover.json"
local server = require "drover.server"
local H = require "helper"

local fixture = H.root .. "/tests/conformance/fixture"

describe("drover client commands against a remote server (DROVER_API)", function()
  local server_home, client_home, tmp, daemon, info, token
  local outputs = {} -- every stdout and stderr a command printed: none may show the token

  -- The CLI with the client's environment (plus `env`, false unsets).
  local function drv(args, env)
    local e = { DROVER_HOME = client_home, DROVER_API = info.url, DROVER_TOKEN = token, DROVER_TOKEN_FILE = false }
    for k, v in pairs(env or {}) do e[k] = v end
    local code, out, err = H.drover(args, { env = e })
    outputs[#outputs + 1] = out
    outputs[#outputs + 1] = err
    return code, out, err
  end

  local function ok(args, env)
    local code, out, err = drv(args, env)
    assert(code == 0, "drover " .. table.concat(args, " ") .. " exited " .. tostring(code) .. ": " .. tostring(err))
    return out, err
  end

  -- A failure: exactly one line on stderr, matching `pattern`, and exit 2
  -- (the caller's mistake: the server refused the request) unless `code`
  -- says otherwise (1: the server is down or answered nonsense).
  local function fails(args, pattern, env, code)
    local got, out, err = drv(args, env)
    assert.are.equal(code or 2, got, "stdout: " .. out .. " stderr: " .. err)
    assert.are.equal("", out)
    local _, lines = err:gsub("\n", "")
    assert.are.equal(1, lines, "one line expected: " .. err)
    assert.matches("^drover: ", err)
    assert.matches(pattern, err)
    return err
  end

  -- The server's record of a run, read with the server's token.
  local function server_run(id)
    return assert(http.get(info.url .. "/api/v1/runs/" .. id,
      { headers = { authorization = "Bearer " .. token } })).json
  end

  local function wait_state(id, want)
    local last
    H.wait_until(function()
      last = server_run(id)
      return last.state == want
    end, 90, "run " .. id .. " to be " .. want)
    return last
  end

  local function run(name, params)
    local args = { "run", name }
    for _, p in ipairs(params or {}) do args[#args + 1] = p end
    local out = ok(args)
    local id, url = out:match("^(%x+)%s+(%S+)\n$")
    assert(id, "drover run printed: " .. out)
    return id, url
  end

  setup(function()
    tmp = H.tempdir()
    server_home = tmp .. "/server"
    client_home = tmp .. "/client"
    assert(fs.mkdir(server_home))
    assert(fs.mkdir(client_home))
    token = "tok-" .. fs.sha256_string(tostring(drover.now()) .. tmp):sub(1, 32)
    daemon, info = H.serve(server_home, { "--port", "0" }, { DROVER_HOME = server_home, DROVER_TOKEN = token })
  end)

  teardown(function()
    if daemon and daemon:is_running() then drover.kill(daemon.pid, "TERM"); daemon:wait(30) end
    if daemon and daemon:is_running() then drover.kill(daemon.pid, "KILL"); daemon:wait(30) end
    os.execute("rm -rf " .. tmp)
  end)

  local pkg

  it("packages the fixture, deploys it, runs it to COMPLETED; ls, status and logs show it", function()
    local out = ok({ "package", "--module", "fixture_flow", "--class", "Fixture", "--entrypoint", "main",
      "--path", fixture, "--json" })
    local p = json.decode(out)
    assert.matches("^%x+$", p.id)
    assert.are.equal("fixture_flow", p.module)
    pkg = p.id
    assert.are.equal("ok\n", (ok({ "deploy", "ok", "--package", pkg, "mode=ok" })))
    ok({ "deploy", "long", "--package", pkg, "mode=long" })
    local id, url = run("ok")
    assert.are.equal(info.url .. "/runs/" .. id, url)
    local r = wait_state(id, "COMPLETED")
    -- it ran as `drover run` runs it on the server: a local worker process
    assert.are.equal("local", r.backend)
    assert.are.equal("ok", r.deployment)
    assert.are.same({ mode = "ok", word = "HELLO" }, r.result)

    local ls = ok({ "ls" })
    assert.matches(id .. "%s+ok%s+ok%s+COMPLETED", ls)
    local runs = json.decode((ok({ "ls", "-d", "ok", "-s", "completed", "--json" })))
    assert.are.equal(id, runs[1].id)
    local deps = ok({ "ls", "--deployments" })
    assert.matches("\nlong%s+local%s+" .. pkg:sub(1, 12), deps)
    assert.matches("\nok%s+local%s+" .. pkg:sub(1, 12), deps)

    local st = ok({ "status", id:sub(1, 8) })
    assert.matches("^run " .. id .. "  ok  COMPLETED\n", st)
    assert.matches("Fixture%.main", st)
    assert.matches("Fixture%.shout", st)
    local sj = json.decode((ok({ "status", id, "--json" })))
    assert.are.equal("COMPLETED", sj.state)
    assert.are.equal(2, #sj.task_runs)

    assert.are.equal("fixture says HELLO\n", (ok({ "logs", id })))
    local lj = json.decode((ok({ "logs", id, "--json" })):match("^[^\n]+"))
    assert.are.equal("fixture says HELLO", lj.line)
  end)

  it("follows a run's logs with -f until it ends", function()
    local id = run("ok")
    local out = ok({ "logs", "-f", id })
    assert.are.equal("fixture says HELLO\n", out)
    assert.are.equal("COMPLETED", server_run(id).state)
  end)

  it("cancels a long run: CANCELLED, its processes gone, the token in no process's argv", function()
    local marker = tostring(3000 + math.random(1, 5000))
    local id = run("long", { "marker=" .. marker })
    wait_state(id, "RUNNING")
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) > 0 end, 60, "the run's sleeps")
    -- the server, its worker and the worker's children all run now: the
    -- token is on no command line
    assert.are.same({}, H.pids_matching(token))
    local out = ok({ "cancel", id })
    assert.are.equal("cancelled " .. id .. " (CANCELLED)\n", out)
    assert.are.equal("CANCELLED", server_run(id).state)
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, 60, "the run's sleeps to end")
    fails({ "cancel", id }, "run " .. id .. " is CANCELLED: only active runs can be cancelled")
  end)

  it("stops a deployment: its active runs end CANCELLED and it is paused", function()
    local marker = tostring(9000 + math.random(1, 5000))
    local a = run("long", { "marker=" .. marker })
    local b = run("long", { "marker=" .. marker })
    wait_state(a, "RUNNING")
    wait_state(b, "RUNNING")
    assert.are.equal("stopped long\n", (ok({ "stop", "long" })))
    assert.are.equal("CANCELLED", server_run(a).state)
    assert.are.equal("CANCELLED", server_run(b).state)
    H.wait_until(function() return #H.pids_matching("sleep " .. marker) == 0 end, 60, "the runs' sleeps to end")
    local deps = json.decode((ok({ "ls", "--deployments", "--json" })))
    local paused = {}
    for _, d in ipairs(deps) do paused[d.name] = d.paused end
    assert.are.same({ long = 1, ok = 0 }, paused)
    fails({ "run", "long" }, "deployment 'long' is stopped")
  end)

  it("takes the token from DROVER_TOKEN_FILE", function()
    local f = tmp .. "/token"
    assert(fs.write(f, token .. "\n", { mode = "600" }))
    assert.matches("RUN", (ok({ "ls" }, { DROVER_TOKEN = false, DROVER_TOKEN_FILE = f })))
  end)

  it("says in one line what was wrong: unknown deployment or run, wrong or missing token, --token on argv", function()
    fails({ "run", "nope" }, "unknown deployment 'nope' %(POST " .. info.url:gsub("%p", "%%%0") ..
      "/api/v1/deployments/nope/runs: 404%)")
    fails({ "status", "0f0f0f0f0f0f" }, "unknown run '0f0f0f0f0f0f'")
    fails({ "deploy", "ok", "--package", pkg }, "deployment 'ok' already exists")
    fails({ "deploy", "x", "--package", "abcdef" }, "unknown package 'abcdef'")
    fails({ "ls" }, "refused the token %(401", { DROVER_TOKEN = "not-the-token" })
    fails({ "ls" }, "requires a token %(401%); set DROVER_TOKEN", { DROVER_TOKEN = false })
    local err = fails({ "ls", "--token", "argv-secret" }, "%-%-token is not taken on the command line")
    assert.is_nil(err:find("argv-secret", 1, true))
    fails({ "ls" }, "bad API URL 'ftp://x'", { DROVER_API = "ftp://x" })
  end)

  it("says in one line when the server is down or answers what a drover server never would", function()
    -- a port nobody listens on any more
    local gone = assert(server.listen { handler = function() return 200, "" end })
    local gone_url = gone.url
    gone:close()
    fails({ "ls" }, "cannot reach the drover server at " .. gone_url:gsub("%p", "%%%0"), { DROVER_API = gone_url }, 1)
    fails({ "run", "ok" }, "cannot reach the drover server", { DROVER_API = gone_url }, 1)

    local answers = {
      ["/api/v1/runs"] = { 200, { ["content-type"] = "text/plain" }, "hello" },
      ["/api/v1/deployments"] = { 200, { ["content-type"] = "application/json" }, "{broken" },
      ["/api/v1/deployments/ok/runs"] = { 201, { ["content-type"] = "application/json" }, '{"id": 5}' },
      ["/api/v1/deployments/bad/runs"] = { 502, { ["content-type"] = "text/html" }, "<html>bad gateway</html>" },
    }
    local odd = assert(server.listen { handler = function(req)
      local a = answers[req.path]
      if a then return a[1], a[2], a[3] end
      return 404, { ["content-type"] = "text/plain" }, "no"
    end })
    local e = { DROVER_API = odd.url }
    fails({ "ls" }, "malformed answer from the drover server to GET .*/api/v1/runs%?limit=50: expected JSON", e, 1)
    fails({ "ls", "--deployments" }, "malformed answer from the drover server to GET .*/api/v1/deployments", e, 1)
    fails({ "run", "ok" }, "malformed answer from the drover server to POST .*/api/v1/deployments/ok/runs: {id, url} expected", e, 1)
    fails({ "run", "bad" }, "502 <html>bad gateway</html> %(is .* a drover server%?%)", e, 1)
    odd:close()
  end)

  it("refuses a run's token, a damaged upload and a cross-site request on the client endpoints", function()
    local store_mod = require "drover.store"
    local s = assert(store_mod.open(server_home))
    local id = s:flow_runs({ limit = 1 })[1].id
    local run_tok = require("drover.run_token").issue(s, id)
    s:close()
    local r = assert(http.get(info.url .. "/api/v1/runs", { headers = { authorization = "Bearer " .. run_tok } }))
    assert.are.equal(403, r.status)
    r = assert(http.post(info.url .. "/api/v1/deployments/ok/runs",
      { json = {}, headers = { authorization = "Bearer " .. run_tok } }))
    assert.are.equal(403, r.status)
    local auth = "Bearer " .. token
    r = assert(http.post(info.url .. "/api/v1/packages?module=fixture_flow", { body = "not a tar",
      headers = { authorization = auth, ["content-type"] = "application/x-tar", ["x-drover-sha256"] = string.rep("0", 64) } }))
    assert.are.equal(400, r.status)
    assert.matches("SHA%-256 is %x+, not 0+ %(damaged in transit%?%)", r.json.error)
    r = assert(http.post(info.url .. "/api/v1/deployments/ok/runs", { json = { config = { home = tmp } },
      headers = { authorization = auth } }))
    assert.are.equal(400, r.status)
    assert.matches("config key 'home' cannot be set through the API", r.json.error)
    r = assert(http.post(info.url .. "/api/v1/deployments/ok/runs", { json = {},
      headers = { authorization = auth, origin = "http://evil.example" } }))
    assert.are.equal(403, r.status)
    r = assert(http.post(info.url .. "/api/v1/runs/" .. id:sub(1, 4) .. "/cancel", { json = {},
      headers = { authorization = auth } }))
    assert.are.equal(404, r.status)
    assert.matches("a full run id is required", r.json.error)
  end)

  -- (the run is cancelled, not waited for: whether a local worker can
  -- report over TLS is the local backend's business, not the client's)
  it("works over TLS with the server's CA (DROVER_CA_FILE or --ca-file), and says so without it", function()
    local dir = tmp .. "/tls"
    assert(fs.mkdir(dir .. "/store"))
    local r = assert(drover.proc.run({ "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
      dir .. "/key.pem", "-out", dir .. "/cert.pem", "-subj", "/CN=127.0.0.1", "-addext",
      "subjectAltName=IP:127.0.0.1", "-days", "2" }))
    assert(r.code == 0, "openssl: " .. tostring(r.stderr))
    local p, tinfo = H.serve(dir .. "/store", { "--port", "0", "--tls-cert", dir .. "/cert.pem", "--tls-key",
      dir .. "/key.pem" }, { DROVER_HOME = dir .. "/store", DROVER_TOKEN = token })
    local ok_run, e = pcall(function()
      assert.matches("^https://", tinfo.url)
      local env = { DROVER_API = tinfo.url, DROVER_CA_FILE = dir .. "/cert.pem" }
      local out = ok({ "package", "--module", "fixture_flow", "--class", "Fixture", "--entrypoint", "main",
        "--path", fixture, "--json" }, env)
      ok({ "deploy", "long", "--package", json.decode(out).id, "mode=long", "marker=" .. math.random(20000, 29999) }, env)
      local id = (ok({ "run", "long", "--ca-file", dir .. "/cert.pem" }, { DROVER_API = tinfo.url }))
        :match("^(%x+)%s+https://")
      assert.is_truthy(id)
      assert.matches("^run " .. id .. "  long  %u+\n", (ok({ "status", id }, env)))
      assert.are.equal("cancelled " .. id .. " (CANCELLED)\n", (ok({ "cancel", id }, env)))
      fails({ "ls" }, "cannot reach the drover server at https://.*certificate", { DROVER_API = tinfo.url }, 1)
    end)
    drover.kill(p.pid, "TERM")
    p:wait(30)
    assert(ok_run, e)
  end)

  it("never created a store in the client's DROVER_HOME, and never printed the token", function()
    assert.are.same({}, fs.list(client_home))
    for _, o in ipairs(outputs) do assert.is_nil(o:find(token, 1, true)) end
    for _, f in ipairs { "serve.out", "serve.err" } do
      assert.is_nil((fs.read(server_home .. "/" .. f) or ""):find(token, 1, true))
    end
    for _, rid in ipairs(fs.list(server_home .. "/runs") or {}) do
      assert.is_nil((fs.read(server_home .. "/runs/" .. rid .. "/worker.log") or ""):find(token, 1, true))
    end
  end)
end)
