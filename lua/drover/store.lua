--- The tracking store: packages, deployments, flow runs, task runs, log
-- lines, the scheduler's fire times and run tokens, and every SQL statement
-- drover runs on them.  Two databases: SQLite (a WAL file under
-- DROVER_HOME, the default) and PostgreSQL (a server's database, for a
-- team and for several servers); the queries both share are here, written
-- once with `?` placeholders, and what only one of them says (its schema
-- migrations, change marks, file maintenance) is its dialect,
-- lua/drover/store/sqlite.lua or lua/drover/store/postgresql.lua.
--
-- Several drover processes may share one store (a CLI, a worker per run,
-- the daemon), so every write is a short transaction and readers never
-- block writers.
--
-- Tracking must cost little: state changes of task runs are queued and
-- written in one transaction per batch (at most `batch_size` statements, or
-- after `batch_delay` seconds), not one transaction per statement.  Reads
-- flush the queue first, so a process always reads its own writes.  On
-- SQLite a batch is written by a connection of its own on a worker thread
-- (dialect.submit, engine/src/dbwriter.c) while this one queues the next;
-- every other write of the store's waits for the batch out (Store:locked).
local core = require "drover.core"
local json = require "drover.json"
local states = require "drover.states"

-- state lists for `state IN (...)`, from drover.states
local ACTIVE_SQL = states.sql_list(states.active_list)
local FINAL_SQL = states.sql_list(states.final_list)
local WORKING_SQL = states.sql_list(states.working_list)

local M = {}
local Store = {}
Store.__index = Store

M.SCHEMA_VERSION = 7

--- Wall-clock seconds with microsecond resolution (comparable across
-- processes, unlike drover.now()).
M.time = core.time

--- The store directory: the embedder's option (drover_options.home: what
-- a program asks for explicitly beats its environment), DROVER_HOME, XDG,
-- ~/.local.
function M.home()
  local ok, cfg = pcall(require, "drover.config")
  if ok and type(cfg) == "table" and cfg.home then return cfg.home end
  local h = os.getenv("DROVER_HOME")
  if h and h ~= "" then return h end
  local xdg = os.getenv("XDG_DATA_HOME")
  if xdg and xdg ~= "" then return xdg .. "/drover" end
  return (os.getenv("HOME") or "/tmp") .. "/.local/share/drover"
end

-- Run ids: 12 hex digits from a generator seeded from /dev/urandom, so ids
-- made in different processes at the same moment do not collide.
do
  local f = io.open("/dev/urandom", "rb")
  if f then
    local s = f:read(8)
    f:close()
    math.randomseed(string.unpack("<i8", s))
  end
end
function M.new_id()
  return string.format("%08x%04x", math.random(0, 0xffffffff), math.random(0, 0xffff))
end

-- Task run ids: 12 hex digits too, but consecutive from a random start
-- drawn once per process (before a workflow can reseed math.random).  A
-- process's task runs then go into one place of the id index, a page at
-- a time, instead of one random page each (the store's cache and its
-- WAL see a page per batch, not a page per row); two processes' ranges
-- meet only if their starts fall within a run's length of each other
-- (less likely than two random ids colliding, once a store holds
-- millions); and the id costs a concatenation, not a string.format of
-- two random numbers.  Flow run ids stay random: people type prefixes.
local HEX2 = {}
for i = 0, 255 do HEX2[i] = string.format("%02x", i) end
local task_seq = math.random(0, 0xffffffffffff)
local task_hi, task_prefix = -1, nil
function M.new_task_id()
  local c = (task_seq + 1) & 0xffffffffffff
  task_seq = c
  local hi = c >> 16
  if hi ~= task_hi then task_hi, task_prefix = hi, string.format("%08x", hi) end
  return task_prefix .. HEX2[(c >> 8) & 0xff] .. HEX2[c & 0xff]
end

--- Where the store of `home` is, and its dialect ("sqlite" or
-- "postgresql"): `explicit` (drover serve --store, the embedder's option),
-- else DROVER_STORE, else the first line of HOME/store.conf (what `drover
-- store use` writes), else HOME/drover.db.  A postgresql:// or
-- postgres:// URL is a PostgreSQL database; anything else a SQLite file.
function M.location(home, explicit)
  local loc = explicit
  if loc == nil or loc == "" then loc = os.getenv("DROVER_STORE") end
  if loc == nil or loc == "" then
    local f = io.open(home .. "/store.conf", "r")
    if f then
      for line in f:lines() do
        line = line:match("^%s*(.-)%s*$")
        if line ~= "" and line:sub(1, 1) ~= "#" then loc = line; break end
      end
      f:close()
    end
  end
  if loc == nil or loc == "" then loc = home .. "/drover.db" end
  if loc:match("^postgres[q]?[l]?://") then return loc, "postgresql" end
  -- anything else that looks like a URL is a mistake, not a file name
  -- (a file made of it would hold a password, and nobody would find it)
  local scheme = loc:match("^(%a[%w+.-]*):")
  if scheme and scheme ~= "file" then
    return nil, "the store location must be a SQLite file or a postgresql:// URL (got '" .. scheme .. ":...')"
  end
  return (loc:gsub("^file:", "")), "sqlite"
end

--- Open (creating if needed) the store of `home` (see M.location; opts.store
-- overrides it).  Returns store or nil, message.
function M.open(home, opts)
  opts = opts or {}
  home = home or M.home()
  local loc, dialect = M.location(home, opts.store)
  if not loc then return nil, dialect end
  local D = require("drover.store." .. dialect)
  if dialect == "sqlite" then
    local fs = require "drover.fs"
    local ok, err = fs.mkdir(home)
    if not ok and not fs.exists(home) then return nil, "cannot create drover home " .. home .. ": " .. tostring(err) end
  end
  local db, derr = D.open(loc, opts)
  if not db then return nil, derr end
  local self = setmetatable({
    db = db, dialect = D, home = home, path = dialect == "sqlite" and loc or nil,
    location = dialect == "sqlite" and loc or db:label(),
    pending = {}, npending = 0, inserting = {}, owner = nil, unlocked = core.event(), inflight = nil,
    batch_size = opts.batch_size or 2000, batch_delay = opts.batch_delay or 0.05,
    flush_task = nil, write_error = nil, write_failures = 0,
  }, Store)
  local mok, merr = pcall(self.migrate, self)
  if not mok then
    db:close()
    return nil, tostring(merr)
  end
  return self
end

--- Bring the schema up to date (every version in one transaction, the
-- version read again inside it, so two processes opening a new store at
-- once apply each step once).  Sets self.migrated_from.
function Store:migrate()
  local D, db, where = self.dialect, self.db, self.location
  local version = D.version(db, where)
  self.migrated_from = version
  if version > M.SCHEMA_VERSION then
    error("the store " .. where .. " has schema version " .. version ..
      ", newer than this drover understands (" .. M.SCHEMA_VERSION .. "): upgrade drover", 0)
  end
  if version == M.SCHEMA_VERSION then return end
  db:transaction(function()
    if D.lock_migrations then D.lock_migrations(db) end
    -- read again under the lock: another process may have migrated meanwhile
    self.migrated_from = D.version(db, where)
    for v = self.migrated_from + 1, M.SCHEMA_VERSION do D.apply(db, v) end
  end)
  if version == 0 then D.created(self) end
end

function Store:close()
  if self.db then
    self:flush()
    self.db:close()
    self.db = nil
  end
  self:unschedule_flush()
end

--- Queue a write; it reaches the database with the next batch.  A batch
-- that cannot be written (disk full, the store locked past the busy
-- timeout) stays queued and is tried again later: never raised here, in
-- the middle of whatever queued it, but kept in `write_error` for the
-- owner of the store to act on (the tracker fails the flow).
function Store:queue(sql, ...)
  return self:enqueue({ sql, select("#", ...), ... })
end

-- How many batches a queue may hold while the one before is written.
local MAX_AHEAD = 4
-- Fewer queued writes than this are written on the store's own connection
-- when flushed (the batch_delay timer, a read): handing them to the writer
-- costs a thread's wake-up each way and a cold cache, more than the rows
-- (bench/dag.sh, drover's own CPU per task: 229-230 us this way, 239-268
-- us with every flush handed over).
local SMALL_BATCH = 256

--- Queue entry `e`: {sql, number of values, values...}.
function Store:enqueue(e)
  local n = self.npending + 1
  -- queued inside a transaction of the store's: whose, so that a
  -- transaction that fails takes its own queued writes with it
  if self.owner then e.by = coroutine.running() end
  self.pending[n] = e
  self.npending = n
  if n < self.batch_size or self.write_error then return self:schedule_flush() end
  if self.dialect.submit and not self.owner then
    -- while the batch out is still being written (a checkpoint's syncs
    -- can take the writer milliseconds), the queue grows up to
    -- MAX_AHEAD batches rather than wait for it
    if self.inflight and n < MAX_AHEAD * self.batch_size and not self.db:batch_done() then
      return self:schedule_flush()
    end
    return self:send_queue()
  end
  self:try_flush()
end

--- A full queue, where the dialect writes off the loop (SQLite): sent to
-- the writer without waiting for it, after the batch sent before it (one
-- batch out at a time: the next fills while it is written).  Nothing is
-- raised here; a batch that fails comes back to the queue (requeue).
function Store:send_queue()
  if self.inflight then pcall(self.settle, self) end
  if not (self.owner or self.inflight or self.write_error) and self.npending > 0 then
    if self:submit_queue() == nil then return self:try_flush() end
  end
  self:schedule_flush() -- its flush sees the batch written at the latest
end

--- Hand the whole queue to the dialect's writer (self.inflight).  Returns
-- true; false and why (a value it cannot take: the queue is back, to be
-- tried again); or nil and why when there is no writer now (its connection
-- cannot be opened: no descriptor left, say), the queue untouched, for
-- the caller to write on the store's own connection.
function Store:submit_queue()
  local q, n = self.pending, self.npending
  local ok, sent, why = pcall(self.dialect.submit, self.db, q, n)
  if ok and not sent then return nil, why end
  self.pending, self.npending, self.inserting = {}, 0, {}
  if ok then
    self.inflight = { q = q, n = n }
    return true
  end
  self:requeue(q, n, tostring(sent))
  return false, tostring(sent)
end

--- Wait for the batch out (submit_queue) to be written.  Returns true, or
-- false and why: the batch is back in front of the queue and write_error
-- says why.  One task waits on the writer; others wait for that one.
-- Raises only when this task is cancelled while it waits (the outcome is
-- kept for the next settle).
function Store:settle()
  while self.inflight do
    local f = self.inflight
    if f.waiter then
      self.unlocked:clear()
      self.unlocked:wait()
    else
      f.waiter = true
      local ok, written, err = pcall(self.db.wait_batch, self.db)
      f.waiter = nil
      if not ok then error(written, 0) end
      self.inflight = nil
      self.unlocked:set()
      if not written then
        self:requeue(f.q, f.n, err)
        return false, err
      end
      self.write_error, self.write_failures = nil, 0
      if self.npending == 0 then self:unschedule_flush() end
    end
  end
  return true
end

--- Batch q[1..n], not written, goes back in front of what was queued
-- since, and another try is scheduled.  Its INSERTs no longer take later
-- state changes (the `inserting` of what was queued since is kept): one
-- queued since as an UPDATE must stay after the INSERT it changes.
function Store:requeue(q, n, err)
  for i = 1, self.npending do q[n + i] = self.pending[i] end
  self.pending, self.npending = q, n + self.npending
  self.write_error, self.write_failures = err, (self.write_failures or 0) + 1
  self:schedule_flush()
end

-- Longest wait between two tries of a batch that failed.
local MAX_RETRY_DELAY = 1

--- Flush after batch_delay (after a failure, after a delay that doubles
-- up to MAX_RETRY_DELAY), once, in a task of its own (cancelled when the
-- queue is written before then: unschedule_flush).
function Store:schedule_flush()
  if self.flush_task then return end
  local delay = self.write_error and math.min(MAX_RETRY_DELAY, self.batch_delay * 2 ^ self.write_failures)
    or self.batch_delay
  local task
  task = core.spawn(function()
    core.sleep(delay)
    if self.flush_task ~= task then return end -- called off (unschedule_flush)
    self.flush_task = nil
    if self.db then self:try_flush() end
  end)
  self.flush_task = task
end

--- Call off the flush schedule_flush() started: the queue it was to write
-- is written (or the store closed), and a sleeping task keeps the process
-- alive (every `drover exec` waited out batch_delay after its last write).
-- A task asleep is cancelled.  One whose sleep is over, or that has not
-- started, is not: a cancel would reach it at its next wait, inside the
-- flush it makes (SQLite busy, the writer lock), and fail that write.
-- It finds itself called off when it wakes, and ends.
function Store:unschedule_flush()
  local t = self.flush_task
  if not t or t == core.current() then return end
  self.flush_task = nil
  if t:status() == "waiting" then t:cancel() end
end

--- flush(), with a failure kept in `write_error` (and the batch queued
-- for another try) instead of raised.  Returns true if it was written.
function Store:try_flush()
  return (pcall(self.flush, self))
end

--- Write every queued statement in one transaction.  The batch leaves the
-- queue only once the transaction has committed: when it fails it goes
-- back in front of whatever was queued meanwhile, `write_error` says why
-- (until a later flush succeeds), another try is scheduled, and the error
-- is raised.  Inside a transaction of the caller's (apply_batch) a failed
-- batch is dropped instead: the caller's whole transaction is rolled back
-- and redone.  Other tasks' flushes wait for this one (the writer lock), so
-- batches commit in the order they were queued.
function Store:flush()
  if self.owner == coroutine.running() then
    if self.npending == 0 then return end
    return self:write_queue(true)
  end
  if self.inflight then
    -- the batch out failing was this flush's try: it is back in the queue
    -- for the retry requeue scheduled, not sent again at once
    local ok, err = self:settle()
    if not ok then error(err, 0) end
  end
  if self.npending == 0 then return end
  return self:locked(self.write_queue, self, false)
end

-- The store's writer lock: one task of this process at a time runs a
-- transaction through the store (a flush, apply_batch, prune_batch,
-- transaction); the owner may nest.  The queue of writes is shared by
-- every task, so a flush must never run inside another task's
-- transaction, nor beside it: SQLite's one handle would fold it into
-- that transaction, and PostgreSQL's pool would commit it on another
-- connection, before (or without) the rows it depends on.
function Store:locked(fn, ...)
  local me = coroutine.running()
  if self.owner == me then return fn(...) end
  -- a batch out (send_queue) is written before anything else of ours:
  -- batches commit in the order they were queued
  while self.owner or self.inflight do
    if self.owner then
      self.unlocked:clear()
      self.unlocked:wait()
    else
      self:settle()
    end
  end
  self.owner = me
  local r = table.pack(pcall(fn, ...))
  self.owner = nil
  self.unlocked:set()
  if not r[1] then error(r[2], 0) end
  return table.unpack(r, 2, r.n)
end

function Store:write_queue(nested)
  if self.npending == 0 then return end
  if not nested and self.dialect.submit and self.npending >= SMALL_BATCH then -- through the writer, waited for
    local ok, err = self:submit_queue()
    if ok ~= nil then
      if ok then ok, err = self:settle() end
      if not ok then error(err, 0) end
      return
    end
    -- no writer now: written below, on the store's own connection
  end
  local db = self.db
  local q, n = self.pending, self.npending
  self.pending, self.npending, self.inserting = {}, 0, {}
  local ok, err = pcall(db.transaction, db, function() self.dialect.run_queue(db, q, n) end)
  if ok then
    self.write_error, self.write_failures = nil, 0
    if self.npending == 0 then self:unschedule_flush() end
    return
  end
  err = tostring(err)
  if not nested then self:requeue(q, n, err) end
  error(err, 0)
end

--- Give up on the queued writes (the store cannot take them, and the run
-- is being ended without them); returns how many there were.
function Store:drop_pending()
  local n = self.npending
  self.pending, self.npending, self.inserting = {}, 0, {}
  return n
end

--- Run a write now, in its own transaction (for rows other processes wait on).
function Store:write(sql, ...)
  self:flush()
  return self.db:run(sql, ...)
end

--- Is this store's connection inside a transaction (one of apply_batch's)?
function Store:in_transaction() return self.dialect.in_transaction(self.db) end

function Store:rows(sql, ...) self:flush(); return self.db:rows(sql, ...) end
function Store:first(sql, ...) self:flush(); return self.db:first(sql, ...) end
function Store:value(sql, ...) self:flush(); return self.db:value(sql, ...) end
function Store:transaction(fn)
  self:flush()
  return self:locked(self.db.transaction, self.db, fn)
end

-- ---- encoding -------------------------------------------------------------

--- JSON for the store; values JSON cannot hold become a description, and the
-- second result says whether the value round-trips.  Strings that are not
-- UTF-8 are kept as {"$bytes": BASE64} (drover.json's bytes option), and
-- come back as the same bytes from decode.
local BYTES = { bytes = true }
function M.encode(v)
  if v == nil then return nil, true end
  local ok, s = pcall(json.encode, v, BYTES)
  if ok then return s, true end
  return json.encode(tostring(v), BYTES), false
end

function M.decode(s)
  if s == nil then return nil end
  local v = json.decode(s, BYTES)
  return v
end

-- ---- flow runs --------------------------------------------------------------

function Store:create_flow_run(r)
  local id = r.id or M.new_id()
  local now = M.time()
  self:flush()
  self.db:run("INSERT INTO flow_run_states(flow_run_id, state, message, ts) VALUES(?,?,?,?)",
    id, r.state or "SCHEDULED", r.message, now)
  self:write([[INSERT INTO flow_runs(id, name, deployment, backend, state, message, params,
      source, created, started, resumed_from, external_id, pid, url, heartbeat)
      VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)]],
    id, r.name, r.deployment, r.backend or "local", r.state or "SCHEDULED", r.message,
    (M.encode(r.params)), r.source and (M.encode(r.source)) or nil, now,
    r.state == "RUNNING" and now or nil, r.resumed_from, r.external_id, r.pid, r.url, now)
  return id
end

local flow_fields = { state = true, message = true, result = true, started = true, ended = true,
  external_id = true, pid = true, url = true, heartbeat = true, host = true }

--- Update fields of a flow run now (other processes watch these).
function Store:update_flow_run(id, fields)
  local keys, sets, vals = {}, {}, {}
  for k in pairs(fields) do
    if not flow_fields[k] then error("store: unknown flow run field '" .. k .. "'", 2) end
    keys[#keys + 1] = k
  end
  table.sort(keys) -- stable SQL text, so the statement cache hits
  for i, k in ipairs(keys) do
    sets[i] = k .. " = ?"
    vals[i] = fields[k]
  end
  vals[#vals + 1] = id
  return self:write("UPDATE flow_runs SET " .. table.concat(sets, ", ") .. " WHERE id = ?",
    table.unpack(vals))
end

--- Move a flow run to `state` unless it is already final.  Returns true if
-- it moved.  `extra` (optional): `result`, stored with the state; `ts`,
-- when the change happened (a worker reporting over HTTP sends its own
-- time, so a batch applied late still dates the history, `started` and
-- `ended` right); default now.  The heartbeat is always now.
function Store:set_flow_state(id, state, message, extra)
  local beat = M.time()
  local now = extra and extra.ts or beat
  local final = states.final[state] == true
  -- a run being cancelled stays CANCELLING when its worker starts (the
  -- worker finds the cancel and ends it: worker.lua)
  local sql = "UPDATE flow_runs SET state = ?, message = ?, heartbeat = ?" ..
    (state == "RUNNING" and ", started = coalesce(started, ?)" or "") ..
    (final and ", ended = ?" or "") ..
    (extra and extra.result ~= nil and ", result = ?" or "") ..
    " WHERE id = ? AND state NOT IN (" .. FINAL_SQL .. ")" ..
    (state == "RUNNING" and " AND state <> 'CANCELLING'" or "")
  local vals = { state, message, beat }
  if state == "RUNNING" then vals[#vals + 1] = now end
  if final then vals[#vals + 1] = now end
  if extra and extra.result ~= nil then vals[#vals + 1] = extra.result end
  vals[#vals + 1] = id
  local changes = self:write(sql, table.unpack(vals))
  if changes > 0 then
    -- the history of states, Prefect-style: what happened, in order
    self.db:run("INSERT INTO flow_run_states(flow_run_id, state, message, ts) VALUES(?,?,?,?)",
      id, state, message, now)
  end
  return changes > 0
end

--- End flow run `id` in final `state` from outside the worker (a reaper, a
-- backend that saw the job or container end, stop): the run, and every
-- task run of it still active, get `state` and `message`.  Returns true if
-- the run was still active (an end already recorded is kept).
--- End run `id`'s task runs that are still active, as `state`.
function Store:end_active_task_runs(id, state, message)
  self:write([[UPDATE task_runs SET state = ?, message = ?
      WHERE flow_run_id = ? AND state IN (]] .. ACTIVE_SQL .. ")", state, message, id)
end

function Store:end_flow_run(id, state, message)
  -- one transaction: a run never ends with task runs still active (a disk
  -- that filled between the two writes left exactly that, and a final run
  -- is never reaped)
  return self:transaction(function()
    local changed = self:set_flow_state(id, state, message)
    self:end_active_task_runs(id, state, message)
    return changed
  end)
end

-- A signature of a run's task runs: changes when one starts, moves or ends.
-- Sums, not every task run's state (a 20,000-task run made a string of
-- 200 KB each poll): one pass over the index task_runs_by_name, no table
-- rows.  A state change that none of these sums sees would have to keep
-- the first letter and the length of the state, started, ended and attempts.
function Store:task_signature(id)
  return self:value(self.dialect.SIGNATURE, id)
end

--- The id of run `id`'s last log line (0 when it has none).
function Store:last_log_id(id)
  return self:value("SELECT coalesce(max(id), 0) FROM logs WHERE flow_run_id = ?", id)
end

function Store:flow_run_states(id)
  return self:rows("SELECT state, message, ts FROM flow_run_states WHERE flow_run_id = ? ORDER BY id", id)
end

-- A run's token digest stays in the store: rows handed out leave it out.
local function public(r)
  if r then r.token_hash = nil end
  return r
end

function Store:flow_run(id)
  return public(self:first("SELECT * FROM flow_runs WHERE id = ?", id))
end

--- Find a flow run by id or unique id prefix.
function Store:find_flow_run(id)
  local r = self:flow_run(id)
  if r then return r end
  local rows = self:rows("SELECT * FROM flow_runs WHERE id LIKE ? || '%' LIMIT 2", id)
  if #rows == 1 then return public(rows[1]) end
  return nil
end

function Store:flow_runs(filter)
  filter = filter or {}
  local where, vals = {}, {}
  if filter.deployment then where[#where + 1] = "deployment = ?"; vals[#vals + 1] = filter.deployment end
  if filter.state then where[#where + 1] = "state = ?"; vals[#vals + 1] = filter.state end
  if filter.backend then where[#where + 1] = "backend = ?"; vals[#vals + 1] = filter.backend end
  if filter.active then
    where[#where + 1] = "state IN (" .. ACTIVE_SQL .. ")"
  end
  local sql = "SELECT * FROM flow_runs" ..
    (#where > 0 and (" WHERE " .. table.concat(where, " AND ")) or "") ..
    " ORDER BY created DESC LIMIT ?"
  vals[#vals + 1] = filter.limit or 100
  local rows = self:rows(sql, table.unpack(vals))
  for _, r in ipairs(rows) do public(r) end
  return rows
end

-- ---- task runs (queued writes: these are the hot path) ---------------------

-- A task run's INSERT and the UPDATEs that follow it usually land in the
-- same batch, hence the same transaction, so no reader can ever see the rows
-- in between: while the INSERT is still queued, later state changes of that
-- run are folded into its queued values instead of being queued as UPDATEs.
-- One statement per run instead of two (and no lookup by the random id)
-- halves the store's share of the per-task overhead.  `inserting` maps the
-- ids whose INSERT is queued to their queue entry; flush() empties it.
local INSERT_TASK_RUN = [[INSERT INTO task_runs(id, flow_run_id, parent_id, name, kind, call_key,
    state, params, params_hash, attempts, cache_key, tags, started, message, result, result_ok,
    ended, cache_expires, reused_from) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)]]
-- positions in a queue entry ({sql, count, values...}) of the folded values
local I_STATE, I_ATTEMPTS, I_MESSAGE, I_RESULT, I_RESULT_OK, I_ENDED, I_EXPIRES, I_REUSED =
  9, 12, 16, 17, 18, 19, 20, 21

function Store:task_run_started(t)
  -- the entry made here rather than by queue(): passing 20 values through
  -- a vararg call (copied, then counted by select) was a fifth of the
  -- store's Lua work per task run
  local e = { INSERT_TASK_RUN, 19,
    t.id, t.flow_run_id, t.parent_id, t.name, t.kind, t.call_key, t.state, t.params,
    t.params_hash, t.attempts, t.cache_key, t.tags, t.started, nil, nil, 1, nil, nil, nil }
  local inserting = self.inserting
  self:enqueue(e)
  -- enqueue() may have flushed (batch full): a batch written swaps
  -- `inserting` for a new table (one that failed puts it back), so the
  -- entry is still queued exactly when the table is the same
  if self.inserting == inserting then inserting[t.id] = e end
end

--- Insert task run `t` of run `flow_run_id` now, with its finish if it
-- has one (message ... reused_from; result_ok absent counts as true): for
-- the server applying a worker's batch inside apply_batch's transaction,
-- where a queue entry per row would only cost time.
function Store:insert_task_run(t, flow_run_id)
  self.db:run(INSERT_TASK_RUN,
    t.id, flow_run_id, t.parent_id, t.name, t.kind, t.call_key, t.state, t.params,
    t.params_hash, t.attempts, t.cache_key, t.tags, t.started, t.message, t.result, t.result_ok == false and 0 or 1,
    t.ended, t.cache_expires, t.reused_from)
end

-- `flow_run_id`, when given, confines the update to that run's task runs
-- (the server applying a worker's events: a run's token writes only its run).
function Store:task_run_state(id, state, message, attempts, flow_run_id)
  local e = self.inserting[id]
  if e and (flow_run_id == nil or e[4] == flow_run_id) then
    e[I_STATE], e[I_MESSAGE], e[I_ATTEMPTS] = state, message, attempts
    return
  end
  if flow_run_id then
    self:queue("UPDATE task_runs SET state = ?, message = ?, attempts = ? WHERE id = ? AND flow_run_id = ?",
      state, message, attempts, id, flow_run_id)
  else
    self:queue("UPDATE task_runs SET state = ?, message = ?, attempts = ? WHERE id = ?",
      state, message, attempts, id)
  end
end

function Store:task_run_finished(id, state, message, result, result_ok, attempts, ended,
                                 cache_expires, reused_from, flow_run_id)
  local e = self.inserting[id]
  if e and (flow_run_id == nil or e[4] == flow_run_id) then
    e[I_STATE], e[I_MESSAGE], e[I_RESULT], e[I_RESULT_OK] = state, message, result, result_ok and 1 or 0
    e[I_ATTEMPTS], e[I_ENDED], e[I_EXPIRES], e[I_REUSED] = attempts, ended, cache_expires, reused_from
    -- its end is its last change: the map keeps only the runs still going
    -- (a map of every run of a batch, rehashed as it grew, cost ~1.4k
    -- instructions a task run)
    self.inserting[id] = nil
    return
  end
  self:queue([[UPDATE task_runs SET state = ?, message = ?, result = ?, result_ok = ?,
      attempts = ?, ended = ?, cache_expires = ?, reused_from = ? WHERE id = ?
      AND flow_run_id = coalesce(?, flow_run_id)]],
    state, message, result, result_ok and 1 or 0, attempts, ended, cache_expires, reused_from, id,
    flow_run_id)
end

function Store:task_runs(flow_run_id)
  return self:rows("SELECT * FROM task_runs WHERE flow_run_id = ? ORDER BY " .. self.dialect.TASK_ORDER, flow_run_id)
end

--- COMPLETED task runs of a flow run, by call key (for resume).
function Store:completed_calls(flow_run_id)
  local out = {}
  for _, r in ipairs(self:rows([[SELECT call_key, params_hash, result, result_ok, id
      FROM task_runs WHERE flow_run_id = ? AND state = 'COMPLETED']], flow_run_id)) do
    out[r.call_key] = r
  end
  return out
end

--- The newest unexpired COMPLETED result for (task name, cache key).
function Store:cached_result(name, cache_key, now)
  return self:first([[SELECT id, result, result_ok FROM task_runs
      WHERE name = ? AND cache_key = ? AND state = 'COMPLETED' AND result_ok = 1
        AND reused_from IS NULL AND (cache_expires IS NULL OR cache_expires > ?)
      ORDER BY ended DESC LIMIT 1]], name, cache_key, now)
end

-- ---- logs --------------------------------------------------------------------

--- `ts` defaults to now (a worker reporting over HTTP sends its own).
function Store:log(flow_run_id, task_run_id, stream, line, ts)
  self:queue("INSERT INTO logs(flow_run_id, task_run_id, ts, stream, line) VALUES(?,?,?,?,?)",
    flow_run_id, task_run_id, ts or M.time(), stream, self.dialect.bytes(line))
end

function Store:logs(flow_run_id, after_id, limit)
  return self:rows([[SELECT id, task_run_id, ts, stream, line FROM logs
      WHERE flow_run_id = ? AND id > ? ORDER BY id LIMIT ?]], flow_run_id, after_id or 0, limit or 100000)
end

-- ---- the worker protocol: run tokens, applied events, remote calls ----------------

--- Keep the hash of run `id`'s token (the token itself is never stored).
function Store:set_run_token(id, token_hash)
  return self:write("UPDATE flow_runs SET token_hash = ? WHERE id = ?", token_hash, id)
end

--- The run whose token has this hash, or nil.
--- Was run `id` given a token (does a worker report it over HTTP)?
function Store:has_run_token(id)
  return self:value("SELECT count(*) FROM flow_runs WHERE id = ? AND token_hash IS NOT NULL", id) == 1
end

--- The run (id, state) a token's digest belongs to, or nil.
function Store:run_by_token(token_hash)
  return self:first("SELECT id, state FROM flow_runs WHERE token_hash = ?", token_hash)
end

--- A token lookup for the server's request-head check: lookup(digest) ->
-- the run (id, state), nil, or { unverified = true }; and close().  The
-- head check runs in the HTTP server's callback, outside any task, where
-- nothing may wait.  SQLite: a connection of its own, whose reads never
-- wait for this connection's transactions.  PostgreSQL: a query there
-- would have to wait, so a token is unverified at the head (handle()
-- checks it again in a task) and the caller bounds what it buffers.
function Store:token_reader()
  if self.dialect.name ~= "sqlite" then
    local unverified = { unverified = true }
    return { lookup = function() return unverified end, close = function() end }
  end
  local hdb, err = core.db.open(self.path, { busy_timeout = 2000 })
  if not hdb then return nil, "cannot open the store for request checks: " .. tostring(err) end
  return {
    lookup = function(token_hash)
      return hdb:first("SELECT id, state FROM flow_runs WHERE token_hash = ?", token_hash)
    end,
    close = function() hdb:close() end,
  }
end

--- Apply a worker's batch in one transaction: `fn(run)` is called with the
-- run's row read inside the transaction (state and event_seq as they are
-- now), and writes through the store; queued writes are flushed before
-- the commit.  `applied`, when fn returns one, becomes the run's event_seq.
function Store:apply_batch(run_id, fn)
  if not self.batch_cache then
    -- only the server that owns the store applies batches, for as long as it runs
    self.batch_cache = true
    self.dialect.tune_for_server(self.db)
  end
  self:flush()
  local me = coroutine.running()
  local ok, r = pcall(self.transaction, self, function()
    -- the run's row locked until the commit (PostgreSQL: FOR UPDATE), so
    -- an end recorded meanwhile (the reaper's) waits for the batch or is
    -- seen by it; SQLite's one writer serializes them already
    local run = self.db:first("SELECT id, state, event_seq FROM flow_runs WHERE id = ?" .. self.dialect.LOCK_ROW,
      run_id)
    local result, applied = fn(run)
    self:flush()
    if run and applied and applied > run.event_seq then
      self.db:run("UPDATE flow_runs SET event_seq = ?, heartbeat = ? WHERE id = ?", applied, M.time(), run_id)
    elseif run then
      self.db:run("UPDATE flow_runs SET heartbeat = ? WHERE id = ?", M.time(), run_id)
    end
    return result
  end)
  if ok then return r end
  -- rolled back: what fn queued and never flushed goes with it (the
  -- worker sends the batch again; kept, it would be written twice)
  self:drop_queued_by(me)
  error(r, 0)
end

--- Drop the queued writes task `co` queued inside its transaction.
function Store:drop_queued_by(co)
  local keep, dropped = {}, {}
  for i = 1, self.npending do
    local e = self.pending[i]
    if e.by == co then dropped[e] = true else keep[#keep + 1] = e end
  end
  for id, e in pairs(self.inserting) do
    if dropped[e] then self.inserting[id] = nil end
  end
  self.pending, self.npending = keep, #keep
end

--- Active runs reporting over HTTP (they have a token) whose last
-- heartbeat is older than `before`.
function Store:silent_runs(before)
  return self:rows([[SELECT * FROM flow_runs WHERE token_hash IS NOT NULL
      AND state IN (]] .. WORKING_SQL .. ") AND heartbeat < ?", before)
end

function Store:create_call(c)
  local id = c.id or M.new_id()
  self:write([[INSERT INTO run_calls(id, flow_run_id, task_run_id, spec, state, created)
      VALUES(?,?,?,?,?,?)]], id, c.flow_run_id, c.task_run_id, c.spec, "PENDING", M.time())
  return id
end

function Store:call(flow_run_id, id)
  return self:first("SELECT * FROM run_calls WHERE id = ? AND flow_run_id = ?", id, flow_run_id)
end

--- Record a call's result (JSON text) once; returns true if it was recorded.
function Store:finish_call(flow_run_id, id, state, result)
  return self:write([[UPDATE run_calls SET state = ?, result = ?, ended = ?
      WHERE id = ? AND flow_run_id = ? AND ended IS NULL]], state, result, M.time(), id, flow_run_id) > 0
end

-- ---- packages and deployments -----------------------------------------------

function Store:put_package(p)
  self:write([[INSERT INTO packages(id, backend, class, module, entrypoint, sha256, location, manifest, created)
      VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET location = excluded.location]],
    p.id, p.backend, p.class, p.module, p.entrypoint, p.sha256, p.location,
    (M.encode(p.manifest)), M.time())
end

function Store:package(id)
  local p = self:first("SELECT * FROM packages WHERE id = ?", id)
  if not p then
    local rows = self:rows("SELECT * FROM packages WHERE id LIKE ? || '%' LIMIT 2", id)
    if #rows == 1 then p = rows[1] end
  end
  return p
end

--- Insert a deployment; fails with a clear message if the name is taken
-- (unless replace is set).
function Store:put_deployment(d, replace)
  local now = M.time()
  local existing = self:deployment(d.name)
  if existing and not replace then
    return nil, "deployment '" .. d.name .. "' already exists (backend " .. existing.backend ..
      "); pass --replace to redeploy it"
  end
  self:write([[INSERT INTO deployments(name, backend, package_id, params, config, schedule,
      max_active, paused, created, updated, backend_config) VALUES(?,?,?,?,?,?,?,0,?,?,?)
      ON CONFLICT(name) DO UPDATE SET backend = excluded.backend, package_id = excluded.package_id,
      params = excluded.params, config = excluded.config, schedule = excluded.schedule,
      max_active = excluded.max_active, paused = 0, updated = excluded.updated,
      backend_config = excluded.backend_config]],
    d.name, d.backend, d.package_id, (M.encode(d.params)), (M.encode(d.config)), d.schedule,
    d.max_active, now, now, (M.encode(d.backend_config)))
  return true
end

function Store:deployment(name)
  return self:first("SELECT * FROM deployments WHERE name = ?", name)
end

function Store:deployments()
  return self:rows("SELECT * FROM deployments ORDER BY name")
end

-- ---- the scheduler's fire times (drover serve) -----------------------------

--- Deployments with a schedule that are not paused, of every backend.
function Store:scheduled_deployments()
  return self:rows([[SELECT * FROM deployments WHERE schedule IS NOT NULL AND schedule != ''
      AND paused = 0 ORDER BY name]])
end

--- The scheduler's row of deployment `name` ({schedule, dep_updated,
-- last_fire}), or nil; all rows by deployment when `name` is nil.
function Store:fire_state(name)
  if name then return self:first("SELECT * FROM daemon_schedule WHERE deployment = ?", name) end
  local out = {}
  for _, r in ipairs(self:rows("SELECT * FROM daemon_schedule")) do out[r.deployment] = r end
  return out
end

--- Start counting deployment `name`'s fire times afresh from `last_fire`.
function Store:rebase_fires(name, schedule, dep_updated, last_fire)
  self:write([[INSERT INTO daemon_schedule(deployment, schedule, dep_updated, last_fire)
      VALUES(?,?,?,?) ON CONFLICT(deployment) DO UPDATE SET schedule = excluded.schedule,
      dep_updated = excluded.dep_updated, last_fire = excluded.last_fire]], name, schedule, dep_updated, last_fire)
end

--- Claim fire time `t` of deployment `name` whose last handled time was
-- `last` (compare-and-set): true for the one daemon that gets it.
function Store:claim_fire(name, last, t)
  return self:write("UPDATE daemon_schedule SET last_fire = ? WHERE deployment = ? AND last_fire = ?",
    t, name, last) == 1
end

function Store:set_paused(name, paused)
  return self:write("UPDATE deployments SET paused = ?, updated = ? WHERE name = ?",
    paused and 1 or 0, M.time(), name)
end


-- ---- retention: prune ended runs, give the space back ------------------------
--
-- `drover prune` and `drover serve --retention` delete ended runs older
-- than a cutoff, each with everything that belongs to it (task runs, log
-- lines, state history, remote calls), a batch of runs per transaction so
-- the write lock is held briefly and workers keep writing in between.
-- Active runs are never candidates: only runs in a final state are.
-- Freed space goes back as the dialect does it (below).

local run_states = require "drover.states"

-- the final states, in a fixed order so the SQL text (and the statement cache) is stable
local FINAL = run_states.final_list

local function placeholders(n) return string.rep("?", n, ",") end

-- The WHERE clause (and its values) choosing prune's candidates in
-- flow_runs.  f: before (seconds since the epoch: created and ended before
-- it), states (a list of final states; default all of them), deployment.
local function prune_where(f, no_index)
  if type(f.before) ~= "number" then error("store.prune: bad filter 'before' (a time expected)", 3) end
  local st = f.states or FINAL
  for _, s in ipairs(st) do
    if not run_states.final[s] then
      error("store.prune: state '" .. tostring(s) .. "' is not a final state (active runs are never pruned)", 3)
    end
  end
  -- SQLite's unary + keeps the planner off the state and deployment
  -- indexes: the created index gives the candidates oldest first, already
  -- in order, and the keyset in prune_batch reads each row of it once per
  -- pass (PostgreSQL's planner weighs them itself)
  local where = "created < ? AND coalesce(ended, created) < ? AND " .. no_index .. "state IN (" ..
    placeholders(#st) .. ")"
  local vals = { f.before, f.before, table.unpack(st) }
  if f.deployment then
    where = where .. " AND " .. no_index .. "deployment = ?"
    vals[#vals + 1] = f.deployment
  end
  return where, vals
end

-- the tables holding rows of a flow run, by flow_run_id
local RUN_CHILDREN = { task_runs = "task_runs", logs = "logs", states = "flow_run_states", calls = "run_calls" }

--- What prune(f) would delete now: { runs, task_runs, logs, states, calls }.
function Store:prune_count(f)
  local where, vals = prune_where(f, self.dialect.NO_INDEX)
  local out = { runs = self:value("SELECT count(*) FROM flow_runs WHERE " .. where, table.unpack(vals)) }
  for key, tbl in pairs(RUN_CHILDREN) do
    out[key] = self:value("SELECT count(*) FROM " .. tbl ..
      " WHERE flow_run_id IN (SELECT id FROM flow_runs WHERE " .. where .. ")", table.unpack(vals))
  end
  return out
end

--- Delete one batch of prune candidates: at most `limit` runs, oldest
-- first, after `cursor` (nil: from the start), with all their rows, in one
-- transaction.  Returns the counts deleted ({ runs, task_runs, logs,
-- states, calls }) and the cursor of the next batch, nil when no candidate
-- is left.  The candidates are chosen inside the write transaction, so a
-- run is deleted only if it is final at that moment (final is for good).
function Store:prune_batch(f, cursor, limit)
  local where, vals = prune_where(f, self.dialect.NO_INDEX)
  local db = self.db
  return self:transaction(function()
    local args = { table.unpack(vals) }
    local keyset = ""
    if cursor then
      -- keyset on (created, id): the runs a filter skipped are not read again
      keyset = " AND created >= ? AND (created > ? OR id > ?)"
      args[#args + 1], args[#args + 2], args[#args + 3] = cursor.created, cursor.created, cursor.id
    end
    args[#args + 1] = limit
    local rows = db:rows("SELECT id, created FROM flow_runs WHERE " .. where .. keyset ..
      " ORDER BY created, id LIMIT ?", table.unpack(args))
    local counts = { runs = 0, task_runs = 0, logs = 0, states = 0, calls = 0 }
    if #rows == 0 then return counts, nil end
    local ids = {}
    for i, r in ipairs(rows) do ids[i] = r.id end
    local list = "(" .. placeholders(#ids) .. ")"
    for key, tbl in pairs(RUN_CHILDREN) do
      counts[key] = db:run("DELETE FROM " .. tbl .. " WHERE flow_run_id IN " .. list, table.unpack(ids))
    end
    counts.runs = db:run("DELETE FROM flow_runs WHERE id IN " .. list, table.unpack(ids))
    local last = rows[#rows]
    return counts, { created = last.created, id = last.id }
  end)
end

-- File maintenance: SQLite's (incremental vacuum, WAL checkpoints; see
-- lua/drover/store/sqlite.lua); on PostgreSQL autovacuum does it, and
-- these say so (nothing to switch, no free pages, an empty checkpoint).

--- Is the store in incremental vacuum mode?
function Store:incremental_vacuum()
  self:flush()
  return self.dialect.incremental_vacuum(self.db)
end

--- Switch the store to incremental vacuum, if it is not: one full VACUUM
-- (rewrites the file and holds the write lock while it does).  Returns
-- true if it switched.
function Store:use_incremental_vacuum()
  self:flush()
  return self.dialect.use_incremental_vacuum(self.db)
end

--- Give up to `pages` free pages back to the filesystem (one short write
-- transaction).  Returns the number of free pages left (0 when the store
-- is not in incremental vacuum mode: its free pages are only reused).
function Store:vacuum_step(pages)
  self:flush()
  return self.dialect.vacuum_step(self.db, pages)
end

--- Pages of the database file that hold nothing (deleted rows' space).
function Store:free_pages()
  self:flush()
  return self.dialect.free_pages(self.db)
end

--- Copy the WAL back into the database file; mode "PASSIVE" (never waits)
-- or "TRUNCATE" (waits for readers, then empties the WAL).  A vacuumed
-- file only shrinks on disk once a checkpoint has run.  Returns
-- { busy, log, checkpointed }.
function Store:checkpoint(mode)
  if mode ~= "PASSIVE" and mode ~= "TRUNCATE" then
    error("store.checkpoint: bad argument 'mode' (PASSIVE or TRUNCATE expected)", 2)
  end
  self:flush()
  return self.dialect.checkpoint(self.db, mode)
end

--- Bytes the store takes: the database file and its WAL; on PostgreSQL
-- the database's size.
function Store:disk_size()
  self:flush()
  return self.dialect.disk_size(self.db, self.path)
end


-- ---- big runs: a run's task runs summarised by name, and paged -------------
--
-- A run may hold tens of thousands of task runs: the daemon's run page
-- shows them grouped by name (task_run_summary) and reads the runs
-- themselves a page at a time (task_run_page), by keyset on (started, id),
-- never OFFSET, so page 200 costs what page 1 does.  Task runs not started
-- yet (started NULL) sort after every started one.

--- The sort key of a task run that has not started: after every real time
-- (the dialect's TASK_KEY: the expression of the index task_runs_by_start).
M.NOT_STARTED = 9e15

--- Task runs of run `flow_run_id` grouped by name: { total, counts =
-- {STATE = n}, groups = { {name, total, counts, started, ended}, ... } },
-- groups ordered by their first start (not started last), then name.
-- started is the group's first start, ended its last end (nil while none
-- has ended).  At most `max_groups` groups (default all); groups_truncated
-- says some were left out (total and counts still count every task run).
function Store:task_run_summary(flow_run_id, max_groups)
  return M.summarize(self:rows([[SELECT name, state, count(*) AS n, min(started) AS started, max(ended) AS ended
      FROM task_runs WHERE flow_run_id = ? GROUP BY name, state]], flow_run_id), max_groups)
end

--- Task runs grouped by name: { total, counts = {STATE = n}, groups = {
-- {name, total, counts, started (the first), ended (the last)}, in the
-- order each name first started } }, from rows {name, state, n, started,
-- ended} (n absent: the row is one task run); at most max_groups groups
-- (then groups_truncated).
function M.summarize(rows, max_groups)
  local by_name, groups, counts, total = {}, {}, {}, 0
  for _, r in ipairs(rows) do
    local g, n = by_name[r.name], r.n or 1
    if not g then
      g = { name = r.name, total = 0, counts = {} }
      by_name[r.name] = g
      groups[#groups + 1] = g
    end
    g.total = g.total + n
    g.counts[r.state] = (g.counts[r.state] or 0) + n
    if r.started and (not g.started or r.started < g.started) then g.started = r.started end
    if r.ended and (not g.ended or r.ended > g.ended) then g.ended = r.ended end
    counts[r.state] = (counts[r.state] or 0) + n
    total = total + n
  end
  table.sort(groups, function(a, b)
    local sa, sb = a.started or M.NOT_STARTED, b.started or M.NOT_STARTED
    if sa ~= sb then return sa < sb end
    return a.name < b.name
  end)
  local out = { total = total, counts = counts, groups = groups }
  if max_groups and #groups > max_groups then
    for i = #groups, max_groups + 1, -1 do groups[i] = nil end
    out.groups_truncated = true
  end
  return out
end

--- The number of task runs of run `flow_run_id`.
function Store:task_run_count(flow_run_id)
  return self:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ?", flow_run_id)
end

--- One page of run `flow_run_id`'s task runs, ordered by (started, id).
-- f: state, name (exact matches; optional), limit (rows), after (the
-- cursor of the page before: { key = sort key, id = task run id }).
-- Returns the rows and the cursor of the next page (nil on the last).
function Store:task_run_page(flow_run_id, f)
  local TASK_KEY = self.dialect.TASK_KEY
  local where, args = { "flow_run_id = ?" }, { flow_run_id }
  if f.state then where[#where + 1] = "state = ?"; args[#args + 1] = f.state end
  if f.name then where[#where + 1] = "name = ?"; args[#args + 1] = f.name end
  if f.after then
    -- the range start the index seeks to, then the tie on the key broken by id
    where[#where + 1] = TASK_KEY .. " >= ? AND (" .. TASK_KEY .. " > ? OR id > ?)"
    args[#args + 1], args[#args + 2], args[#args + 3] = f.after.key, f.after.key, f.after.id
  end
  -- one row more than asked: whether there is a next page, without a count
  args[#args + 1] = f.limit + 1
  local rows = self:rows("SELECT *, " .. TASK_KEY .. " AS sort_key FROM task_runs WHERE " ..
    table.concat(where, " AND ") .. " ORDER BY " .. TASK_KEY .. ", id LIMIT ?", table.unpack(args))
  local next_cursor
  if #rows > f.limit then
    rows[#rows] = nil
    next_cursor = { key = rows[#rows].sort_key, id = rows[#rows].id }
  end
  for _, r in ipairs(rows) do r.sort_key = nil end
  return rows, next_cursor
end

--- Turn run `id`, ended in one of the final states `from` (a list), into
-- final `state` with `message`, and record it in the run's history: a
-- cancel that killed the work after its worker recorded its end (Slurm's
-- cancelled_after_all).  Returns true if the run was in one of `from`.
function Store:replace_end(id, from, state, message)
  if not states.final[state] then error("store.replace_end: '" .. tostring(state) .. "' is not a final state", 2) end
  local changed = self:write("UPDATE flow_runs SET state = ?, message = ? WHERE id = ? AND state IN (" ..
    states.sql_list(from) .. ")", state, message, id)
  if changed > 0 then
    self:write("INSERT INTO flow_run_states(flow_run_id, state, message, ts) VALUES(?,?,?,?)",
      id, state, message, M.time())
  end
  return changed > 0
end


-- ---- counts and pages for the daemon: nothing proportional to the store -------------
--
-- /metrics reads run_counts, a row per (kind, state) that triggers keep
-- (migration 4): counting 2M task runs per scrape took seconds of the
-- daemon's loop.  Each row holds the number of runs in that state, how many
-- of them have both a start and an end (`timed`), and the sum of those
-- durations (`seconds`: added and subtracted as rows change, so it can
-- drift from sum() by float rounding, never by a row).
--
-- /api/runs pages newest first by keyset on (created, id), with an index
-- per filter (migration 4): a page costs its own rows, at any depth.

--- Counts of flow runs (kind 'flow') and task runs (kind 'task') by state:
-- a list of { kind, state, n, timed, seconds }.
function Store:run_counts()
  return self:rows(self.dialect.RUN_COUNTS)
end

--- A page of flow runs, newest first.  f: state, deployment, limit
-- (default 100), after ({ created, id }: the last row of the page before;
-- rows that sort after it come next, so runs created meanwhile never shift
-- a page).
function Store:flow_runs_page(f)
  local where, vals = {}, {}
  if f.state then where[#where + 1] = "state = ?"; vals[#vals + 1] = f.state end
  if f.deployment then where[#where + 1] = "deployment = ?"; vals[#vals + 1] = f.deployment end
  if f.after then
    where[#where + 1] = "(created, id) < (?, ?)"
    vals[#vals + 1], vals[#vals + 2] = f.after.created, f.after.id
  end
  vals[#vals + 1] = f.limit or 100
  local rows = self:rows("SELECT * FROM flow_runs" .. (#where > 0 and (" WHERE " .. table.concat(where, " AND ")) or "")
    .. " ORDER BY created DESC, id DESC LIMIT ?", table.unpack(vals))
  for _, r in ipairs(rows) do public(r) end
  return rows
end

--- Two values that, together, differ whenever the store may have changed
-- since the last call, by this process or any other (the dialect's
-- change_mark).  Queued writes are flushed first, so they count.
-- since (optional, a drover.now() time): a mark that saw every commit
-- made before then will do.  no_wait: nil instead of a flush, a read
-- inside a transaction or a query that would wait (for a caller outside
-- any task: server.listen's fast path).
function Store:change_mark(since, no_wait)
  if no_wait and (self.npending > 0 or self.inflight or self.owner or self:in_transaction()) then return nil end
  self:flush()
  local state = self.mark_state
  if not state then state = {}; self.mark_state = state end
  return self.dialect.change_mark(self.db, since, state, no_wait)
end

--- Fold the counters' pending changes (PostgreSQL keeps them as delta
-- rows; the server calls this every few seconds).  Returns how many.
function Store:compact_counts()
  self:flush()
  return self.dialect.compact_counts(self.db)
end

--- Is the store whole?  "ok", or what is wrong, one finding a line: the
-- database's own check (SQLite's integrity_check; PostgreSQL checks its
-- pages itself), rows of a run whose run is gone, and counters (/metrics)
-- that differ from the rows they count.
function Store:integrity()
  self:compact_counts()
  local found = {}
  local own = self.dialect.integrity(self.db)
  if own ~= "ok" then found[#found + 1] = own end
  for _, tbl in ipairs { "task_runs", "logs", "flow_run_states", "run_calls" } do
    local n = self:value("SELECT count(*) FROM " .. tbl ..
      " t WHERE NOT EXISTS (SELECT 1 FROM flow_runs r WHERE r.id = t.flow_run_id)")
    if n > 0 then found[#found + 1] = n .. " row(s) of " .. tbl .. " belong to no run" end
  end
  local counted = {}
  for _, c in ipairs(self:run_counts()) do counted[c.kind .. " " .. c.state] = c.n end
  for kind, tbl in pairs { flow = "flow_runs", task = "task_runs" } do
    for _, r in ipairs(self:rows("SELECT state, count(*) AS n FROM " .. tbl .. " GROUP BY state")) do
      local key = kind .. " " .. r.state
      if (counted[key] or 0) ~= r.n then
        found[#found + 1] = string.format("%s runs %s: %d counted, %d stored", kind, r.state, counted[key] or 0, r.n)
      end
      counted[key] = nil
    end
  end
  for key, n in pairs(counted) do
    if n ~= 0 then found[#found + 1] = key .. ": " .. n .. " counted, none stored" end
  end
  return #found == 0 and "ok" or table.concat(found, "\n")
end

-- ---- moving an installation: drover store copy --------------------------------

-- Every table that holds a store's data, with its key (copied in key
-- order, a page at a time).  meta stays (each store has its own marker and
-- version); run_counts is rebuilt by the target's own triggers as the runs
-- go in.
M.TABLES = {
  { "packages", "id" }, { "deployments", "name" }, { "flow_runs", "id" }, { "task_runs", "id" },
  { "logs", "id" }, { "flow_run_states", "id" }, { "run_calls", "id" }, { "daemon_schedule", "deployment" },
}

--- How many rows each data table of the store holds: { table = n }.
function Store:table_counts()
  local out = {}
  for _, t in ipairs(M.TABLES) do out[t[1]] = self:value("SELECT count(*) FROM " .. t[1]) end
  return out
end

--- Copy every row of store `from` into the empty store `to` (another
-- database, either dialect), in one transaction on `to`: a failure leaves
-- it empty.  `progress(table, rows_so_far)` is called after each page.
-- Returns { table = rows copied }, or nil and one line (the target holds
-- data; the schemas differ).
function M.copy(from, to, progress)
  local held = to:table_counts()
  for _, t in ipairs(M.TABLES) do
    if held[t[1]] > 0 then
      return nil, "the target store " .. to.location .. " is not empty (" .. t[1] .. " holds " .. held[t[1]] ..
        " row(s)): copy into a new store"
    end
  end
  from:flush()
  local copied = {}
  to:transaction(function()
    for _, t in ipairs(M.TABLES) do
      local tbl, key = t[1], t[2]
      local cols = to.dialect.columns(to.db, tbl)
      local have = {}
      for _, c in ipairs(from.dialect.columns(from.db, tbl)) do have[c] = true end
      for _, c in ipairs(cols) do
        if not have[c] then error("store copy: " .. from.location .. " has no column " .. tbl .. "." .. c, 0) end
      end
      local insert = "INSERT INTO " .. tbl .. "(" .. table.concat(cols, ", ") .. ") VALUES(" ..
        string.rep("?", #cols, ",") .. ")"
      local n, last = 0, nil
      while true do
        local rows = last == nil
          and from.db:rows("SELECT * FROM " .. tbl .. " ORDER BY " .. key .. " LIMIT 1000")
          or from.db:rows("SELECT * FROM " .. tbl .. " WHERE " .. key .. " > ? ORDER BY " .. key .. " LIMIT 1000", last)
        for _, r in ipairs(rows) do
          local vals = {}
          for i, c in ipairs(cols) do vals[i] = r[c] end
          if tbl == "logs" then
            for i, c in ipairs(cols) do if c == "line" then vals[i] = to.dialect.bytes(r.line) end end
          end
          to.db:run(insert, table.unpack(vals, 1, #cols))
        end
        n = n + #rows
        if progress then progress(tbl, n) end
        if #rows < 1000 then break end
        last = rows[#rows][key]
      end
      to.dialect.after_copy(to.db, tbl)
      copied[tbl] = n
    end
  end)
  return copied
end

return M
