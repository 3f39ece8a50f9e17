-- Two `drover serve` processes on one PostgreSQL database (the real server
-- tests/services/postgres.sh starts): each has its own drover home, and
-- both homes' store.conf name the same database.  Both answer the API and
-- the dashboard's event stream for runs the other started, a deployment's
-- schedule fires each time once, and with one server SIGKILLed the other
-- goes on.
local drover = require "drover"
local http = require "drover.http"
local json = require "drover.json"
local H = require "helper"
local _ -- the values a test ignores

local fixture = (os.getenv("DROVER_ROOT") or ".") .. "/tests/conformance/fixture"

describe("two servers on one PostgreSQL database", function()
  local url, homes, servers, infos = nil, {}, {}, {}

  local function drv(i, args) return H.drover(args, { env = { DROVER_HOME = homes[i], DROVER_STORE = "" } }) end

  setup(function()
    url = H.pg_database()
    for i = 1, 2 do
      homes[i] = H.tempdir()
      local f = assert(io.open(homes[i] .. "/store.conf", "w"))
      f:write(url, "\n")
      f:close()
    end
    local code, out, err = drv(1, { "package", "--module", "fixture_flow", "--class", "Fixture",
      "--entrypoint", "main", "--path", fixture, "--json" })
    assert.are.equal(0, code, err)
    local pkg = json.decode(out).id
    code, _, err = drv(1, { "deploy", "ok", "--package", pkg, "mode=ok" })
    assert.are.equal(0, code, err)
    for i = 1, 2 do
      servers[i], infos[i] = H.serve(homes[i], { "--port", "0" }, { DROVER_HOME = homes[i], DROVER_STORE = "" })
    end
  end)

  teardown(function()
    for _, p in ipairs(servers) do
      if p:is_running() then p:kill("KILL"); p:wait(30) end
    end
    for _, h in ipairs(homes) do H.remove_worker_dirs(h); drover.fs.remove(h, { recursive = true }) end
  end)

  it("both answer for a run the other started, and stream its events", function()
    local events = {}
    local curl = assert(drover.proc.spawn({ "curl", "-sN", "--max-time", "120", infos[2].url .. "/api/events" },
      { env = { LD_PRELOAD = "" }, stdout = function(chunk) events[#events + 1] = chunk end }))
    H.wait_until(function() return table.concat(events):find("retry: 2000", 1, true) end, 30, "the stream to open")
    -- started through server 1 (its home's daemon), reported to it
    local id = H.run({ DROVER_HOME = homes[1], DROVER_STORE = "" }, "ok")
    local r1 = H.wait_run_state(infos[1].url, id, "COMPLETED", 120)
    local r2 = H.wait_run_state(infos[2].url, id, "COMPLETED", 60)
    assert.are.same(r1.result, r2.result)
    local list = json.decode(assert(http.get(infos[2].url .. "/api/runs")).body)
    assert.are.equal(id, list[1].id)
    H.wait_until(function()
      local s = table.concat(events)
      return s:find('"id":"' .. id .. '"', 1, true) and s:find('"state":"COMPLETED"', 1, true)
    end, 60, "server 2's stream to carry run " .. id)
    local logs = json.decode(assert(http.get(infos[2].url .. "/api/runs/" .. id .. "/logs")).body)
    local found = false
    for _, l in ipairs(logs) do found = found or l.line == "fixture says HELLO" end
    assert.is_true(found)
    curl:kill("TERM")
    curl:wait(30)
  end)

  it("a schedule fires each time once across both servers", function()
    local code, _, err = drv(2, { "deploy", "ticking", "--package", "0000dead", "--schedule", "@every 2s" })
    assert.are.equal(2, code) -- an unknown package: one line, nothing deployed
    assert.matches("unknown package '0000dead'", err)
    local store = assert(require("drover.store").open(homes[1]))
    local pkg = store:deployment("ok").package_id
    code, _, err = drv(2, { "deploy", "ticking", "--package", pkg, "mode=ok", "--schedule", "@every 2s" })
    assert.are.equal(0, code, err)
    H.wait_until(function() return #store:flow_runs { deployment = "ticking", limit = 1000 } >= 4 end, 120,
      "4 scheduled runs")
    drv(2, { "stop", "ticking" })
    local fires = {}
    for _, r in ipairs(store:flow_runs { deployment = "ticking", limit = 1000 }) do
      local src = require("drover.store").decode(r.source) or {}
      local t = assert(src.fire_time, json.encode(src))
      assert.is_nil(fires[t], "fire time " .. tostring(t) .. " started twice")
      fires[t] = true
    end
    store:close()
  end)

  it("PostgreSQL restarted and its sessions terminated during a run: the run completes, nothing lost", function()
    local src = H.tempdir()
    assert(drover.fs.write(src .. "/lines_flow.lua", [[
      local drover = require "drover"
      local Lines = drover.class("Lines")
      local echo = drover.task("echo", function(i) print("line " .. i) drover.sleep(0.05) return i end)
      function Lines:main()
        local sum = 0
        for i = 1, 200 do sum = sum + echo(i) end
        return sum
      end
      return Lines
    ]]))
    local code, out, err = drv(2, { "package", "--module", "lines_flow", "--class", "Lines", "--entrypoint", "main",
      "--path", src, "--json" })
    assert.are.equal(0, code, err)
    code, _, err = drv(2, { "deploy", "lines", "--package", json.decode(out).id })
    assert.are.equal(0, code, err)
    local store = assert(require("drover.store").open(homes[2]))
    local id = H.run({ DROVER_HOME = homes[2], DROVER_STORE = "" }, "lines")
    H.wait_until(function() return #store:task_runs(id) >= 20 end, 120, "20 task runs recorded")
    local pgdir = assert(os.getenv("DROVER_PG_DIR"), "DROVER_PG_DIR: the postgres service's directory")
    local r = assert(drover.proc.run({ "bash", H.root .. "/tests/services/postgres.sh", "restart", pgdir }))
    assert.are.equal(0, r.code, r.stderr)
    H.wait_until(function() return #store:task_runs(id) >= 100 end, 120, "100 task runs recorded")
    -- every session of this database ended by an administrator
    local admin = assert(drover.pg.connect(os.getenv("DROVER_PG_URL")))
    assert(admin:value([[SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
        WHERE datname = current_database() AND pid <> pg_backend_pid()]]))
    admin:close()
    local done = H.wait_run_state(infos[2].url, id, "COMPLETED", 180)
    assert.are.equal(20100, done.result)
    local tasks = store:task_runs(id)
    local by_key = {}
    for _, t in ipairs(tasks) do
      assert.is_nil(by_key[t.call_key], "task " .. t.call_key .. " twice: " .. json.encode(t) .. " and " ..
        json.encode(by_key[t.call_key] or {}) .. "; worker log: " ..
        tostring(drover.fs.read(homes[2] .. "/runs/" .. id .. "/worker.log")))
      by_key[t.call_key] = t
    end
    local echoes = 0
    for _, t in ipairs(tasks) do
      assert.are.equal("COMPLETED", t.state)
      if t.name == "echo" then echoes = echoes + 1 end
    end
    assert.are.equal(200, echoes)
    local lines = {}
    for _, l in ipairs(store:logs(id, 0, 100000)) do
      local i = l.line:match("^line (%d+)$")
      if i then lines[i] = (lines[i] or 0) + 1 end
    end
    for i = 1, 200 do assert.are.equal(1, lines[tostring(i)], "line " .. i .. " once") end
    store:close()
  end)

  it("with one server SIGKILLed, the other serves and ends nothing twice", function()
    servers[1]:kill("KILL")
    servers[1]:wait(30)
    local store = assert(require("drover.store").open(homes[2]))
    local before = #store:flow_runs { limit = 10000 }
    local id = H.run({ DROVER_HOME = homes[2], DROVER_STORE = "" }, "ok")
    H.wait_run_state(infos[2].url, id, "COMPLETED", 120)
    assert.are.equal(before + 1, #store:flow_runs { limit = 10000 })
    for _, r in ipairs(store:flow_runs { limit = 10000 }) do
      local ends = 0
      for _, s in ipairs(store:flow_run_states(r.id)) do
        if require("drover.states").is_final(s.state) then ends = ends + 1 end
      end
      assert.is_true(ends <= 1, "run " .. r.id .. " ended " .. ends .. " times")
    end
    assert.are.equal("ok", store:integrity())
    store:close()
  end)
end)
