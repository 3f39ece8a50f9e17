--- Shared helpers for the busted specs.
local H = {}

H.root = os.getenv("DROVER_ROOT") or "."
H.build = H.root .. "/" .. (os.getenv("DROVER_BUILD") or "build")
H.drover_bin = H.build .. "/drover"
-- The Lua interpreter for child Lua processes: stock lua5.4, or in the
-- sanitizer run the interpreter built with the sanitizer runtime.
H.lua = os.getenv("DROVER_LUA") or "lua5.4"

--- Poll cond() until it returns a truthy value or `timeout` seconds pass.
-- Generous deadlines, never fixed sleeps: the suite must hold on a loaded
-- 2-core machine.
function H.wait_until(cond, timeout, what)
  local drover = require "drover"
  local deadline = drover.now() + (timeout or 30)
  while true do
    local v = cond()
    if v then return v end
    if drover.now() > deadline then
      error("timed out waiting for " .. (what or "condition"), 2)
    end
    drover.sleep(0.02)
  end
end

--- Run the drover binary with argv (a table); returns code, stdout, stderr.
function H.drover(args, opts)
  local drover = require "drover"
  local argv = { H.drover_bin }
  for _, a in ipairs(args) do argv[#argv + 1] = a end
  local r = assert(drover.proc.run(argv, opts or {}))
  return r.code, r.stdout, r.stderr
end

--- Pids of the processes whose command line contains `s` (read from /proc,
-- so no pgrep or shell shows up in its own results).
function H.pids_matching(s)
  local drover = require "drover"
  local pids = {}
  for _, pid in ipairs(drover.fs.list("/proc") or {}) do
    if pid:match("^%d+$") then
      local cmd = drover.fs.read("/proc/" .. pid .. "/cmdline")
      if cmd and cmd:gsub("%z", " "):find(s, 1, true) then pids[#pids + 1] = math.tointeger(tonumber(pid)) end
    end
  end
  return pids
end

--- The daemon.json a `drover serve` on store `home` wrote, or nil.
function H.daemon_info(home)
  local drover = require "drover"
  local text = drover.fs.read(home .. "/daemon.json")
  return text and drover.json.decode(text)
end

--- Stop the daemon serving store `home`, if one runs (`drover run` starts
-- one for the dashboard URL); waits until it has exited.
function H.stop_daemon(home)
  local drover = require "drover"
  local d = home and H.daemon_info(home)
  if type(d) == "table" and math.type(d.pid) == "integer" and drover.kill(d.pid, "TERM") then
    H.wait_until(function() return not drover.kill(d.pid, 0) end, 30, "the daemon to stop")
  end
end

--- Start `drover serve ARGS` (default `--port 0`) on store `home`, with
-- env (default { DROVER_HOME = home }); wait until it wrote daemon.json.
-- Returns the process and the daemon info; the caller stops the process.
function H.serve(home, args, env)
  local drover = require "drover"
  local argv = { H.drover_bin, "serve" }
  for _, a in ipairs(args or { "--port", "0" }) do argv[#argv + 1] = a end
  local p = assert(drover.proc.spawn(argv, { env = env or { DROVER_HOME = home },
    stdout = home .. "/serve.out", stderr = home .. "/serve.err" }))
  local info = H.wait_until(function()
    local d = H.daemon_info(home)
    return d and d.pid == p.pid and d
  end, 60, "daemon.json of the new daemon")
  return p, info
end

--- `drover run NAME PARAMS...` with env; returns the run id and URL it printed.
function H.run(env, name, params)
  local args = { "run", name }
  for _, p in ipairs(params or {}) do args[#args + 1] = p end
  local code, out, err = H.drover(args, { env = env })
  assert(code == 0, "drover run " .. name .. " exited " .. tostring(code) .. ": " .. tostring(err))
  return out:match("^(%x+)%s+(%S+)")
end

--- Poll the daemon at base_url until run `id` is in state `want`; returns
-- the run record.
function H.wait_run_state(base_url, id, want, timeout)
  local http = require "drover.http"
  local last
  H.wait_until(function()
    last = assert(http.get(base_url .. "/api/runs/" .. id)).json
    return last.state == want
  end, timeout or 60, "run " .. id .. " to be " .. want)
  return last
end

--- Every Lua file of the library, as paths under lua/ ("drover/store/sqlite.lua"),
-- sorted: what an installation must carry (make install, the rockspec).
function H.lua_files()
  local fs = require("drover").fs
  local out = {}
  local function walk(rel)
    for _, name in ipairs(fs.list(H.root .. "/lua/" .. rel) or {}) do
      local path = rel .. "/" .. name
      if name:match("%.lua$") then
        out[#out + 1] = path
      elseif fs.stat(H.root .. "/lua/" .. path).type == "directory" then
        walk(path)
      end
    end
  end
  walk("drover")
  table.sort(out)
  return out
end

--- A new, empty PostgreSQL database on the suite's server
-- (tests/services/postgres.sh: DROVER_PG_URL, whose role may create
-- databases); returns its URL.  Raises when the service is not there.
local pg_databases = 0
function H.pg_database()
  local url = os.getenv("DROVER_PG_URL")
  assert(url, "DROVER_PG_URL is not set: tests/run.sh starts tests/services/postgres.sh")
  local c = assert(require("drover").pg.connect(url))
  pg_databases = pg_databases + 1
  local name = string.format("drover_t%d_%d_%d", require("drover").pid(), pg_databases, math.random(1e9))
  assert(c:exec("CREATE DATABASE " .. name))
  c:close()
  return (url:gsub("/[^/?]*$", "/" .. name))
end

--- Everything store `home` holds, as text to search for what must not be
-- there (a secret): the SQLite file and its WAL as bytes, or every row of a
-- PostgreSQL store as JSON.
function H.store_text(home)
  local store_mod = require "drover.store"
  local store = assert(store_mod.open(home))
  local parts = {}
  if store.path then
    parts[1] = require("drover").fs.read(store.path) or ""
    parts[2] = require("drover").fs.read(store.path .. "-wal") or ""
  else
    local json = require "drover.json"
    for _, t in ipairs(store_mod.TABLES) do
      for _, r in ipairs(store:rows("SELECT * FROM " .. t[1])) do parts[#parts + 1] = json.encode(r, { bytes = true }) end
    end
  end
  store:close()
  return table.concat(parts, "\n")
end

--- A fresh temporary directory, removed by the caller.  Under
-- DROVER_TEST_STORE=postgresql (tests/run.sh runs some specs again so)
-- each one is a drover home whose store is a new PostgreSQL database
-- (its store.conf names it), so the spec runs on PostgreSQL unchanged.
function H.tempdir()
  local p = io.popen("mktemp -d /tmp/drover-spec.XXXXXX")
  local d = p:read("l")
  p:close()
  if os.getenv("DROVER_TEST_STORE") == "postgresql" then
    local f = assert(io.open(d .. "/store.conf", "w"))
    f:write(H.pg_database(), "\n")
    f:close()
  end
  return d
end

--- Remove the work directories (/tmp/drover-worker-RUNID + 6 random
-- characters, worker.lua) of store `home`'s runs: a worker a test killed
-- with SIGKILL never removes its own.  Call it before removing `home`.
function H.remove_worker_dirs(home)
  local drover = require "drover"
  local store = require("drover.store").open(home)
  if not store then return end
  local ids = {}
  for _, r in ipairs(store:flow_runs { limit = 100000 }) do ids[r.id] = true end
  store:close()
  for _, name in ipairs(drover.fs.list("/tmp") or {}) do
    local id = name:match("^drover%-worker%-(%x+)%w%w%w%w%w%w$")
    if id and ids[id] then drover.fs.remove("/tmp/" .. name, { recursive = true }) end
  end
end

return H
