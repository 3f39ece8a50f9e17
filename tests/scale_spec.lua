-- The daemon's list and metrics at scale (issue 13), on a store of 10,000
-- runs made by bench/scale_fixture.lua, served by a real `drover serve`:
-- /api/runs pages by keyset (a cursor in the x-next-cursor header) and
-- answers from a cache that every change of the store invalidates (a
-- write of another process, and the daemon's own write of a worker's
-- events), and /metrics gives counts kept by triggers that equal COUNT(*).
local H = require "helper"
local F = dofile((os.getenv("DROVER_ROOT") or ".") .. "/bench/scale_fixture.lua")
local drover = require "drover"
local http, json = require "drover.http", require "drover.json"
local store_mod, run_token = require "drover.store", require "drover.run_token"

local FLOW = [[
local drover = require "drover"
local Few = drover.class("Few")
local step = drover.task("step", function(i) return i * 2 end)
function Few:main(params)
  local sum = 0
  for i = 1, tonumber(params.n or 3) do sum = sum + step(i) end
  return sum
end
return Few
]]

describe("drover serve at scale", function()
  local home, url, daemon

  -- a connection of the test's own: another process's view of the store
  local function with_db(fn)
    local db = assert(drover.db.open(home .. "/drover.db", { busy_timeout = 10000 }))
    local ok, a, b = pcall(fn, db)
    db:close()
    assert(ok, a)
    return a, b
  end

  local function get(path)
    local res = assert(http.get(url .. path))
    assert.are.equal(200, res.status, res.body)
    return res
  end

  -- every run of a filter, following x-next-cursor; the ids in order
  local function walk(query, limit)
    local ids, seen, pages = {}, {}, 0
    local cursor
    repeat
      local res = get("/api/runs?limit=" .. limit .. query .. (cursor and ("&cursor=" .. cursor) or ""))
      assert.is_table(res.json) -- the body stays an array (the dashboard reads it so)
      for _, r in ipairs(res.json) do
        assert.is_nil(seen[r.id], "run " .. r.id .. " listed twice")
        seen[r.id] = true
        ids[#ids + 1] = r.id
      end
      cursor = res.headers["x-next-cursor"]
      pages = pages + 1
      assert.is_true(#res.json == limit or cursor == nil, "a short page before the last")
    until not cursor
    return ids, pages
  end

  local function ids_in_db(where, ...)
    local args = table.pack(...)
    return with_db(function(db)
      local out = {}
      for i, r in ipairs(db:rows("SELECT id FROM flow_runs" .. (where and (" WHERE " .. where) or "") ..
          " ORDER BY created DESC, id DESC", table.unpack(args, 1, args.n))) do
        out[i] = r.id
      end
      return out
    end)
  end

  local function first_ids(path)
    local out = {}
    for i, r in ipairs(get(path).json) do out[i] = r.id end
    return out
  end

  -- a finished run inserted by another process, newer than every other
  local function insert_run(db, state)
    local id = store_mod.new_id()
    local t = store_mod.time()
    db:run([[INSERT INTO flow_runs(id, name, backend, state, created, started, ended, heartbeat)
        VALUES(?, 'outside', 'local', ?, ?, ?, ?, ?)]], id, state, t, t, t + 1, t)
    return id
  end

  setup(function()
    home = H.tempdir()
    local r = F.make(home, { runs = 10000 })
    assert.are.equal(10000, r.runs)
    local src = home .. "/src"
    assert(drover.fs.mkdir(src))
    assert(drover.fs.write(src .. "/few_flow.lua", FLOW))
    local env = { DROVER_HOME = home }
    local code, out, err = H.drover({ "package", "--module", "few_flow", "--class", "Few", "--entrypoint", "main",
      "--path", src, "--json" }, { env = env })
    assert.are.equal(0, code, err)
    assert.are.equal(0, (H.drover({ "deploy", "few", "--package", json.decode(out).id }, { env = env })))
    local info
    daemon, info = H.serve(home, { "--port", "0" }, env)
    url = info.url
  end)

  teardown(function()
    if daemon and daemon:is_running() then
      drover.kill(daemon.pid, "TERM")
      daemon:wait(30)
    end
    H.stop_daemon(home)
    if home then os.execute("rm -rf " .. home) end
  end)

  it("pages walk every run exactly once, newest first, with and without a filter", function()
    local ids, pages = walk("", 1000)
    assert.are.same(ids_in_db(nil), ids)
    assert.are.equal(10, pages)
    local filtered = walk("&state=completed&deployment=deploy-3", 97)
    local want = ids_in_db("state = 'COMPLETED' AND deployment = 'deploy-3'")
    assert.is_true(#want > 97 * 2)
    assert.are.same(want, filtered)
    -- no cursor of ours: one line saying so
    local res = assert(http.get(url .. "/api/runs?cursor=zz"))
    assert.are.equal(400, res.status)
    assert.matches("bad cursor 'zz'", res.json.error)
  end)

  it("a cursor stays where it was when new runs arrive", function()
    local res = get("/api/runs?limit=50&state=COMPLETED")
    local cursor = res.headers["x-next-cursor"]
    assert.is_string(cursor)
    local second = first_ids("/api/runs?limit=50&state=COMPLETED&cursor=" .. cursor)
    local new = with_db(function(db) return { insert_run(db, "COMPLETED"), insert_run(db, "COMPLETED") } end)
    -- the second page is the same page; the first one starts with the new runs
    assert.are.same(second, first_ids("/api/runs?limit=50&state=COMPLETED&cursor=" .. cursor))
    local first = first_ids("/api/runs?limit=50&state=COMPLETED")
    assert.are.same({ new[2], new[1] }, { first[1], first[2] })
  end)

  it("the cached list changes when another process writes the store", function()
    local path = "/api/runs?limit=5&state=COMPLETED"
    local before = first_ids(path)
    assert.are.same(before, first_ids(path)) -- served from the cache now
    local id = with_db(function(db) return insert_run(db, "COMPLETED") end)
    assert.are.equal(id, first_ids(path)[1])
    -- and an update of a row on the page, not only a new row
    with_db(function(db) db:run("UPDATE flow_runs SET state = 'FAILED' WHERE id = ?", id) end)
    assert.are.same(before, first_ids(path))
  end)

  it("the cached list changes when the daemon itself writes a worker's events", function()
    local path = "/api/runs?limit=5&state=COMPLETED"
    -- a run for a worker reporting over HTTP, made here (a write of this
    -- process: then the list is read, and cached, before the worker starts)
    local store = assert(store_mod.open(home))
    local id = store:create_flow_run { name = "few", deployment = "few", backend = "local", state = "PENDING",
      params = { n = 3 } }
    local token = run_token.issue(store, id)
    store:close()
    local before = first_ids(path)
    assert.are.same(before, first_ids(path))
    -- the worker never opens the store: every write of its run is the daemon's
    local w = assert(drover.proc.spawn({ H.drover_bin, "worker", id, "--api", url },
      { env = { DROVER_HOME = home .. "/not-here", DROVER_RUN_TOKEN = token } }))
    H.wait_until(function() return first_ids(path)[1] == id end, 120, "run " .. id .. " first in " .. path)
    assert.are.equal(0, w:wait(60).code)
    assert.are.equal(6 + 4 + 2, get("/api/runs/" .. id).json.result)
  end)

  it("/metrics gives the counts of the store by state, and the task runs' durations", function()
    -- changes of every kind first: a run ended and its task runs failed,
    -- task runs deleted, a run inserted (the tests above ran a worker too)
    with_db(function(db)
      local r = db:first("SELECT id FROM flow_runs WHERE state = 'RUNNING' LIMIT 1")
      db:transaction(function()
        db:run("UPDATE flow_runs SET state = 'FAILED', ended = started + 3 WHERE id = ?", r.id)
        db:run("UPDATE task_runs SET state = 'FAILED', ended = coalesce(started, 0) + 1 WHERE flow_run_id = ?", r.id)
        db:run("DELETE FROM task_runs WHERE flow_run_id = (SELECT id FROM flow_runs WHERE state = 'COMPLETED' LIMIT 1)")
        insert_run(db, "CRASHED")
      end)
    end)
    local text = get("/metrics").body
    local function metric(name, state)
      local v = text:match("\n" .. name .. (state and ('{state="' .. state .. '"}') or "") .. " ([%d%.e+-]+)\n")
      assert(v, name .. " " .. tostring(state) .. " missing from /metrics")
      return tonumber(v)
    end
    with_db(function(db)
      for _, k in ipairs { { "drover_flow_runs", "flow_runs" }, { "drover_task_runs", "task_runs" } } do
        local n = 0
        for _, s in ipairs { "SCHEDULED", "PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELLING", "CANCELLED",
          "CRASHED" } do
          local want = db:value("SELECT count(*) FROM " .. k[2] .. " WHERE state = ?", s)
          assert.are.equal(want, metric(k[1], s), k[1] .. " " .. s)
          n = n + want
        end
        assert.are.equal(db:value("SELECT count(*) FROM " .. k[2]), n)
      end
      local d = db:first([[SELECT sum(ended - started) AS s, count(*) AS n FROM task_runs
          WHERE state = 'COMPLETED' AND started IS NOT NULL AND ended IS NOT NULL]])
      assert.are.equal(d.n, metric("drover_task_run_duration_seconds_count"))
      assert.is_true(math.abs(d.s - metric("drover_task_run_duration_seconds_sum")) < 1e-3)
    end)
  end)
end)
