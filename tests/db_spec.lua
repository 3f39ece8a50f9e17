-- drover.db: the SQLite binding, against real database files, real
-- concurrent writer processes and a real second process holding the lock.
local drover = require "drover"
local H = require "helper"

local dbm = drover.db

local function readable(path)
  local f = io.open(path, "rb")
  if f then f:close() return true end
  return false
end

local function write_file(path, data)
  local f = assert(io.open(path, "wb"))
  f:write(data)
  f:close()
end

local function q(s) return "'" .. s:gsub("'", "'\\''") .. "'" end

describe("drover.db", function()
  local dir, path, db

  before_each(function()
    dir = H.tempdir()
    path = dir .. "/test.db"
    db = assert(dbm.open(path))
    db:exec [[
      CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT UNIQUE, v);
      CREATE TABLE child(id INTEGER PRIMARY KEY, t_id INTEGER NOT NULL REFERENCES t(id));
    ]]
  end)

  after_each(function()
    if db then db:close() end
    os.execute("rm -rf " .. q(dir))
  end)

  describe("open", function()
    it("opens in WAL mode with foreign keys on by default", function()
      assert.equal("wal", db:value("PRAGMA journal_mode"))
      assert.equal(1, db:value("PRAGMA synchronous")) -- NORMAL
      assert.equal(1, db:value("PRAGMA foreign_keys"))
      assert.equal(path, db:path())
      assert.is_true(db:isopen())
      assert.matches("drover.db%(.*test.db%)", tostring(db))
    end)

    it("honours wal=false, foreign_keys=false and busy_timeout", function()
      local d2 = assert(dbm.open(dir .. "/plain.db", { wal = false, foreign_keys = false, busy_timeout = 0 }))
      assert.equal("delete", d2:value("PRAGMA journal_mode"))
      assert.equal(0, d2:value("PRAGMA foreign_keys"))
      d2:close()
    end)

    it("opens readonly: reads work, writes raise", function()
      db:run("INSERT INTO t(name) VALUES ('x')")
      local ro = assert(dbm.open(path, { readonly = true }))
      assert.equal(1, ro:value("SELECT count(*) FROM t"))
      assert.has_error(function() ro:run("INSERT INTO t(name) VALUES ('y')") end,
        "drover.db.run: attempt to write a readonly database")
      ro:close()
    end)

    it("returns nil and a message naming the path for a file that is not a database", function()
      local bogus = dir .. "/not-a-db"
      write_file(bogus, ("this is not sqlite\n"):rep(100))
      local d, err = dbm.open(bogus)
      assert.is_nil(d)
      assert.equal("drover.db.open: " .. bogus .. ": file is not a database", err)
    end)

    it("returns nil and a message for paths it cannot open", function()
      local d, err = dbm.open(dir .. "/missing/sub/x.db")
      assert.is_nil(d)
      assert.matches("drover.db.open: .*/missing/sub/x.db: unable to open database file", err)
      d, err = dbm.open(dir .. "/absent.db", { create = false })
      assert.is_nil(d)
      assert.matches("absent.db: unable to open", err)
      assert.is_false(readable(dir .. "/absent.db"))
    end)

    it("rejects wrong argument types, naming the argument", function()
      assert.has_error(function() dbm.open(nil) end,
        "drover.db.open: bad argument 'path' (string expected, got nil)")
      assert.has_error(function() dbm.open(42) end,
        "drover.db.open: bad argument 'path' (string expected, got number)")
      assert.has_error(function() dbm.open(path, "wal") end,
        "drover.db.open: bad argument 'opts' (table expected, got string)")
      assert.has_error(function() dbm.open(path, { wal = "yes" }) end,
        "drover.db.open: bad option 'wal' (boolean expected, got string)")
      assert.has_error(function() dbm.open(path, { busy_timeout = "5s" }) end,
        "drover.db.open: bad option 'busy_timeout' (number expected, got string)")
      assert.has_error(function() dbm.open(path, { busy_timeout = -1 }) end)
      assert.has_error(function() dbm.open("a\0b") end,
        "drover.db.open: bad argument 'path' (contains a zero byte)")
      assert.has_error(function() dbm.open(path, { busy_timout = 5 }) end,
        "drover.db.open: unknown option 'busy_timout' (known: readonly, create, wal, foreign_keys, " ..
        "busy_timeout, cache_size, auto_vacuum)")
      assert.has_error(function() dbm.open(path, { true }) end,
        "drover.db.open: bad argument 'opts' (option names must be strings, got number)")
      assert.has_error(function() dbm.open(path, { auto_vacuum = "sometimes" }) end,
        'drover.db.open: bad option \'auto_vacuum\' ("none", "full" or "incremental", got "sometimes")')
    end)

    it("sets auto_vacuum on a new database, in WAL mode, without rewriting it; an existing one keeps its mode",
      function()
        local fresh = dir .. "/fresh.db"
        local d = assert(dbm.open(fresh, { auto_vacuum = "incremental" }))
        assert.equal(2, d:value("PRAGMA auto_vacuum"))
        assert.equal("wal", d:value("PRAGMA journal_mode"))
        d:exec("CREATE TABLE x(a); INSERT INTO x VALUES (randomblob(100000)); DELETE FROM x")
        assert.is_true(d:value("PRAGMA freelist_count") > 10)
        d:exec("PRAGMA incremental_vacuum")
        assert.equal(0, d:value("PRAGMA freelist_count")) -- the free pages left the file
        d:close()
        -- the test database has tables and was made without the option
        db:close()
        db = assert(dbm.open(path, { auto_vacuum = "incremental" }))
        assert.equal(0, db:value("PRAGMA auto_vacuum"))
        d = assert(dbm.open(fresh, { auto_vacuum = "none" }))
        assert.equal(2, d:value("PRAGMA auto_vacuum"))
        d:close()
      end)

    it("opens an in-memory database", function()
      local m = assert(dbm.open(":memory:"))
      m:exec("CREATE TABLE x(a)")
      m:run("INSERT INTO x VALUES (?)", 5)
      assert.equal(5, m:value("SELECT a FROM x"))
      m:close()
    end)
  end)

  describe("CRUD", function()
    it("inserts, reads, updates and deletes", function()
      local changes, id = db:run("INSERT INTO t(name, v) VALUES (?, ?)", "alpha", 1)
      assert.equal(1, changes)
      assert.equal(1, id)
      changes, id = db:run("INSERT INTO t(name, v) VALUES (?, ?)", "beta", 2)
      assert.same({ 1, 2 }, { changes, id })
      assert.equal(2, db:last_insert_rowid())

      local rows = db:rows("SELECT id, name, v FROM t ORDER BY id")
      assert.same({ { id = 1, name = "alpha", v = 1 }, { id = 2, name = "beta", v = 2 } }, rows)
      assert.same({ id = 2, name = "beta", v = 2 }, db:first("SELECT * FROM t WHERE name = ?", "beta"))
      assert.is_nil(db:first("SELECT * FROM t WHERE name = ?", "gamma"))
      assert.equal("alpha", db:value("SELECT name FROM t WHERE id = ?", 1))
      assert.is_nil(db:value("SELECT name FROM t WHERE id = ?", 99))
      assert.same({}, db:rows("SELECT * FROM t WHERE id > 100"))

      changes = db:run("UPDATE t SET v = v + 10")
      assert.equal(2, changes)
      assert.equal(2, db:changes())
      assert.equal(23, db:value("SELECT sum(v) FROM t"))

      changes = db:run("DELETE FROM t WHERE name = ?", "alpha")
      assert.equal(1, changes)
      assert.equal(1, db:value("SELECT count(*) FROM t"))
      -- a SELECT through run reports no changes
      assert.equal(0, (db:run("SELECT * FROM t")))
    end)

    it("exec runs a script of several statements, comments included", function()
      db:exec [[
        -- a comment
        INSERT INTO t(name) VALUES ('a');  /* another */
        INSERT INTO t(name) VALUES ('b');
        UPDATE t SET v = 7;
      ]]
      assert.equal(14, db:value("SELECT sum(v) FROM t"))
      db:exec("") -- nothing to do
      db:exec("  -- only a comment\n")
    end)

    it("exec stops at the first failing statement and keeps what ran before", function()
      assert.has_error(function()
        db:exec("INSERT INTO t(name) VALUES ('a'); INSERT INTO nope VALUES (1); INSERT INTO t(name) VALUES ('c')")
      end, "drover.db.exec: no such table: nope")
      assert.same({ { name = "a" } }, db:rows("SELECT name FROM t"))
    end)

    it("exec rolls back a transaction its failing script opened", function()
      assert.has_error(function()
        db:exec("BEGIN; INSERT INTO t(name) VALUES ('a'); INSERT INTO t(name) VALUES ('a'); COMMIT")
      end, "drover.db.exec: UNIQUE constraint failed: t.name")
      assert.equal(0, db:value("SELECT count(*) FROM t"))
      assert.is_false(db:stats().in_transaction)
      db:run("INSERT INTO t(name) VALUES ('ok')") -- no transaction left open
      assert.equal(1, db:value("SELECT count(*) FROM t"))
    end)
  end)

  describe("types", function()
    it("round-trips integers, including the 64-bit extremes", function()
      for _, n in ipairs { 0, -1, 42, 2 ^ 53 | 0, (2 ^ 53 | 0) + 1, math.maxinteger, math.mininteger } do
        local _, id = db:run("INSERT INTO t(v) VALUES (?)", n)
        local got = db:value("SELECT v FROM t WHERE id = ?", id)
        assert.equal(n, got)
        assert.is_true(math.type(got) == "integer")
        assert.equal("integer", db:value("SELECT typeof(v) FROM t WHERE id = ?", id))
      end
    end)

    it("round-trips floats", function()
      for _, x in ipairs { 0.1, -2.5, 1e308, 5e-324, 3.0 } do
        local _, id = db:run("INSERT INTO t(v) VALUES (?)", x)
        local got = db:value("SELECT v FROM t WHERE id = ?", id)
        assert.equal(x, got)
        assert.equal("float", math.type(got))
      end
    end)

    it("binds strings as text, byte for byte, embedded zeros included", function()
      local all = {}
      for i = 0, 255 do all[#all + 1] = string.char(i) end
      all = table.concat(all)
      for _, s in ipairs { "", "a\0b", "\0\0\0", all, ("x"):rep(100000) .. "\0end" } do
        local _, id = db:run("INSERT INTO t(v) VALUES (?)", s)
        assert.equal(s, db:value("SELECT v FROM t WHERE id = ?", id))
        assert.equal("text", db:value("SELECT typeof(v) FROM t WHERE id = ?", id))
        assert.equal(#s, db:value("SELECT length(CAST(v AS BLOB)) FROM t WHERE id = ?", id))
      end
      -- the empty string is not NULL
      assert.equal(1, db:value("SELECT count(*) FROM t WHERE v = ''"))
    end)

    it("binds db.blob(s) as a BLOB and reads it back as a string", function()
      local b = dbm.blob("\0\1\2\255")
      assert.equal(4, #b)
      assert.equal("\0\1\2\255", tostring(b))
      local _, id = db:run("INSERT INTO t(v) VALUES (?)", b)
      assert.equal("blob", db:value("SELECT typeof(v) FROM t WHERE id = ?", id))
      assert.equal("\0\1\2\255", db:value("SELECT v FROM t WHERE id = ?", id))
      _, id = db:run("INSERT INTO t(v) VALUES (:v)", { v = dbm.blob("") })
      assert.equal("blob", db:value("SELECT typeof(v) FROM t WHERE id = ?", id))
      assert.equal("", db:value("SELECT v FROM t WHERE id = ?", id))
      assert.has_error(function() dbm.blob(12) end,
        "drover.db.blob: bad argument 's' (string expected, got number)")
    end)

    it("binds nil as NULL (absent from rows) and booleans as 0/1", function()
      local _, id = db:run("INSERT INTO t(name, v) VALUES (?, ?)", nil, true)
      local row = db:first("SELECT id, name, v FROM t WHERE id = ?", id)
      assert.same({ id = id, v = 1 }, row)
      assert.equal("null", db:value("SELECT typeof(name) FROM t WHERE id = ?", id))
      db:run("UPDATE t SET v = ? WHERE id = ?", false, id)
      assert.equal(0, db:value("SELECT v FROM t WHERE id = ?", id))
      assert.is_nil(db:value("SELECT NULL"))
    end)

    it("refuses values it cannot bind, naming the parameter", function()
      assert.has_error(function() db:run("INSERT INTO t(name, v) VALUES (?, ?)", "a", {}) end,
        "drover.db.run: bad parameter #2 (nil, boolean, number, string or drover.db.blob expected, got table)")
      assert.has_error(function() db:run("INSERT INTO t(v) VALUES (:v)", { v = print }) end,
        "drover.db.run: bad parameter ':v' (nil, boolean, number, string or drover.db.blob expected, got function)")
      assert.has_error(function() db:run("INSERT INTO t(v) VALUES (?)", io.stdout) end)
      assert.equal(0, db:value("SELECT count(*) FROM t"))
    end)
  end)

  describe("parameters", function()
    it("binds named parameters from a table, with :, @ and $ prefixes", function()
      db:run("INSERT INTO t(name, v) VALUES (:name, @v)", { name = "a", v = 1 })
      db:run("INSERT INTO t(name, v) VALUES ($name, :v)", { name = "b", v = 2 })
      assert.same({ { name = "a", v = 1 }, { name = "b", v = 2 } },
        db:rows("SELECT name, v FROM t ORDER BY id"))
      -- a parameter used twice binds once
      assert.equal(2, db:value("SELECT count(*) FROM t WHERE v >= :x OR name = :x", { x = 1 }))
    end)

    it("binds a missing named key as NULL", function()
      local _, id = db:run("INSERT INTO t(name, v) VALUES (:name, :v)", { name = "only-name" })
      assert.same({ name = "only-name" }, db:first("SELECT name, v FROM t WHERE id = ?", id))
    end)

    it("reads ?NNN and anonymous parameters from a table by index", function()
      db:run("INSERT INTO t(name, v) VALUES (?2, ?1)", { 10, "ten" })
      assert.same({ name = "ten", v = 10 }, db:first("SELECT name, v FROM t"))
    end)

    it("requires as many positional values as the statement has parameters", function()
      assert.has_error(function() db:run("INSERT INTO t(name, v) VALUES (?, ?)", "a") end,
        "drover.db.run: wrong number of parameters (the statement has 2, got 1)")
      assert.has_error(function() db:rows("SELECT ?", 1, 2) end,
        "drover.db.rows: wrong number of parameters (the statement has 1, got 2)")
      -- explicit trailing nils count
      db:run("INSERT INTO t(name, v) VALUES (?, ?)", "a", nil)
      assert.equal(1, db:value("SELECT count(*) FROM t WHERE v IS NULL"))
    end)
  end)

  describe("statement cache", function()
    it("prepares a statement once and rebinds it with new parameters each call", function()
      local sql = "INSERT INTO t(name, v) VALUES (?, ?)"
      local before = db:stats().prepares
      for i = 1, 50 do db:run(sql, "n" .. i, i * i) end
      assert.equal(before + 1, db:stats().prepares)
      for i = 1, 50 do
        assert.equal(i * i, db:value("SELECT v FROM t WHERE name = ?", "n" .. i))
      end
      assert.equal(before + 2, db:stats().prepares)
      -- the same text built at run time (a different string object) hits too
      local built = table.concat({ "SELECT v FROM t", "WHERE name = ?", "-- a long enough text" }, " ")
      db:value(built, "n1")
      local p = db:stats().prepares
      db:value(table.concat({ "SELECT v FROM t", "WHERE name = ?", "-- a long enough text" }, " "), "n2")
      assert.equal(p, db:stats().prepares)
      assert.is_true(db:stats().hits >= 98)
    end)

    it("stays correct when statements are evicted (cache_size=2) or not cached (0)", function()
      for _, size in ipairs { 2, 0 } do
        local d = assert(dbm.open(path, { cache_size = size }))
        d:run("DELETE FROM t")
        local sqls = {
          "INSERT INTO t(name, v) VALUES (?, ?)",
          "UPDATE t SET v = v + ? WHERE name = ?",
          "SELECT v FROM t WHERE name = ?",
        }
        for i = 1, 30 do
          d:run(sqls[1], "k" .. i, i)
          d:run(sqls[2], 1000, "k" .. i)
          assert.equal(1000 + i, d:value(sqls[3], "k" .. i))
          assert.is_true(d:stats().cached <= size)
        end
        assert.is_true(d:stats().prepares >= 90) -- 3 statements rotating through a cache of <= 2
        d:close()
      end
    end)

    it("keeps a reused statement isolated from a failed earlier use", function()
      local sql = "INSERT INTO t(name, v) VALUES (?, ?)"
      db:run(sql, "dup", 1)
      assert.has_error(function() db:run(sql, "dup", 2) end,
        "drover.db.run: UNIQUE constraint failed: t.name")
      assert.has_error(function() db:run(sql, "x", {}) end)
      db:run(sql, "fine", 3)
      assert.same({ { name = "dup", v = 1 }, { name = "fine", v = 3 } },
        db:rows("SELECT name, v FROM t ORDER BY id"))
    end)
  end)

  describe("transactions", function()
    it("commits and returns fn's results", function()
      local a, b = db:transaction(function(d, x)
        assert.equal(db, d)
        d:run("INSERT INTO t(name) VALUES (?)", x)
        assert.is_true(d:stats().in_transaction)
        return "done", 2
      end, "committed")
      assert.same({ "done", 2 }, { a, b })
      assert.equal(1, db:value("SELECT count(*) FROM t WHERE name = 'committed'"))
      assert.is_false(db:stats().in_transaction)
      -- visible to another connection: it was really committed
      local other = assert(dbm.open(path))
      assert.equal(1, other:value("SELECT count(*) FROM t"))
      other:close()
    end)

    it("rolls back and re-raises fn's error", function()
      local err = { code = 42 }
      local ok, e = pcall(db.transaction, db, function(d)
        d:run("INSERT INTO t(name) VALUES ('gone')")
        error(err)
      end)
      assert.is_false(ok)
      assert.equal(err, e) -- the very same error value
      assert.has_error(function()
        db:transaction(function(d)
          d:run("INSERT INTO t(name) VALUES ('gone')")
          error("boom", 0)
        end)
      end, "boom")
      assert.equal(0, db:value("SELECT count(*) FROM t"))
      assert.is_false(db:stats().in_transaction)
    end)

    it("nests with savepoints: an inner failure rolls back only the inner part", function()
      db:transaction(function(d)
        d:run("INSERT INTO t(name) VALUES ('outer1')")
        local ok = pcall(d.transaction, d, function()
          d:run("INSERT INTO t(name) VALUES ('inner-fails')")
          error("inner")
        end)
        assert.is_false(ok)
        d:transaction(function()
          d:run("INSERT INTO t(name) VALUES ('inner-ok')")
          d:transaction(function() d:run("INSERT INTO t(name) VALUES ('innermost')") end)
        end)
        d:run("INSERT INTO t(name) VALUES ('outer2')")
      end)
      assert.same({ { name = "outer1" }, { name = "inner-ok" }, { name = "innermost" }, { name = "outer2" } },
        db:rows("SELECT name FROM t ORDER BY id"))
      -- an outer failure rolls back the committed inner levels too
      pcall(db.transaction, db, function(d)
        d:transaction(function() d:run("INSERT INTO t(name) VALUES ('lost')") end)
        error("outer")
      end)
      assert.equal(0, db:value("SELECT count(*) FROM t WHERE name = 'lost'"))
    end)

    it("rolls back when COMMIT fails (deferred foreign key) and raises", function()
      db:exec("CREATE TABLE p(id INTEGER PRIMARY KEY); CREATE TABLE c(p_id REFERENCES p(id) DEFERRABLE INITIALLY DEFERRED)")
      assert.has_error(function()
        db:transaction(function(d) d:run("INSERT INTO c VALUES (99)") end)
      end, "drover.db.transaction: FOREIGN KEY constraint failed")
      assert.equal(0, db:value("SELECT count(*) FROM c"))
      assert.is_false(db:stats().in_transaction)
      db:transaction(function(d) d:run("INSERT INTO p VALUES (1)"); d:run("INSERT INTO c VALUES (1)") end)
      assert.equal(1, db:value("SELECT count(*) FROM c"))
    end)

    it("checks its arguments", function()
      assert.has_error(function() db:transaction(nil) end,
        "drover.db.transaction: bad argument 'fn' (function expected, got nil)")
      assert.has_error(function() db.transaction(nil, function() end) end,
        "drover.db.transaction: bad argument 'self' (drover.db expected, got nil)")
      assert.has_error(function() db.transaction(io.stdout, function() end) end,
        "drover.db.transaction: bad argument 'self' (drover.db expected, got userdata)")
      assert.has_error(function() db.transaction(dbm.blob("x"), function() end) end,
        "drover.db.transaction: bad argument 'self' (drover.db expected, got userdata)")
    end)

    it("works inside tasks and isolates tasks sharing one handle", function()
      local b_seen_waiting
      drover.run(function()
        local b
        local a = drover.spawn(function()
          return pcall(db.transaction, db, function(d)
            d:run("INSERT INTO t(name) VALUES ('a1')")
            drover.sleep(0.05) -- yields inside the transaction: b runs meanwhile
            b_seen_waiting = b:status()
            -- b's insert did not slip into this transaction
            assert.equal(0, d:value("SELECT count(*) FROM t WHERE name = 'b'"))
            error("a fails")
          end)
        end)
        b = drover.spawn(function()
          db:run("INSERT INTO t(name) VALUES ('b')")
        end)
        local ok, err = a:join()
        assert.is_false(ok)
        assert.matches("a fails", err)
        b:join()
      end)
      assert.equal("waiting", b_seen_waiting)
      assert.same({ { name = "b" } }, db:rows("SELECT name FROM t"))
    end)

    it("releases the handle when a task inside a transaction is cancelled", function()
      drover.run(function()
        local a = drover.spawn(function()
          db:transaction(function(d)
            d:run("INSERT INTO t(name) VALUES ('cancelled')")
            drover.sleep(60)
          end)
        end)
        local waiter = drover.spawn(function() -- waits for a's transaction, then is cancelled too
          db:transaction(function(d) d:run("INSERT INTO t(name) VALUES ('never')") end)
        end)
        H.wait_until(function() return a:status() == "waiting" and waiter:status() == "waiting" end, 30)
        waiter:cancel()
        a:cancel()
        local ok, err = a:wait()
        assert.is_false(ok)
        assert.matches("cancelled", err)
        assert.is_false((waiter:wait()))
        -- the handle is free again
        db:transaction(function(d) d:run("INSERT INTO t(name) VALUES ('after')") end)
      end)
      assert.same({ { name = "after" } }, db:rows("SELECT name FROM t"))
      assert.is_false(db:stats().in_transaction)
    end)
  end)

  describe("user_version and migrate", function()
    it("gets and sets PRAGMA user_version", function()
      assert.equal(0, db:user_version())
      db:user_version(12)
      assert.equal(12, db:user_version())
      assert.equal(12, db:value("PRAGMA user_version"))
      assert.has_error(function() db:user_version("3") end,
        "drover.db.user_version: bad argument 'n' (integer expected, got string)")
      assert.has_error(function() db:user_version(1.5) end)
    end)

    it("applies pending migration steps once, atomically", function()
      local steps = {
        "CREATE TABLE m1(a)",
        function(d) d:run("INSERT INTO m1 VALUES (?)", "from-fn") end,
      }
      assert.same({ 0, 2 }, { db:migrate(steps) })
      assert.same({ 2, 2 }, { db:migrate(steps) })
      assert.equal(1, db:value("SELECT count(*) FROM m1"))
      steps[3] = "ALTER TABLE m1 ADD COLUMN b; CREATE TABLE broken(" -- fails
      assert.has_error(function() db:migrate(steps) end)
      assert.equal(2, db:user_version())
      assert.equal(1, #db:rows("PRAGMA table_info(m1)"))
      db:user_version(9)
      assert.has_error(function() db:migrate(steps) end,
        "drover.db.migrate: " .. path .. " has schema version 9, newer than the 3 known here")
      assert.has_error(function() db:migrate("x") end,
        "drover.db.migrate: bad argument 'steps' (table expected, got string)")
    end)
  end)

  describe("errors", function()
    it("names the operation and gives SQLite's message", function()
      assert.has_error(function() db:run("SELECT * FROM foo") end, "drover.db.run: no such table: foo")
      assert.has_error(function() db:rows("SELEC 1") end, 'drover.db.rows: near "SELEC": syntax error')
      assert.has_error(function() db:first("SELECT nope FROM t") end, "drover.db.first: no such column: nope")
      assert.has_error(function() db:value("SELECT * FROM foo") end, "drover.db.value: no such table: foo")
      assert.has_error(function() db:exec("CREATE TABLE") end, 'drover.db.exec: incomplete input')
    end)

    it("reports constraint violations", function()
      db:run("INSERT INTO t(name) VALUES ('u')")
      assert.has_error(function() db:run("INSERT INTO t(name) VALUES ('u')") end,
        "drover.db.run: UNIQUE constraint failed: t.name")
      assert.has_error(function() db:run("INSERT INTO child(t_id) VALUES (999)") end,
        "drover.db.run: FOREIGN KEY constraint failed")
      assert.has_error(function() db:run("INSERT INTO child(t_id) VALUES (NULL)") end,
        "drover.db.run: NOT NULL constraint failed: child.t_id")
    end)

    it("runs one statement at a time outside exec", function()
      assert.has_error(function() db:run("INSERT INTO t(name) VALUES ('a'); DELETE FROM t") end,
        "drover.db.run: more than one SQL statement (db:exec runs scripts)")
      assert.has_error(function() db:run("   -- nothing") end, "drover.db.run: no SQL statement in the text")
      assert.has_error(function() db:exec("SELECT 1;\0DROP TABLE t") end, "drover.db.exec: SQL text contains a zero byte")
      assert.has_error(function() db:run("SELECT 1\0") end, "drover.db.run: SQL text contains a zero byte")
      assert.has_error(function() db:exec("SELECT ?", 1) end,
        "drover.db.exec: takes no parameters (db:run binds parameters)")
      -- a trailing semicolon or comment is fine
      db:run("INSERT INTO t(name) VALUES ('a'); -- done")
      assert.equal(1, db:value("SELECT count(*) FROM t;"))
    end)

    it("rejects wrong argument types, naming the argument", function()
      assert.has_error(function() db:run(nil) end, "drover.db.run: bad argument 'sql' (string expected, got nil)")
      assert.has_error(function() db:rows(12) end, "drover.db.rows: bad argument 'sql' (string expected, got number)")
      assert.has_error(function() db.value({}, "SELECT 1") end,
        "drover.db.value: bad argument 'self' (drover.db expected, got table)")
      assert.has_error(function() db.run("SELECT 1") end,
        "drover.db.run: bad argument 'self' (drover.db expected, got string)")
      assert.has_error(function() db.exec(io.stdout, "SELECT 1") end,
        "drover.db.exec: bad argument 'self' (drover.db expected, got userdata)")
    end)
  end)

  describe("close", function()
    it("is idempotent and gives a clear error on use after close", function()
      db:run("INSERT INTO t(name) VALUES ('x')")
      db:close()
      db:close()
      assert.is_false(db:isopen())
      assert.matches("closed", tostring(db))
      local msg = "database is closed (" .. path .. ")"
      assert.has_error(function() db:run("SELECT 1") end, "drover.db.run: " .. msg)
      assert.has_error(function() db:rows("SELECT 1") end, "drover.db.rows: " .. msg)
      assert.has_error(function() db:first("SELECT 1") end, "drover.db.first: " .. msg)
      assert.has_error(function() db:value("SELECT 1") end, "drover.db.value: " .. msg)
      assert.has_error(function() db:exec("SELECT 1") end, "drover.db.exec: " .. msg)
      assert.has_error(function() db:transaction(function() end) end, "drover.db.transaction: " .. msg)
      assert.has_error(function() db:user_version() end, "drover.db.user_version: " .. msg)
      assert.has_error(function() db:changes() end, "drover.db.changes: " .. msg)
      assert.has_error(function() db:last_insert_rowid() end, "drover.db.last_insert_rowid: " .. msg)
      assert.equal(0, db:stats().cached)
      -- the data was written
      local again = assert(dbm.open(path))
      assert.equal(1, again:value("SELECT count(*) FROM t"))
      again:close()
    end)

    it("closing inside a transaction rolls it back and the transaction reports it", function()
      assert.has_error(function()
        db:transaction(function(d)
          d:run("INSERT INTO t(name) VALUES ('x')")
          d:close()
        end)
      end, "drover.db.transaction: database was closed during the transaction (" .. path .. ")")
      db = assert(dbm.open(path))
      assert.equal(0, db:value("SELECT count(*) FROM t"))
    end)

    it("closes on garbage collection and with <close>", function()
      for _ = 1, 20 do
        local d = assert(dbm.open(path))
        d:value("SELECT count(*) FROM t")
      end
      collectgarbage()
      collectgarbage()
      local keep
      do
        local d <close> = assert(dbm.open(path))
        keep = d
        assert.is_true(d:isopen())
      end
      assert.is_false(keep:isopen())
    end)
  end)

  describe("batches written by a connection of their own (db:submit)", function()
    it("writes every kind of value, as run and as run_rows from queue entries", function()
      local b = dbm.batch()
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "int", 42)
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "float", 2.5)
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "bool", true)
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "nil", nil)
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "text", "a\0b\255")
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "blob", dbm.blob("\1\2"))
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "empty", dbm.blob(""))
      b:run("INSERT INTO t(name, v) VALUES(?, ?)", "empty text", "")
      local sql = "INSERT INTO t(name, v) VALUES(?, ?)"
      local entries = { { sql, 2, "r1", 1 }, { sql, 2, "r2", nil }, { sql, 2, "r3", "three" } }
      b:run_rows("INSERT INTO t(name, v) VALUES(?, ?), (?, ?)", entries, 2, 2)
      assert.equal(9, #b)
      db:submit(b)
      assert.equal(0, #b) -- handed over
      assert.is_true(db:wait_batch())
      assert.is_true(db:batch_done())
      local got = {}
      for _, r in ipairs(db:rows("SELECT name, v, typeof(v) AS ty FROM t ORDER BY id")) do
        got[#got + 1] = { r.name, r.v, r.ty }
      end
      assert.same({ { "int", 42, "integer" }, { "float", 2.5, "real" }, { "bool", 1, "integer" },
        { "nil", nil, "null" }, { "text", "a\0b\255", "text" }, { "blob", "\1\2", "blob" },
        { "empty", "", "blob" }, { "empty text", "", "text" }, { "r2", nil, "null" }, { "r3", "three", "text" } }, got)
    end)

    it("a statement that fails rolls the whole batch back, in one line naming why", function()
      local function write(...)
        local b = dbm.batch()
        for _, st in ipairs({ ... }) do b:run(table.unpack(st)) end
        db:submit(b)
        return db:wait_batch()
      end
      local ins = "INSERT INTO t(name) VALUES(?)"
      assert.same({ false, "drover.db.run: UNIQUE constraint failed: t.name" },
        { write({ ins, "a" }, { ins, "b" }, { ins, "a" }) })
      assert.same({ false, "drover.db.run: wrong number of parameters (the statement has 1, got 2)" },
        { write({ ins, "c" }, { ins, "d", "e" }) })
      assert.same({ false, "drover.db.run: no such table: nope" }, { write({ ins, "f" }, { "DELETE FROM nope" }) })
      assert.equal(0, db:value("SELECT count(*) FROM t")) -- nothing of any of them
      assert.is_true(write({ ins, "a" }, { ins, "b" }))
      assert.equal(2, db:value("SELECT count(*) FROM t"))
      assert.is_false(db:stats().in_transaction)
    end)

    it("takes one batch at a time, and refuses what it cannot write, naming it", function()
      assert.is_true(db:wait_batch()) -- none out
      local b = dbm.batch()
      b:run("INSERT INTO t(name) VALUES('x')")
      db:submit(b)
      local b2 = dbm.batch()
      assert.has_error(function() db:submit(b2) end,
        "drover.db.submit: the previous batch of " .. path .. " is still out (wait_batch first)")
      assert.is_true(db:wait_batch())
      assert.has_error(function() b2:run("INSERT INTO t(name, v) VALUES(?, ?)", "y", {}) end,
        "drover.db.batch.run: bad parameter #2 (nil, boolean, number, string or drover.db.blob expected, got table)")
      assert.has_error(function() b2:run(42) end,
        "drover.db.batch.run: bad argument 'sql' (string expected, got number)")
      assert.has_error(function() db:submit({}) end,
        "drover.db.submit: bad argument 'batch' (drover.db.batch expected, got table)")
      local ro = assert(dbm.open(path, { readonly = true }))
      assert.has_error(function() ro:submit(dbm.batch()) end, "drover.db.submit: " .. path .. " is open read-only")
      ro:close()
      db:close()
      assert.has_error(function() db:submit(dbm.batch()) end, "drover.db.submit: database is closed (" .. path .. ")")
      db = nil
    end)

    it("says so when the second connection cannot be opened, and keeps the batch", function()
      assert.equal(0, db:value("SELECT count(*) FROM t")) -- the handle's own files are open
      local b = dbm.batch()
      b:run("INSERT INTO t(name) VALUES('kept')")
      local files = {}
      while true do -- use up every descriptor
        local f = io.open("/dev/null")
        if not f then break end
        files[#files + 1] = f
      end
      local sent, why = db:submit(b)
      for _, f in ipairs(files) do f:close() end
      assert.is_false(sent)
      assert.equal("drover.db.submit: cannot open " .. path .. " for writing: unable to open database file", why)
      assert.equal(1, #b) -- kept
      assert.is_true(db:submit(b))
      assert.is_true(db:wait_batch())
      assert.equal("kept", db:value("SELECT name FROM t"))
    end)

    it("where the caller cannot yield, wait_batch blocks until the batch is written", function()
      local b = dbm.batch()
      for i = 1, 500 do b:run("INSERT INTO t(name) VALUES(?)", "n" .. i) end
      drover.run(function()
        db:submit(b)
        local r
        -- a comparator called from C: no yield possible there
        table.sort({ 2, 1 }, function(x, y) r = r or { db:wait_batch() }; return x < y end)
        assert.same({ true }, r)
      end)
      assert.equal(500, db:value("SELECT count(*) FROM t"))
    end)
  end)

  describe("several processes", function()
    local function script(name, src)
      local p = dir .. "/" .. name
      write_file(p, src)
      return p
    end

    -- A second process holds the write lock (BEGIN EXCLUSIVE) until we
    -- close its stdin; it creates `marker` once it has the lock.
    local function hold_lock(opts)
      local holder = script("holder.lua", [[
        local path, marker, wal = ...
        local db = assert(require("drover.db").open(path, { wal = wal == "wal" }))
        db:exec("BEGIN EXCLUSIVE")
        db:run("INSERT INTO t(name) VALUES ('holder')")
        local f = assert(io.open(marker, "w")); f:close()
        io.read("a")
        db:exec("COMMIT")
        db:close()
      ]])
      local marker = dir .. "/locked"
      os.remove(marker)
      local p = assert(io.popen((H.lua .. " %s %s %s %s"):format(q(holder), q(opts.path or path), q(marker),
        opts.wal == false and "nowal" or "wal"), "w"))
      H.wait_until(function() return readable(marker) end, 60, "the holder to take the lock")
      return p
    end

    it("raises 'database is locked' naming the path after busy_timeout", function()
      local d = assert(dbm.open(path, { busy_timeout = 300 }))
      local p = hold_lock {}
      local t0 = drover.now()
      local ok, err = pcall(d.run, d, "INSERT INTO t(name) VALUES ('me')")
      local waited = drover.now() - t0
      assert.is_false(ok)
      assert.equal("drover.db.run: database is locked: " .. path ..
        " (another connection held the lock for more than 300 ms)", err)
      assert.is_true(waited >= 0.25, "waited only " .. waited .. " s")
      -- WAL: readers are not blocked by the writer
      assert.equal(0, d:value("SELECT count(*) FROM t"))
      -- a transaction cannot begin either
      assert.has_error(function() d:transaction(function() end) end,
        "drover.db.transaction: database is locked: " .. path ..
        " (another connection held the lock for more than 300 ms)")
      assert.is_false(d:stats().in_transaction)
      p:close() -- the holder commits and exits
      d:run("INSERT INTO t(name) VALUES ('me')")
      assert.same({ { name = "holder" }, { name = "me" } }, d:rows("SELECT name FROM t ORDER BY id"))
      d:close()
    end)

    -- submit a batch of one INSERT of `name` into t on handle d
    local function submit_insert(d, name)
      local b = dbm.batch()
      b:run("INSERT INTO t(name) VALUES(?)", name)
      d:submit(b)
    end

    it("a batch waits for another process's lock on its own thread: the loop goes on", function()
      local d = assert(dbm.open(path, { busy_timeout = 60000 }))
      local p = hold_lock {}
      submit_insert(d, "batch")
      local ticks, waiter_error = 0, nil
      drover.run(function()
        local waiter = drover.spawn(function() return d:wait_batch() end)
        H.wait_until(function() ticks = ticks + 1; return ticks >= 5 end, 60, "ticks while the batch waits")
        assert.equal("waiting", waiter:status())
        assert.is_false(d:batch_done())
        waiter:cancel() -- the wait ends; the batch does not
        waiter_error = select(2, pcall(waiter.join, waiter))
        p:close() -- the holder commits: the batch goes through
        local again = drover.spawn(function() return d:wait_batch() end)
        assert.is_true(again:join())
      end)
      assert.matches("cancelled", tostring(waiter_error))
      assert.same({ { name = "holder" }, { name = "batch" } }, d:rows("SELECT name FROM t ORDER BY id"))
      d:close()
    end)

    it("a batch fails with 'database is locked' naming the path after busy_timeout", function()
      local d = assert(dbm.open(path, { busy_timeout = 300 }))
      local p = hold_lock {}
      submit_insert(d, "batch")
      assert.same({ false, "drover.db.run: database is locked: " .. path ..
        " (another connection held the lock for more than 300 ms)" }, { d:wait_batch() })
      p:close()
      submit_insert(d, "again")
      assert.is_true(d:wait_batch())
      assert.same({ { name = "holder" }, { name = "again" } }, d:rows("SELECT name FROM t ORDER BY id"))
      d:close()
    end)

    it("closing a handle with a batch out lets the batch finish", function()
      local d = assert(dbm.open(path, { busy_timeout = 60000 }))
      local p = hold_lock {}
      submit_insert(d, "after close")
      d:close() -- returns at once; the batch waits for the lock on its thread
      p:close()
      H.wait_until(function() return db:value("SELECT count(*) FROM t WHERE name = 'after close'") == 1 end,
        60, "the batch of the closed handle")
    end)

    it("without WAL, even readers get 'database is locked'", function()
      local plain = dir .. "/plain.db"
      local d = assert(dbm.open(plain, { wal = false, busy_timeout = 200 }))
      d:exec("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT)")
      local p = hold_lock { path = plain, wal = false }
      assert.has_error(function() d:value("SELECT count(*) FROM t") end,
        "drover.db.value: database is locked: " .. plain ..
        " (another connection held the lock for more than 200 ms)")
      p:close()
      assert.equal(1, d:value("SELECT count(*) FROM t"))
      d:close()
    end)

    it("a task waiting for the lock yields: other tasks keep running", function()
      local d = assert(dbm.open(path, { busy_timeout = 20000 }))
      local p = hold_lock {}
      local ticks, done, status_while_locked = 0, false, nil
      drover.run(function()
        local a = drover.spawn(function()
          local changes = d:run("INSERT INTO t(name) VALUES ('waited')")
          done = true
          return changes
        end)
        local ticker = drover.spawn(function()
          local function finished() local st = a:status() return st == "done" or st == "failed" end
          while not done and not finished() do
            ticks = ticks + 1
            drover.sleep(0.01)
          end
        end)
        H.wait_until(function() return ticks >= 5 end, 60, "ticks while the insert waits")
        status_while_locked = a:status() -- waiting, or ready between two retries
        assert.is_false(done)
        p:close() -- release: the waiting insert goes through
        assert.equal(1, a:join())
        ticker:join()
      end)
      assert.is_truthy(status_while_locked == "waiting" or status_while_locked == "ready", status_while_locked)
      assert.same({ { name = "holder" }, { name = "waited" } }, d:rows("SELECT name FROM t ORDER BY id"))
      d:close()
    end)

    it("a second connection in the same process waits (yielding) for the first's commit", function()
      local d2 = assert(dbm.open(path, { busy_timeout = 20000 }))
      local order = {}
      drover.run(function()
        local holder = drover.spawn(function()
          db:transaction(function(d)
            d:run("INSERT INTO t(name) VALUES ('first')")
            order[#order + 1] = "holder in"
            H.wait_until(function() return #order >= 2 end, 60) -- until the writer has tried
            drover.sleep(0.05)
            order[#order + 1] = "holder commits"
          end)
        end)
        local writer = drover.spawn(function()
          order[#order + 1] = "writer tries"
          d2:run("INSERT INTO t(name) VALUES ('second')") -- BUSY: waits for the holder
          order[#order + 1] = "writer done"
        end)
        -- a third task on d2 waits for the lock too, and is cancelled while waiting
        local victim = drover.spawn(function() d2:run("INSERT INTO t(name) VALUES ('victim')") end)
        H.wait_until(function() return victim:status() == "waiting" end, 60)
        victim:cancel()
        local ok, err = victim:wait()
        assert.is_false(ok)
        assert.matches("cancelled", err)
        holder:join()
        writer:join()
      end)
      assert.same({ "holder in", "writer tries", "holder commits", "writer done" }, order)
      assert.same({ { name = "first" }, { name = "second" } }, d2:rows("SELECT name FROM t ORDER BY id"))
      d2:close()
    end)

    it("4 writer processes x 500 rows in transactions: every row arrives, integrity ok", function()
      db:exec("CREATE TABLE r(worker INTEGER, i INTEGER, payload TEXT, PRIMARY KEY(worker, i))")
      local writer = script("writer.lua", [[
        local id, path, n, per = tonumber(arg[1]), arg[2], tonumber(arg[3]), tonumber(arg[4])
        local db = assert(require("drover.db").open(path, { busy_timeout = 60000 }))
        for b = 0, n // per - 1 do
          db:transaction(function(d)
            for i = b * per + 1, b * per + per do
              d:run("INSERT INTO r(worker, i, payload) VALUES (?, ?, ?)", id, i, ("p"):rep(i % 50))
            end
          end)
        end
        db:close()
        io.write("done ", id, "\n")
      ]])
      local procs = {}
      for w = 1, 4 do
        procs[w] = assert(io.popen((H.lua .. " %s %d %s 500 25 2>&1"):format(q(writer), w, q(path))))
      end
      for w = 1, 4 do
        local out = procs[w]:read("a")
        local ok, how, code = procs[w]:close()
        assert.equal("done " .. w .. "\n", out)
        assert.same({ true, "exit", 0 }, { ok, how, code })
      end
      assert.equal(2000, db:value("SELECT count(*) FROM r"))
      for w = 1, 4 do
        assert.same({ n = 500, lo = 1, hi = 500 },
          db:first("SELECT count(*) AS n, min(i) AS lo, max(i) AS hi FROM r WHERE worker = ?", w))
      end
      assert.equal("ok", db:value("PRAGMA integrity_check"))
    end)
  end)

  describe("the store's write queue", function()
    local store_mod = require "drover.store"

    local function task(id, i)
      return { id = string.format("t%04d", i), flow_run_id = id, name = "n", kind = "task",
        call_key = "/n#" .. i, state = "RUNNING", params = "[]", params_hash = "[]", attempts = 1, started = i }
    end

    -- another process holds the store's write lock until release() is called
    local function hold_store_lock(home)
      local holder = assert(drover.proc.spawn({ "sqlite3", home .. "/drover.db" }, { stdin = true }))
      holder:write(".timeout 30000\nBEGIN IMMEDIATE;\n")
      H.wait_until(function()
        return drover.proc.run({ "sqlite3", "-cmd", ".timeout 10", home .. "/drover.db",
          "BEGIN IMMEDIATE; ROLLBACK;" }).code ~= 0
      end, 30, "the lock")
      return function()
        holder:write("ROLLBACK;\n")
        holder:close()
        holder:wait(10)
      end
    end

    it("sends a full queue to the writer while the next fills; reads see every row once, in order", function()
      local home = H.tempdir()
      local s = assert(store_mod.open(home, { batch_size = 16 }))
      local id = s:create_flow_run { name = "q", state = "RUNNING" }
      local out = 0
      for i = 1, 300 do
        local t = task(id, i)
        s:task_run_started(t)
        s:task_run_finished(t.id, "COMPLETED", nil, nil, true, 1, i + 0.5, nil, nil)
        s:log(id, t.id, "stdout", "line " .. i)
        if s.inflight then out = out + 1 end
      end
      assert.is_true(out > 0, "no batch was written off the loop")
      local runs = s:task_runs(id) -- a read: waits for the batch out, writes the rest
      assert.equal(300, #runs)
      for i, r in ipairs(runs) do
        assert.equal(string.format("t%04d", i), r.id)
        assert.equal("COMPLETED", r.state)
        assert.equal(i + 0.5, r.ended)
      end
      local logs = s:logs(id)
      assert.equal(300, #logs)
      for i, l in ipairs(logs) do assert.equal("line " .. i, l.line) end
      assert.equal(300, s:value("SELECT n FROM run_counts WHERE kind = 'task' AND state = 'COMPLETED'"))
      s:close()
      os.execute("rm -rf " .. home)
    end)

    it("a batch the writer cannot write comes back in front; a change queued since stays after it", function()
      local home = H.tempdir()
      local s = assert(store_mod.open(home, { batch_size = 4, busy_timeout = 100 }))
      local id = s:create_flow_run { name = "q", state = "RUNNING" }
      local release = hold_store_lock(home)
      for i = 1, 4 do s:task_run_started(task(id, i)) end -- the fourth fills the queue: sent
      assert.truthy(s.inflight)
      for i = 1, 4 do s:task_run_state(string.format("t%04d", i), "SCHEDULED", "retry", 1) end
      H.wait_until(function() return s.write_error end, 30, "the batch to fail")
      assert.matches("database is locked", s.write_error)
      -- changed again after the failure: must land after the SCHEDULED above
      for i = 1, 4 do
        s:task_run_finished(string.format("t%04d", i), "COMPLETED", nil, nil, true, 2, 10 + i, nil, nil)
      end
      release()
      H.wait_until(function() return s.npending == 0 and not s.inflight and not s.write_error end, 30,
        "the queue to be written")
      local runs = s:task_runs(id)
      assert.equal(4, #runs)
      for i, r in ipairs(runs) do
        assert.same({ string.format("t%04d", i), "COMPLETED", 2, 10 + i }, { r.id, r.state, r.attempts, r.ended })
      end
      s:close()
      os.execute("rm -rf " .. home)
    end)

    it("keeps a batch that fails until a later flush commits it", function()
      local home = H.tempdir()
      local s = assert(store_mod.open(home, { busy_timeout = 100 }))
      local id = s:create_flow_run { name = "q", state = "RUNNING" }
      -- another process holds the write lock, longer than the busy timeout
      local holder = assert(drover.proc.spawn({ "sqlite3", home .. "/drover.db" }, { stdin = true }))
      holder:write(".timeout 30000\nBEGIN IMMEDIATE;\n")
      H.wait_until(function()
        return drover.proc.run({ "sqlite3", "-cmd", ".timeout 10", home .. "/drover.db",
          "BEGIN IMMEDIATE; ROLLBACK;" }).code ~= 0
      end, 30, "the lock")
      for i = 1, 10 do s:log(id, nil, "stdout", "line " .. i) end
      local ok, err = pcall(s.flush, s)
      assert.is_false(ok)
      assert.matches("locked", err)
      assert.are.equal(10, s.npending) -- still queued, not dropped
      assert.matches("locked", s.write_error)
      holder:write("ROLLBACK;\n")
      holder:close()
      holder:wait(10)
      -- tried again by itself, and written once
      H.wait_until(function() return s.npending == 0 and not s.inflight and not s.write_error end, 30,
        "the queue to be written")
      assert.is_nil(s.write_error)
      local lines = {}
      for _, l in ipairs(s:logs(id)) do lines[#lines + 1] = l.line end
      assert.are.same({ "line 1", "line 2", "line 3", "line 4", "line 5", "line 6", "line 7", "line 8",
        "line 9", "line 10" }, lines)
      s:close()
      os.execute("rm -rf " .. home)
    end)
  end)
end)
