-- drover.http against a real HTTP server (tests/support/httpd.c, H2O on
-- libuv) started as a child process for this file.
local drover = require "drover"
local http = require "drover.http"
local H = require "helper"

local proc = require "drover.proc"

local build = os.getenv("DROVER_BUILD") or "build"
local server = {}

local function start_server()
  local bin = H.build .. "/httpd-test"
  local r = assert(proc.run({ "make", "-s", "-C", H.root, "BUILD=" .. build, build .. "/httpd-test" }))
  assert(r.code == 0, "cannot build the test server: " .. (r.stdout or "") .. (r.stderr or ""))
  server.dir = H.tempdir()
  server.sock = server.dir .. "/httpd.sock"
  -- port 0: the server picks a free port and prints it as its first line
  local out = ""
  server.proc = assert(proc.spawn({ bin, "0", server.sock }, {
    stdout = function(chunk) out = out .. chunk end,
  }))
  server.port = tonumber(H.wait_until(function() return out:match("^(%d+)\n") end, 30,
    "the test server to print its port"))
  server.base = "http://127.0.0.1:" .. server.port
end

local function stop_server()
  if server.proc then
    server.proc:kill()
    server.proc:wait()
  end
  if server.dir then os.remove(server.sock); os.remove(server.dir .. "/script.lua"); os.remove(server.dir) end
end

local function url(path) return server.base .. path end

local function open_requests()
  return assert(http.get(url("/stats"))).json.pending
end

-- Run a Lua script in a fresh process (stock lua5.4 or the drover binary):
-- exit code, stdout (stderr appended when the code is not 0).
local function run_script(interp, src, ...)
  local f = server.dir .. "/script.lua"
  local fh = assert(io.open(f, "w"))
  fh:write(src)
  fh:close()
  local r = assert(proc.run({ interp, f, ... }, { timeout = 60 }))
  return r.code, r.code == 0 and r.stdout or (r.stdout .. r.stderr)
end

describe("drover.http", function()
  setup(start_server)
  teardown(stop_server)

  it("GET returns status, lower-case headers and the body (plain script mode)", function()
    local r = assert(http.get(url("/")))
    assert.are.equal(200, r.status)
    assert.are.equal("hello\n", r.body)
    assert.are.equal("text/plain", r.headers["content-type"])
    assert.are.equal("6", r.headers["content-length"])
    for k in pairs(r.headers) do assert.are.equal(k:lower(), k) end
    assert.is_nil(r.json)
  end)

  it("works inside tasks too", function()
    local a, b = drover.run(function()
      local t = drover.spawn(function() return assert(http.get(url("/json"))).json.name end)
      return assert(http.get(url("/"))).body, t:join()
    end)
    assert.are.equal("hello\n", a)
    assert.are.equal("drover", b)
  end)

  it("sends every method, through request and the shorthands", function()
    for _, m in ipairs({ "GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND" }) do
      local r = assert(http.request { url = url("/echo"), method = m })
      assert.are.equal(200, r.status)
      assert.are.equal(m, r.json.method)
    end
    -- a lower-case method is normalised
    assert.are.equal("POST", assert(http.request { url = url("/echo"), method = "post" }).json.method)
    -- HEAD: headers, no body
    local h = assert(http.head(url("/echo")))
    assert.are.equal("HEAD", h.headers["x-echo-method"])
    assert.are.equal("", h.body)
    assert.are.equal("GET", assert(http.get(url("/echo"))).json.method)
    assert.are.equal("DELETE", assert(http.delete(url("/echo"))).json.method)
    local p = assert(http.post(url("/echo"), "raw body"))
    assert.are.same({ "POST", "raw body" }, { p.json.method, p.json.body })
    p = assert(http.put(url("/echo"), { body = "put body" }))
    assert.are.same({ "PUT", "put body" }, { p.json.method, p.json.body })
    p = assert(http.patch(url("/echo"), { json = { x = 1 } }))
    assert.are.same({ "PATCH", { x = 1 } }, { p.json.method, require("cjson").decode(p.json.body) })
    -- a body-less POST/PUT still says Content-Length: 0
    p = assert(http.post(url("/echo")))
    assert.are.same({ "POST", "" }, { p.json.method, p.json.body })
    -- method defaults to POST when there is a body
    assert.are.equal("POST", assert(http.request { url = url("/echo"), body = "x" }).json.method)
  end)

  it("sends request headers and returns response headers", function()
    local r = assert(http.get(url("/echo?q=1"), {
      headers = { ["X-Token"] = "secret-token", ["X-Number"] = 42, ["X-Empty"] = "" },
    }))
    local sent = r.json.headers
    assert.are.equal("secret-token", sent["x-token"])
    assert.are.equal("42", sent["x-number"])
    assert.are.equal("", sent["x-empty"])
    assert.are.equal("drover/" .. drover.version, sent["user-agent"])
    assert.is_nil(sent["expect"])
    assert.are.equal("q=1", r.json.query)
    -- response side: names lower-cased, repeated headers joined
    assert.are.equal("GET", r.headers["x-echo-method"])
    assert.are.equal("a, b", r.headers["x-multi"])
    -- a header given by the caller replaces curl's own
    r = assert(http.get(url("/echo"), { headers = { ["User-Agent"] = "mine/1" } }))
    assert.are.equal("mine/1", r.json.headers["user-agent"])
    -- long values (big tokens, cookies) are not cut
    local long = string.rep("v", 20000)
    r = assert(http.get(url("/echo"), { headers = { ["X-Long"] = long } }))
    assert.are.equal(long, r.json.headers["x-long"])
  end)

  it("encodes json= and decodes JSON responses", function()
    local value = { name = "drover", list = { 1, 2, 3 }, nested = { ok = true } }
    local r = assert(http.post(url("/echo"), { json = value }))
    assert.are.equal("application/json", r.json.headers["content-type"])
    assert.are.same(value, require("cjson").decode(r.json.body))
    local j = assert(http.get(url("/json")))
    assert.are.equal("application/json; charset=utf-8", j.headers["content-type"])
    assert.are.same({ 1, 2, 3 }, j.json.items)
    assert.is_true(j.json.ok)
    assert.are.equal(http.null, j.json.nested.none)
    assert.is_nil(j.json_error)
    -- the caller's content-type wins
    r = assert(http.post(url("/echo"), { json = { a = 1 }, headers = { ["content-type"] = "application/vnd.x+json" } }))
    assert.are.equal("application/vnd.x+json", r.json.headers["content-type"])
    -- a raw body gets no invented content-type
    r = assert(http.post(url("/echo"), "a=1"))
    assert.is_nil(r.json.headers["content-type"])
  end)

  it("reports malformed JSON without failing the request", function()
    local r, err = http.get(url("/bad-json"))
    assert.is_nil(err)
    assert.are.equal(200, r.status)
    assert.are.equal('{"ok": tru', r.body)
    assert.is_nil(r.json)
    assert.matches("malformed JSON", r.json_error, 1, true)
    assert.matches(url("/bad-json"), r.json_error, 1, true)
  end)

  it("treats HTTP error statuses as normal responses", function()
    for _, st in ipairs({ 201, 204, 301, 404, 500, 503 }) do
      local r, err = http.get(url("/status/" .. st))
      assert.is_nil(err)
      assert.are.equal(st, r.status)
    end
    assert.are.equal("status 404\n", http.get(url("/status/404")).body)
    assert.are.equal(404, http.get(url("/no/such/path")).status)
  end)

  it("times out", function()
    local t0 = drover.now()
    local r, err = http.get(url("/delay?ms=20000"), { timeout = 0.3 })
    assert.is_nil(r)
    assert.matches("Timeout was reached", err, 1, true)
    assert.matches(url("/delay?ms=20000"), err, 1, true)
    assert.is_true(drover.now() - t0 < 15)
    -- a timeout long enough lets it through
    assert.are.equal(200, assert(http.get(url("/delay?ms=10"), { timeout = 30 })).status)
  end)

  it("returns nil, message on connection refused", function()
    local r, err = http.get("http://127.0.0.1:1/x")
    assert.is_nil(r)
    assert.matches("^drover%.http%.get: GET http://127%.0%.0%.1:1/x failed: Couldn't connect", err)
  end)

  -- issue 12, item 11: out of descriptors, curl's socket() fails and curl
  -- said "Couldn't connect to server".
  it("says 'too many open files' when the process is out of descriptors", function()
    local f = server.dir .. "/fds.lua"
    local fh = assert(io.open(f, "w"))
    fh:write([[
local http = require "drover.http"
http.get("http://127.0.0.1:1/") -- loads libcurl, leaves no connection to reuse
local held = {}
while true do
  local fd = io.open("/dev/null")
  if not fd then break end
  held[#held + 1] = fd
end
local r, err = http.get(arg[1])
io.write(#held, "|", tostring(r), "|", tostring(err))
]])
    fh:close()
    local r = assert(proc.run({ "bash", "-c", 'ulimit -n 64 && exec "$0" "$@"', H.lua, f, url("/") },
      { timeout = 60 }))
    os.remove(f)
    assert.are.equal(0, r.code, r.stderr)
    local held, res, err = r.stdout:match("^(%d+)|(.-)|(.*)$")
    assert.is_true(tonumber(held) > 10, r.stdout) -- it did run out
    assert.are.equal("nil", res)
    assert.are.equal("drover.http.get: GET " .. url("/") .. " failed: cannot open a socket: too many open files", err)
  end)

  it("returns nil, message on DNS failure", function()
    local r, err = http.request { url = "http://nonexistent.invalid/" }
    assert.is_nil(r)
    assert.matches("nonexistent.invalid", err, 1, true)
    assert.matches("resolve", err, 1, true)
  end)

  it("returns nil, message on TLS failure", function()
    -- the server speaks plain HTTP: the handshake cannot succeed
    for _, insecure in ipairs({ false, true }) do
      local r, err = http.get("https://127.0.0.1:" .. server.port .. "/", { insecure = insecure, timeout = 20 })
      assert.is_nil(r)
      assert.matches("https://127.0.0.1:" .. server.port .. "/", err, 1, true)
      assert.matches("SSL", err, 1, true)
    end
  end)

  it("refuses protocols other than http and https", function()
    local r, err = http.get("file:///etc/passwd")
    assert.is_nil(r)
    assert.matches("file:///etc/passwd failed", err, 1, true)
  end)

  it("keeps user:password out of messages", function()
    local r, err = http.get("http://user:hunter2@127.0.0.1:1/", { headers = { Authorization = "Bearer tok3n" } })
    assert.is_nil(r)
    assert.is_nil(err:find("hunter2", 1, true))
    assert.is_nil(err:find("tok3n", 1, true))
    assert.matches("http://***@127.0.0.1:1/", err, 1, true)
  end)

  it("talks over a unix socket", function()
    local r = assert(http.get("http://localhost/echo", { unix_socket = server.sock }))
    assert.are.equal(200, r.status)
    assert.are.equal("/echo", r.json.path)
    local _, err = http.get("http://localhost/", { unix_socket = server.dir .. "/nope.sock" })
    assert.matches("Couldn't connect", err, 1, true)
  end)

  it("streams with on_chunk, without keeping the body", function()
    local chunks = {}
    local r = assert(http.get(url("/stream?n=4&ms=20"), {
      on_chunk = function(data) chunks[#chunks + 1] = data end,
    }))
    assert.are.equal(200, r.status)
    assert.are.equal("", r.body)
    assert.are.equal("chunk 0\nchunk 1\nchunk 2\nchunk 3\n", table.concat(chunks))
    -- data arrives while the response is still going: the second chunk of
    -- this stream comes a minute after the first, yet on_chunk sees the
    -- first one at once (and stops the transfer) -- well before the timeout
    local first
    local r2, err = http.get(url("/stream?n=2&ms=60000"), {
      timeout = 30,
      on_chunk = function(data) first = data; error("seen enough") end,
    })
    assert.is_nil(r2)
    assert.matches("on_chunk: .*seen enough", err)
    assert.are.equal("chunk 0\n", first)
    -- and inside a task
    local n = drover.run(function()
      local got = {}
      assert(http.get(url("/bytes?n=300000"), { on_chunk = function(d) got[#got + 1] = #d end }))
      local total = 0
      for _, k in ipairs(got) do total = total + k end
      return total
    end)
    assert.are.equal(300000, n)
  end)

  it("aborts the transfer when on_chunk raises", function()
    local r, err = http.get(url("/stream?n=50&ms=20"), { on_chunk = function() error("boom in chunk") end })
    assert.is_nil(r)
    assert.matches("on_chunk: .*boom in chunk", err)
    assert.matches(url("/stream?n=50&ms=20"), err, 1, true)
    r, err = http.get(url("/stream?n=3"), { on_chunk = function() error({}) end })
    assert.is_nil(r)
    assert.matches("error object is a table value", err, 1, true)
    -- the server sees the connection go (the stream had 50 chunks to go)
    assert.are.equal(200, assert(http.get(url("/"))).status)
  end)

  it("does not let on_chunk wait or start requests", function()
    local r, err = http.get(url("/stream?n=2"), { on_chunk = function() drover.sleep(0.01) end })
    assert.is_nil(r)
    assert.matches("cannot wait", err, 1, true)
    r, err = drover.run(function()
      return http.get(url("/stream?n=2"), { on_chunk = function() http.get(url("/")) end })
    end)
    assert.is_nil(r)
    assert.matches("cannot start a request from inside on_chunk", err, 1, true)
  end)

  it("runs 100 requests at once from 10 tasks", function()
    -- /barrier?n=100 answers nobody until 100 requests are waiting in it:
    -- this only finishes if all 100 are really in flight together.
    local results = drover.run(function()
      local tasks = {}
      for i = 1, 10 do
        tasks[i] = drover.spawn(function()
          local subs = {}
          for j = 1, 10 do
            subs[j] = drover.spawn(function()
              local r = assert(http.get(url("/barrier?n=100"), { timeout = 60 }))
              return r.json.released
            end)
          end
          local n = 0
          for j = 1, 10 do if subs[j]:join() then n = n + 1 end end
          return n
        end)
      end
      local total = 0
      for i = 1, 10 do total = total + tasks[i]:join() end
      return total
    end)
    assert.are.equal(100, results)
    H.wait_until(function() return open_requests() == 0 end, 30, "the server to settle")
  end)

  it("reuses connections (fresh engine: sequential requests share one)", function()
    local code, out = run_script(H.lua, [[
      local http = require "drover.http"
      local ids = {}
      for i = 1, 5 do ids[i] = string.format("%d", assert(http.get(arg[1] .. "/conn")).json.conn) end
      print(table.concat(ids, " "))
    ]], server.base)
    assert.are.equal(0, code, out)
    local first = out:match("^(%d+)")
    assert.is_truthy(first, out)
    assert.are.equal((first .. " "):rep(5):sub(1, -2) .. "\n", out)
    -- in this process too: two back-to-back requests, same connection
    local a = assert(http.get(url("/conn"))).json.conn
    local b = assert(http.get(url("/conn"))).json.conn
    local c = assert(http.get(url("/conn"))).json.conn
    assert.is_true(a == b or b == c)
  end)

  it("moves large bodies both ways (10 MB)", function()
    local n = 10 * 1024 * 1024
    local r = assert(http.get(url("/bytes?n=" .. n)))
    assert.are.equal(n, #r.body)
    assert.are.equal("abcdefghij", r.body:sub(1, 10))
    assert.are.equal(string.char(97 + (n - 1) % 26), r.body:sub(n, n))
    assert.are.equal(string.char(97 + 5000000 % 26), r.body:sub(5000001, 5000001))
    local up = string.rep("0123456789", n // 10)
    local e = assert(http.post(url("/echo?omit_body=1"), up))
    assert.are.equal(#up, e.json.body_length)
    -- bodies are bytes: NULs go through
    e = assert(http.post(url("/echo"), "a\0b\0"))
    assert.are.equal(4, e.json.body_length)
    assert.are.equal("a\0b\0", e.json.body)
  end)

  it("cancelling a waiting task aborts its request", function()
    H.wait_until(function() return open_requests() == 0 end, 30, "no delayed requests")
    drover.run(function()
      local t = drover.spawn(function() return http.get(url("/delay?ms=120000")) end)
      H.wait_until(function() return open_requests() == 1 end, 30, "the request to reach the server")
      assert.is_true(t:cancel())
      local ok, err = t:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
      -- the connection was closed: the server forgets the request
      H.wait_until(function() return open_requests() == 0 end, 30, "the server to see the cancel")
    end)
    assert.are.equal(200, assert(http.get(url("/"))).status)
  end)

  it("survives on_chunk cancelling its own task", function()
    drover.run(function()
      local me
      me = drover.spawn(function()
        return http.get(url("/stream?n=100&ms=10"), { on_chunk = function() me:cancel() end })
      end)
      local ok, err = me:wait()
      assert.is_false(ok)
      assert.are.equal("cancelled", err)
    end)
    assert.are.equal(200, assert(http.get(url("/"))).status)
  end)

  it("rejects bad arguments with a clear error", function()
    local cases = {
      { function() http.request() end, "drover.http.request: bad argument 'opts' (table expected, got nil)" },
      { function() http.request("http://x") end, "bad argument 'opts' (table expected, got string)" },
      { function() http.request {} end, "bad option 'url' (string expected, got nil)" },
      { function() http.request { url = 5 } end, "bad option 'url' (string expected, got number)" },
      { function() http.request { url = url("/"), method = 1 } end, "bad option 'method' (string expected" },
      { function() http.request { url = url("/"), method = "GE T" } end, "bad option 'method'" },
      { function() http.request { url = url("/"), headers = "x" } end, "bad option 'headers' (table expected, got string)" },
      { function() http.request { url = url("/"), headers = { "x" } } end, "keys must be header names" },
      { function() http.request { url = url("/"), headers = { X = true } } end, "bad header 'X' (string expected, got boolean)" },
      { function() http.request { url = url("/"), headers = { X = "a\r\nEvil: 1" } } end, "must not contain CR, LF" },
      { function() http.request { url = url("/"), headers = { ["Bad Name"] = "v" } } end, "bad header name 'Bad Name'" },
      { function() http.request { url = url("/"), body = {} } end, "bad option 'body' (string expected, got table)" },
      { function() http.request { url = url("/"), timeout = "1" } end, "bad option 'timeout' (number expected, got string)" },
      { function() http.request { url = url("/"), timeout = -1 } end, "bad option 'timeout' (seconds" },
      { function() http.request { url = url("/") .. "\0x" } end, "bad option 'url' (contains a NUL byte)" },
      { function() http.request { url = url("/"), on_chunk = 1 } end, "bad option 'on_chunk' (function expected, got number)" },
      { function() http.request { url = url("/"), insecure = "yes" } end, "bad option 'insecure' (boolean expected, got string)" },
      { function() http.request { url = url("/"), unix_socket = 1 } end, "bad option 'unix_socket' (string expected" },
      { function() http.request { url = url("/"), json = function() end } end, "bad option 'json' (cannot encode" },
      { function() http.request { url = url("/"), json = {}, body = "x" } end, "'body' and 'json' cannot be used together" },
      { function() http.request { url = url("/"), header = {} } end, "unknown option 'header'" },
      { function() http.get() end, "drover.http.get: bad argument 'url' (string expected, got nil)" },
      { function() http.get(url("/"), "x") end, "drover.http.get: bad argument 'opts' (table expected, got string)" },
      { function() http.get(url("/"), { body = "x" }) end, "takes no body" },
      { function() http.get(url("/"), { url = "x" }) end, "option 'url' is given by the call itself" },
      { function() http.post(url("/"), 5) end, "drover.http.post: bad argument 'body_or_opts' (string or table expected, got number)" },
      { function() http.put(url("/"), { bogus = 1 }) end, "drover.http.put: unknown option 'bogus'" },
    }
    for _, c in ipairs(cases) do
      local ok, err = pcall(c[1])
      assert.is_false(ok, c[2])
      assert.matches(c[2], tostring(err), 1, true)
    end
    -- the error points at the caller's line
    local ok, err = pcall(function() http.get(nil) end)
    assert.is_false(ok)
    assert.matches("http_spec.lua:%d+: drover.http.get", err)
    -- nothing broke
    assert.are.equal(200, assert(http.get(url("/"))).status)
  end)

  it("works in the drover binary (the script is a task)", function()
    local code, out = run_script(H.drover_bin, [[
      local drover = require "drover"
      local base = arg[1]
      local r = assert(drover.http.get(base .. "/json"))
      local hs = {}
      for i = 1, 20 do hs[i] = drover.spawn(drover.http.get, base .. "/delay?ms=50") end
      local ok = 0
      for i = 1, 20 do if hs[i]:join().status == 200 then ok = ok + 1 end end
      print(r.json.name, ok)
    ]], server.base)
    assert.are.equal(0, code, out)
    assert.are.equal("drover\t20\n", out)
  end)

  it("wakes a plain-script wait that curl finishes from its timer", function()
    -- curl fails an unsupported URL (and often finishes a transfer on a
    -- reused connection) in its timeout handling, i.e. in libuv's timers
    -- phase; the poll phase after it must not block while another fd (here
    -- a child's pipe) is watched.  A hang shows up as the timeout's 124.
    local code, out = run_script(H.lua, [[
      local drover = require "drover"
      local p = assert(drover.proc.spawn({ "sleep", "60" }, { stdout = function() end }))
      for i = 1, 20 do
        assert(not drover.http.get("file:///nonexistent"))
        assert(drover.http.get(arg[1] .. "/").status == 200)
      end
      p:kill()
      print("ok")
    ]], server.base)
    assert.are.equal(0, code, out)
    assert.are.equal("ok\n", out)
  end)

  it("closes cleanly with requests still in flight", function()
    local code, out = run_script(H.lua, [[
      local drover = require "drover"
      local base = arg[1]
      for i = 1, 5 do
        drover.spawn(function() drover.http.get(base .. "/delay?ms=60000") end)
      end
      drover.spawn(function() drover.http.get(base .. "/stream?n=1000&ms=10", { on_chunk = function() end }) end)
      drover.sleep(0.3)   -- runs the loop: the requests are on the wire
      print("leaving")
    ]], server.base)
    assert.are.equal(0, code, out)
    assert.are.equal("leaving\n", out)
    H.wait_until(function() return open_requests() == 0 end, 30, "the server to see the connections close")
  end)
end)
