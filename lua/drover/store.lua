--- The tracking store: SQLite (WAL) under DROVER_HOME.
--
-- Packages, deployments, flow runs, task runs and log lines.  Several
-- drover processes share one store (a CLI, a worker per run, the daemon),
-- so every write is a short transaction and readers never block writers.
--
-- Tracking must cost little: state changes of task runs are queued and
-- written in one transaction per batch (at most `batch_size` statements, or
-- after `batch_delay` seconds), not one transaction per statement.  Reads
-- flush the queue first, so a process always reads its own writes.
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

M.SCHEMA_VERSION = 5

-- Each migration takes the store from version i-1 to i.  Never edit one
-- that has shipped: add the next.
local migrations = {
  [1] = [[
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE packages(
      id TEXT PRIMARY KEY, backend TEXT NOT NULL, class TEXT, module TEXT NOT NULL,
      entrypoint TEXT, sha256 TEXT NOT NULL, location TEXT, manifest TEXT,
      created REAL NOT NULL);
    CREATE TABLE deployments(
      name TEXT PRIMARY KEY, backend TEXT NOT NULL, package_id TEXT, params TEXT,
      config TEXT, schedule TEXT, max_active INTEGER, paused INTEGER NOT NULL DEFAULT 0,
      created REAL NOT NULL, updated REAL NOT NULL);
    CREATE TABLE flow_runs(
      id TEXT PRIMARY KEY, name TEXT NOT NULL, deployment TEXT, backend TEXT NOT NULL,
      state TEXT NOT NULL, message TEXT, params TEXT, result TEXT, source TEXT,
      created REAL NOT NULL, started REAL, ended REAL, resumed_from TEXT,
      external_id TEXT, pid INTEGER, url TEXT, heartbeat REAL);
    CREATE INDEX flow_runs_by_deployment ON flow_runs(deployment, state);
    CREATE INDEX flow_runs_by_state ON flow_runs(state);
    CREATE INDEX flow_runs_by_created ON flow_runs(created);
    CREATE TABLE task_runs(
      id TEXT PRIMARY KEY, flow_run_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL,
      kind TEXT NOT NULL, call_key TEXT NOT NULL, state TEXT NOT NULL, message TEXT,
      params TEXT, params_hash TEXT, result TEXT, result_ok INTEGER NOT NULL DEFAULT 1,
      attempts INTEGER NOT NULL DEFAULT 0, cache_key TEXT, cache_expires REAL,
      reused_from TEXT, tags TEXT, started REAL, ended REAL);
    CREATE INDEX task_runs_by_flow ON task_runs(flow_run_id, call_key);
    CREATE INDEX task_runs_by_cache ON task_runs(name, cache_key) WHERE cache_key IS NOT NULL;
    CREATE TABLE logs(
      id INTEGER PRIMARY KEY, flow_run_id TEXT NOT NULL, task_run_id TEXT,
      ts REAL NOT NULL, stream TEXT NOT NULL, line TEXT NOT NULL);
    CREATE INDEX logs_by_run ON logs(flow_run_id, id);
    CREATE TABLE flow_run_states(
      id INTEGER PRIMARY KEY, flow_run_id TEXT NOT NULL, state TEXT NOT NULL,
      message TEXT, ts REAL NOT NULL);
    CREATE INDEX flow_run_states_by_run ON flow_run_states(flow_run_id, id);
    INSERT INTO meta(key, value) VALUES ('app', 'drover');
  ]],
  -- the backend config a deployment was made with (secrets left out), so
  -- run, stop, status and the daemon reach the backend the same way later
  [2] = [[
    ALTER TABLE deployments ADD COLUMN backend_config TEXT;
  ]],
  -- workers that report over HTTP (the worker protocol, docs/protocol.md):
  -- the hash of each run's own token, the last event sequence number the
  -- server applied for it, the calls a backend runs as jobs of their own
  -- (slurm `resources`) with their results, and the scheduler's fire
  -- times (once created by the daemon outside the migrations).
  [3] = [[
    ALTER TABLE flow_runs ADD COLUMN token_hash TEXT;
    ALTER TABLE flow_runs ADD COLUMN event_seq INTEGER NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX flow_runs_by_token ON flow_runs(token_hash) WHERE token_hash IS NOT NULL;
    CREATE TABLE run_calls(
      id TEXT PRIMARY KEY, flow_run_id TEXT NOT NULL, task_run_id TEXT, spec TEXT NOT NULL,
      state TEXT NOT NULL, result TEXT, created REAL NOT NULL, ended REAL);
    CREATE INDEX run_calls_by_run ON run_calls(flow_run_id);
    CREATE TABLE IF NOT EXISTS daemon_schedule(
      deployment TEXT PRIMARY KEY, schedule TEXT NOT NULL, dep_updated REAL NOT NULL,
      last_fire REAL NOT NULL);
  ]],
  -- big runs (issue 13): a run's task runs paged in start order by keyset
  -- (the expression is Store:task_run_page's sort key, not-started last),
  -- and summarised by name and state from an index alone
  [4] = [[
    CREATE INDEX task_runs_by_start ON task_runs(flow_run_id, ifnull(started, 9000000000000000), id);
    CREATE INDEX task_runs_by_name ON task_runs(flow_run_id, name, state, started, ended, attempts);
  ]],
  -- issue 13: counts per state kept by triggers (run_counts: /metrics
  -- reads a few rows instead of counting millions), and an index per
  -- filter of the run list in its order (keyset pages: Store:flow_runs_page)
  [5] = (function()
    local function counted(tbl, kind)
      local function add(row) -- upsert row OLD or NEW into its state's counts
        return (([[INSERT INTO run_counts(kind, state, n, timed, seconds) VALUES('%s', R.state, 1,
            R.started IS NOT NULL AND R.ended IS NOT NULL, coalesce(R.ended - R.started, 0))
          ON CONFLICT(kind, state) DO UPDATE SET n = n + 1, timed = timed + excluded.timed,
            seconds = seconds + excluded.seconds;]]):format(kind):gsub("R%.", row .. "."))
      end
      local remove = ([[UPDATE run_counts SET n = n - 1,
            timed = timed - (OLD.started IS NOT NULL AND OLD.ended IS NOT NULL),
            seconds = seconds - coalesce(OLD.ended - OLD.started, 0)
          WHERE kind = '%s' AND state = OLD.state;]]):format(kind)
      return ([[
        INSERT INTO run_counts(kind, state, n, timed, seconds)
          SELECT '%s', state, count(*), sum(started IS NOT NULL AND ended IS NOT NULL),
            coalesce(sum(ended - started), 0) FROM %s GROUP BY state;
        CREATE TRIGGER %s_count_insert AFTER INSERT ON %s BEGIN %s END;
        CREATE TRIGGER %s_count_update AFTER UPDATE OF state, started, ended ON %s
          WHEN OLD.state IS NOT NEW.state OR OLD.started IS NOT NEW.started OR OLD.ended IS NOT NEW.ended
          BEGIN %s %s END;
        CREATE TRIGGER %s_count_delete AFTER DELETE ON %s BEGIN %s END;
      ]]):format(kind, tbl, tbl, tbl, add("NEW"), tbl, tbl, remove, add("NEW"), tbl, tbl, remove)
    end
    return [[
      CREATE TABLE run_counts(kind TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
        timed INTEGER NOT NULL, seconds REAL NOT NULL, PRIMARY KEY(kind, state)) WITHOUT ROWID;
    ]] .. counted("flow_runs", "flow") .. counted("task_runs", "task") .. [[
      DROP INDEX flow_runs_by_state;
      CREATE INDEX flow_runs_by_state_created ON flow_runs(state, created, id);
      CREATE INDEX flow_runs_by_deployment_created ON flow_runs(deployment, created, id);
      CREATE INDEX flow_runs_by_created_id ON flow_runs(created, id);
    ]]
  end)(),
}

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

local unwritable

local function mkdir_p(path)
  local fs = require "drover.fs"
  local ok, err = fs.mkdir(path)
  if not ok and not fs.exists(path) then return nil, err end
  return true
end

--- Why the store at `path` in directory `home` cannot be written (one
-- line naming the path), or nil: SQLite says only "unable to open
-- database file" or "attempt to write a readonly database" when the
-- directory or the file is read-only (a read-only mount, another user's
-- store), which is no reason to call it "not a drover store".  The store
-- needs both: the file, and the directory for its -wal and -shm files.
function unwritable(home, path)
  local f, err = io.open(path, "r+b")
  if f then
    f:close()
  elseif not (err or ""):find("No such file", 1, true) then
    return "cannot open the drover store " .. path .. ": " .. err:gsub("^.-: ", "") ..
      " (the store must be writable)"
  end
  local probe = string.format("%s/.drover-write-test.%d", home, core.pid())
  f, err = io.open(probe, "wb")
  if not f then
    return "cannot write in the drover home " .. home .. ": " .. tostring(err):gsub("^.-: ", "") ..
      " (the store needs a writable directory)"
  end
  f:close()
  os.remove(probe)
  return nil
end

--- Open (creating if needed) the store in `home`.  Returns store or nil, message.
function M.open(home, opts)
  opts = opts or {}
  home = home or M.home()
  local ok, err = mkdir_p(home)
  if not ok then return nil, "cannot create drover home " .. home .. ": " .. tostring(err) end
  local path = home .. "/drover.db"
  local db, derr = core.db.open(path, { busy_timeout = opts.busy_timeout
    or tonumber(os.getenv("DROVER_BUSY_TIMEOUT") or "") or 10000 })
  if not db then
    local why = unwritable(home, path)
    if why then return nil, why end
    return nil, "not a drover store: " .. path .. " (" .. tostring(derr) .. ")"
  end
  local self = setmetatable({
    db = db, home = home, path = path, pending = {}, npending = 0, inserting = {},
    batch_size = opts.batch_size or 2000, batch_delay = opts.batch_delay or 0.05,
    flush_pending = false, write_error = nil, write_failures = 0,
  }, Store)
  local mok, merr = pcall(self.migrate, self)
  if not mok then
    db:close()
    return nil, tostring(merr)
  end
  return self
end

function Store:migrate()
  local db = self.db
  local okv, version = pcall(db.user_version, db)
  if not okv then
    error("not a drover store: " .. self.path .. " (" .. tostring(version) .. ")", 0)
  end
  if version == 0 then
    local n = db:value("SELECT count(*) FROM sqlite_master")
    if n > 0 then error("not a drover store: " .. self.path .. " (it holds other tables)", 0) end
  else
    local app = db:first("SELECT value FROM sqlite_master m, meta WHERE m.name = 'meta' AND meta.key = 'app'")
    if not app or app.value ~= "drover" then
      error("not a drover store: " .. self.path .. " (no drover marker)", 0)
    end
    if version > M.SCHEMA_VERSION then
      error("the store " .. self.path .. " has schema version " .. version ..
        ", newer than this drover understands (" .. M.SCHEMA_VERSION .. "): upgrade drover", 0)
    end
  end
  for v = version + 1, M.SCHEMA_VERSION do
    db:transaction(function()
      db:exec(migrations[v])
      db:user_version(v)
    end)
  end
  -- a new store gives the space of deleted rows back (see prune below)
  if version == 0 then self:use_incremental_vacuum() end
end

function Store:close()
  if self.db then
    self:flush()
    self.db:close()
    self.db = nil
  end
end

--- Queue a write; it reaches the database with the next batch.  A batch
-- that cannot be written (disk full, the store locked past the busy
-- timeout) stays queued and is tried again later: never raised here, in
-- the middle of whatever queued it, but kept in `write_error` for the
-- owner of the store to act on (the tracker fails the flow).
function Store:queue(sql, ...)
  local n = self.npending + 1
  self.pending[n] = { sql, select("#", ...), ... }
  self.npending = n
  if n >= self.batch_size and not self.write_error then
    self:try_flush()
  else
    self:schedule_flush()
  end
end

-- Longest wait between two tries of a batch that failed.
local MAX_RETRY_DELAY = 1

--- Flush after batch_delay (after a failure, after a delay that doubles
-- up to MAX_RETRY_DELAY), once, in a task of its own.
function Store:schedule_flush()
  if self.flush_pending then return end
  self.flush_pending = true
  local delay = self.write_error and math.min(MAX_RETRY_DELAY, self.batch_delay * 2 ^ self.write_failures)
    or self.batch_delay
  core.spawn(function()
    core.sleep(delay)
    self.flush_pending = false
    if self.db then self:try_flush() end
  end)
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
-- and redone.  A flush waiting for SQLite's lock lets other tasks run:
-- one that flushes meanwhile waits for it, so that batches commit in the
-- order they were queued.
function Store:flush()
  if self.npending == 0 then return end
  local db = self.db
  local nested = db:stats().in_transaction
  -- (not inside a transaction: the flush in flight may be waiting for it)
  while self.flushing and not nested do self.flushing:wait() end
  if self.npending == 0 then return end
  local q, n, inserting = self.pending, self.npending, self.inserting
  self.pending, self.npending, self.inserting = {}, 0, {}
  local done = not nested and core.event()
  if done then self.flushing = done end
  local ok, err = pcall(db.transaction, db, function()
    for i = 1, n do
      local e = q[i]
      db:run(e[1], table.unpack(e, 3, 2 + e[2]))
    end
  end)
  if done then
    self.flushing = nil
    done:set()
  end
  if ok then
    self.write_error, self.write_failures = nil, 0
    return
  end
  err = tostring(err)
  if not nested then
    for i = 1, self.npending do q[n + i] = self.pending[i] end
    for id, e in pairs(self.inserting) do inserting[id] = e end
    self.pending, self.npending, self.inserting = q, n + self.npending, inserting
    self.write_error, self.write_failures = err, (self.write_failures or 0) + 1
    self:schedule_flush()
  end
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

function Store:rows(sql, ...) self:flush(); return self.db:rows(sql, ...) end
function Store:first(sql, ...) self:flush(); return self.db:first(sql, ...) end
function Store:value(sql, ...) self:flush(); return self.db:value(sql, ...) end
function Store:transaction(fn) self:flush(); return self.db:transaction(fn) end

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
  external_id = true, pid = true, url = true, heartbeat = true }

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
  local sql = "UPDATE flow_runs SET state = ?, message = ?, heartbeat = ?" ..
    (state == "RUNNING" and ", started = coalesce(started, ?)" or "") ..
    (final and ", ended = ?" or "") ..
    (extra and extra.result ~= nil and ", result = ?" or "") ..
    " WHERE id = ? AND state NOT IN (" .. FINAL_SQL .. ")"
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
  local changed = self:set_flow_state(id, state, message)
  self:end_active_task_runs(id, state, message)
  return changed
end

-- A signature of a run's task runs: changes when one starts, moves or ends.
-- Sums, not every task run's state (a 20,000-task run made a string of
-- 200 KB each poll): one pass over the index task_runs_by_name, no table
-- rows.  A state change that none of these sums sees would have to keep
-- the first letter and the length of the state, started, ended and attempts.
function Store:task_signature(id)
  return self:value([[SELECT count(*) || '/' || count(started) || '/' || count(ended) || '/' ||
      total(attempts) || '/' || total(unicode(state)) || '/' || total(length(state))
      FROM task_runs WHERE flow_run_id = ?]], id)
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
  self:queue(INSERT_TASK_RUN,
    t.id, t.flow_run_id, t.parent_id, t.name, t.kind, t.call_key, t.state, t.params,
    t.params_hash, t.attempts, t.cache_key, t.tags, t.started, nil, nil, 1, nil, nil, nil)
  -- queue() may have flushed (batch full): then the entry is written already
  if self.npending > 0 then self.inserting[t.id] = self.pending[self.npending] end
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
    return
  end
  self:queue([[UPDATE task_runs SET state = ?, message = ?, result = ?, result_ok = ?,
      attempts = ?, ended = ?, cache_expires = ?, reused_from = ? WHERE id = ?
      AND flow_run_id = coalesce(?, flow_run_id)]],
    state, message, result, result_ok and 1 or 0, attempts, ended, cache_expires, reused_from, id,
    flow_run_id)
end

function Store:task_runs(flow_run_id)
  return self:rows("SELECT * FROM task_runs WHERE flow_run_id = ? ORDER BY started, rowid", flow_run_id)
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
    flow_run_id, task_run_id, ts or M.time(), stream, line)
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
  return self:value("SELECT token_hash IS NOT NULL FROM flow_runs WHERE id = ?", id) == 1
end

--- The run (id, state) a token's digest belongs to, read on any
-- connection to the store `db` (the server checks tokens from a request's
-- head on a connection of its own).
function M.run_by_token(db, token_hash)
  return db:first("SELECT id, state FROM flow_runs WHERE token_hash = ?", token_hash)
end

function Store:run_by_token(token_hash)
  self:flush()
  return M.run_by_token(self.db, token_hash)
end

--- Apply a worker's batch in one transaction: `fn(run)` is called with the
-- run's row read inside the transaction (state and event_seq as they are
-- now), and writes through the store; queued writes are flushed before
-- the commit.  `applied`, when fn returns one, becomes the run's event_seq.
function Store:apply_batch(run_id, fn)
  if not self.batch_cache then
    -- only the server that owns the store applies batches, for as long
    -- as it runs: a page cache of 64 MiB instead of SQLite's 2 MiB keeps
    -- the task run index it inserts into at random (ids are random) in
    -- memory as the store grows (a fifth less time per event at 100,000
    -- task runs)
    self.batch_cache = true
    self.db:exec("PRAGMA cache_size = -65536")
  end
  self:flush()
  return self.db:transaction(function()
    local run = self.db:first("SELECT id, state, event_seq FROM flow_runs WHERE id = ?", run_id)
    local result, applied = fn(run)
    self:flush()
    if run and applied and applied > run.event_seq then
      self.db:run("UPDATE flow_runs SET event_seq = ?, heartbeat = ? WHERE id = ?", applied, M.time(), run_id)
    elseif run then
      self.db:run("UPDATE flow_runs SET heartbeat = ? WHERE id = ?", M.time(), run_id)
    end
    return result
  end)
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
--
-- Freed pages go back to the filesystem by incremental vacuum: a store is
-- made with auto_vacuum=INCREMENTAL (Store:migrate; in WAL mode that takes
-- a VACUUM once the tables exist, instantaneous on an empty store), and
-- prune then moves free pages off the end of the file a few at a time.
-- Stores made before that are switched by one full VACUUM
-- (`drover prune --full-vacuum`).

local run_states = require "drover.states"

-- the final states, in a fixed order so the SQL text (and the statement cache) is stable
local FINAL = run_states.final_list

local function placeholders(n) return string.rep("?", n, ",") end

-- The WHERE clause (and its values) choosing prune's candidates in
-- flow_runs.  f: before (seconds since the epoch: created and ended before
-- it), states (a list of final states; default all of them), deployment.
local function prune_where(f)
  if type(f.before) ~= "number" then error("store.prune: bad filter 'before' (a time expected)", 3) end
  local st = f.states or FINAL
  for _, s in ipairs(st) do
    if not run_states.final[s] then
      error("store.prune: state '" .. tostring(s) .. "' is not a final state (active runs are never pruned)", 3)
    end
  end
  -- unary + keeps the planner off the state and deployment indexes: the
  -- created index gives the candidates oldest first, already in order, and
  -- the keyset in prune_batch reads each row of it once per pass
  local where = "created < ? AND coalesce(ended, created) < ? AND +state IN (" .. placeholders(#st) .. ")"
  local vals = { f.before, f.before, table.unpack(st) }
  if f.deployment then
    where = where .. " AND +deployment = ?"
    vals[#vals + 1] = f.deployment
  end
  return where, vals
end

-- the tables holding rows of a flow run, by flow_run_id
local RUN_CHILDREN = { task_runs = "task_runs", logs = "logs", states = "flow_run_states", calls = "run_calls" }

--- What prune(f) would delete now: { runs, task_runs, logs, states, calls }.
function Store:prune_count(f)
  local where, vals = prune_where(f)
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
  local where, vals = prune_where(f)
  self:flush()
  local db = self.db
  return db:transaction(function()
    local args = { table.unpack(vals) }
    local keyset = ""
    if cursor then
      -- keyset on (created, rowid): the runs a filter skipped are not read again
      keyset = " AND created >= ? AND (created > ? OR rowid > ?)"
      args[#args + 1], args[#args + 2], args[#args + 3] = cursor.created, cursor.created, cursor.rowid
    end
    args[#args + 1] = limit
    local rows = db:rows("SELECT rowid AS rid, id, created FROM flow_runs WHERE " .. where .. keyset ..
      " ORDER BY created, rowid LIMIT ?", table.unpack(args))
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
    return counts, { created = last.created, rowid = last.rid }
  end)
end

--- Is the store in incremental vacuum mode?
function Store:incremental_vacuum()
  self:flush()
  return self.db:value("PRAGMA auto_vacuum") == 2
end

--- Switch the store to incremental vacuum, if it is not: one full VACUUM
-- (rewrites the file and holds the write lock while it does).  Returns
-- true if it switched.
function Store:use_incremental_vacuum()
  if self:incremental_vacuum() then return false end
  self.db:exec("PRAGMA auto_vacuum = INCREMENTAL")
  self.db:exec("VACUUM")
  return true
end

--- Give up to `pages` free pages back to the filesystem (one short write
-- transaction).  Returns the number of free pages left (0 when the store
-- is not in incremental vacuum mode: its free pages are only reused).
function Store:vacuum_step(pages)
  if not self:incremental_vacuum() then return 0 end
  self.db:exec("PRAGMA incremental_vacuum(" .. math.tointeger(pages) .. ")")
  return self:free_pages()
end

--- Pages of the database file that hold nothing (deleted rows' space).
function Store:free_pages()
  self:flush()
  return self.db:value("PRAGMA freelist_count")
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
  return self.db:first("PRAGMA wal_checkpoint(" .. mode .. ")")
end

--- Bytes the store takes on disk: the database file and its WAL.
function Store:disk_size()
  local fs = require "drover.fs"
  local total = 0
  for _, p in ipairs { self.path, self.path .. "-wal" } do
    local st = fs.stat(p)
    if st then total = total + st.size end
  end
  return total
end


-- ---- big runs: a run's task runs summarised by name, and paged -------------
--
-- A run may hold tens of thousands of task runs: the daemon's run page
-- shows them grouped by name (task_run_summary) and reads the runs
-- themselves a page at a time (task_run_page), by keyset on (started, id),
-- never OFFSET, so page 200 costs what page 1 does.  Task runs not started
-- yet (started NULL) sort after every started one.

--- The sort key of a task run that has not started: after every real time.
-- TASK_KEY is the expression of the index task_runs_by_start (migration 4),
-- character for character: SQLite uses an expression index only then.
M.NOT_STARTED = 9e15
local TASK_KEY = "ifnull(started, 9000000000000000)"

--- Task runs of run `flow_run_id` grouped by name: { total, counts =
-- {STATE = n}, groups = { {name, total, counts, started, ended}, ... } },
-- groups ordered by their first start (not started last), then name.
-- started is the group's first start, ended its last end (nil while none
-- has ended).  At most `max_groups` groups (default all); groups_truncated
-- says some were left out (total and counts still count every task run).
function Store:task_run_summary(flow_run_id, max_groups)
  local rows = self:rows([[SELECT name, state, count(*) AS n, min(started) AS started, max(ended) AS ended
      FROM task_runs WHERE flow_run_id = ? GROUP BY name, state]], flow_run_id)
  local by_name, groups, counts, total = {}, {}, {}, 0
  for _, r in ipairs(rows) do
    local g = by_name[r.name]
    if not g then
      g = { name = r.name, total = 0, counts = {} }
      by_name[r.name] = g
      groups[#groups + 1] = g
    end
    g.total = g.total + r.n
    g.counts[r.state] = r.n
    if r.started and (not g.started or r.started < g.started) then g.started = r.started end
    if r.ended and (not g.ended or r.ended > g.ended) then g.ended = r.ended end
    counts[r.state] = (counts[r.state] or 0) + r.n
    total = total + r.n
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
  return self:rows("SELECT kind, state, n, timed, seconds FROM run_counts ORDER BY kind, state")
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

--- Two integers that, together, differ whenever the store may have
-- changed since the last call: the rows this connection's own writes
-- changed (total_changes(): SQLite's data_version does not count them)
-- and every other connection's commits (data_version).  Two cheap reads,
-- no table touched (two statements: the pragma_data_version table would
-- prepare its PRAGMA on every call).  Queued writes are flushed first, so
-- they count.
function Store:change_mark()
  self:flush()
  local db = self.db
  return db:value("SELECT total_changes()"), db:value("PRAGMA data_version")
end

return M
