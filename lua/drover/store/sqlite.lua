--- The store's SQLite dialect: a file (WAL) under DROVER_HOME, the
-- embedded default.  store.lua holds every query that both databases
-- share; this file holds what only SQLite says: the schema's migrations in
-- SQLite's SQL, how a version is kept (PRAGMA user_version), the change
-- mark the server's response cache watches, and file maintenance (vacuum,
-- checkpoints, size on disk).  lua/drover/store/postgresql.lua is the
-- same interface for PostgreSQL.
local core = require "drover.core"
local fs = require "drover.fs"

local D = { name = "sqlite" }

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
  -- the host a run's pid belongs to (process_identity.host): with a store
  -- shared by servers on several hosts, a reaper looks only at its own
  [6] = [[
    ALTER TABLE flow_runs ADD COLUMN host TEXT;
  ]],
  -- issue 13, the cost of a tracked call: every index of task_runs is
  -- paid for on each insert (a tenth of a tracked no-op call for this
  -- one), and since migration 4 task_runs_by_name and task_runs_by_start
  -- both begin with flow_run_id, so every lookup by run (the planner
  -- chose task_runs_by_name already) goes without task_runs_by_flow;
  -- nothing looks task runs up by call key within a run
  [7] = [[
    DROP INDEX task_runs_by_flow;
  ]],
}


D.migrations = migrations

--- The sort key of a task run in task_run_page: the expression of the
-- index task_runs_by_start (migration 4), character for character, since
-- SQLite uses an expression index only then.
D.TASK_KEY = "ifnull(started, 9000000000000000)"
--- A task list's order: start, then insertion.
D.TASK_ORDER = "started, rowid"
--- What locks a row read inside a transaction until it commits: nothing
-- (SQLite's write transaction excludes every other writer).
D.LOCK_ROW = ""
--- A prefix that keeps the planner off a column's indexes (prune).
D.NO_INDEX = "+"
--- A signature of a run's task runs (Store:task_signature): sums over
-- the index task_runs_by_name, no table rows.
D.SIGNATURE = [[SELECT count(*) || '/' || count(started) || '/' || count(ended) || '/' ||
      total(attempts) || '/' || total(unicode(state)) || '/' || total(length(state))
      FROM task_runs WHERE flow_run_id = ?]]

-- Queued writes: SQLite pays per statement too (step setup, closing the
-- table's cursors, the count trigger's frame made and freed, reset,
-- clearing bindings), so runs of one INSERT go as multi-row statements
-- (issue 13: 87k -> 68k instructions per tracked no-op call), at most 32
-- rows each (608 values for task_runs; SQLite takes 32,766; 64 rows
-- measured no better).
local run_queue = require("drover.store.batch").run_queue
function D.run_queue(db, q, n) return run_queue(db, q, n, 32) end

--- Send q[1..n] to the connection's writer (engine/src/dbwriter.c): one
-- transaction on a connection of its own, on a libuv worker thread, so the
-- loop goes on queueing while it is written; db:wait_batch() tells how it
-- went.  Returns true, or false and why when the writer's connection
-- cannot be opened (no descriptor left); raises on a value SQLite cannot
-- take.
function D.submit(db, q, n)
  local b = core.db.batch()
  run_queue(b, q, n, 32)
  return db:submit(b)
end

--- Log lines are stored as they are (TEXT, byte for byte).
function D.bytes(s) return s end

--- Open the store file at `path`.  Returns db, or nil and one line.
function D.open(path, opts)
  local home = path:match("^(.*)/[^/]*$") or "."
  local ok, err = fs.mkdir(home)
  if not ok and not fs.exists(home) then return nil, "cannot create drover home " .. home .. ": " .. tostring(err) end
  local db, derr = core.db.open(path, { busy_timeout = opts.busy_timeout
    or tonumber(os.getenv("DROVER_BUSY_TIMEOUT") or "") or 10000, auto_vacuum = "incremental" })
  if not db then
    local why = D.unwritable(home, path)
    if why then return nil, why end
    return nil, "not a drover store: " .. path .. " (" .. tostring(derr) .. ")"
  end
  return db
end

--- Why the store at `path` in directory `home` cannot be written (one
-- line naming the path), or nil: SQLite says only "unable to open
-- database file" or "attempt to write a readonly database" when the
-- directory or the file is read-only (a read-only mount, another user's
-- store), which is no reason to call it "not a drover store".  The store
-- needs both: the file, and the directory for its -wal and -shm files.
function D.unwritable(home, path)
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

--- The schema version of `db`, after checking it is a drover store
-- (raises one line naming `where` otherwise); 0 for an empty database.
function D.version(db, where)
  local okv, version = pcall(db.user_version, db)
  if not okv then
    error("not a drover store: " .. where .. " (" .. tostring(version) .. ")", 0)
  end
  if version == 0 then
    local n = db:value("SELECT count(*) FROM sqlite_master")
    if n > 0 then error("not a drover store: " .. where .. " (it holds other tables)", 0) end
  else
    local app = db:first("SELECT value FROM sqlite_master m, meta WHERE m.name = 'meta' AND meta.key = 'app'")
    if not app or app.value ~= "drover" then
      error("not a drover store: " .. where .. " (no drover marker)", 0)
    end
  end
  return version
end

--- Apply migration `v` (in the caller's transaction) and record it.
function D.apply(db, v)
  db:exec(migrations[v])
  db:user_version(v)
end

--- Once, after a new store got its tables: give deleted rows' space back
-- (see the store's prune).
function D.created(store) store:use_incremental_vacuum() end

--- Is `db` inside a transaction (of any task: SQLite's handle has one)?
function D.in_transaction(db) return db:stats().in_transaction end

--- The server that owns the store applies every worker's batch: a page
-- cache of 64 MiB instead of SQLite's 2 MiB keeps the task run index it
-- inserts into at random (ids are random) in memory as the store grows (a
-- fifth less time per event at 100,000 task runs).
function D.tune_for_server(db) db:exec("PRAGMA cache_size = -65536") end

--- Two integers that, together, differ whenever the store may have
-- changed since the last call: the rows this connection's own writes
-- changed (total_changes(): SQLite's data_version does not count them)
-- and every other connection's commits (data_version).  Two cheap reads,
-- no table touched (two statements: the pragma_data_version table would
-- prepare its PRAGMA on every call).  data_version opens a read
-- transaction (file locks, a stat): with `since` (a drover.now() time) it
-- is read again only when its last read (kept in `state`) began before
-- since -- a caller that needs every commit made before since gets them,
-- and under load that is one read per turn of the loop, not per request.
-- (Both reads are in-process and never wait: no_wait changes nothing.)
function D.change_mark(db, since, state)
  local own = db:value("SELECT total_changes()")
  if not since or not state.checked or state.checked < since then
    state.checked = core.now() -- before the read: every commit made before this is in it
    state.version = db:value("PRAGMA data_version")
  end
  return own, state.version
end

--- The columns of table `tbl`, in order (drover store copy).
function D.columns(db, tbl)
  local out = {}
  for _, r in ipairs(db:rows("SELECT name FROM pragma_table_info(?) ORDER BY cid", tbl)) do out[#out + 1] = r.name end
  return out
end

--- After rows were copied in with their ids: nothing to do (SQLite's
-- INTEGER PRIMARY KEY continues after the largest id).
function D.after_copy() end

--- Counters of runs by state (migration 5): kept exact by triggers.
D.RUN_COUNTS = "SELECT kind, state, n, timed, seconds FROM run_counts ORDER BY kind, state"
function D.compact_counts() return 0 end

-- ---- file maintenance (drover prune) ----------------------------------------
--
-- Freed pages go back to the filesystem by incremental vacuum: a store is
-- made with auto_vacuum=INCREMENTAL (set by D.open before the file's first
-- page is written, so it costs nothing; D.created switches a new database
-- that somehow missed it with a VACUUM), and prune then moves free pages
-- off the end of the file a few at a time.  Stores made before that are
-- switched by one full VACUUM (`drover prune --full-vacuum`).

function D.incremental_vacuum(db) return db:value("PRAGMA auto_vacuum") == 2 end

function D.use_incremental_vacuum(db)
  if D.incremental_vacuum(db) then return false end
  db:exec("PRAGMA auto_vacuum = INCREMENTAL")
  db:exec("VACUUM")
  return true
end

function D.vacuum_step(db, pages)
  if not D.incremental_vacuum(db) then return 0 end
  db:exec("PRAGMA incremental_vacuum(" .. math.tointeger(pages) .. ")")
  return D.free_pages(db)
end

function D.free_pages(db) return db:value("PRAGMA freelist_count") end

function D.checkpoint(db, mode) return db:first("PRAGMA wal_checkpoint(" .. mode .. ")") end

function D.disk_size(_, path)
  local total = 0
  for _, p in ipairs { path, path .. "-wal" } do
    local st = fs.stat(p)
    if st then total = total + st.size end
  end
  return total
end

--- SQLite's own check of the file (pages, indexes): "ok" or its findings.
function D.integrity(db)
  local out = {}
  for _, r in ipairs(db:rows("PRAGMA integrity_check")) do out[#out + 1] = r.integrity_check end
  return table.concat(out, "\n")
end

return D
