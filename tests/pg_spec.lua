-- drover.pg: the PostgreSQL primitive, against the real PostgreSQL 15 server
-- that tests/services/postgres.sh starts (DROVER_PG_URL, DROVER_PG_SOCKET_URL,
-- DROVER_PG_DIR come from its env file).  Without them this spec fails: the
-- suite always starts the service, so a missing URL is a broken setup.
local drover = require "drover"
local H = require "helper"

local pg = drover.pg
local URL = os.getenv("DROVER_PG_URL")
local SOCKET_URL = os.getenv("DROVER_PG_SOCKET_URL")
local SERVICE_DIR = os.getenv("DROVER_PG_DIR")

local function need_server()
  assert(URL and SOCKET_URL and SERVICE_DIR,
    "DROVER_PG_URL, DROVER_PG_SOCKET_URL and DROVER_PG_DIR are not set: run the spec through " ..
    "tests/run.sh, which starts tests/services/postgres.sh (or start it and source its env)")
end

local function password() return URL:match("^postgresql://[^:]+:([^@]+)@") end
local function port() return URL:match(":(%d+)/[^/]*$") end

-- A port nothing listens on: bind one, note it, let it go.
local function dead_port()
  local r = assert(drover.proc.run({ "python3", "-c",
    "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])" }))
  return (r.stdout:gsub("%s", ""))
end

describe("drover.pg", function()
  local c

  before_each(function()
    need_server()
    c = assert(pg.connect(URL))
  end)
  after_each(function() if c then c:close() end end)

  it("has the service's server to talk to", function()
    need_server()
    assert.truthy(URL:match("^postgresql://"))
  end)

  it("connects over TCP and over the unix socket", function()
    assert.equal("drover", c:value("SELECT current_user"))
    assert.equal("127.0.0.1", c:value("SELECT host(inet_server_addr())"))
    local s = assert(pg.connect(SOCKET_URL))
    assert.equal("drover", s:value("SELECT current_user"))
    -- a unix-socket session has no server address
    assert.is_nil(s:value("SELECT inet_server_addr()"))
    assert.truthy(s:label():find("/sock:", 1, true))
    s:close()
    assert.is_false(s:isopen())
    assert.has_error(function() s:value("SELECT 1") end,
      "drover.pg.value: the connection is closed (" .. s:label() .. ")")
  end)

  it("round-trips types: int8 extremes, bool, NULL, bytea, UTF-8 text, numeric", function()
    local r = assert(c:first([[SELECT $1::int8 AS max, $2::int8 AS min, $3::int2 AS small,
      $4::int4 AS i4, $5::bool AS t, $6::bool AS f, $7::text AS null, $8::text AS utf8,
      $9::float8 AS fl, $10::bytea AS bin]],
      math.maxinteger, math.mininteger, -32768, 2147483647, true, false, nil, "héllo ✓ ☃",
      0.1, pg.bytea("a\0b\255\\x")))
    assert.equal(math.maxinteger, r.max)
    assert.equal("integer", math.type(r.max))
    assert.equal(math.mininteger, r.min)
    assert.equal(-32768, r.small)
    assert.equal(2147483647, r.i4)
    assert.is_true(r.t)
    assert.is_false(r.f)
    assert.is_nil(r.null)
    assert.equal("héllo ✓ ☃", r.utf8)
    assert.equal(0.1, r.fl)
    assert.equal("a\0b\255\\x", r.bin)
    -- a plain string holding a zero byte binds as binary bytea too
    assert.equal("\0\255", c:value("SELECT $1::bytea", "\0\255"))
    -- numeric: integral -> integer, short -> number, long -> exact text
    local n = assert(c:first([[SELECT 42::numeric AS int, 1.5::numeric AS short,
      '12345678901234567890.0123456789'::numeric AS long, '-0.000001'::numeric AS tiny,
      '1.500000000000000000'::numeric(20, 18) AS padded, '0.1234567890123456'::numeric AS sixteen]]))
    assert.equal(42, n.int)
    assert.equal("integer", math.type(n.int))
    assert.equal(1.5, n.short)
    assert.equal("12345678901234567890.0123456789", n.long)
    assert.equal(-0.000001, n.tiny)
    assert.equal(1.5, n.padded)
    assert.equal("0.1234567890123456", n.sixteen)
    -- through a table, and NULL as drover.json.null when asked
    assert(c:run("CREATE TEMP TABLE types(i int8, b bool, t text, x bytea)"))
    assert.equal(2, c:run("INSERT INTO types VALUES ($1, $2, $3, $4), ($5, $6, $7, $8)",
      math.mininteger, true, "ünï", pg.bytea("\0"), nil, nil, nil, nil))
    local rows = assert(c:rows("SELECT * FROM types ORDER BY i NULLS LAST"))
    assert.same({ { i = math.mininteger, b = true, t = "ünï", x = "\0" }, {} }, rows)
    local j = assert(pg.connect(URL, { null = drover.json.null }))
    assert.equal(drover.json.null, j:value("SELECT NULL"))
    assert.equal(drover.json.null, j:first("SELECT NULL AS n").n)
    j:close()
    -- json.null binds NULL as nil does
    assert.is_true(c:value("SELECT $1::text IS NULL", drover.json.null))
  end)

  it("binds parameters, never splices them: an injection-looking string stays data", function()
    assert(c:run("CREATE TEMP TABLE victims(name text)"))
    local evil = "x'); DROP TABLE victims; --"
    assert.equal(1, c:run("INSERT INTO victims VALUES ($1)", evil))
    assert.equal(evil, c:value("SELECT name FROM victims WHERE name = $1", evil))
    assert.equal(1, c:value("SELECT count(*) FROM victims"))
    assert.equal("$1", c:value("SELECT '$1' || $1", ""))
  end)

  it("runs a script of several statements with exec, and no parameters", function()
    assert.is_true(c:exec([[
      CREATE TEMP TABLE script(a int);
      INSERT INTO script VALUES (1), (2);
      INSERT INTO script SELECT a + 10 FROM script;
    ]]))
    assert.equal(4, c:value("SELECT count(*) FROM script"))
    local v, err = c:exec("INSERT INTO script VALUES (3); SELECT * FROM no_such_table")
    assert.is_nil(v)
    assert.equal('drover.pg: 42P01: relation "no_such_table" does not exist', err)
    -- one implicit transaction: the INSERT before the failure is gone too
    assert.equal(0, c:value("SELECT count(*) FROM script WHERE a = 3"))
    assert.has_error(function() c:exec("SELECT $1", 1) end,
      "drover.pg.exec: a script takes no parameters (use run)")
    -- run takes one statement (it is prepared)
    v, err = c:run("SELECT 1; SELECT 2")
    assert.is_nil(v)
    assert.truthy(err:find("^drover%.pg: 42601: cannot insert multiple commands into a prepared statement"), err)
  end)

  it("prepares a statement once per connection and reuses it", function()
    local sql = "SELECT $1::int8 + 1"
    for i = 1, 3 do assert.equal(i + 1, c:value(sql, i)) end
    local s = c:stats()
    assert.equal(1, s.prepares)
    assert.equal(2, s.hits)
    assert.equal(1, s.cached)
    assert.equal(1, c:value("SELECT count(*) FROM pg_prepared_statements WHERE statement = $1", sql))
    -- cache_size = 0: every statement runs unnamed
    local u = assert(pg.connect(URL, { cache_size = 0 }))
    for i = 1, 3 do assert.equal(i + 1, u:value(sql, i)) end
    assert.equal(0, u:stats().prepares)
    assert.equal(0, u:value("SELECT count(*) FROM pg_prepared_statements"))
    u:close()
  end)

  it("returns nil and 'drover.pg: SQLSTATE: message' on errors; bad arguments raise", function()
    local v, err = c:rows("SELECT * FROM no_such_table")
    assert.is_nil(v)
    assert.equal('drover.pg: 42P01: relation "no_such_table" does not exist', err)
    v, err = c:value("SELECT 1 / $1::int", 0)
    assert.is_nil(v)
    assert.equal("drover.pg: 22012: division by zero", err)
    assert(c:run("CREATE TEMP TABLE u(id int PRIMARY KEY)"))
    assert(c:run("INSERT INTO u VALUES (1)"))
    v, err = c:run("INSERT INTO u VALUES (1)")
    assert.is_nil(v)
    assert.truthy(err:find('^drover%.pg: 23505: duplicate key value violates unique constraint "u_pkey" %(Key'))
    v, err = c:first("SELEC 1")
    assert.is_nil(v)
    assert.truthy(err:find("^drover%.pg: 42601: syntax error"))
    -- the connection is fine afterwards
    assert.equal(1, c:value("SELECT 1"))
    assert.has_error(function() c:rows(42) end, "drover.pg.rows: bad argument 'sql' (string expected, got number)")
    assert.has_error(function() c:run("SELECT $1", {}) end,
      "drover.pg.run: bad argument #1 (nil, boolean, number, string or drover.pg.bytea expected, got table)")
    assert.equal(1, c:value("SELECT 1"))
    assert.has_error(function() pg.connect(URL, { pool = 4 }) end)
    assert.has_error(function() pg.pool(URL, { sise = 4 }) end,
      "drover.pg.pool: unknown option 'sise' (known: size, connect_timeout, cache_size, null)")
  end)

  it("runs queries from 20 tasks on a pool of 4 at once, without blocking the loop", function()
    local pool = assert(pg.pool(URL, { size = 4 }))
    local probe = assert(pg.connect(URL))
    local marker = "overlap-" .. drover.pid()
    local pids, overlap, ticks_during = {}, 0, nil
    drover.run(function()
      local tasks = {}
      for i = 1, 20 do
        tasks[i] = drover.spawn(function()
          return assert(pool:value("SELECT pg_backend_pid() FROM pg_sleep(0.3) /* " .. marker .. " */"))
        end)
      end
      -- several of them are on the server at the same moment
      overlap = H.wait_until(function()
        local n = probe:value("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
          "%" .. marker .. " */")
        return n >= 2 and n
      end, 60, "two pool queries running at once")
      for i = 1, 20 do pids[tasks[i]:join()] = true end
      -- a timer task keeps ticking while a query sleeps on the server
      local ticks, stop = 0, false
      local ticker = drover.spawn(function()
        while not stop do drover.sleep(0.02); ticks = ticks + 1 end
      end)
      local before = ticks
      assert(pool:value("SELECT pg_sleep(1)"))
      ticks_during = ticks - before
      stop = true
      ticker:join()
    end)
    local n = 0
    for _ in pairs(pids) do n = n + 1 end
    assert.equal(4, n)
    assert.equal(4, pool:stats().connections)
    assert.is_true(overlap >= 2)
    assert.is_true(ticks_during > 2, "ticks during pg_sleep(1): " .. tostring(ticks_during))
    pool:close()
    probe:close()
  end)

  it("nests transactions through savepoints: an inner rollback keeps the outer", function()
    assert(c:run("CREATE TEMP TABLE tx(v text)"))
    local r = { c:transaction(function(t)
      assert(t:run("INSERT INTO tx VALUES ($1)", "outer"))
      local ok, err = pcall(t.transaction, t, function(t2)
        assert(t2:run("INSERT INTO tx VALUES ($1)", "inner"))
        error("inner fails", 0)
      end)
      assert.is_false(ok)
      assert.equal("inner fails", err)
      assert.equal("intrans", t:txstatus())
      assert(t:transaction(function(t3) return t3:run("INSERT INTO tx VALUES ($1)", "inner2") end))
      return "result", 2
    end) }
    assert.same({ "result", 2 }, r)
    assert.same({ { v = "inner2" }, { v = "outer" } }, c:rows("SELECT v FROM tx ORDER BY v"))
    assert.equal("idle", c:txstatus())
    -- fn raising rolls everything back and raises again
    assert.has_error(function()
      c:transaction(function(t) assert(t:run("INSERT INTO tx VALUES ('gone')")); error("boom", 0) end)
    end, "boom")
    assert.equal(0, c:value("SELECT count(*) FROM tx WHERE v = 'gone'"))
    -- a statement that failed while fn returned normally: rolled back, nil, message
    local v, err = c:transaction(function(t)
      assert(t:run("INSERT INTO tx VALUES ('also gone')"))
      t:run("SELECT * FROM no_such_table")
      return true
    end)
    assert.is_nil(v)
    assert.equal("drover.pg.transaction: a statement inside the transaction failed; rolled back", err)
    assert.equal(0, c:value("SELECT count(*) FROM tx WHERE v = 'also gone'"))
    assert.equal("idle", c:txstatus())
  end)

  it("keeps other tasks out of a connection while one task is inside a transaction", function()
    assert(c:run("CREATE TEMP TABLE iso(v int)"))
    local seen
    drover.run(function()
      local inside = drover.event()
      local writer = drover.spawn(function()
        return c:transaction(function(t)
          assert(t:run("INSERT INTO iso VALUES (1)"))
          inside:set()
          assert(t:value("SELECT pg_sleep(0.2)"))
          assert(t:run("INSERT INTO iso VALUES (2)"))
          return true
        end)
      end)
      inside:wait()
      -- waits for the writer's COMMIT instead of joining its transaction
      seen = c:value("SELECT count(*) FROM iso")
      assert.is_true(writer:join())
    end)
    assert.equal(2, seen)
  end)

  it("says a wrong password in one line, without the password", function()
    local bad = URL:gsub(":[^:@/]+@", ":not-" .. password() .. "@")
    local v, err = pg.connect(bad)
    assert.is_nil(v)
    assert.truthy(err:find("^drover%.pg%.connect: drover@127%.0%.0%.1:" .. port() .. "/drover: "))
    assert.truthy(err:find("password authentication failed", 1, true))
    assert.is_nil(err:find("\n", 1, true))
    assert.is_nil(err:find(password(), 1, true))
    v, err = pg.pool(bad, { size = 2 })
    assert.is_nil(v)
    assert.is_nil(err:find(password(), 1, true))
    -- libpq quotes a token it cannot read, even when the token is the password
    v, err = pg.connect((URL:gsub(":[^:@/]+@", ":%%zz" .. password() .. "@")))
    assert.is_nil(v)
    assert.equal('drover.pg.connect: bad connection string: invalid percent-encoded token: "***"', err)
  end)

  it("says which host and port when the server is down at connect", function()
    local p = dead_port()
    local v, err = pg.connect(("postgresql://drover:%s@127.0.0.1:%s/drover"):format(password(), p))
    assert.is_nil(v)
    assert.truthy(err:find("^drover%.pg%.connect: drover@127%.0%.0%.1:" .. p .. "/drover: "), err)
    assert.truthy(err:find("Connection refused", 1, true), err)
    assert.is_nil(err:find("\n", 1, true))
    assert.is_nil(err:find(password(), 1, true))
  end)

  it("reconnects after pg_terminate_backend: the next query works", function()
    local admin = assert(pg.connect(URL))
    local pid = c:backend_pid()
    assert.is_true(admin:value("SELECT pg_terminate_backend($1)", pid))
    H.wait_until(function()
      return admin:value("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid) == 0
    end, 30, "the terminated backend to exit")
    assert.equal(2, c:value("SELECT $1::int + 1", 1))
    assert.are_not.equal(pid, c:backend_pid())
    assert.equal(1, c:stats().reconnects)
    -- the prepared statement is prepared again on the new session
    assert.equal(3, c:value("SELECT $1::int + 1", 2))
    admin:close()
  end)

  it("cancels the server's statement when the waiting task is cancelled", function()
    local probe = assert(pg.connect(URL))
    local marker = "cancel-me-" .. drover.pid()
    drover.run(function()
      local t = drover.spawn(function() return c:value("SELECT pg_sleep(60) /* " .. marker .. " */") end)
      H.wait_until(function()
        return probe:value("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
          "%" .. marker .. " */") == 1
      end, 30, "the sleep to start")
      t:cancel()
      local ok, err = t:wait()
      assert.is_false(ok)
      assert.equal("cancelled", err)
    end)
    -- the connection is usable again once the server has stopped the sleep
    assert.equal(1, c:value("SELECT 1"))
    assert.equal(0, probe:value("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
      "%" .. marker .. " */"))
    probe:close()
  end)

  it("closes the engine cleanly with a query in flight, and the server stops it", function()
    local dir = H.tempdir()
    local script = dir .. "/inflight.lua"
    local f = assert(io.open(script, "w"))
    f:write([[
      local drover = require "drover"
      local c = assert(drover.pg.connect(os.getenv("DROVER_PG_URL")))
      local probe = assert(drover.pg.connect(os.getenv("DROVER_PG_URL")))
      drover.spawn(function() c:value("SELECT pg_sleep(60) /* inflight-" .. drover.pid() .. " */") end)
      for _ = 1, 1500 do
        if probe:value("SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE $1",
          "%inflight-" .. drover.pid() .. " */") == 1 then
          io.write("in flight ", drover.pid(), "\n")
          break
        end
        drover.sleep(0.02)
      end
      -- the script ends here: lua_close closes the engine with the query running
    ]])
    f:close()
    local r = assert(drover.proc.run({ H.lua, script }, { timeout = 50 }))
    assert.equal(0, r.code, r.stderr)
    assert.equal("", r.stderr)
    local child = r.stdout:match("^in flight (%d+)")
    assert.truthy(child, r.stdout)
    H.wait_until(function()
      return c:value("SELECT count(*) FROM pg_stat_activity WHERE query LIKE $1",
        "%inflight-" .. child .. " */") == 0
    end, 30, "the server to drop the closed engine's query")
    os.execute("rm -rf " .. dir)
  end)

  it("works again after the server restarts (pg_ctl restart -m fast)", function()
    local pool = assert(pg.pool(URL, { size = 2 }))
    assert.equal(1, pool:value("SELECT 1"))
    local before = c:backend_pid()
    local r = assert(drover.proc.run({ "bash", H.root .. "/tests/services/postgres.sh", "restart", SERVICE_DIR },
      { timeout = 120 }))
    assert.equal(0, r.code, r.stderr)
    assert.equal(5, c:value("SELECT $1::int + 2", 3))
    assert.are_not.equal(before, c:backend_pid())
    assert.equal(1, pool:value("SELECT 1"))
    assert.equal(1, pool:stats().reconnects)
    pool:close()
  end)
end)
