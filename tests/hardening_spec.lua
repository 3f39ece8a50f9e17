-- `drover serve` under hostile or careless input (issue 12): full run ids
-- on state-changing endpoints, bytes that are not UTF-8 in every view,
-- request bodies refused from their head with memory bounded, the token
-- on the command line, and server-sent events fanned out to many clients.
-- Real daemons, real runs (`drover exec`), real curl clients.
local drover = require "drover"
local http = require "drover.http"
local json = require "drover.json"
local events = require "drover.events"
local H = require "helper"

local child_env = { LD_PRELOAD = "" }

local function curl_bg(args, on_out)
  local argv = { "curl", "-sN", "--max-time", "120" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return assert(drover.proc.spawn(argv, { env = child_env, stdout = on_out or "null" }))
end

describe("drover serve, hardened", function()
  local home, info
  local procs = {}

  local function drv(args, env)
    return H.drover(args, { env = env or { DROVER_HOME = home } })
  end

  local function serve(dir, args, env)
    local p, i = H.serve(dir, args, env)
    procs[#procs + 1] = p
    return p, i
  end

  local function stop(p)
    if p:is_running() then drover.kill(p.pid, "TERM"); p:wait(60) end
  end

  setup(function()
    home = H.tempdir()
    local _
    _, info = serve(home)
  end)

  teardown(function()
    for _, p in ipairs(procs) do
      if p:is_running() then drover.kill(p.pid, "KILL"); p:wait(30) end
    end
    os.execute("rm -rf " .. home)
  end)

  -- issue 12, item 1: one hex digit was enough to cancel somebody's run
  -- (ids were matched with LIKE ?||'%').
  it("cancels a run by its full id only: a prefix is refused and the run goes on", function()
    local store = assert(require("drover.store").open(home))
    local id = store:create_flow_run { name = "victim", backend = "local", state = "RUNNING" }
    for _, path in ipairs { "/api/runs/" .. id:sub(1, 1) .. "/cancel", "/api/runs/" .. id:sub(1, 11) .. "/cancel",
      "/api/v1/runs/" .. id:sub(1, 4) .. "/cancel" } do
      local r = assert(http.post(info.url .. path, "", { headers = { ["content-type"] = "application/json" } }))
      assert.are.equal(404, r.status, path)
      assert.matches("a full run id is required", r.json.error, 1, true)
    end
    local state = store:flow_run(id).state
    assert.is_nil(({ CANCELLING = true, CANCELLED = true })[state], "the run was cancelled: " .. state)
    -- reading by prefix stays a convenience
    assert.are.equal(id, assert(http.get(info.url .. "/api/runs/" .. id:sub(1, 11))).json.id)
    local r = assert(http.post(info.url .. "/api/runs/" .. id .. "/cancel", ""))
    assert.are.equal(202, r.status)
    store:close()
  end)

  -- issue 12, item 4: one byte that is not UTF-8 broke a run's views, and
  -- lost its parameters.
  describe("bytes that are not UTF-8", function()
    local id, flow

    setup(function()
      flow = home .. "/binary_flow.lua"
      assert(drover.fs.write(flow, [[
local drover = require "drover"
print("bad \255\254 line")
local t = drover.task("t", function(x) return #x end)
t("\255\254")
return "\0\255binary"
]]))
      local code, _, err = drv({ "exec", flow, "x=1e400", "y=\255\254" })
      assert.are.equal(0, code, err) -- was 2: "invalid UTF-8 in string"
      local store = assert(require("drover.store").open(home))
      id = store:flow_runs { limit = 1 }[1].id
      store:close()
    end)

    it("round-trip through drover.json's bytes option, marks and all", function()
      local v = { s = "\255", list = { "ok", "a\128b" }, empty = json.array(), ["k\200"] = 1 }
      local text = json.encode(v, { bytes = true })
      assert.are.equal('{"empty":[],"k\\\\xC8":1,"list":["ok",{"$bytes":"YYBi"}],"s":{"$bytes":"/w=="}}', text)
      local back = json.decode(text, { bytes = true })
      assert.are.equal("\255", back.s)
      assert.are.same({ "ok", "a\128b" }, back.list)
      assert.are.equal("array", json.kind(back.empty))
      -- without the option nothing changes: bytes are an error, markers stay objects
      assert.has_error(function() json.encode(v) end)
      assert.are.same({ ["$bytes"] = "/w==" }, json.decode(text).s)
      -- a table shared twice is encoded twice, as without bytes
      local shared = { "\255" }
      assert.are.equal('[[{"$bytes":"/w=="}],[{"$bytes":"/w=="}]]', json.encode({ shared, shared }, { bytes = true }))
    end)

    it("are stored losslessly: the run completes with its params and result", function()
      local store = assert(require("drover.store").open(home))
      local r = store:flow_run(id)
      store:close()
      assert.are.equal("COMPLETED", r.state)
      -- were "table: 0x..."
      assert.are.same({ x = "1e400", y = "\255\254" }, require("drover.store").decode(r.params))
      assert.are.equal("\0\255binary", require("drover.store").decode(r.result))
    end)

    it("show in the API as {\"$bytes\": base64}", function()
      local r = assert(http.get(info.url .. "/api/runs/" .. id))
      assert.are.equal(200, r.status) -- was 500
      assert.are.same({ ["$bytes"] = events.b64encode("\255\254") }, r.json.params.y)
      assert.are.equal("1e400", r.json.params.x)
      assert.are.same({ ["$bytes"] = events.b64encode("\0\255binary") }, r.json.result)
      -- a task's arguments: JSON text in which the bytes are a marker
      assert.are.same({ { ["$bytes"] = events.b64encode("\255\254") } }, r.json.task_runs[1].params)
      local logs = assert(http.get(info.url .. "/api/runs/" .. id .. "/logs"))
      assert.are.equal(200, logs.status) -- was 500
      assert.are.same({ ["$bytes"] = events.b64encode("bad \255\254 line") }, logs.json[1].line)
      local runs = assert(http.get(info.url .. "/api/runs"))
      assert.are.equal(200, runs.status)
    end)

    it("show in server-sent events, and the stream goes on", function()
      local out = {}
      local c = curl_bg({ info.url .. "/api/events?run=" .. id .. "&after=0" }, function(chunk) out[#out + 1] = chunk end)
      local want = json.encode { ["$bytes"] = events.b64encode("bad \255\254 line") }
      H.wait_until(function() return table.concat(out):find(want, 1, true) end, 30, "the log event")
      -- was aborted at that line: a later run's event still arrives
      local code = drv({ "exec", home .. "/binary_flow.lua" })
      assert.are.equal(0, code)
      local store = assert(require("drover.store").open(home))
      local later = store:flow_runs { limit = 1 }[1].id
      store:close()
      assert.are_not.equal(id, later)
      H.wait_until(function() return table.concat(out):find('"id":"' .. later .. '"', 1, true) end, 30,
        "the later run's event after the binary line")
      c:kill("TERM")
      c:wait(30)
    end)

    it("show in the CLI's --json output (ls, status, logs)", function()
      local code, out, err = drv({ "ls", "--json" })
      assert.are.equal(0, code, err) -- was 2
      local runs = assert(json.decode(out))
      local mine
      for _, r in ipairs(runs) do if r.id == id then mine = r end end
      assert.are.same({ x = "1e400", y = "\255\254" }, json.decode(mine.params, { bytes = true }))
      code, out, err = drv({ "status", id, "--json" })
      assert.are.equal(0, code, err)
      local st = assert(json.decode(out, { bytes = true }))
      assert.are.same({ "\255\254" }, json.decode(st.task_runs[1].params, { bytes = true }))
      code, out, err = drv({ "logs", id, "--json" })
      assert.are.equal(0, code, err)
      assert.are.same({ ["$bytes"] = events.b64encode("bad \255\254 line") }, json.decode(out:match("[^\n]+")).line)
      -- the plain text views print the bytes as they are, from the store
      -- or through the API (DROVER_API)
      code, out = drv({ "logs", id })
      assert.are.equal(0, code)
      assert.matches("bad \255\254 line", out, 1, true)
      local remote = { DROVER_HOME = home .. "/nowhere", DROVER_API = info.url }
      code, out, err = drv({ "logs", id }, remote)
      assert.are.equal(0, code, err)
      assert.matches("bad \255\254 line", out, 1, true)
      code, out, err = drv({ "logs", id, "--json" }, remote)
      assert.are.equal(0, code, err)
      assert.are.same({ ["$bytes"] = events.b64encode("bad \255\254 line") }, json.decode(out:match("[^\n]+")).line)
    end)
  end)

  -- issue 12, item 5: bodies up to 64 MiB were buffered before the token
  -- was checked: 24 such requests took the daemon from 7 MB to 963 MB.
  it("refuses bodies from their head: without a token, 24 x 63 MiB keep the daemon under 50 MB", function()
    local dir = H.tempdir()
    local body = dir .. "/body"
    local fh = assert(io.open(body, "wb"))
    local mib = ("\0"):rep(1024 * 1024)
    for _ = 1, 63 do fh:write(mib) end
    fh:close()
    local p, i = serve(dir, { "--port", "0" }, { DROVER_HOME = dir, DROVER_TOKEN = "t0ken-" .. math.random(1e6) })
    local codes, clients = {}, {}
    for n = 1, 24 do
      local path = n % 2 == 0 and "/api/v1/packages" or "/api/runs/0123456789ab/cancel"
      codes[n] = ""
      clients[n] = assert(drover.proc.spawn({ "curl", "-sS", "--max-time", "120", "-o", "/dev/null",
        "-w", "%{http_code}", "-H", "Expect:", "-H", "Content-Type: application/json",
        "--data-binary", "@" .. body, i.url .. path }, { env = child_env,
        stdout = function(chunk) codes[n] = codes[n] .. chunk end }))
    end
    for n = 1, 24 do clients[n]:wait(150) end
    local status = drover.fs.read("/proc/" .. p.pid .. "/status")
    local hwm = tonumber(status:match("VmHWM:%s*(%d+) kB"))
    for n = 1, 24 do assert.are.equal("401", codes[n], "request " .. n) end
    assert.is_true(hwm < 50 * 1024, "daemon peak RSS " .. hwm .. " kB")
    stop(p)
    os.execute("rm -rf " .. dir)
  end)

  it("takes 1 MiB on most endpoints and --max-body on package uploads, from the head", function()
    local function post(path, size, ctype)
      local r = assert(drover.proc.run({ "sh", "-c",
        'head -c "$1" /dev/zero | curl -sS --max-time 60 -H Expect: -H "Content-Type: $2" --data-binary @- "$3"',
        "sh", tostring(size), ctype or "application/json", info.url .. path }, { env = child_env, timeout = 90 }))
      return json.decode(r.stdout) or r.stdout
    end
    local big = post("/api/runs/0123456789ab/cancel", 2 * 1024 * 1024)
    assert.matches("request body of 2097152 bytes is larger than /api/runs/0123456789ab/cancel takes %(1048576",
      big.error)
    -- an upload of 2 MiB is past the size check (and refused for what it is)
    local up = post("/api/v1/packages?module=m&class=C&entrypoint=main", 2 * 1024 * 1024, "application/x-tar")
    assert.is_nil(tostring(up.error):find("larger than", 1, true), tostring(up.error))
    assert.matches("larger than /api/v1/packages takes %(16777216", post("/api/v1/packages", 17 * 1024 * 1024).error)
    -- a body without a length where only small ones go
    local r = assert(drover.proc.run({ "curl", "-sS", "-H", "Transfer-Encoding: chunked", "-H",
      "Content-Type: application/json", "--data-binary", "{}", info.url .. "/api/runs/0123456789ab/cancel" },
      { env = child_env }))
    assert.matches("needs a Content%-Length", json.decode(r.stdout).error)
    local code, _, err = drv({ "serve", "--max-connections", "none" })
    assert.are.equal(2, code)
    assert.matches("%-%-max%-connections must be a number", err)
  end)

  -- issue 12, item 10: --token shows in ps.
  it("warns when the token is on the command line, not when it comes from the environment", function()
    local dir = H.tempdir()
    local secret = "argv-" .. math.random(1e6)
    local p = serve(dir, { "--port", "0", "--token", secret }, { DROVER_HOME = dir })
    stop(p)
    local err = drover.fs.read(dir .. "/serve.err")
    assert.matches("drover serve: warning: --token shows in ps to every user of this machine; "
      .. "use DROVER_TOKEN or DROVER_TOKEN_FILE\n", err, 1, true)
    assert.is_nil(err:find(secret, 1, true))
    local file = dir .. "/token"
    assert(drover.fs.write(file, secret .. "\n"))
    assert(drover.fs.remove(dir .. "/serve.err"))
    p = serve(dir, { "--port", "0" }, { DROVER_HOME = dir, DROVER_TOKEN_FILE = file })
    local d = H.daemon_info(dir)
    assert.are.equal(401, assert(http.get(d.url .. "/api/runs")).status)
    assert.are.equal(200, assert(http.get(d.url .. "/api/runs", { headers = { authorization = "Bearer " .. secret } })).status)
    stop(p)
    local err2 = drover.fs.read(dir .. "/serve.err")
    assert.is_nil(err2:find("--token", 1, true), err2)
    os.execute("rm -rf " .. dir)
  end)

  it("compares tokens as digests: the guard holds no token, and every given token is digested", function()
    local guard_mod = require "drover.request_guard"
    local secret = "the-server-token"
    local g = guard_mod.new { bind = "127.0.0.1", token = secret }
    for k, v in pairs(g) do assert.are_not.equal(secret, v, k) end
    local digested = {}
    local real = guard_mod.digest
    guard_mod.digest = function(s) digested[#digested + 1] = s; return real(s) end
    local function ask(token)
      return guard_mod.check(g, { method = "GET", headers = { host = "127.0.0.1:1", authorization = "Bearer " .. token },
        args = {}, body = "" }, function() return nil end)
    end
    local ok1, no1 = ask("x")                       -- a length that differs
    local ok2, no2 = ask(secret:sub(1, -2) .. "X") -- the same length
    local ok3 = ask(secret)
    guard_mod.digest = real
    assert.is_nil(ok1); assert.are.equal(401, no1.status)
    assert.is_nil(ok2); assert.are.equal(401, no2.status)
    assert.is_true(ok3.admin)
    assert.are.same({ "x", secret:sub(1, -2) .. "X", secret }, digested)
  end)

  -- issue 12, item 12: each client polled the store itself (500 clients:
  -- 18 s of CPU in 30 s); now one poll is fanned out.  What must hold:
  -- every client gets every change.
  it("sends a run's state change to each of 50 event clients", function()
    local outs, clients = {}, {}
    for n = 1, 50 do
      outs[n] = {}
      clients[n] = curl_bg({ info.url .. "/api/events" }, function(chunk) outs[n][#outs[n] + 1] = chunk end)
    end
    H.wait_until(function()
      for n = 1, 50 do if not table.concat(outs[n]):find("retry: 2000", 1, true) then return false end end
      return true
    end, 60, "50 streams to open")
    local code = drv({ "exec", home .. "/binary_flow.lua" })
    assert.are.equal(0, code)
    local store = assert(require("drover.store").open(home))
    local id = store:flow_runs { limit = 1 }[1].id
    store:close()
    H.wait_until(function()
      for n = 1, 50 do
        local s = table.concat(outs[n])
        if not (s:find('"id":"' .. id .. '"', 1, true) and s:find('"state":"COMPLETED"', 1, true)) then return false end
      end
      return true
    end, 60, "the run's COMPLETED event at all 50 clients")
    for n = 1, 50 do clients[n]:kill("TERM") end
    for n = 1, 50 do clients[n]:wait(30) end
  end)
end)
