--- The store's PostgreSQL dialect: `drover serve --store postgresql://...`
-- (or DROVER_STORE), for a team's server and for more than one server on
-- one database.  The same interface as lua/drover/store/sqlite.lua; the
-- queries both share stay in store.lua, written with `?` placeholders,
-- which the connection below numbers ($1, $2...) once per SQL text.
--
-- The connection is a drover.pg pool behind the methods store.lua calls
-- on SQLite's handle (run, rows, first, value, exec, transaction), with
-- SQLite's contract: errors raise, and a transaction belongs to the task
-- that opened it.  A task inside db:transaction() has a connection of the
-- pool to itself, and every call that task makes goes there; other tasks
-- take other connections meanwhile (SQLite's single handle makes them
-- wait instead).
--
-- Text.  PostgreSQL's text must be valid UTF-8 without zero bytes, while a
-- workflow's output is bytes.  Log lines are stored as bytea (lossless,
-- like SQLite's TEXT); params, results and sources are JSON with
-- non-UTF-8 strings already escaped (store.encode); in any other text
-- value (a message, a name) a byte that is not UTF-8 becomes U+FFFD and a
-- zero byte is dropped, rather than failing the whole batch it is in.
local core = require "drover.core"
local pg = require "drover.pg"

local D = { name = "postgresql" }

local POOL_SIZE = 8

-- ---- the connection ----------------------------------------------------------

local Db = {}
Db.__index = Db

-- `?` -> `$n` outside quoted strings and identifiers, cached by SQL text
-- (the store's statements are a few dozen fixed strings).
-- (bounded: the store's statements, with IN lists and multi-row INSERTs of
-- a few sizes each)
local numbered = {}
local function number(sql)
  local out = numbered[sql]
  if out then return out end
  local n, parts, i, quote = 0, {}, 1, nil
  for j = 1, #sql do
    local ch = sql:sub(j, j)
    if quote then
      if ch == quote then quote = nil end
    elseif ch == "'" or ch == '"' then
      quote = ch
    elseif ch == "?" then
      n = n + 1
      parts[#parts + 1] = sql:sub(i, j - 1) .. "$" .. n
      i = j + 1
    end
  end
  parts[#parts + 1] = sql:sub(i)
  out = table.concat(parts)
  numbered[sql] = out
  return out
end
D.number = number

-- Text PostgreSQL takes: valid UTF-8, no zero byte (see the header).
local function clean(s)
  if utf8.len(s) and not s:find("\0", 1, true) then return s end
  local out, i = {}, 1
  while i <= #s do
    local ok, at = utf8.len(s, i)
    if ok then
      out[#out + 1] = s:sub(i)
      break
    end
    out[#out + 1] = s:sub(i, at - 1)
    out[#out + 1] = "\u{FFFD}"
    i = at + 1
  end
  return (table.concat(out):gsub("%z", ""))
end

local function args(...)
  local n = select("#", ...)
  local a = { ... }
  for i = 1, n do
    if type(a[i]) == "string" then a[i] = clean(a[i]) end
  end
  return table.unpack(a, 1, n)
end

-- The connection of this task's transaction, else the pool.
function Db:conn()
  return self.tx[coroutine.running()] or self.pool
end

-- drover.pg answers nil, message; the store expects a raise.
local function check(r, err)
  if r == nil and err ~= nil then error(err, 0) end
  return r
end

-- Statements that may write, counted: this process's own changes move the
-- change mark at once (see D.change_mark).
function Db:run(sql, ...)
  self.writes = self.writes + 1
  return check(self:conn():run(number(sql), args(...)))
end
function Db:rows(sql, ...) return check(self:conn():rows(number(sql), args(...))) end
function Db:first(sql, ...) return check(self:conn():first(number(sql), args(...))) end
function Db:value(sql, ...) return check(self:conn():value(number(sql), args(...))) end
function Db:exec(script)
  self.writes = self.writes + 1
  return check(self:conn():exec(script))
end

--- fn(db) inside BEGIN ... COMMIT on one connection of the pool (nested:
-- a savepoint on it).  fn's results; an error in fn rolls back and is
-- raised again, as is a failed COMMIT.
function Db:transaction(fn)
  local co = coroutine.running()
  local mine = self.tx[co]
  local out
  local function body()
    out = table.pack(fn(self))
    return true
  end
  if mine then
    check(mine:transaction(body))
  else
    check(self.pool:transaction(function(c)
      self.tx[co] = c
      local ok, err = pcall(body)
      self.tx[co] = nil
      if not ok then error(err, 0) end
      return true
    end))
  end
  return table.unpack(out, 1, out.n)
end

function Db:in_transaction() return self.tx[coroutine.running()] ~= nil end
function Db:close() self.pool:close() end
function Db:label() return self.pool:label() end

--- Open a pool on `url`.  Returns db, or nil and one line naming the
-- database (never the password).
function D.open(url, opts)
  local pool, err = pg.pool(url, { size = opts.pool_size or POOL_SIZE,
    connect_timeout = opts.connect_timeout or 10 })
  if not pool then
    return nil, "cannot open the drover store on PostgreSQL: " .. tostring(err):gsub("^drover%.pg%.connect: ", "")
  end
  return setmetatable({ pool = pool, tx = setmetatable({}, { __mode = "k" }), writes = 0 }, Db)
end

-- ---- the schema ------------------------------------------------------------------
--
-- The same versions as the SQLite dialect, each turning version i-1 into
-- i, in PostgreSQL's words: REAL -> double precision (times are seconds
-- since the epoch with microseconds), INTEGER -> bigint, INTEGER PRIMARY
-- KEY -> an identity column, log lines -> bytea.  The version is kept in
-- meta ('schema_version'); tests/store_spec.lua checks that both dialects
-- give every table the same columns.  Never edit one that has shipped.

D.migrations = {
  [1] = [[
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE packages(
      id TEXT PRIMARY KEY, backend TEXT NOT NULL, class TEXT, module TEXT NOT NULL,
      entrypoint TEXT, sha256 TEXT NOT NULL, location TEXT, manifest TEXT,
      created DOUBLE PRECISION NOT NULL);
    CREATE TABLE deployments(
      name TEXT PRIMARY KEY, backend TEXT NOT NULL, package_id TEXT, params TEXT,
      config TEXT, schedule TEXT, max_active BIGINT, paused BIGINT NOT NULL DEFAULT 0,
      created DOUBLE PRECISION NOT NULL, updated DOUBLE PRECISION NOT NULL);
    CREATE TABLE flow_runs(
      id TEXT PRIMARY KEY, name TEXT NOT NULL, deployment TEXT, backend TEXT NOT NULL,
      state TEXT NOT NULL, message TEXT, params TEXT, result TEXT, source TEXT,
      created DOUBLE PRECISION NOT NULL, started DOUBLE PRECISION, ended DOUBLE PRECISION,
      resumed_from TEXT, external_id TEXT, pid BIGINT, url TEXT, heartbeat DOUBLE PRECISION);
    CREATE INDEX flow_runs_by_deployment ON flow_runs(deployment, state);
    CREATE INDEX flow_runs_by_state ON flow_runs(state);
    CREATE INDEX flow_runs_by_created ON flow_runs(created);
    CREATE TABLE task_runs(
      id TEXT PRIMARY KEY, flow_run_id TEXT NOT NULL, parent_id TEXT, name TEXT NOT NULL,
      kind TEXT NOT NULL, call_key TEXT NOT NULL, state TEXT NOT NULL, message TEXT,
      params TEXT, params_hash TEXT, result TEXT, result_ok BIGINT NOT NULL DEFAULT 1,
      attempts BIGINT NOT NULL DEFAULT 0, cache_key TEXT, cache_expires DOUBLE PRECISION,
      reused_from TEXT, tags TEXT, started DOUBLE PRECISION, ended DOUBLE PRECISION);
    CREATE INDEX task_runs_by_flow ON task_runs(flow_run_id, call_key);
    CREATE INDEX task_runs_by_cache ON task_runs(name, cache_key) WHERE cache_key IS NOT NULL;
    CREATE TABLE logs(
      id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, flow_run_id TEXT NOT NULL,
      task_run_id TEXT, ts DOUBLE PRECISION NOT NULL, stream TEXT NOT NULL, line BYTEA NOT NULL);
    CREATE INDEX logs_by_run ON logs(flow_run_id, id);
    CREATE TABLE flow_run_states(
      id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, flow_run_id TEXT NOT NULL,
      state TEXT NOT NULL, message TEXT, ts DOUBLE PRECISION NOT NULL);
    CREATE INDEX flow_run_states_by_run ON flow_run_states(flow_run_id, id);
    INSERT INTO meta(key, value) VALUES ('app', 'drover');
  ]],
  [2] = [[
    ALTER TABLE deployments ADD COLUMN backend_config TEXT;
  ]],
  [3] = [[
    ALTER TABLE flow_runs ADD COLUMN token_hash TEXT;
    ALTER TABLE flow_runs ADD COLUMN event_seq BIGINT NOT NULL DEFAULT 0;
    CREATE UNIQUE INDEX flow_runs_by_token ON flow_runs(token_hash) WHERE token_hash IS NOT NULL;
    CREATE TABLE run_calls(
      id TEXT PRIMARY KEY, flow_run_id TEXT NOT NULL, task_run_id TEXT, spec TEXT NOT NULL,
      state TEXT NOT NULL, result TEXT, created DOUBLE PRECISION NOT NULL, ended DOUBLE PRECISION);
    CREATE INDEX run_calls_by_run ON run_calls(flow_run_id);
    CREATE TABLE daemon_schedule(
      deployment TEXT PRIMARY KEY, schedule TEXT NOT NULL, dep_updated DOUBLE PRECISION NOT NULL,
      last_fire DOUBLE PRECISION NOT NULL);
  ]],
  [4] = [[
    CREATE INDEX task_runs_by_start ON task_runs(flow_run_id, (coalesce(started, 9000000000000000)), id);
    CREATE INDEX task_runs_by_name ON task_runs(flow_run_id, name, state, started, ended, attempts);
  ]],
  -- Counts by state.  SQLite's triggers update one row per (kind, state)
  -- in place; here every change appends a delta row instead, because
  -- concurrent transactions updating the same few counter rows in
  -- different orders deadlock (and serialize) on PostgreSQL.  run_counts
  -- holds the sums up to the last compaction (D.compact_counts, run by the
  -- server every few seconds), run_count_deltas what came since.
  [5] = [[
    CREATE TABLE run_counts(kind TEXT NOT NULL, state TEXT NOT NULL, n BIGINT NOT NULL,
      timed BIGINT NOT NULL, seconds DOUBLE PRECISION NOT NULL, PRIMARY KEY(kind, state));
    CREATE TABLE run_count_deltas(kind TEXT NOT NULL, state TEXT NOT NULL, n BIGINT NOT NULL,
      timed BIGINT NOT NULL, seconds DOUBLE PRECISION NOT NULL);
    CREATE FUNCTION drover_count_runs() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP <> 'INSERT' THEN
        INSERT INTO run_count_deltas VALUES(TG_ARGV[0], OLD.state, -1,
          -(OLD.started IS NOT NULL AND OLD.ended IS NOT NULL)::int,
          -coalesce(OLD.ended - OLD.started, 0));
      END IF;
      IF TG_OP <> 'DELETE' THEN
        INSERT INTO run_count_deltas VALUES(TG_ARGV[0], NEW.state, 1,
          (NEW.started IS NOT NULL AND NEW.ended IS NOT NULL)::int,
          coalesce(NEW.ended - NEW.started, 0));
      END IF;
      RETURN NULL;
    END $$;
    INSERT INTO run_counts SELECT 'flow', state, count(*),
      count(*) FILTER (WHERE started IS NOT NULL AND ended IS NOT NULL),
      coalesce(sum(ended - started), 0) FROM flow_runs GROUP BY state;
    INSERT INTO run_counts SELECT 'task', state, count(*),
      count(*) FILTER (WHERE started IS NOT NULL AND ended IS NOT NULL),
      coalesce(sum(ended - started), 0) FROM task_runs GROUP BY state;
    CREATE TRIGGER flow_runs_count AFTER INSERT OR DELETE ON flow_runs
      FOR EACH ROW EXECUTE FUNCTION drover_count_runs('flow');
    CREATE TRIGGER flow_runs_count_update AFTER UPDATE OF state, started, ended ON flow_runs
      FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.started IS DISTINCT FROM NEW.started
        OR OLD.ended IS DISTINCT FROM NEW.ended)
      EXECUTE FUNCTION drover_count_runs('flow');
    CREATE TRIGGER task_runs_count AFTER INSERT OR DELETE ON task_runs
      FOR EACH ROW EXECUTE FUNCTION drover_count_runs('task');
    CREATE TRIGGER task_runs_count_update AFTER UPDATE OF state, started, ended ON task_runs
      FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state OR OLD.started IS DISTINCT FROM NEW.started
        OR OLD.ended IS DISTINCT FROM NEW.ended)
      EXECUTE FUNCTION drover_count_runs('task');
    DROP INDEX flow_runs_by_state;
    CREATE INDEX flow_runs_by_state_created ON flow_runs(state, created, id);
    CREATE INDEX flow_runs_by_deployment_created ON flow_runs(deployment, created, id);
    CREATE INDEX flow_runs_by_created_id ON flow_runs(created, id);
  ]],
  [6] = [[
    ALTER TABLE flow_runs ADD COLUMN host TEXT;
  ]],
  -- one index less to keep up on each task run (see the SQLite dialect:
  -- task_runs_by_name and task_runs_by_start begin with flow_run_id)
  [7] = [[
    DROP INDEX task_runs_by_flow;
  ]],
}

D.TASK_KEY = "coalesce(started, 9000000000000000)"
-- PostgreSQL sorts NULL last; SQLite (and so the store's contract) first
D.TASK_ORDER = "started NULLS FIRST, id"
D.NO_INDEX = ""
-- a row read in a transaction stays locked until it commits (apply_batch
-- against the reaper: both may write one run at once here)
D.LOCK_ROW = " FOR UPDATE"
D.SIGNATURE = [[SELECT count(*) || '/' || count(started) || '/' || count(ended) || '/' ||
      coalesce(sum(attempts), 0) || '/' || coalesce(sum(ascii(state)), 0) || '/' ||
      coalesce(sum(length(state)), 0) FROM task_runs WHERE flow_run_id = ?]]

function D.bytes(s) return pg.bytea(s) end

-- Queued writes: each statement is a round trip to the server, so runs of
-- one INSERT go as multi-row statements of up to 256 rows
-- (lua/drover/store/batch.lua).
local run_queue = require("drover.store.batch").run_queue
function D.run_queue(db, q, n) return run_queue(db, q, n, 256) end

-- Several servers may open one database at once: a migration runs under
-- a transaction-level advisory lock (this number, "drover" in ASCII), so
-- one applies each version and the others find it applied.
local MIGRATION_LOCK = 0x64726f766572

function D.version(db, where)
  local n = db:value([[SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()]])
  if n == 0 then return 0 end
  local has_meta = db:value([[SELECT count(*) FROM pg_tables
      WHERE schemaname = current_schema() AND tablename = 'meta']])
  if has_meta == 0 then error("not a drover store: " .. where .. " (it holds other tables)", 0) end
  local app = db:value("SELECT value FROM meta WHERE key = 'app'")
  if app ~= "drover" then error("not a drover store: " .. where .. " (no drover marker)", 0) end
  return math.tointeger(tonumber(db:value("SELECT value FROM meta WHERE key = 'schema_version'") or "1"))
end

function D.lock_migrations(db) db:value("SELECT pg_advisory_xact_lock(?::int8)", MIGRATION_LOCK) end

function D.apply(db, v)
  db:exec(D.migrations[v])
  db:run([[INSERT INTO meta(key, value) VALUES('schema_version', ?) ON CONFLICT(key)
      DO UPDATE SET value = excluded.value]], tostring(v))
end

function D.created() end

function D.in_transaction(db) return db:in_transaction() end

function D.tune_for_server() end

--- The change mark: this process's own writes (counted by the connection:
-- they move it at once), and the server's current snapshot
-- (xmin:xmax:running transactions), which moves whenever a transaction
-- that writes starts or ends on any connection of any server.  The
-- snapshot is read at most every MARK_TTL seconds: a query per request
-- would cost a round trip each, and under 64 clients the pool's
-- connections; so another server's or worker's write shows in a cached
-- answer (/api/runs) within MARK_TTL.
-- (no_wait: a read due then is not made, and nil says so.)
local MARK_TTL = 0.25
function D.change_mark(db, _, state, no_wait)
  local now = core.now()
  if not state.at or now - state.at > MARK_TTL then
    if no_wait then return nil end
    state.mark = db:value("SELECT pg_current_snapshot()::text")
    state.at = now
  end
  return db.writes, state.mark
end

function D.columns(db, tbl)
  local out = {}
  for _, r in ipairs(db:rows([[SELECT column_name FROM information_schema.columns
      WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position]], tbl)) do
    out[#out + 1] = r.column_name
  end
  return out
end

--- Rows copied in with their own ids: move the identity past them.
function D.after_copy(db, tbl)
  if tbl == "logs" or tbl == "flow_run_states" then
    db:value(("SELECT setval(pg_get_serial_sequence('%s', 'id'), greatest(coalesce(max(id), 0), 1)) FROM %s")
      :format(tbl, tbl))
  end
end

D.RUN_COUNTS = [[SELECT kind, state, sum(n)::int8 AS n, sum(timed)::int8 AS timed, sum(seconds) AS seconds
    FROM (SELECT * FROM run_counts UNION ALL SELECT * FROM run_count_deltas) c
    GROUP BY kind, state ORDER BY kind, state]]

--- Fold the deltas into run_counts; returns how many deltas it folded.
-- One server at a time (a transaction advisory lock; another server
-- skips), so the counter rows are only ever updated here.
function D.compact_counts(db)
  return db:transaction(function()
    if not db:value("SELECT pg_try_advisory_xact_lock(?::int8)", MIGRATION_LOCK + 1) then return 0 end
    local moved = db:rows([[WITH moved AS (DELETE FROM run_count_deltas RETURNING *)
        SELECT kind, state, sum(n)::int8 AS n, sum(timed)::int8 AS timed, sum(seconds) AS seconds,
          count(*)::int8 AS rows FROM moved GROUP BY kind, state ORDER BY kind, state]])
    local total = 0
    for _, m in ipairs(moved) do
      db:run([[INSERT INTO run_counts(kind, state, n, timed, seconds) VALUES(?, ?, ?, ?, ?)
          ON CONFLICT(kind, state) DO UPDATE SET n = run_counts.n + excluded.n,
          timed = run_counts.timed + excluded.timed, seconds = run_counts.seconds + excluded.seconds]],
        m.kind, m.state, m.n, m.timed, m.seconds)
      total = total + m.rows
    end
    return total
  end)
end

-- ---- maintenance: PostgreSQL's own (autovacuum) ------------------------------

function D.incremental_vacuum() return false end
function D.use_incremental_vacuum() return false end
function D.vacuum_step() return 0 end
function D.free_pages() return 0 end
function D.checkpoint() return { busy = 0, log = 0, checkpointed = 0 } end
function D.disk_size(db) return db:value("SELECT pg_database_size(current_database())") end

--- PostgreSQL checks its own pages (checksums, WAL): nothing to add here.
function D.integrity() return "ok" end

return D
