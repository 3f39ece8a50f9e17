-- `drover prune` and the retention pass on a store of 10,000 runs made by
-- bench/scale_fixture.lua (200k task runs, 200k log lines), and while a
-- real `drover serve` runs and a real local run writes.
local drover = require "drover"
local json = require "drover.json"
local store_mod = require "drover.store"
local retention = require "drover.retention"
local H = require "helper"

local root = os.getenv("DROVER_ROOT") or "."
local F = dofile(root .. "/bench/scale_fixture.lua")
local DAY = 86400
local FINAL = "('COMPLETED','FAILED','CANCELLED','CRASHED')"
local CHILDREN = { "task_runs", "logs", "flow_run_states", "run_calls" }

local function sh(cmd) assert(os.execute(cmd), cmd) end

-- Every table's row count, straight from the file (a connection of the test's own).
local function counts(home)
  local db = assert(drover.db.open(home .. "/drover.db"))
  local c = {}
  for _, t in ipairs { "flow_runs", "task_runs", "logs", "flow_run_states", "run_calls" } do
    c[t] = db:value("SELECT count(*) FROM " .. t)
  end
  db:close()
  return c
end

local function query(home, sql, ...)
  local db = assert(drover.db.open(home .. "/drover.db"))
  local v = db:value(sql, ...)
  db:close()
  return v
end

-- Rows of every table that belong to runs matching `where` (on flow_runs).
local function owned(home, where, ...)
  local db = assert(drover.db.open(home .. "/drover.db"))
  local c = { flow_runs = db:value("SELECT count(*) FROM flow_runs WHERE " .. where, ...) }
  for _, t in ipairs(CHILDREN) do
    c[t] = db:value("SELECT count(*) FROM " .. t .. " WHERE flow_run_id IN (SELECT id FROM flow_runs WHERE " ..
      where .. ")", ...)
  end
  db:close()
  return c
end

local function orphans(home)
  local db = assert(drover.db.open(home .. "/drover.db"))
  local n = 0
  for _, t in ipairs(CHILDREN) do
    n = n + db:value("SELECT count(*) FROM " .. t .. " WHERE flow_run_id NOT IN (SELECT id FROM flow_runs)")
  end
  db:close()
  return n
end

local function disk_size(home)
  local total = 0
  for _, p in ipairs { home .. "/drover.db", home .. "/drover.db-wal" } do
    local st = drover.fs.stat(p)
    if st then total = total + st.size end
  end
  return total
end

describe("drover prune", function()
  local base, now, homes = nil, nil, {}

  -- a fresh copy of the 10k-run fixture
  local function copy()
    local d = H.tempdir()
    homes[#homes + 1] = d
    sh("cp " .. base .. "/drover.db " .. d .. "/drover.db")
    return d
  end

  local function prune(home, args)
    local argv = { "prune" }
    for _, a in ipairs(args) do argv[#argv + 1] = a end
    return H.drover(argv, { env = { DROVER_HOME = home } })
  end

  setup(function()
    base = H.tempdir()
    now = store_mod.time()
    local r = F.make(base, { runs = 10000, now = now })
    assert.are.equal(10000, r.runs)
    assert.are.equal(200000, r.task_runs)
  end)

  teardown(function()
    for _, d in ipairs(homes) do sh("rm -rf " .. d) end
    if base then sh("rm -rf " .. base) end
  end)

  it("deletes ended runs older than the cutoff with all their rows, nothing orphaned, active runs untouched, "
    .. "and gives the space back (incremental vacuum)", function()
    local home = copy()
    local size_before = disk_size(home)
    local cutoff = now - 30 * DAY
    local before = counts(home)
    local gone = owned(home, "created < ? AND ended < ? AND state IN " .. FINAL, cutoff, cutoff)
    local active = owned(home, "state NOT IN " .. FINAL)
    assert.is_true(gone.flow_runs > 9000 and active.flow_runs > 0 and active.task_runs > 0)
    -- stale RUNNING rows older than the cutoff exist, and must stay
    assert.is_true(query(home, "SELECT count(*) FROM flow_runs WHERE state = 'RUNNING' AND created < ?", cutoff) > 0)

    local code, out, err = prune(home, { "--older-than", "30d", "--json" })
    assert.are.equal(0, code, err)
    local r = json.decode(out)
    assert.are.same({ gone.flow_runs, gone.task_runs, gone.logs, gone.flow_run_states, gone.run_calls },
      { r.runs, r.task_runs, r.logs, r.states, r.calls })
    local after = counts(home)
    for t, n in pairs(before) do assert.are.equal(n - gone[t], after[t], t) end
    assert.are.equal(0, orphans(home))
    assert.are.same(active, owned(home, "state NOT IN " .. FINAL))
    assert.are.equal(0, query(home, "SELECT count(*) FROM flow_runs WHERE state IN " .. FINAL ..
      " AND created < ? AND ended < ?", cutoff, cutoff))
    assert.are.equal("ok", query(home, "PRAGMA integrity_check"))
    -- the space: 92% of the runs went, the file is at most a fifth of what it was
    local size_after = disk_size(home)
    local msg = ("size before %d, after %d bytes"):format(size_before, size_after)
    assert.is_true(r.incremental_vacuum, msg)
    assert.are.same({ size_before, size_after }, { r.size_before, r.size_after }, msg)
    assert.is_true(size_after < size_before / 5, msg)
    assert.are.equal(0, query(home, "PRAGMA freelist_count"))
  end)

  it("a store made before incremental vacuum keeps its size until --full-vacuum rewrites it once", function()
    local home = copy()
    local db = assert(drover.db.open(home .. "/drover.db"))
    db:exec("PRAGMA auto_vacuum = NONE")
    db:exec("VACUUM")
    db:close()
    local size0 = disk_size(home)
    local code, out, err = prune(home, { "--older-than", "300d" })
    assert.are.equal(0, code, err)
    assert.matches("predates incremental vacuum", out)
    local size1 = disk_size(home)
    assert.is_true(size1 >= size0 * 0.95, ("size %d -> %d"):format(size0, size1))
    code, out, err = prune(home, { "--older-than", "30d", "--full-vacuum", "--json" })
    assert.are.equal(0, code, err)
    local r = json.decode(out)
    assert.is_true(r.full_vacuum and r.incremental_vacuum)
    local size2 = disk_size(home)
    assert.is_true(size2 < size0 / 5, ("size %d -> %d"):format(size0, size2))
    assert.are.equal(2, query(home, "PRAGMA auto_vacuum"))
    assert.are.equal(0, orphans(home))
  end)

  it("--dry-run counts and changes nothing", function()
    local home = copy()
    local before = counts(home)
    local cutoff = now - 90 * DAY
    local gone = owned(home, "created < ? AND ended < ? AND state IN " .. FINAL, cutoff, cutoff)
    local code, out, err = prune(home, { "--older-than", "90d", "--dry-run", "--json" })
    assert.are.equal(0, code, err)
    local r = json.decode(out)
    assert.is_true(r.dry_run)
    assert.are.same({ gone.flow_runs, gone.task_runs, gone.logs, gone.flow_run_states, gone.run_calls },
      { r.runs, r.task_runs, r.logs, r.states, r.calls })
    assert.is_true(r.runs > 0)
    assert.are.same(before, counts(home))
    code, out = prune(home, { "--older-than", "90d", "--dry-run" })
    assert.are.equal(0, code)
    assert.matches("^would prune " .. gone.flow_runs .. " run%(s%)", out)
    assert.are.same(before, counts(home))
  end)

  it("--state and --deployment choose which ended runs go", function()
    local home = copy()
    local cutoff = now - 30 * DAY
    local before = counts(home)
    local chosen = "created < ? AND ended < ? AND state IN ('FAILED','CRASHED') AND deployment = 'deploy-3'"
    local gone = owned(home, chosen, cutoff, cutoff)
    assert.is_true(gone.flow_runs > 10)
    local code, out, err = prune(home, { "--older-than", "30d", "--state", "failed", "-s", "CRASHED",
      "--deployment", "deploy-3", "--json" })
    assert.are.equal(0, code, err)
    assert.are.equal(gone.flow_runs, json.decode(out).runs)
    local after = counts(home)
    for t, n in pairs(before) do assert.are.equal(n - gone[t], after[t], t) end
    assert.are.equal(0, query(home, "SELECT count(*) FROM flow_runs WHERE " .. chosen, cutoff, cutoff))
    -- the other states of that deployment, and the other deployments, stay
    assert.is_true(query(home, "SELECT count(*) FROM flow_runs WHERE state = 'COMPLETED' AND deployment = 'deploy-3'"
      .. " AND created < ?", cutoff) > 100)
    assert.is_true(query(home, "SELECT count(*) FROM flow_runs WHERE state = 'FAILED' AND deployment = 'deploy-4'"
      .. " AND created < ?", cutoff) > 10)
    assert.are.equal(0, orphans(home))
  end)

  it("rejects a bad --older-than, an active or unknown --state, with one line and exit 2, the store untouched", function()
    local home = copy()
    local before = counts(home)
    local cases = {
      { { "--older-than", "30x" }, "%-%-older%-than '30x' is not a duration" },
      { { "--older-than", "-5d" }, "%-%-older%-than '%-5d' is not a duration" },
      { { "--older-than", "" }, "%-%-older%-than '' is not a duration" },
      { {}, "missing %-%-older%-than" },
      { { "--older-than", "30d", "--state", "RUNNING" }, "RUNNING is an active state" },
      { { "--older-than", "30d", "--state", "DONE" }, "unknown state 'DONE'" },
    }
    for _, c in ipairs(cases) do
      local code, out, err = prune(home, c[1])
      assert.are.equal(2, code, table.concat(c[1], " "))
      assert.are.equal("", out)
      assert.matches("^drover: drover prune: [^\n]*" .. c[2] .. "[^\n]*\n$", err)
    end
    assert.are.same(before, counts(home))
  end)

  it("the retention pass (drover serve --retention) prunes in small batches and stops when told", function()
    local home = copy()
    local store = assert(store_mod.open(home))
    local cutoff = now - 30 * DAY
    local gone = owned(home, "created < ? AND ended < ? AND state IN " .. FINAL, cutoff, cutoff)
    local lines, stop = {}, false
    local t = drover.spawn(function()
      retention.run(store, 30 * DAY, { stopping = function() return stop end,
        log = function(l) lines[#lines + 1] = l end })
    end)
    H.wait_until(function() return #lines > 0 end, 120, "a retention pass")
    stop = true
    t:join()
    store:close()
    assert.matches("pruned " .. gone.flow_runs .. " run%(s%), " .. gone.task_runs .. " task run%(s%)", lines[1])
    assert.are.equal(0, orphans(home))
    assert.are.equal(0, owned(home, "created < ? AND ended < ? AND state IN " .. FINAL, cutoff, cutoff).flow_runs)
    assert.is_true(retention.parse_duration("2w") == 14 * DAY and retention.parse_duration("1.5d") == nil)
  end)

  it("pruning while drover serve runs and a worker writes loses no active run's rows", function()
    local home = copy()
    -- a flow that keeps writing task runs and log lines until told to stop
    local proj = home .. "/proj"
    assert(drover.fs.mkdir(proj))
    assert(drover.fs.write(proj .. "/writer_flow.lua", [[
local drover = require "drover"
local Writer = drover.class("Writer")
function Writer:main(params)
  local n = 0
  while not drover.fs.exists(params.stop) do
    n = n + 1
    self:step(n)
    print("wrote " .. n)
    drover.sleep(0.002)
  end
  return { n = n }
end
function Writer:step(i) return i end
return Writer
]]))
    local env = { DROVER_HOME = home }
    local code, out, err = H.drover({ "package", "--module", "writer_flow", "--class", "Writer",
      "--entrypoint", "main", "--path", proj, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    assert.are.equal(0, (H.drover({ "deploy", "writer", "--package", json.decode(out).id }, { env = env })))
    local daemon, info = H.serve(home, { "--port", "0" }, env)
    local ok, e = pcall(function()
      local stop = home .. "/stop"
      local id = H.run(env, "writer", { "stop=" .. stop })
      H.wait_until(function()
        return query(home, "SELECT count(*) FROM task_runs WHERE flow_run_id = ?", id) >= 20
      end, 120, "the writer's first task runs")
      local active = owned(home, "state NOT IN " .. FINAL .. " AND id <> ?", id)
      -- everything ended goes (--older-than 0s), twice, while the writer writes
      for _ = 1, 2 do
        local pc, pout, perr = prune(home, { "--older-than", "0s", "--json" })
        assert.are.equal(0, pc, perr)
        assert.is_true(json.decode(pout).runs >= 0)
      end
      assert(drover.fs.write(stop, ""))
      local run = H.wait_run_state(info.url, id, "COMPLETED", 120)
      local n = run.result.n
      assert.is_true(n >= 20)
      -- every task run and every line the writer made is there
      assert.are.equal(n, query(home, "SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND name LIKE '%step'", id))
      assert.are.equal(n, query(home, "SELECT count(*) FROM logs WHERE flow_run_id = ? AND line LIKE 'wrote %'", id))
      assert.are.equal(n, query(home, "SELECT count(DISTINCT line) FROM logs WHERE flow_run_id = ? AND line LIKE 'wrote %'", id))
      -- the fixture's active runs, untouched
      assert.are.same(active, owned(home, "state NOT IN " .. FINAL .. " AND id <> ?", id))
      assert.are.equal(0, orphans(home))
      assert.are.equal("ok", query(home, "PRAGMA integrity_check"))
      -- only the writer's run and the fixture's active ones are left
      assert.are.equal(active.flow_runs + 1, query(home, "SELECT count(*) FROM flow_runs"))
    end)
    drover.kill(daemon.pid, "TERM")
    daemon:wait(30)
    H.stop_daemon(home)
    assert(ok, e)
  end)
end)
