-- Issue 13, goal 2: a run with 20,000 task runs stays usable through the
-- daemon's API.  /api/runs/ID answers with a summary by name (checked
-- against COUNT(*) in the store), small; /api/runs/ID/task_runs pages
-- through every task run exactly once, with and without filters.
local drover = require "drover"
local http = require "drover.http"
local H = require "helper"

local B = dofile(H.root .. "/tests/bigrun_fixture.lua")
local TASKS = 20000

describe("a run with 20,000 task runs", function()
  local home, proc, url, id, store

  setup(function()
    home = H.tempdir()
    store = assert(require("drover.store").open(home))
    local t0 = drover.time()
    id = B.make(store, { tasks = TASKS, pid = drover.pid() })
    print(string.format("# made %d task runs in %.2f s", TASKS, drover.time() - t0))
    proc, url = H.serve(home)
    url = url.url
  end)

  teardown(function()
    if proc then drover.kill(proc.pid, "TERM"); proc:wait(60) end
    if store then store:close() end
    os.execute("rm -rf " .. home)
  end)

  local function get(path)
    local r = assert(http.get(url .. path))
    return r
  end

  it("answers /api/runs/ID with a summary by name whose counts are the store's", function()
    local r = get("/api/runs/" .. id)
    assert.are.equal(200, r.status)
    print(string.format("# /api/runs/ID: %d bytes", #r.body))
    assert.is_true(#r.body < 100 * 1024, "answer of " .. #r.body .. " bytes")
    local v = r.json
    assert.are.equal(id, v.id)
    assert.is_true(v.task_runs_truncated)
    assert.is_nil(v.task_runs)
    assert.are.equal(TASKS, v.summary.total)
    assert.are.equal(B.NAMES, #v.summary.groups)
    local total = 0
    for _, g in ipairs(v.summary.groups) do
      local n = 0
      for st, c in pairs(g.counts) do
        assert.are.equal(store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND name = ? AND state = ?",
          id, g.name, st), c, g.name .. " " .. st)
        n = n + c
      end
      assert.are.equal(store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND name = ?", id, g.name),
        g.total)
      assert.are.equal(g.total, n)
      assert.are.equal(store:value("SELECT min(started) FROM task_runs WHERE flow_run_id = ? AND name = ?", id, g.name),
        g.started)
      assert.are.equal(store:value("SELECT max(ended) FROM task_runs WHERE flow_run_id = ? AND name = ?", id, g.name),
        g.ended)
      total = total + g.total
    end
    assert.are.equal(TASKS, total)
    for _, st in ipairs { "COMPLETED", "FAILED", "RUNNING", "PENDING" } do
      local want = store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND state = ?", id, st)
      assert.is_true(want > 0, st)
      assert.are.equal(want, v.summary.counts[st], st)
    end
    -- groups in order of their first start
    for i = 2, #v.summary.groups do
      assert.is_true(v.summary.groups[i - 1].started <= v.summary.groups[i].started)
    end
  end)

  -- every page, following next_cursor; returns the ids in order and the pages' largest size
  local function walk(query, limit)
    local ids, seen, cursor, pages, biggest = {}, {}, nil, 0, 0
    repeat
      local r = get("/api/runs/" .. id .. "/task_runs?limit=" .. limit .. query ..
        (cursor and ("&cursor=" .. require("drover.api_client").urlencode(cursor)) or ""))
      assert.are.equal(200, r.status, r.body)
      biggest = math.max(biggest, #r.body)
      pages = pages + 1
      assert.is_true(#r.json.task_runs <= limit)
      for _, t in ipairs(r.json.task_runs) do
        assert.is_nil(seen[t.id], "task run " .. t.id .. " seen twice")
        seen[t.id] = true
        ids[#ids + 1] = t
      end
      cursor = r.json.next_cursor
      if cursor == require("drover.json").null then cursor = nil end
    until not cursor
    return ids, pages, biggest
  end

  it("pages through every task run exactly once, in start order (not started last)", function()
    local rows, pages, biggest = walk("", 1000)
    print(string.format("# %d pages of 1000, the largest %d bytes", pages, biggest))
    assert.are.equal(TASKS, #rows)
    assert.is_true(biggest < 1024 * 1024)
    local want = store:rows([[SELECT id FROM task_runs WHERE flow_run_id = ?
        ORDER BY ifnull(started, 9e15), id]], id)
    for i, t in ipairs(rows) do assert.are.equal(want[i].id, t.id) end
    assert.are.equal("PENDING", rows[#rows].state)
    assert.is_nil(rows[#rows].started)
  end)

  it("pages with filters for state and name, each alone and together", function()
    local cases = {
      { "&state=FAILED", "state = 'FAILED'" },
      { "&state=pending", "state = 'PENDING'" },
      { "&name=step-7", "name = 'step-7'" },
      { "&name=step-3&state=RUNNING", "name = 'step-3' AND state = 'RUNNING'" },
      { "&name=nosuch", "name = 'nosuch'" },
    }
    for _, c in ipairs(cases) do
      local rows = walk(c[1], 37)
      local want = store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ? AND " .. c[2], id)
      assert.are.equal(want, #rows, c[1])
      for _, t in ipairs(rows) do
        if c[1]:find("state=FAILED") then assert.are.equal("FAILED", t.state) end
        if c[1]:find("name=step%-7") then assert.are.equal("step-7", t.name) end
      end
    end
  end)

  it("says what is wrong with a bad page request", function()
    local cases = {
      { "?limit=x", "bad limit 'x'" }, { "?limit=0", "bad limit '0'" },
      { "?state=NOPE", "unknown state 'NOPE'" }, { "?cursor=garbage", "bad cursor 'garbage'" },
      { "?offset=5", "unknown query argument 'offset'" }, { "?state=FAILED&state=RUNNING", "given 2 times" },
    }
    for _, c in ipairs(cases) do
      local r = get("/api/runs/" .. id .. "/task_runs" .. c[1])
      assert.are.equal(400, r.status, c[1])
      assert.matches(c[2], r.json.error, 1, true)
    end
    assert.are.equal(404, get("/api/runs/ffffffffffff/task_runs").status)
  end)

  it("gives a remote client (DROVER_API) every task run of a big run, page by page", function()
    local client_home = H.tempdir()
    local code, out, err = H.drover({ "status", id, "--json" },
      { env = { DROVER_HOME = client_home, DROVER_API = url, DROVER_TOKEN_FILE = false } })
    os.execute("rm -rf " .. client_home)
    assert.are.equal(0, code, err)
    local v = require("drover.json").decode(out)
    assert.are.equal(TASKS, #v.task_runs)
    assert.is_nil(v.task_runs_truncated)
    local seen = {}
    for _, t in ipairs(v.task_runs) do seen[t.id] = true end
    assert.are.equal(TASKS, store:value("SELECT count(*) FROM task_runs WHERE flow_run_id = ?", id))
    local n = 0
    for _ in pairs(seen) do n = n + 1 end
    assert.are.equal(TASKS, n)
  end)

  it("keeps a small run's task runs in /api/runs/ID", function()
    local small = B.make(store, { tasks = 600, pid = drover.pid() })
    -- 600 is over the limit; one of 150 is under it
    assert.is_true(get("/api/runs/" .. small).json.task_runs_truncated)
    local tiny = store:create_flow_run { name = "tiny", state = "RUNNING", pid = drover.pid() }
    store:transaction(function()
      for i = 1, 150 do
        store.db:run([[INSERT INTO task_runs(id, flow_run_id, name, kind, call_key, state, started)
            VALUES(?, ?, 't', 'task', ?, 'COMPLETED', ?)]], string.format("a%05x", i), tiny, "t:" .. i, i)
      end
    end)
    local v = get("/api/runs/" .. tiny).json
    assert.is_nil(v.task_runs_truncated)
    assert.are.equal(150, #v.task_runs)
    assert.are.equal(150, v.summary.groups[1].counts.COMPLETED)
  end)
end)
