--- drover.db: SQLite for drover (the tracking store stands on it).
--
--   local db = assert(drover.db.open(path, {busy_timeout = 5000}))
--   db:exec[[CREATE TABLE IF NOT EXISTS runs(id INTEGER PRIMARY KEY, name TEXT, state TEXT)]]
--   local _, id = db:run("INSERT INTO runs(name, state) VALUES(?, ?)", "build", "running")
--   db:run("UPDATE runs SET state = :state WHERE id = :id", {state = "done", id = id})
--   for _, r in ipairs(db:rows("SELECT * FROM runs WHERE state = ?", "done")) do ... end
--   db:transaction(function(db) ... end)      -- BEGIN IMMEDIATE ... COMMIT / ROLLBACK
--
-- The binding is C (engine/src/db.c, whose header comment explains the
-- choices: statement cache, lock waits that yield the task, the per-handle
-- transaction lock).  In short:
--
--   open(path, opts)        -> db, or nil and "drover.db.open: PATH: reason"
--                              opts: readonly=false, create=true, wal=true
--                              (journal_mode=WAL, synchronous=NORMAL),
--                              foreign_keys=true, busy_timeout=5000 (ms),
--                              cache_size=64 (prepared statements; 0 = none),
--                              auto_vacuum=nil ("none", "full", "incremental":
--                              applied to a database without tables only)
--                              (an unknown option is an error)
--   blob(s)                 -> a value that binds as BLOB (a plain string binds
--                              as TEXT, byte for byte, embedded zeros included)
--   db:exec(sql)            runs a script (several statements, no parameters)
--   db:run(sql, ...)        -> changes, last_insert_rowid
--   db:rows(sql, ...)       -> list of rows, each {column = value} (NULL
--                              columns are absent; duplicate names: last wins)
--   db:first(sql, ...)      -> the first row or nil
--   db:value(sql, ...)      -> the first column of the first row, or nil
--   db:transaction(fn, ...) -> fn(db, ...)'s results; nested calls use
--                              SAVEPOINTs; an error in fn rolls back and is
--                              re-raised
--   db:user_version([n])    get / set PRAGMA user_version
--   db:migrate(steps)       -> old, new version (see below)
--   db:changes(), db:last_insert_rowid(), db:stats(), db:path(),
--   db:isopen(), db:close() (idempotent; also __gc and <close>)
--
-- Writes off the loop thread (engine/src/dbwriter.c): a batch of
-- statements, written in one transaction by a second connection of the
-- handle's on a libuv worker thread, while the loop goes on:
--
--   batch()                 -> an empty batch; b:run(sql, ...) appends a
--                              statement (its values copied: positional only),
--                              b:run_rows(sql, q, i, k) one whose values are
--                              those of entries q[i..i+k-1] ({sql, n, v1..vn});
--                              #b is how many statements it holds
--   db:submit(b)            -> true: writing b has started (b is left
--                              empty); one batch per handle at a time;
--                              false and why: the second connection cannot
--                              be opened (no descriptor left), b is kept
--   db:batch_done()         -> true when none is out or it has been written
--   db:wait_batch()         -> true, or false and "drover.db.run: why" (the
--                              whole batch rolled back); yields in a task
--
-- Parameters are positional (`?`, one vararg each, count must match) or one
-- table for named ones (`:name`, `@name`, `$name`; a missing key is NULL).
-- nil -> NULL, booleans -> 0/1, integers -> INTEGER (64-bit), floats -> REAL.
--
-- Errors raise "drover.db.FN: SQLite's message" ("drover.db.run: no such
-- table: foo"); a lock still held by another connection after busy_timeout
-- raises "... database is locked: PATH (...)".  While waiting for such a
-- lock, a task yields (other tasks run).
local core = require "drover.core"

local M = {
  open = core.db.open,
  blob = core.db.blob,
  batch = core.db.batch,
}

local methods = core.db.methods

--- Bring the schema up to date.  steps[i] (a SQL script or a function(db))
-- turns version i-1 into version i; the steps not applied yet run in one
-- transaction together with the new user_version, so a failure leaves the
-- database as it was, and two processes migrating at once cannot both apply
-- a step (the version is read inside the write transaction).
-- Returns the version found and the version now.
function methods:migrate(steps)
  if type(steps) ~= "table" then
    error("drover.db.migrate: bad argument 'steps' (table expected, got " .. type(steps) .. ")", 2)
  end
  for i = 1, #steps do
    local t = type(steps[i])
    if t ~= "string" and t ~= "function" then
      error(("drover.db.migrate: bad argument 'steps[%d]' (string or function expected, got %s)")
        :format(i, t), 2)
    end
  end
  return self:transaction(function(db)
    local found = db:user_version()
    if found > #steps then
      error(("drover.db.migrate: %s has schema version %d, newer than the %d known here")
        :format(db:path(), found, #steps), 0)
    end
    for v = found + 1, #steps do
      local step = steps[v]
      if type(step) == "string" then db:exec(step) else step(db) end
    end
    if found < #steps then db:user_version(#steps) end
    return found, #steps
  end)
end

return M
