-- drover.server against real HTTP clients: the curl command line (through
-- drover.proc, so the loop keeps serving while curl runs) and drover.http.
local drover = require "drover"
local server = require "drover.server"
local http = require "drover.http"
local proc = require "drover.proc"
local json = require "drover.json"
local H = require "helper"

-- Children run without the sanitizer run's LD_PRELOAD: curl under a
-- preloaded libasan deadlocks in setlocale() at start-up.
local child_env = { LD_PRELOAD = "" }

-- curl with args; returns code, stdout, stderr.  Waits without blocking the
-- loop, so it works against a server in this very process.
local function curl(args)
  local argv = { "curl", "-sS", "--max-time", "60" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = assert(proc.run(argv, { env = child_env, timeout = 90 }))
  return r.code, r.stdout, r.stderr
end

-- curl in the background; stdout chunks go to on_out.
local function curl_bg(args, on_out)
  local argv = { "curl", "-s", "--max-time", "120" }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  return assert(proc.spawn(argv, { env = child_env, stdout = on_out or "null" }))
end

-- A handler that reports what it saw as JSON.
local function echo(req)
  return server.json(200, {
    method = req.method, path = req.path, query = req.query, args = req.args,
    target = req.target, headers = req.headers, body = req.body,
    remote_addr = req.remote_addr, remote_port = req.remote_port, version = req.version,
  })
end

-- Servers and handler tasks of the running test, so that a failing test
-- does not leave tasks behind that keep drover.run (and the suite) waiting.
local live = { servers = {}, tasks = {}, cleanups = {} }

local function listen(handler, opts)
  local o = {
    handler = function(req, res)
      live.tasks[#live.tasks + 1] = drover.current()
      return handler(req, res)
    end,
  }
  for k, v in pairs(opts or {}) do
    if k ~= "handler" then o[k] = v end
  end
  local srv = assert(server.listen(o))
  live.servers[#live.servers + 1] = srv
  return srv
end

-- drover.run(fn) that, when fn fails, runs the registered cleanups, closes
-- the test's servers and cancels its handler tasks before raising.
local function run(fn)
  live = { servers = {}, tasks = {}, cleanups = {} }
  local function on_fail(f) live.cleanups[#live.cleanups + 1] = f end
  drover.run(function()
    local ok, err = xpcall(fn, debug.traceback, on_fail)
    if not ok then
      for i = #live.cleanups, 1, -1 do pcall(live.cleanups[i]) end
      for _, s in ipairs(live.servers) do s:close() end
      for _, t in ipairs(live.tasks) do t:cancel() end
      error(err, 0)
    end
  end)
end

describe("drover.server", function()
  local tmp
  setup(function() tmp = H.tempdir() end)
  teardown(function() os.execute("rm -rf '" .. tmp .. "'") end)

  it("listens on a port of the system's choosing, on loopback by default", function()
    local srv = listen(echo, { port = 0 })
    assert.is_true(math.type(srv.port) == "integer" and srv.port > 0)
    assert.are.equal("127.0.0.1", srv.host)
    assert.are.equal("http://127.0.0.1:" .. srv.port, srv.url)
    assert.is_false(srv.closed)
    -- plain script mode: the request runs the loop until it is answered
    local r = assert(http.get(srv.url .. "/hi"))
    assert.are.equal(200, r.status)
    assert.are.equal("/hi", r.json.path)
    assert.are.equal("127.0.0.1", r.json.remote_addr)
    assert.is_true(r.json.remote_port > 0)
    assert.is_true(srv:close())
    assert.is_true(srv.closed)
    assert.is_false(srv:close())
  end)

  it("decodes the method, path, query args, headers and body (curl)", function()
    run(function(on_fail)
      local srv = listen(echo)
      local code, out = curl({ "-H", "X-Custom: Value 1", "-H", "Cookie: a=1", "-H", "Cookie: b=2",
        srv.url .. "/a/b%20c?x=1&y=hello+world&z=%2F&x=2&flag" })
      assert.are.equal(0, code)
      local j = assert(json.decode(out))
      assert.are.equal("GET", j.method)
      assert.are.equal("/a/b c", j.path)
      assert.are.equal("x=1&y=hello+world&z=%2F&x=2&flag", j.query)
      assert.are.equal("/a/b%20c?x=1&y=hello+world&z=%2F&x=2&flag", j.target)
      assert.are.same({ "1", "2" }, j.args.x)
      assert.are.equal("hello world", j.args.y)
      assert.are.equal("/", j.args.z)
      assert.are.equal(true, j.args.flag)
      assert.are.equal("Value 1", j.headers["x-custom"])
      assert.are.equal("a=1; b=2", j.headers.cookie)
      assert.are.equal("127.0.0.1:" .. srv.port, j.headers.host)
      assert.are.equal("", j.body)
      assert.are.equal("HTTP/1.1", j.version)

      local f = tmp .. "/put-body"
      local fh = assert(io.open(f, "wb")); fh:write("line1\nline2\0binary"); fh:close()
      code, out = curl({ "-X", "PUT", "--data-binary", "@" .. f, srv.url .. "/put" })
      assert.are.equal(0, code)
      j = assert(json.decode(out))
      assert.are.equal("PUT", j.method)
      assert.are.equal("line1\nline2\0binary", j.body)
      assert.are.equal("18", j.headers["content-length"])
      srv:close()
    end)
  end)

  it("takes POST bodies, large and chunked ones too", function()
    run(function(on_fail)
      local srv = listen(function(req) return 201, { ["x-len"] = #req.body }, req.body:sub(1, 10) .. "|" .. req.method end)
      local big = ("0123456789"):rep(300000) -- 3 MB
      local r = assert(http.post(srv.url .. "/up", big))
      assert.are.equal(201, r.status)
      assert.are.equal(tostring(#big), r.headers["x-len"])
      assert.are.equal("0123456789|POST", r.body)
      -- chunked upload
      local f = tmp .. "/body"
      local fh = assert(io.open(f, "wb")); fh:write("chunked body!"); fh:close()
      local code, out = curl({ "-H", "Transfer-Encoding: chunked", "--data-binary", "@" .. f,
        "-w", " %{http_code}", srv.url .. "/c" })
      assert.are.equal(0, code)
      assert.are.equal("chunked bo|POST 201", out)
      srv:close()
    end)
  end)

  it("sends response headers, repeated ones too, and a content-length", function()
    run(function(on_fail)
      local srv = listen(function(req)
        if req.path == "/head" then return 200, { ["X-One"] = "1" }, "twelve bytes" end
        if req.path == "/empty" then return end
        if req.path == "/short" then return 404, "nope\n" end
        if req.path == "/body" then return "just a body" end
        return 200, { ["X-Multi"] = { "a", "b" }, ["content-type"] = "application/x-test", ["x-num"] = 42 }, "hello"
      end)
      local code, out = curl({ "-i", srv.url .. "/" })
      assert.are.equal(0, code)
      assert.matches("^HTTP/1.1 200 OK\r\n", out)
      assert.matches("\r\nx%-multi: a\r\n", out)
      assert.matches("\r\nx%-multi: b\r\n", out)
      assert.matches("\r\nx%-num: 42\r\n", out)
      assert.matches("\r\ncontent%-type: application/x%-test\r\n", out)
      assert.matches("\r\n[Cc]ontent%-[Ll]ength: 5\r\n", out)
      assert.matches("\r\n\r\nhello$", out)
      -- HEAD: the length of the body, no body
      code, out = curl({ "-I", srv.url .. "/head" })
      assert.are.equal(0, code)
      assert.matches("\r\n[Cc]ontent%-[Ll]ength: 12\r\n", out)
      assert.matches("\r\nx%-one: 1\r\n", out)
      assert.matches("\r\n\r\n$", out)
      local r = assert(http.get(srv.url .. "/empty"))
      assert.are.equal(204, r.status)
      assert.are.equal("", r.body)
      r = assert(http.get(srv.url .. "/short"))
      assert.are.equal(404, r.status)
      assert.are.equal("nope\n", r.body)
      assert.are.equal("text/plain; charset=utf-8", r.headers["content-type"])
      r = assert(http.get(srv.url .. "/body"))
      assert.are.equal(200, r.status)
      assert.are.equal("just a body", r.body)
      srv:close()
    end)
  end)

  it("keeps connections alive between requests", function()
    run(function(on_fail)
      local srv = listen(function(req) return "r" .. req.path end)
      local code, out, err = curl({ "-v", srv.url .. "/1", srv.url .. "/2" })
      assert.are.equal(0, code)
      assert.are.equal("r/1r/2", out)
      assert.matches("Re%-using existing connection", err)
      assert.are.equal(2, srv:stats().requests)
      srv:close()
    end)
  end)

  it("serves 100 concurrent requests, at most 50 in flight from curl", function()
    run(function(on_fail)
      local inflight, max_inflight = 0, 0
      local srv = listen(function(req)
        inflight = inflight + 1
        if inflight > max_inflight then max_inflight = inflight end
        drover.sleep(0.2)
        inflight = inflight - 1
        return "n=" .. req.args.n .. "\n"
      end)
      local argv = { "--parallel", "--parallel-max", "50" }
      for i = 1, 100 do argv[#argv + 1] = srv.url .. "/?n=" .. i end
      local code, out = curl(argv)
      assert.are.equal(0, code)
      local seen = {}
      for n in out:gmatch("n=(%d+)\n") do seen[tonumber(n)] = true end
      for i = 1, 100 do assert(seen[i], "missing response " .. i) end
      -- each handler sleeps 0.2 s: only concurrency explains 100 in time,
      -- and the handlers did overlap
      assert.is_true(max_inflight >= 10, "max in flight " .. max_inflight)
      assert.are.equal(100, srv:stats().requests)
      srv:close()
    end)
  end)

  it("serves other requests while a handler waits", function()
    run(function(on_fail)
      local release = drover.event()
      local slow_started = false
      local srv = listen(function(req)
        if req.path == "/slow" then
          slow_started = true
          release:wait()
          return "slow done"
        end
        return "fast"
      end)
      local slow = drover.spawn(function() return assert(http.get(srv.url .. "/slow")).body end)
      H.wait_until(function() return slow_started end, 30, "the slow handler to start")
      for _ = 1, 3 do
        assert.are.equal("fast", assert(http.get(srv.url .. "/fast")).body)
      end
      assert.are.equal("waiting", slow:status())
      release:set()
      assert.are.equal("slow done", slow:join())
      srv:close()
    end)
  end)

  it("streams a chunked body with res:write, chunk by chunk", function()
    run(function(on_fail)
      local got = ""
      local srv = listen(function(req, res)
        assert(res:start(200, { ["content-type"] = "text/plain" }))
        for i = 1, 3 do
          assert(res:write("part " .. i .. "\n"))
          -- the next chunk only after the client has this one: a server
          -- that buffered the body would never get here
          H.wait_until(function() return got:find("part " .. i, 1, true) end, 30, "chunk " .. i)
        end
        assert(res:finish("end\n"))
      end)
      local r = assert(http.get(srv.url .. "/s", { on_chunk = function(c) got = got .. c end }))
      assert.are.equal(200, r.status)
      assert.are.equal("chunked", r.headers["transfer-encoding"])
      assert.are.equal("part 1\npart 2\npart 3\nend\n", got)
      srv:close()
    end)
  end)

  it("serves server-sent events to curl -N", function()
    run(function(on_fail)
      local srv = listen(function(req, res)
        res:start(200, { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" })
        for i = 1, 3 do
          res:write(server.sse { event = "tick", id = i, data = "n=" .. i .. "\nline 2" })
          drover.sleep(0.02)
        end
        -- returning without res:finish() finishes the stream
      end)
      local code, out = curl({ "-N", "-i", srv.url .. "/events" })
      assert.are.equal(0, code)
      assert.matches("\r\ncontent%-type: text/event%-stream\r\n", out)
      assert.matches("\r\n[Tt]ransfer%-[Ee]ncoding: chunked\r\n", out)
      local body = out:match("\r\n\r\n(.*)$")
      assert.are.equal("event: tick\nid: 1\ndata: n=1\ndata: line 2\n\n" ..
                       "event: tick\nid: 2\ndata: n=2\ndata: line 2\n\n" ..
                       "event: tick\nid: 3\ndata: n=3\ndata: line 2\n\n", body)
      srv:close()
    end)
  end)

  it("tells a streaming handler that the client disconnected: write returns nil, 'closed'", function()
    run(function(on_fail)
      local writes, result, closed_flag = 0, nil, nil
      local srv = listen(function(req, res)
        res:start(200)
        -- no other waits: the handler is always in (or between) writes
        while true do
          local ok, err = res:write(("x"):rep(16384))
          if not ok then result = err; closed_flag = res.closed; return end
          writes = writes + 1
        end
      end)
      -- curl reads a while and then is killed
      local got = 0
      local p = curl_bg({ "-N", srv.url .. "/forever" }, function(c) got = got + #c end)
      on_fail(function() p:kill("KILL") end)
      H.wait_until(function() return got > 100000 end, 30, "curl to receive chunks")
      p:kill("KILL")
      p:wait()
      H.wait_until(function() return result ~= nil end, 30, "the handler to see the client go")
      assert.are.equal("closed", result)
      assert.is_true(closed_flag)
      assert.is_true(writes >= 5)
      H.wait_until(function() return srv:stats().active == 0 end, 30, "the request to be released")
      srv:close()
    end)
  end)

  it("makes res:write wait for a slow client (backpressure)", function()
    run(function(on_fail)
      local writes, finished = 0, false
      local chunk = ("y"):rep(1024 * 1024)
      local srv = listen(function(req, res)
        res:start(200)
        for _ = 1, 100 do
          if not res:write(chunk) then return end
          writes = writes + 1
        end
        finished = true
      end)
      local got = 0
      local p = curl_bg({ "-N", "--limit-rate", "1M", srv.url .. "/big" }, function(c) got = got + #c end)
      on_fail(function() p:kill("KILL") end)
      H.wait_until(function() return got >= 2 * 1024 * 1024 end, 60, "curl to receive 2 MB")
      -- 100 MB are waiting to go: without backpressure every write would
      -- have returned long ago; with it the handler is at most the socket
      -- buffers ahead of the client
      assert.is_false(finished)
      assert.is_true(writes < 40, "writes: " .. writes)
      p:kill("KILL")
      p:wait()
      H.wait_until(function() return srv:stats().active == 0 end, 30, "the request to be released")
      srv:close()
    end)
  end)

  it("cancels an event stream that waits for news when its client goes", function()
    run(function(on_fail)
      local never = drover.event()
      local started, outcome = false, nil
      local srv = listen(function(req, res)
        res:start(200, { ["content-type"] = "text/event-stream" })
        res:write(server.sse { data = "hello" })
        started = true
        local ok, err = pcall(never.wait, never) -- no news, ever
        outcome = ok and "woke" or err
      end)
      local out = ""
      local p = curl_bg({ "-N", srv.url .. "/events" }, function(c) out = out .. c end)
      on_fail(function() p:kill("KILL") end)
      H.wait_until(function() return started and out == "data: hello\n\n" end, 30, "the first event")
      p:kill("KILL")
      p:wait()
      H.wait_until(function() return outcome ~= nil end, 30, "the handler task to be cancelled")
      assert.are.equal("cancelled", outcome)
      H.wait_until(function() return srv:stats().active == 0 end, 30, "the request to be released")
      srv:close()
    end)
  end)

  it("cancels the task of a handler that never answers when its client goes", function()
    run(function(on_fail)
      local started, outcome = false, nil
      local srv = listen(function(req, res)
        started = true
        local ok, err = pcall(drover.sleep, 3600)
        outcome = ok and "woke" or err
        error(err, 0) -- cancelled: nothing more to do
      end)
      local p = curl_bg({ srv.url .. "/hang" })
      on_fail(function() p:kill("KILL") end)
      H.wait_until(function() return started end, 30, "the handler to start")
      assert.are.equal(1, srv:stats().active)
      p:kill("KILL")
      p:wait()
      H.wait_until(function() return outcome ~= nil end, 30, "the handler task to be cancelled")
      assert.are.equal("cancelled", outcome)
      H.wait_until(function() return srv:stats().active == 0 and srv:stats().connections == 0 end, 30,
        "the connection to be released")
      srv:close()
    end)
  end)

  it("answers 500 when a handler raises, reports it, and keeps serving", function()
    run(function(on_fail)
      local reported = {}
      local srv = listen(function(req)
        if req.path == "/boom" then error("secret detail") end
        if req.path == "/badret" then return {} end
        if req.path == "/badheader" then return 200, { ["bad name"] = "x" }, "" end
        return "fine"
      end, {
        on_error = function(err, trace)
          reported[#reported + 1] = { err = err, trace = trace }
        end,
      })
      local r = assert(http.get(srv.url .. "/boom"))
      assert.are.equal(500, r.status)
      assert.is_nil(r.body:find("secret", 1, true))
      assert.is_nil(r.body:find("traceback", 1, true))
      assert.are.equal("fine", assert(http.get(srv.url .. "/ok")).body)
      r = assert(http.get(srv.url .. "/badret"))
      assert.are.equal(500, r.status)
      r = assert(http.get(srv.url .. "/badheader"))
      assert.are.equal(500, r.status)
      assert.are.equal("fine", assert(http.get(srv.url .. "/ok")).body)
      H.wait_until(function() return #reported == 3 end, 30, "three reports")
      assert.matches("secret detail", reported[1].err)
      assert.matches("stack traceback", reported[1].trace)
      assert.matches("handler returned a table", reported[2].err)
      assert.matches("not a valid header name", reported[3].err)
      srv:close()
    end)
  end)

  it("aborts a stream whose handler fails midway", function()
    run(function(on_fail)
      local srv = listen(function(req, res)
        res:start(200)
        res:write("first\n")
        error("midway")
      end, { on_error = function() end })
      local got = ""
      local r, err = http.get(srv.url .. "/", { on_chunk = function(c) got = got .. c end })
      -- the body ends without its last chunk: the client sees an error
      assert.is_nil(r)
      assert.is_string(err)
      assert.are.equal("first\n", got)
      srv:close()
    end)
  end)

  it("lets a handler respond early and keep working", function()
    run(function(on_fail)
      local outcome
      local srv = listen(function(req, res)
        assert(res:respond(202, { ["x-early"] = "yes" }, "accepted"))
        assert.is_true(res.finished)
        -- not cancelled: the response was complete
        local ok, err = pcall(drover.sleep, 0.3)
        outcome = ok and "slept" or err
      end)
      local r = assert(http.get(srv.url .. "/"))
      assert.are.equal(202, r.status)
      assert.are.equal("yes", r.headers["x-early"])
      assert.are.equal("accepted", r.body)
      H.wait_until(function() return outcome end, 30, "the handler to finish")
      assert.are.equal("slept", outcome)
      srv:close()
    end)
  end)

  it("rejects bodies larger than max_body with 413", function()
    run(function(on_fail)
      local calls = 0
      local srv = listen(function() calls = calls + 1; return "ok" end, { max_body = 1000 })
      local r = assert(http.post(srv.url .. "/", ("x"):rep(2000)))
      assert.are.equal(413, r.status)
      assert.are.equal(0, calls)
      r = assert(http.post(srv.url .. "/", ("x"):rep(500)))
      assert.are.equal(200, r.status)
      srv:close()
    end)
  end)

  -- issue 12, item 5: H2O reads a whole body before the handler runs, so a
  -- server could refuse a body only after buffering it.  check_head
  -- decides from the head: a refused body is never read into memory.
  it("check_head refuses a request from its head, before its body is read", function()
    run(function()
      local calls, heads = 0, {}
      local srv = listen(function(req) calls = calls + 1; return "took " .. #req.body end, {
        check_head = function(head)
          heads[#heads + 1] = head
          if head.headers["x-key"] ~= "k" then
            return 401, { ["content-type"] = "text/plain", ["www-authenticate"] = "Key" }, "no key\n"
          end
        end })
      -- 8 MiB that the client offers without waiting for 100-continue
      local f = tmp .. "/big-body"
      local fh = assert(io.open(f, "wb")); fh:write(("y"):rep(8 * 1024 * 1024)); fh:close()
      local code, out, err = curl({ "-H", "Expect:", "-H", "Content-Type: text/plain", "--data-binary", "@" .. f,
        "-o", "/dev/null", "-w", "%{http_code} %{size_upload}", srv.url .. "/up?x=1" })
      local status, sent = out:match("^(%d+) (%d+)")
      assert.are.equal("401", status, tostring(code) .. " " .. out .. " " .. err)
      assert.is_true(tonumber(sent) < 8 * 1024 * 1024, "curl sent the whole body: " .. out)
      assert.are.equal(0, calls)
      local h = heads[1]
      assert.are.equal("POST", h.method)
      assert.are.equal("/up", h.path)
      assert.are.equal("x=1", h.query)
      assert.are.equal("1", h.args.x)
      assert.are.equal("8388608", h.headers["content-length"])
      assert.are.equal("127.0.0.1:" .. srv.port, h.headers.host)
      assert.is_nil(h.body)
      -- the answer as check_head gave it
      code, out = curl({ "-i", "-H", "Content-Type: text/plain", "--data-binary", "abc", srv.url .. "/up" })
      assert.are.equal(0, code)
      assert.matches("^HTTP/1.1 401 Unauthorized\r\n", out)
      assert.matches("\r\nwww%-authenticate: Key\r\n", out)
      assert.matches("\r\n\r\nno key\n$", out)
      -- let through: the handler gets the whole body; requests without a
      -- body are the handler's to judge and are not asked about
      local n = #heads
      code, out = curl({ "-H", "X-Key: k", "--data-binary", "@" .. f, srv.url .. "/up" })
      assert.are.equal("took 8388608", out, code)
      code, out = curl({ srv.url .. "/plain" })
      assert.are.equal("took 0", out, code)
      assert.are.equal(n + 1, #heads)
      -- keep-alive: the second request on a connection is asked about too
      code, out = curl({ "-H", "X-Key: k", "--data-binary", "a", srv.url .. "/one", "--next",
        "--data-binary", "b", "-o", "/dev/null", "-w", "%{http_code}", srv.url .. "/two" })
      assert.are.equal("took 1401", out, code)
      -- a head after an empty line, sent a few bytes at a time, is asked about too
      local r = assert(proc.run({ "python3", "-c", [[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
head = b"\r\nPOST /slow HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\nContent-Length: 9000000\r\n\r\n"
for i in range(0, len(head), 7):
    s.sendall(head[i:i + 7]); time.sleep(0.005)
print(s.recv(100).split(b"\r\n")[0].decode())
]], tostring(srv.port) }, { env = child_env, timeout = 60 }))
      assert.are.equal("HTTP/1.1 401 Unauthorized\n", r.stdout, r.stderr)
      assert.are.equal("/slow", heads[#heads].path)
      assert.are.equal(3, calls) -- the big body, /plain, /one; not /two
      srv:close()
    end)
  end)

  it("check_head: an error refuses with a 500; a bad return value is an error", function()
    run(function()
      local mode = "raise"
      local calls = 0
      local srv = listen(function() calls = calls + 1; return "ok" end, {
        check_head = function()
          if mode == "raise" then error("boom") end
          return "yes"
        end })
      for _, m in ipairs { "raise", "bad" } do
        mode = m
        local _, out = curl({ "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: text/plain",
          "--data-binary", "abc", srv.url .. "/" })
        assert.are.equal("500", out, m)
      end
      assert.are.equal(0, calls)
      srv:close()
    end)
  end)

  it("sends a body object's bytes as they are, from one object to many responses", function()
    run(function()
      local bytes = "a\0b" .. ("\255x"):rep(50000) -- binary, NUL and all
      local b = server.body(bytes)
      assert.are.equal(#bytes, #b)
      assert.are.equal(bytes, b:bytes())
      assert.are.equal("drover.server.body(" .. #bytes .. " bytes)", tostring(b))
      local srv = listen(function(req, res)
        if req.path == "/bare" then return b end
        if req.path == "/status" then return 201, b end
        if req.path == "/respond" then res:respond(202, { ["x-a"] = "1" }, b); return end
        return 200, { ["content-type"] = "application/octet-stream" }, b
      end)
      for path, want in pairs { ["/bare"] = 200, ["/status"] = 201, ["/respond"] = 202, ["/full"] = 200 } do
        local r = assert(http.get(srv.url .. path))
        assert.are.equal(want, r.status, path)
        assert.is_true(r.body == bytes, path .. ": the bytes differ")
        assert.are.equal(tostring(#bytes), r.headers["content-length"], path)
      end
      -- many responses at once share the object
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = drover.spawn(function() return assert(http.get(srv.url .. "/full")).body == bytes end)
      end
      for i = 1, 20 do assert.is_true(tasks[i]:join(), "response " .. i) end
      -- HEAD: the length, no bytes
      local code, out = curl({ "-sI", srv.url .. "/full" })
      assert.are.equal(0, code)
      assert.matches("\r\ncontent%-length: " .. #bytes .. "\r\n", out:lower())
      assert.are.equal(bytes, b:bytes()) -- sending consumed nothing
      srv:close()
    end)
  end)

  it("frees a body object once it is dropped and no response still writes it", function()
    run(function()
      collectgarbage(); collectgarbage()
      local base = server.body_stats()
      -- more than the kernel's socket buffers can take at once (send 4 MiB,
      -- receive up to 32 MiB here), so H2O is still writing it
      local size = 48 * 1024 * 1024
      local made, after_drop
      local srv = listen(function()
        local b = server.body(("z"):rep(size))
        made = server.body_stats()
        return b
      end)
      -- a slow reader: the response is still being written when the
      -- handler's object is long collected
      local out = {}
      local p = curl_bg({ "--limit-rate", "16M", "-o", "-", srv.url .. "/" }, function(c) out[#out + 1] = c end)
      H.wait_until(function() return made end, 60, "the handler to run")
      assert.are.equal(base.count + 1, made.count)
      assert.are.equal(base.bytes + size, made.bytes)
      collectgarbage(); collectgarbage()
      after_drop = server.body_stats()
      assert.are.equal(base.count + 1, after_drop.count, "freed while a response still writes it")
      assert.are.equal(0, p:wait(120).code)
      local got = table.concat(out)
      assert.are.equal(size, #got)
      assert.is_nil(got:find("[^z]"))
      -- the response is done and the object collected: the bytes are gone
      H.wait_until(function()
        collectgarbage()
        return server.body_stats().count == base.count
      end, 30, "the body to be freed")
      assert.are.equal(base.bytes, server.body_stats().bytes)
      -- dropped without ever being sent
      server.body("never sent") -- luacheck: ignore
      collectgarbage(); collectgarbage()
      assert.are.equal(base.count, server.body_stats().count)
      srv:close()
    end)
  end)

  it("fast answers a request outside any task, or hands it to the handler", function()
    run(function()
      local page = server.body('{"cached":true}')
      local fast_calls, handled, in_task, times = 0, 0, nil, {}
      local srv = listen(function(req)
        handled = handled + 1
        times.handler = req.time
        return "handler " .. req.path .. " " .. tostring(req.args.x)
      end, {
        fast = function(req)
          fast_calls = fast_calls + 1
          in_task = drover.current()
          times.fast = req.time
          if req.path == "/cached" and req.method == "GET" then
            return 200, { ["content-type"] = "application/json", ["x-from"] = "fast" }, page
          elseif req.path == "/string" then
            return "fast " .. req.args.x
          elseif req.path == "/raise" then
            error("fast boom")
          elseif req.path == "/wait" then
            drover.sleep(0.01) -- cannot wait here
          elseif req.path == "/bad" then
            return {}
          end
        end })
      local r = assert(http.get(srv.url .. "/cached"))
      assert.are.equal(200, r.status)
      assert.are.equal('{"cached":true}', r.body)
      assert.are.equal("fast", r.headers["x-from"])
      assert.is_nil(in_task)
      assert.are.equal(0, handled)
      assert.are.equal("fast 7", assert(http.get(srv.url .. "/string?x=7")).body)
      -- nothing said: the handler gets the request, args and all; req.time
      -- is when the server had it, on drover.now()'s clock
      local t0 = drover.now()
      r = assert(http.get(srv.url .. "/other?x=3"))
      local t1 = drover.now()
      assert.are.equal("handler /other 3", r.body)
      assert.are.equal(1, handled)
      assert.are.equal(times.fast, times.handler)
      assert.is_true(t0 <= times.handler and times.handler <= t1, ("%f <= %f <= %f"):format(t0, times.handler, t1))
      -- a POST with a body goes through fast too
      local code, out = curl({ "-H", "Content-Type: text/plain", "--data-binary", "abc", srv.url .. "/post" })
      assert.are.equal(0, code)
      assert.are.equal("handler /post nil", out)
      -- keep-alive over fast answers and handler answers alike
      code, out = curl({ srv.url .. "/cached", "--next", srv.url .. "/other?x=1", "--next", srv.url .. "/cached" })
      assert.are.equal('{"cached":true}handler /other 1{"cached":true}', out, code)
      -- an error, a wait, a value that is no answer: 500, and the handler never runs
      local before = handled
      for _, path in ipairs { "/raise", "/wait", "/bad" } do
        assert.are.equal(500, assert(http.get(srv.url .. path)).status, path)
      end
      assert.are.equal(before, handled)
      assert.are.equal(10, fast_calls)
      -- and the server goes on
      assert.are.equal(200, assert(http.get(srv.url .. "/cached")).status)
      srv:close()
    end)
    assert.matches("bad option 'fast' (function expected, got number)",
      select(2, pcall(server.listen, { handler = echo, fast = 1 })), 1, true)
    assert.matches("drover.server.body: bad argument 'bytes' (string expected, got number)",
      select(2, pcall(server.body, 5)), 1, true)
  end)

  it("asks fast about the requests of a pass of the loop together, once it has read them all", function()
    run(function(on_fail)
      local N = 4
      local asked, outs, clients = {}, {}, {}
      local srv
      -- the server's side of connections to the port with request bytes
      -- waiting in the kernel (not yet accepted, or not yet read)
      local function waiting_requests()
        local n, port = 0, ("%04X"):format(srv.port)
        for line in io.lines("/proc/net/tcp") do
          local lport, st, rx = line:match("^%s*%d+: %x+:(%x+) %x+:%x+ (%x+) %x+:(%x+)")
          if lport == port and st == "01" and tonumber(rx, 16) > 0 then n = n + 1 end
        end
        return n
      end
      srv = listen(function(req)
        -- /gate: N clients send /x while this handler holds the loop (it
        -- never waits), so that the next passes accept them all, then
        -- read them all
        assert.are.equal("/gate", req.path)
        for n = 1, N do
          outs[n] = {}
          clients[n] = curl_bg({ srv.url .. "/x" }, function(chunk) outs[n][#outs[n] + 1] = chunk end)
        end
        local deadline = os.time() + 60
        while waiting_requests() < N do
          assert(os.time() < deadline, "the clients' requests did not arrive in 60 s")
        end
        return "gate"
      end, { fast = function(req)
        if req.path == "/x" then
          asked[#asked + 1] = { time = req.time, at = drover.now() }
          return "fast"
        end
      end })
      on_fail(function() for _, c in ipairs(clients) do c:kill("KILL") end end)
      assert.are.equal("gate", assert(http.get(srv.url .. "/gate")).body)
      for n = 1, N do
        assert.are.equal(0, clients[n]:wait(60).code)
        assert.are.equal("fast", table.concat(outs[n]))
      end
      assert.are.equal(N, #asked)
      -- one batch: every request was in before the first was asked
      for n = 1, N do
        assert.is_true(asked[n].time < asked[1].at, ("request %d: req.time %f, first asked at %f"):format(
          n, asked[n].time, asked[1].at))
      end
      srv:close()
    end)
  end)

  it("caps its connections: one more gets a 503", function()
    run(function(on_fail)
      local srv = listen(function() return "ok" end, { max_connections = 2 })
      -- two idle keep-alive connections hold both places
      local held, said = {}, {}
      for i = 1, 2 do
        said[i] = ""
        held[i] = assert(proc.spawn({ "python3", "-c", [[
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
s.recv(1000)
sys.stdout.write("held\n"); sys.stdout.flush()
time.sleep(60)
]], tostring(srv.port) }, { env = child_env, stdout = function(chunk) said[i] = said[i] .. chunk end }))
        on_fail(function() drover.kill(held[i].pid, "KILL") end)
      end
      H.wait_until(function() return said[1] == "held\n" and said[2] == "held\n" end, 30, "two answered clients")
      H.wait_until(function() return srv:stats().connections == 2 end, 30, "two connections")
      local _, out = curl({ "-o", "-", "-w", " %{http_code}", srv.url .. "/" })
      assert.are.equal("too many connections: try again later\n 503", out)
      assert.are.equal(1, srv:stats().turned_away)
      for i = 1, 2 do drover.kill(held[i].pid, "KILL"); held[i]:wait(30) end
      H.wait_until(function() return srv:stats().connections == 0 end, 30, "the connections to close")
      _, out = curl({ srv.url .. "/" })
      assert.are.equal("ok", out)
      srv:close()
    end)
  end)

  it("listens on a unix socket", function()
    run(function(on_fail)
      local path = tmp .. "/srv.sock"
      local srv = listen(echo, { unix = path })
      assert.are.equal(path, srv.unix)
      assert.is_nil(srv.port)
      local code, out = curl({ "--unix-socket", path, "http://localhost/via-unix?a=1" })
      assert.are.equal(0, code)
      local j = assert(json.decode(out))
      assert.are.equal("/via-unix", j.path)
      assert.are.equal("unix:", j.remote_addr)
      local r = assert(http.get("http://localhost/x", { unix_socket = path }))
      assert.are.equal("/x", r.json.path)
      srv:close()
      assert.is_nil(io.open(path, "r"), "the socket file is removed on close")
      -- a stale socket file (nobody listening) does not block a new server
      -- (a server process that dies by SIGKILL leaves one behind)
      local stale = tmp .. "/stale.lua"
      local fh = assert(io.open(stale, "w"))
      fh:write([[
        local drover = require "drover"
        assert(drover.server.listen { unix = arg[1], handler = function() end })
        drover.kill(drover.pid(), "KILL")
      ]])
      fh:close()
      local k = assert(proc.run({ H.drover_bin, stale, path }))
      assert.are.equal(128 + 9, k.code)
      assert.is_not_nil(io.open(path, "r") or io.popen("test -S '" .. path .. "' && echo y"):read("l"))
      local srv2 = listen(echo, { unix = path })
      r = assert(http.get("http://localhost/again", { unix_socket = path }))
      assert.are.equal("/again", r.json.path)
      srv2:close()
    end)
  end)

  it("returns nil and a message naming the address when the port is taken", function()
    local srv = listen(echo)
    local s2, err = server.listen { handler = echo, port = srv.port }
    assert.is_nil(s2)
    assert.matches("127.0.0.1:" .. srv.port, err, 1, true)
    assert.matches("address already in use", err, 1, true)
    -- a unix socket a live server holds is not taken over
    local path = tmp .. "/busy.sock"
    local u = listen(echo, { unix = path })
    local u2, err2 = server.listen { handler = echo, unix = path }
    assert.is_nil(u2)
    assert.matches(path, err2, 1, true)
    u:close()
    srv:close()
  end)

  it("refuses connections after close", function()
    run(function(on_fail)
      local srv = listen(function() return "ok" end)
      local url = srv.url
      assert.are.equal("ok", assert(http.get(url .. "/")).body)
      srv:close()
      local code = curl({ url .. "/" })
      assert.are.equal(7, code) -- curl: failed to connect
      local r, msg = http.get(url .. "/")
      assert.is_nil(r)
      assert.is_string(msg)
    end)
  end)

  it("closes idle keep-alive connections on close, and lets busy ones finish", function()
    run(function(on_fail)
      local release = drover.event()
      on_fail(function() release:set() end)
      local srv = listen(function(req)
        if req.path == "/wait" then release:wait() end
        return "done " .. req.path
      end)
      local busy = drover.spawn(function() return assert(http.get(srv.url .. "/wait")) end)
      H.wait_until(function() return srv:stats().active == 1 end, 30, "the busy request")
      -- a second connection (the first is busy), idle in drover.http's pool
      assert.are.equal("done /idle", assert(http.get(srv.url .. "/idle")).body)
      assert.are.equal(2, srv:stats().connections)
      srv:close()
      assert.are.equal(1, srv:stats().connections) -- the idle one went at once
      release:set()
      local r = busy:join()
      assert.are.equal("done /wait", r.body)
      assert.are.equal("close", r.headers.connection)
      H.wait_until(function() return srv:stats().connections == 0 end, 30, "the last connection to close")
    end)
  end)

  it("checks its arguments", function()
    local function err_of(f, ...)
      local ok, e = pcall(f, ...)
      assert.is_false(ok)
      return tostring(e)
    end
    assert.matches("drover.server.listen: bad argument 'opts' (table expected, got nil)",
      err_of(server.listen), 1, true)
    assert.matches("bad option 'handler' (function expected, got nil)", err_of(server.listen, {}), 1, true)
    assert.matches("bad option 'on_error'", err_of(server.listen, { handler = echo, on_error = 1 }), 1, true)
    assert.matches("bad option 'port' (integer expected, got string)",
      err_of(server.listen, { handler = echo, port = "80" }), 1, true)
    assert.matches("bad option 'port'", err_of(server.listen, { handler = echo, port = 70000 }), 1, true)
    assert.matches("bad option 'host' (string expected, got number)",
      err_of(server.listen, { handler = echo, host = 1 }), 1, true)
    assert.matches("bad option 'host'", err_of(server.listen, { handler = echo, host = "not an ip" }), 1, true)
    assert.matches("bad option 'unix' (string expected, got boolean)",
      err_of(server.listen, { handler = echo, unix = true }), 1, true)
    assert.matches("bad option 'max_body'", err_of(server.listen, { handler = echo, max_body = -1 }), 1, true)
    assert.matches("bad argument 'query'", err_of(server.decode_args, 5), 1, true)

    -- res methods check theirs, inside a handler
    run(function(on_fail)
      local errs = {}
      local srv = listen(function(req, res)
        errs.status = err_of(res.respond, res, "200")
        errs.status_range = err_of(res.respond, res, 99)
        errs.headers = err_of(res.respond, res, 200, "x", "y")
        errs.hvalue = err_of(res.respond, res, 200, { ["x-a"] = "a\r\nb" }, "")
        errs.write_first = err_of(res.write, res, "x")
        errs.self = err_of(res.write, {}, "x")
        res:start(200)
        errs.chunk = err_of(res.write, res, 123)
        errs.start_twice = err_of(res.start, res, 200)
        res:finish()
        errs.after = err_of(res.write, res, "x")
      end)
      assert.are.equal(200, assert(http.get(srv.url .. "/")).status)
      srv:close()
      assert.matches("res:respond: bad argument 'status' (integer expected, got string)", errs.status, 1, true)
      assert.matches("res:respond: bad argument 'status'", errs.status_range, 1, true)
      assert.matches("res:respond: bad argument 'headers' (table expected, got string)", errs.headers, 1, true)
      assert.matches("res:respond: bad header 'x-a' (value contains CR, LF or NUL)", errs.hvalue, 1, true)
      assert.matches("res:write: call res:start first", errs.write_first, 1, true)
      assert.matches("res:write: bad argument 'self'", errs.self, 1, true)
      assert.matches("res:write: bad argument 'chunk' (string expected, got number)", errs.chunk, 1, true)
      assert.matches("res:start: the response was already started", errs.start_twice, 1, true)
      assert.matches("res:write: the response is finished", errs.after, 1, true)
    end)
  end)

  it("closes every listener and connection when the engine closes", function()
    -- a separate process: the script leaves a server with an idle, a hung
    -- and a streaming connection, then exits closing the Lua state
    local script = tmp .. "/engine_close.lua"
    local fh = assert(io.open(script, "w"))
    fh:write([[
      local drover = require "drover"
      local server = drover.server
      local started = 0
      local srv = assert(server.listen{ handler = function(req, res)
        started = started + 1
        if req.path == "/hang" then drover.sleep(3600) end
        if req.path == "/stream" then
          res:start(200)
          while res:write(("x"):rep(1000)) do drover.sleep(0.01) end
          return
        end
        return "ok"
      end })
      local u = assert(server.listen{ unix = arg[1], handler = function() return "u" end })
      assert(drover.http.get(srv.url .. "/idle"))
      assert(drover.http.get("http://localhost/", { unix_socket = arg[1] }))
      drover.spawn(function() drover.http.get(srv.url .. "/hang") end)
      drover.spawn(function() drover.http.get(srv.url .. "/stream", { on_chunk = function() end }) end)
      -- (waits in plain-script mode: drover.run would wait for the handlers;
      -- and never forever, whatever goes wrong)
      local deadline = drover.now() + 60
      while started < 3 do
        if drover.now() > deadline then io.stderr:write("handlers did not start\n"); os.exit(3) end
        drover.sleep(0.02)
      end
      drover.sleep(0.1)
      print("active " .. srv:stats().active)
      os.exit(0, true)
    ]])
    fh:close()
    local sock = tmp .. "/ec.sock"
    for _, interp in ipairs { H.drover_bin, H.lua } do
      local r = assert(proc.run({ interp, script, sock }, { timeout = 120 }))
      assert.are.equal(0, r.code, r.stderr)
      assert.are.equal("active 2\n", r.stdout)
      assert.are.equal("", r.stderr)
      assert.is_nil(io.open(sock, "r"), "the socket file is removed")
    end
  end)

  it("formats server-sent events and JSON responses", function()
    assert.are.equal("data: hi\n\n", server.sse("hi"))
    assert.are.equal("event: x\nid: 3\nretry: 100\ndata: a\ndata: b\n\n",
      server.sse { event = "x", id = 3, retry = 100, data = "a\r\nb" })
    assert.are.equal(":\n\n", server.sse {})
    local s, h, b = server.json(201, { a = 1 }, { ["x-y"] = "z" })
    assert.are.equal(201, s)
    assert.are.equal("application/json", h["content-type"])
    assert.are.equal("z", h["x-y"])
    assert.are.same({ a = 1 }, json.decode(b))
    assert.are.same({ a = "1", b = "", c = true, d = { "1", "2" }, ["e f"] = "g&h" },
      server.decode_args("a=1&b=&c&d=1&d=2&e+f=g%26h"))
  end)
end)
