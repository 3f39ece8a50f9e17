--- A run with many task runs, made in a second through SQL (issue 13's
-- "big run"), for tests/bigrun_spec.lua and the dashboard's browser test.
--
--   local B = dofile(root .. "/tests/bigrun_fixture.lua")
--   local id = B.make(store, { tasks = 20000, pid = drover.pid() })
--   B.add_late(store, id)            -- a live change: one more group
--
-- As a script (the browser test changes the store while the page shows it):
--   drover tests/bigrun_fixture.lua late HOME RUN_ID
--
-- Task run k (0-based), id RUN_ID .. hex, is named step-(k % NAMES); the last 500 have not
-- started (PENDING, started NULL), the 100 before them RUNNING, every
-- 97th of the rest FAILED, the others COMPLETED.  Ids are hex of k, so
-- they sort as numbers would not: paging must order by (started, id)
-- and not by insertion.
local M = {}

M.NAMES = 40

--- Add a RUNNING run with opts.tasks task runs (default 20000) to `store`
-- (a drover.store), in one transaction.  opts.pid: the run's pid (a live
-- process, so a daemon's reaper leaves the run RUNNING).  Returns its id.
function M.make(store, opts)
  local store_mod = require "drover.store"
  local n = math.tointeger(opts.tasks or 20000)
  local now = store_mod.time()
  local id = store:create_flow_run { name = "big-flow", backend = "local", state = "RUNNING", pid = opts.pid }
  store:transaction(function()
    store.db:run("UPDATE flow_runs SET started = ? WHERE id = ?", now - 300, id)
    store.db:run(([[WITH RECURSIVE t(k) AS (SELECT 0 UNION ALL SELECT k + 1 FROM t WHERE k < %d),
      x AS (SELECT k, CASE WHEN k >= %d THEN 'PENDING' WHEN k >= %d THEN 'RUNNING'
          WHEN k %% 97 = 0 THEN 'FAILED' ELSE 'COMPLETED' END AS st FROM t)
      INSERT INTO task_runs(id, flow_run_id, name, kind, call_key, state, params, result, result_ok,
        attempts, started, ended)
      SELECT ? || printf('%%x', (k * 7919) %% %d + 4096), ?, 'step-' || (k %% %d), 'task',
        'step-' || (k %% %d) || ':' || k, st, '{"shard":' || k || '}',
        CASE st WHEN 'COMPLETED' THEN '{"ok":true}' END, st <> 'FAILED', 1,
        CASE WHEN st = 'PENDING' THEN NULL ELSE ? + (k / 10) * 0.01 END,
        CASE WHEN st IN ('PENDING', 'RUNNING') THEN NULL ELSE ? + (k / 10) * 0.01 + 0.4 END
      FROM x]]):format(n - 1, n - 500, n - 600, n, M.NAMES, M.NAMES), id, id, now - 299, now - 299)
  end)
  return id
end

--- A live change to run `id`: a new group of 3 task runs ("late-step",
-- RUNNING) and its first RUNNING task run COMPLETED.
function M.add_late(store, id)
  local now = require("drover.store").time()
  store:transaction(function()
    for i = 1, 3 do
      store.db:run([[INSERT INTO task_runs(id, flow_run_id, name, kind, call_key, state, attempts, started)
          VALUES(?, ?, 'late-step', 'task', ?, 'RUNNING', 1, ?)]], id .. "-late" .. i, id, "late-step:" .. i, now)
    end
    store.db:run([[UPDATE task_runs SET state = 'COMPLETED', ended = ? WHERE id = (SELECT id FROM task_runs
        WHERE flow_run_id = ? AND state = 'RUNNING' AND name <> 'late-step' ORDER BY started, id LIMIT 1)]],
      now, id)
  end)
end

if arg and arg[0] and arg[0]:match("bigrun_fixture%.lua$") and arg[1] == "late" then
  local store = assert(require("drover.store").open(arg[2]))
  M.add_late(store, arg[3])
  store:close()
end

return M
