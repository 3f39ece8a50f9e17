--- bench/scale_fixture.lua -- a store holding a year of a busy team's runs,
-- made in seconds through SQL (issue 13's fixture, shared by bench/scale.sh
-- and tests/prune_spec.lua).
--
--   drover bench/scale_fixture.lua HOME [RUNS] [BIG_RUN_TASKS]   (100000, 0)
--   local F = dofile(root .. "/bench/scale_fixture.lua"); F.make(home, opts)
--
-- drover.store creates the schema (so the fixture always has the store's
-- current schema and pragmas); then the rows are inserted by a few
-- INSERT ... SELECT statements over a recursive counter, in one
-- transaction, on a connection of this generator's own (a fixture, not a
-- writer of the product: it writes the tables directly).
--
-- Per flow run: 20 task runs, 20 log lines (one per task run), its state
-- history (SCHEDULED, RUNNING, the end), and every 50th run a remote call
-- (run_calls).  Runs are created evenly over the `days` before `now`;
-- states are drawn from a hash of the run's number: ~83% COMPLETED, 10%
-- FAILED, CANCELLED and CRASHED a few each, 0.3% RUNNING left behind
-- (stale rows, at any age: what a crashed host leaves), and the newest
-- 0.3% active (SCHEDULED, PENDING, RUNNING).  20 deployments, and one run
-- in ten without one (a `drover exec`).  Ids are a bijection of the row
-- number (odd multiplier mod 2^48), so they look random to the indexes, as
-- real ones do.
local M = {}

M.TASKS_PER_RUN = 20
M.DEPLOYMENTS = 20
M.DAY = 86400

-- SQL for the run number i's hash (0..999) and derived columns; every
-- statement below computes them the same way, so tables agree.
local H = "((%s * 2654435761) %% 1000)"
local function hash(col) return H:format(col) end
-- the flow run id of run number i (12 hex digits)
local RUN_ID = "printf('%%012x', (%s * 691504013) & 281474976710655)"
local function run_id(col) return RUN_ID:format(col) end

-- db:exec(sql); with FIXTURE_TIMES=1 in the environment, how long each
-- table's INSERT took goes to stderr (to see where the seconds go)
local function exec_timed(db, sql)
  local clock = require("drover.store").time
  local t = clock()
  db:exec(sql)
  if os.getenv("FIXTURE_TIMES") == "1" then
    io.stderr:write(string.format("%.2f s %s\n", clock() - t, sql:match("INSERT INTO %w+")))
  end
end

-- The state of run i (n runs): the newest 0.3% active, some stale RUNNING.
local function state_sql(i, n)
  local h = hash(i)
  return ([[CASE
    WHEN %s >= %d THEN (CASE %s %% 3 WHEN 0 THEN 'SCHEDULED' WHEN 1 THEN 'PENDING' ELSE 'RUNNING' END)
    WHEN %s < 3 THEN 'RUNNING'
    WHEN %s < 103 THEN 'FAILED'
    WHEN %s < 118 THEN 'CANCELLED'
    WHEN %s < 125 THEN 'CRASHED'
    ELSE 'COMPLETED' END]]):format(i, n - math.max(1, n * 3 // 1000), h, h, h, h, h)
end

--- Make the fixture in store directory `home` (created; must not hold a
-- store yet).  opts: runs (default 100000), big_run_tasks (a run with this
-- many task runs added, default 0), now (default the clock), days
-- (default 365).  Returns { runs, task_runs, logs, states, calls,
-- big_run = id or nil, seconds }.
function M.make(home, opts)
  opts = opts or {}
  local drover = require "drover"
  local store_mod = require "drover.store"
  local n = math.tointeger(opts.runs or 100000)
  assert(n and n > 0, "scale_fixture: runs must be a positive integer")
  local big = math.tointeger(opts.big_run_tasks or 0)
  local now = opts.now or store_mod.time()
  local span = (opts.days or 365) * M.DAY
  local t0 = store_mod.time()

  local store = assert(store_mod.open(home))
  local path = store.path
  assert(store:value("SELECT count(*) FROM flow_runs") == 0, "scale_fixture: " .. path .. " is not empty")
  store:close()

  -- Nobody else has the new store open: the bulk insert skips the journal
  -- (and the WAL, which would write every page twice); WAL again after.
  local db = assert(drover.db.open(path, { busy_timeout = 10000, wal = false }))
  db:exec("PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF; PRAGMA cache_size = -262144")
  local T = M.TASKS_PER_RUN
  local i_state = state_sql("i", n)
  -- created: evenly over the span, oldest first; started 1-5 s later;
  -- ended 30 s to 10 min after that.
  local runs_cte = ([[WITH RECURSIVE s(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM s WHERE i < %d),
    r AS MATERIALIZED (SELECT i, %s AS id, %s AS h, %s AS state,
      %.6f - %.6f * (%d - i) / %d AS created FROM s)]]):format(n - 1, run_id("i"), hash("i"), i_state,
    now, span, n, n)
  db:transaction(function()
    -- The store's secondary indexes are dropped and made again after the
    -- inserts (a sort each instead of 2M random inserts): several times
    -- faster, and the same indexes, read from the schema.
    local indexes = db:rows([[SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL
        AND tbl_name IN ('flow_runs', 'task_runs', 'logs', 'flow_run_states', 'run_calls')]])
    for _, ix in ipairs(indexes) do db:exec('DROP INDEX "' .. ix.name .. '"') end
    for d = 0, M.DEPLOYMENTS - 1 do
      db:run([[INSERT INTO deployments(name, backend, params, schedule, paused, created, updated)
          VALUES(?, 'local', '{}', NULL, 0, ?, ?)]], "deploy-" .. d, now - span, now - span)
    end
    exec_timed(db, runs_cte .. [[
      INSERT INTO flow_runs(id, name, deployment, backend, state, message, params, result, created,
        started, ended, heartbeat)
      SELECT id, 'flow-' || (i % 20), CASE WHEN h % 10 = 0 THEN NULL ELSE 'deploy-' || (i % 20) END,
        'local', state,
        CASE state WHEN 'FAILED' THEN 'task-19 failed: exit code 1' WHEN 'CRASHED' THEN 'worker died'
          WHEN 'CANCELLED' THEN 'cancelled by the user' END,
        '{"n":' || i || ',"day":"' || date(created, 'unixepoch') || '"}',
        CASE state WHEN 'COMPLETED' THEN '{"ok":true,"rows":' || (h * 37) || '}' END,
        created,
        CASE WHEN state IN ('SCHEDULED', 'PENDING') THEN NULL ELSE created + 1 + h % 5 END,
        CASE WHEN state IN ('SCHEDULED', 'PENDING', 'RUNNING') THEN NULL
          ELSE created + 31 + h % 5 + h * 0.6 END,
        created + 1
      FROM r ORDER BY i]])
    exec_timed(db, runs_cte .. [[
      INSERT INTO flow_run_states(flow_run_id, state, message, ts)
      SELECT id, st, NULL, ts FROM (
        SELECT i, 0 AS k, id, 'SCHEDULED' AS st, created AS ts FROM r
        UNION ALL SELECT i, 1, id, 'RUNNING', created + 1 + h % 5 FROM r
          WHERE state NOT IN ('SCHEDULED', 'PENDING')
        UNION ALL SELECT i, 2, id, state, created + 31 + h % 5 + h * 0.6 FROM r
          WHERE state NOT IN ('SCHEDULED', 'PENDING', 'RUNNING'))
      ORDER BY i, k]])
    -- task run j of run i: COMPLETED, except the last of a FAILED run and
    -- those of active runs (the first half done, one RUNNING, the rest PENDING)
    local tasks_cte = runs_cte .. (([[,
      t(j) AS (SELECT 0 UNION ALL SELECT j + 1 FROM t WHERE j < %d),
      x AS MATERIALIZED (SELECT r.*, j, printf('%%012x', ((i * %d + j + 1) * 1099511628211) & 281474976710655) AS tid,
        created + 1 + h %% 5 + j * 1.5 AS tstart,
        CASE WHEN state IN ('SCHEDULED','PENDING','RUNNING') THEN
          (CASE WHEN j < %d THEN 'COMPLETED' WHEN j = %d THEN 'RUNNING' ELSE 'PENDING' END)
          WHEN state = 'FAILED' AND j = %d THEN 'FAILED'
          WHEN state IN ('CANCELLED','CRASHED') AND j = %d THEN state
          ELSE 'COMPLETED' END AS tstate
        FROM r, t)]]):format(T - 1, T, T // 2, T // 2, T - 1, T - 1))
    exec_timed(db, tasks_cte .. [[
      INSERT INTO task_runs(id, flow_run_id, parent_id, name, kind, call_key, state, message, params,
        params_hash, result, result_ok, attempts, tags, started, ended)
      SELECT tid, id, NULL, 'task-' || (j % 7), 'task', 'task-' || (j % 7) || ':' || (j / 7 + 1), tstate,
        CASE tstate WHEN 'FAILED' THEN 'exit code 1' END,
        '{"chunk":' || j || ',"of":20}', printf('%016x', (i * 31 + j) * 2654435761),
        CASE tstate WHEN 'COMPLETED' THEN '{"ok":true,"records":' || (h * 13 + j) || '}' END,
        CASE tstate WHEN 'FAILED' THEN 0 ELSE 1 END, 1, '["cpu"]',
        CASE WHEN tstate = 'PENDING' THEN NULL ELSE tstart END,
        CASE WHEN tstate IN ('PENDING', 'RUNNING') THEN NULL ELSE tstart + 1.2 END
      FROM x ORDER BY i, j]])
    exec_timed(db, tasks_cte .. [[
      INSERT INTO logs(flow_run_id, task_run_id, ts, stream, line)
      SELECT id, tid, tstart + 0.5, CASE WHEN tstate = 'FAILED' THEN 'stderr' ELSE 'stdout' END,
        'task-' || (j % 7) || ' chunk ' || j || ' of run ' || id || ': processed ' || (h * 13 + j) ||
        ' records in 0.' || (h % 90 + 10) || ' s'
      FROM x WHERE tstate <> 'PENDING' ORDER BY i, j]])
    exec_timed(db, runs_cte .. [[
      INSERT INTO run_calls(id, flow_run_id, task_run_id, spec, state, result, created, ended)
      SELECT 'c' || id, id, NULL, '{"fn":"train","resources":{"cpus":4}}',
        CASE WHEN state IN ('SCHEDULED','PENDING','RUNNING') THEN 'PENDING' ELSE 'COMPLETED' END,
        CASE WHEN state IN ('SCHEDULED','PENDING','RUNNING') THEN NULL ELSE '{"ok":true}' END,
        created + 2, CASE WHEN state IN ('SCHEDULED','PENDING','RUNNING') THEN NULL ELSE created + 20 END
      FROM r WHERE i % 50 = 0]])
    for _, ix in ipairs(indexes) do db:exec(ix.sql) end
  end)

  local big_id
  if big > 0 then
    -- one run with `big` task runs (50 names) and a log line each, a day old
    big_id = "b16" .. string.format("%09x", n)
    local created = now - M.DAY
    db:transaction(function()
      db:run([[INSERT INTO flow_runs(id, name, deployment, backend, state, params, created, started,
          ended, heartbeat) VALUES(?, 'big-flow', 'deploy-0', 'local', 'COMPLETED', '{}', ?, ?, ?, ?)]],
        big_id, created, created + 1, created + 1 + big * 0.01, created + 1)
      db:run([[INSERT INTO flow_run_states(flow_run_id, state, ts) VALUES(?, 'SCHEDULED', ?), (?, 'RUNNING', ?),
          (?, 'COMPLETED', ?)]], big_id, created, big_id, created + 1, big_id, created + 1 + big * 0.01)
      local cte = ([[WITH RECURSIVE t(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM t WHERE k < %d),
        x AS (SELECT k, printf('b%%011x', k) AS tid, %.6f + k * 0.01 AS ts FROM t)]]):format(big - 1, created + 1)
      db:run(cte .. [[
        INSERT INTO task_runs(id, flow_run_id, name, kind, call_key, state, params, result, result_ok,
          attempts, tags, started, ended)
        SELECT tid, ?, 'step-' || (k % 50), 'task', 'step-' || (k % 50) || ':' || (k / 50 + 1), 'COMPLETED',
          '{"shard":' || k || '}', '{"ok":true}', 1, 1, '["cpu"]', ts, ts + 0.4 FROM x ORDER BY k]], big_id)
      db:run(cte .. [[
        INSERT INTO logs(flow_run_id, task_run_id, ts, stream, line)
        SELECT ?, tid, ts + 0.2, 'stdout', 'step-' || (k % 50) || ' shard ' || k || ' done' FROM x ORDER BY k]],
        big_id)
    end)
  end
  db:exec("PRAGMA journal_mode = WAL")
  local out = {
    runs = db:value("SELECT count(*) FROM flow_runs"),
    task_runs = db:value("SELECT count(*) FROM task_runs"),
    logs = db:value("SELECT count(*) FROM logs"),
    states = db:value("SELECT count(*) FROM flow_run_states"),
    calls = db:value("SELECT count(*) FROM run_calls"),
    big_run = big_id, path = path, seconds = store_mod.time() - t0,
  }
  db:close()
  return out
end

-- As a script: drover bench/scale_fixture.lua HOME [RUNS] [BIG_RUN_TASKS]
if arg and arg[0] and arg[0]:match("scale_fixture%.lua$") then
  local home = arg[1]
  if not home then
    io.stderr:write("usage: drover bench/scale_fixture.lua HOME [RUNS] [BIG_RUN_TASKS]\n")
    os.exit(2)
  end
  local r = M.make(home, { runs = tonumber(arg[2] or "100000"), big_run_tasks = tonumber(arg[3] or "0") })
  print(require("drover.json").encode(r))
end

return M
