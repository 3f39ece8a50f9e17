-- The store on both databases: the same interface on SQLite and on the
-- real PostgreSQL 15 server tests/services/postgres.sh starts
-- (DROVER_PG_URL), what only a shared database must do (several
-- processes migrating at once, several servers), moving an installation
-- between them (drover store copy), and the lines bad stores get.
local drover = require "drover"
local H = require "helper"
local _ -- the values a test ignores
local json = require "drover.json"
local store_mod = require "drover.store"

-- A small workflow for `drover exec`: one task, one line printed.
local function hello_file()
  local path = H.tempdir() .. "/hello.lua"
  local f = assert(io.open(path, "w"))
  f:write([[
    local drover = require "drover"
    local greet = drover.task("greet", function(who) print("hello " .. who) return who end)
    return greet("store")
  ]])
  f:close()
  return path
end

local function need_pg()
  assert(os.getenv("DROVER_PG_URL"), "DROVER_PG_URL is not set: tests/run.sh starts tests/services/postgres.sh")
end

-- A fresh store of each kind: its location and the home it belongs to.
local kinds = {
  sqlite = function()
    local home = H.tempdir()
    return home .. "/drover.db", home
  end,
  postgresql = function()
    need_pg()
    return H.pg_database(), H.tempdir()
  end,
}

-- One run with what a real run leaves: task runs (one folded into its
-- INSERT, one updated after a flush), log lines with bytes that are not
-- UTF-8, a state history, a call.
local function fill(s)
  local id = s:create_flow_run { name = "etl", state = "RUNNING", params = { x = "\255\254", n = 1 } }
  local t0 = store_mod.time()
  s:task_run_started { id = id .. "a", flow_run_id = id, name = "extract", kind = "task", call_key = "/extract#1",
    state = "RUNNING", attempts = 1, started = t0 }
  s:task_run_finished(id .. "a", "COMPLETED", nil, json.encode { rows = 3 }, true, 1, t0 + 0.5)
  s:task_run_started { id = id .. "b", flow_run_id = id, name = "load", kind = "task", call_key = "/load#1",
    state = "RUNNING", attempts = 1, started = t0 + 1 }
  s:flush()
  s:task_run_finished(id .. "b", "FAILED", "bad \255 byte", nil, false, 1, t0 + 2)
  s:log(id, nil, "stdout", "bytes \255\254 and \0 zero")
  s:log(id, id .. "a", "stderr", "plain line")
  s:create_call { flow_run_id = id, task_run_id = id .. "b", spec = "{}" }
  s:set_flow_state(id, "FAILED", "load failed")
  s:flush()
  return id
end

for _, kind in ipairs { "sqlite", "postgresql" } do
  describe("the store on " .. kind, function()
    local s, loc, home

    before_each(function()
      loc, home = kinds[kind]()
      s = assert(store_mod.open(home, { store = loc }))
    end)
    after_each(function()
      if s then s:close() end
      drover.fs.remove(home, { recursive = true })
    end)

    it("opens a new store at the current schema version", function()
      assert.are.equal(kind, s.dialect.name)
      assert.are.equal(0, s.migrated_from)
      s:close()
      s = assert(store_mod.open(home, { store = loc }))
      assert.are.equal(store_mod.SCHEMA_VERSION, s.migrated_from)
    end)

    it("cancels the flush it scheduled once the queue is written: nothing sleeps on after the writes", function()
      -- a sleeping task keeps the process alive: `drover exec` waited out
      -- the batch delay after its last write
      local id = s:create_flow_run { name = "etl", state = "RUNNING" }
      s:log(id, nil, "stdout", "a line")
      local t = s.flush_task
      assert.is_truthy(t, "a write queued schedules a flush")
      H.wait_until(function() return t:status() == "waiting" end, 30, "the scheduled flush to sleep")
      s:flush()
      assert.is_nil(s.flush_task)
      H.wait_until(function() return t:status() == "cancelled" end, 30, "the scheduled flush to be cancelled")
      -- queued again, then the store closed: the new one goes too
      s:log(id, nil, "stdout", "another line")
      t = s.flush_task
      H.wait_until(function() return t:status() == "waiting" end, 30, "the scheduled flush to sleep")
      s:close()
      s = nil
      H.wait_until(function() return t:status() == "cancelled" end, 30, "the scheduled flush to be cancelled")
    end)

    it("keeps runs, task runs, logs (bytes as they were) and states", function()
      local id = fill(s)
      local r = s:flow_run(id)
      assert.are.equal("FAILED", r.state)
      assert.are.equal("load failed", r.message)
      assert.are.same({ x = "\255\254", n = 1 }, store_mod.decode(r.params))
      local tasks = s:task_runs(id)
      assert.are.equal(2, #tasks)
      assert.are.equal("extract", tasks[1].name)
      assert.are.equal("COMPLETED", tasks[1].state)
      assert.are.same({ rows = 3 }, json.decode(tasks[1].result))
      assert.are.equal("FAILED", tasks[2].state)
      assert.are.equal(0, tasks[2].result_ok)
      assert.is_truthy(tasks[2].message:find("^bad "))
      local logs = s:logs(id)
      assert.are.equal(2, #logs)
      assert.are.equal("bytes \255\254 and \0 zero", logs[1].line)
      assert.are.equal("plain line", logs[2].line)
      assert.is_true(logs[2].id > logs[1].id)
      local hist = {}
      for _, st in ipairs(s:flow_run_states(id)) do hist[#hist + 1] = st.state end
      assert.are.same({ "RUNNING", "FAILED" }, hist)
      -- an ended run stays ended
      assert.is_false(s:set_flow_state(id, "COMPLETED"))
      assert.are.equal(id, s:find_flow_run(id:sub(1, 6)).id)
      assert.are.equal("ok", s:integrity())
    end)

    it("counts runs by state as rows change (/metrics), and pages by keyset", function()
      local ids = {}
      for i = 1, 25 do
        ids[i] = s:create_flow_run { name = "n" .. i, state = i % 2 == 0 and "RUNNING" or "SCHEDULED" }
      end
      s:end_flow_run(ids[2], "CRASHED", "gone")
      s:compact_counts()
      local counts = {}
      for _, c in ipairs(s:run_counts()) do if c.kind == "flow" then counts[c.state] = c.n end end
      assert.are.equal(13, counts.SCHEDULED)
      assert.are.equal(11, counts.RUNNING)
      assert.are.equal(1, counts.CRASHED)
      assert.are.equal("ok", s:integrity())
      local seen, after, pages = {}, nil, 0
      repeat
        local rows = s:flow_runs_page { limit = 10, after = after }
        pages = pages + 1
        for _, r in ipairs(rows) do
          assert.is_nil(seen[r.id])
          seen[r.id] = true
        end
        after = #rows == 10 and { created = rows[10].created, id = rows[10].id } or nil
      until not after
      assert.are.equal(3, pages)
      local n = 0
      for _ in pairs(seen) do n = n + 1 end
      assert.are.equal(25, n)
    end)

    it("pages a run's task runs and summarises them by name", function()
      local id = s:create_flow_run { name = "big", state = "RUNNING" }
      for i = 1, 30 do
        s:task_run_started { id = string.format("%s%03d", id, i), flow_run_id = id, name = i <= 20 and "a" or "b",
          kind = "task", call_key = "/" .. i, state = "RUNNING", attempts = 1, started = i <= 25 and i or nil }
      end
      s:flush()
      local sum = s:task_run_summary(id)
      assert.are.equal(30, sum.total)
      assert.are.equal("a", sum.groups[1].name)
      assert.are.equal(20, sum.groups[1].total)
      local got, after = {}, nil
      repeat
        local rows, nxt = s:task_run_page(id, { limit = 7, after = after })
        for _, r in ipairs(rows) do got[#got + 1] = r.started or store_mod.NOT_STARTED end
        after = nxt
      until not after
      assert.are.equal(30, #got)
      for i = 2, #got do assert.is_true(got[i - 1] <= got[i]) end
      assert.are.equal(store_mod.NOT_STARTED, got[30])
    end)

    it("a fire time is claimed once (compare-and-set)", function()
      s:rebase_fires("nightly", "@daily", 1, 100)
      assert.is_true(s:claim_fire("nightly", 100, 200))
      assert.is_false(s:claim_fire("nightly", 100, 200))
      assert.are.equal(200, s:fire_state("nightly").last_fire)
    end)

    it("a batch is applied in one transaction: an error leaves nothing of it", function()
      local id = s:create_flow_run { name = "x", state = "RUNNING" }
      assert.has_error(function()
        s:apply_batch(id, function()
          s:log(id, nil, "stdout", "inside")
          s:task_run_started { id = id .. "t", flow_run_id = id, name = "t", kind = "task", call_key = "/t",
            state = "RUNNING", attempts = 1, started = 1 }
          error("the batch breaks")
        end)
      end, "the batch breaks")
      s:flush()
      assert.are.equal(0, #s:logs(id))
      assert.are.equal(0, #s:task_runs(id))
      s:apply_batch(id, function() s:log(id, nil, "stdout", "second try") end)
      assert.are.equal(1, #s:logs(id))
    end)

    it("sees another process's writes in its change mark and its reads", function()
      local a, b = s:change_mark()
      local code, _, err = H.drover({ "exec", hello_file() },
        { env = { DROVER_HOME = home, DROVER_STORE = loc, DROVER_DAEMON = "0" } })
      assert.are.equal(0, code, err)
      -- at once on SQLite; on PostgreSQL within its MARK_TTL (0.25 s)
      H.wait_until(function()
        local c, d = s:change_mark()
        return a ~= c or b ~= d
      end, 10, "the change mark to move")
      assert.are.equal(1, #s:flow_runs {})
    end)

    it("prunes a run with everything it holds", function()
      local id = fill(s)
      local keep = s:create_flow_run { name = "live", state = "RUNNING" }
      local f = { before = store_mod.time() + 60 }
      assert.are.same({ runs = 1, task_runs = 2, logs = 2, states = 2, calls = 1 }, s:prune_count(f))
      local counts = s:prune_batch(f, nil, 10)
      assert.are.equal(1, counts.runs)
      assert.is_nil(s:flow_run(id))
      assert.is_truthy(s:flow_run(keep))
      assert.are.equal("ok", s:integrity())
    end)
  end)
end

describe("the store's two dialects", function()
  it("give every table the same columns", function()
    local a = assert(store_mod.open(H.tempdir()))
    need_pg()
    local b = assert(store_mod.open(H.tempdir(), { store = H.pg_database() }))
    for _, t in ipairs(store_mod.TABLES) do
      assert.are.same(a.dialect.columns(a.db, t[1]), b.dialect.columns(b.db, t[1]), t[1])
    end
    assert.are.same(a.dialect.columns(a.db, "run_counts"), b.dialect.columns(b.db, "run_counts"))
    a:close()
    b:close()
  end)
end)

describe("a PostgreSQL store", function()
  it("is migrated once when several processes open a new database at once", function()
    local url = H.pg_database()
    local procs = {}
    for i = 1, 4 do
      procs[i] = assert(drover.proc.spawn({ H.drover_bin, "store", "migrate" },
        { env = { DROVER_HOME = H.tempdir(), DROVER_STORE = url }, stdout = "capture", stderr = "capture" }))
    end
    local from = {}
    for i = 1, 4 do
      local r = procs[i]:wait(120)
      assert.are.equal(0, r.code, r.stderr)
      from[#from + 1] = r.stdout:match("migrated from 0") and "new" or "found"
    end
    table.sort(from)
    assert.are.same({ "found", "found", "found", "new" }, from)
  end)

  it("refuses bad databases in one line naming the database, never the password", function()
    need_pg()
    local url = os.getenv("DROVER_PG_URL")
    local password = url:match("^postgresql://[^:]+:([^@]+)@")
    local function open_err(u)
      local s, err = store_mod.open(H.tempdir(), { store = u })
      assert.is_nil(s)
      assert.is_nil(err:find(password, 1, true))
      assert.is_nil(err:find("\n"))
      return err
    end
    -- the server down: a port nothing listens on
    local dead = url:gsub(":(%d+)/", ":1/")
    assert.matches("^cannot open the drover store on PostgreSQL: drover@127%.0%.0%.1:1/drover: ", open_err(dead))
    -- a wrong password
    local wrong = url:gsub(":[^:@/]+@", ":not-the-password@")
    assert.matches("drover@127%.0%.0%.1:%d+/drover: .*password authentication failed", open_err(wrong))
    -- a database that holds something else
    local other = H.pg_database()
    local c = assert(drover.pg.connect(other))
    assert(c:exec("CREATE TABLE invoices(id int)"))
    assert.matches("^not a drover store: drover@.*/drover_t.* %(it holds other tables%)$", open_err(other))
    -- a schema newer than this drover
    local newer = H.pg_database()
    local s = assert(store_mod.open(H.tempdir(), { store = newer }))
    s:close()
    local n = assert(drover.pg.connect(newer))
    assert(n:run("UPDATE meta SET value = '99' WHERE key = 'schema_version'"))
    assert.matches("has schema version 99, newer than this drover understands %(" .. store_mod.SCHEMA_VERSION ..
      "%): upgrade drover$", open_err(newer))
    c:close()
    n:close()
    -- a location that is neither a file nor a postgresql:// URL
    local mangled = "postgresql:1//" .. url:gsub("^postgresql://", "")
    local cwd = H.tempdir()
    local code, _, err = H.drover({ "ls" }, { env = { DROVER_HOME = H.tempdir(), DROVER_STORE = mangled }, cwd = cwd })
    assert.are.equal(2, code)
    assert.are.equal("drover: the store location must be a SQLite file or a postgresql:// URL (got 'postgresql:...')\n",
      err)
    assert.are.same({}, drover.fs.list(cwd), "nothing made of the mistaken location")
    -- the CLI: the same line, exit 2
    code, _, err = H.drover({ "ls" }, { env = { DROVER_HOME = H.tempdir(), DROVER_STORE = wrong } })
    assert.are.equal(2, code)
    assert.matches("^drover: cannot open the drover store on PostgreSQL: .*password authentication failed", err)
    assert.is_nil(err:find(password, 1, true))
  end)
end)

describe("drover store", function()
  it("copies SQLite to PostgreSQL and back, losing nothing", function()
    local home = H.tempdir()
    local src = assert(store_mod.open(home, { store = home .. "/drover.db" }))
    local ids = {}
    for i = 1, 3 do ids[i] = fill(src) end
    src:put_package { id = "p1", backend = "local", module = "m", sha256 = "x", location = "/tmp/p1.tar" }
    src:put_deployment { name = "d1", backend = "local", package_id = "p1", schedule = "@daily" }
    src:close()
    local pg_url = H.pg_database()
    local env = { DROVER_HOME = home, DROVER_STORE = "" }
    local code, out, err = H.drover({ "store", "copy", home .. "/drover.db", pg_url }, { env = env })
    assert.are.equal(0, code, err)
    assert.matches("3 run%(s%), 6 task run%(s%), 6 log line%(s%), 1 deployment%(s%), 1 package%(s%)", out)
    assert.matches("warning: the store URL's password shows in ps", err)
    -- into a store that holds data: refused, nothing written
    code, _, err = H.drover({ "store", "copy", home .. "/drover.db", pg_url }, { env = env })
    assert.are.equal(1, code)
    assert.matches("\ndrover: drover store copy: the target store drover@.* is not empty %(packages holds 1 row%(s%)%)", err)
    local back = H.tempdir() .. "/back.db"
    code, _, err = H.drover({ "store", "copy", pg_url, back }, { env = env })
    assert.are.equal(0, code, err)
    local a = assert(store_mod.open(home, { store = home .. "/drover.db" }))
    local b = assert(store_mod.open(home, { store = back }))
    local p = assert(store_mod.open(home, { store = pg_url }))
    for _, id in ipairs(ids) do
      for _, other in ipairs { b, p } do
        assert.are.same(a:flow_run(id), other:flow_run(id))
        -- PostgreSQL's text holds UTF-8 only: a message's stray byte
        -- became U+FFFD there (log lines, params and results keep their bytes)
        local ta, to = a:task_runs(id), other:task_runs(id)
        assert.are.equal("bad \255 byte", ta[2].message)
        assert.are.equal("bad \u{FFFD} byte", to[2].message)
        ta[2].message, to[2].message = nil, nil
        assert.are.same(ta, to)
        assert.are.same(a:logs(id), other:logs(id))
        assert.are.same(a:flow_run_states(id), other:flow_run_states(id))
      end
    end
    assert.are.same(a:deployment("d1"), p:deployment("d1"))
    assert.are.equal("ok", p:integrity())
    assert.are.equal("ok", b:integrity())
    -- new rows after the copy get new ids (the identity moved past the copied ones)
    local id = p:create_flow_run { name = "after", state = "RUNNING" }
    p:log(id, nil, "stdout", "new")
    p:flush()
    assert.is_true(p:logs(id)[1].id > a:logs(ids[3])[2].id)
    a:close(); b:close(); p:close()
  end)

  it("use, info and migrate name the store; bad input gets one line", function()
    local home = H.tempdir()
    local url = H.pg_database()
    local env = { DROVER_HOME = home, DROVER_STORE = "" }
    local code, out, err = H.drover({ "store", "use", url }, { env = env })
    assert.are.equal(0, code, err)
    assert.matches("now keeps its runs in drover@", out)
    assert.are.equal(tonumber("600", 8), drover.fs.stat(home .. "/store.conf").mode & tonumber("777", 8))
    code, out = H.drover({ "store" }, { env = env })
    assert.are.equal(0, code)
    assert.matches("^drover@127%.0%.0%.1:%d+/drover_t[%w_]+ %(postgresql%): schema version %d+\n  0 run%(s%)", out)
    -- every command of this home now uses it
    code, _, err = H.drover({ "exec", hello_file() }, { env = env })
    assert.are.equal(0, code, err)
    local p = assert(store_mod.open(home, { store = url }))
    assert.are.equal(1, #p:flow_runs {})
    p:close()
    assert.is_false(drover.fs.exists(home .. "/drover.db"))
    code, out = H.drover({ "store", "migrate", "--json" }, { env = env })
    assert.are.equal(0, code)
    assert.are.equal(store_mod.SCHEMA_VERSION, json.decode(out).migrated_from)
    code, _, err = H.drover({ "store", "frobnicate" }, { env = env })
    assert.are.equal(2, code)
    assert.are.equal("drover: drover store: unknown subcommand 'frobnicate' (info, migrate, use, copy)\n", err)
    code, _, err = H.drover({ "store", "copy", "only-one" }, { env = env })
    assert.are.equal(2, code)
    assert.matches("missing TO", err)
  end)
end)
