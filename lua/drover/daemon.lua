--- The drover daemon (`drover serve`): one HTTP server on the engine's loop
-- that shows the tracking store to people (a dashboard) and programs (a
-- JSON API, server-sent events, Prometheus metrics), reaps local runs
-- whose worker died, and starts the runs of scheduled deployments.
--
-- The store is SQLite shared with the worker processes, so the daemon is a
-- reader like any other: it holds no state of its own, can be killed and
-- restarted at any time, and learns about changes by polling (the honest
-- mechanism when the writers are other processes).  The one thing it keeps
-- is, per scheduled deployment, the last fire time it handled (table
-- daemon_schedule in the store), so a restarted daemon neither fires a time
-- twice nor replays the fire times it missed while it was down.
--
--   GET  /api/runs?state=&deployment=&limit=&cursor=   runs, newest first;
--        the header x-next-cursor (absent on the last page) is the cursor
--        of the next page (keyset: runs created meanwhile shift nothing)
--   GET  /api/runs/ID                          the run, states, summary (task runs by name:
--                                              counts per state, first start, last end);
--                                              task_runs too when at most RUN_TASK_RUNS
--   GET  /api/runs/ID/task_runs?state=&name=&limit=&cursor=
--                                              a page of task runs: {task_runs, next_cursor}
--   GET  /api/runs/ID/logs?after=N             log lines with id > N
--   POST /api/runs/ID/cancel                   two-phase cancel, through the run's backend
--                                              (the full run id: no prefix)
--   GET  /api/deployments, /api/deployments/NAME (with recent runs)
--   GET  /api/events?run=ID&after=N            text/event-stream: `run`
--        events on state changes, `log` events for new lines of run ID
--   GET  /metrics                              Prometheus text format
--   GET  /, /runs/ID, /deployments/NAME         the dashboard (index.html)
--
-- Security: loopback (127.0.0.1, ::1, localhost) by default.  Any other
-- address requires a token, and then every request must carry it
-- (Authorization: Bearer T, ?token=T, or the cookie a ?token= request
-- sets so the browser can load the page's assets).  The token is never
-- logged nor written to daemon.json.
local drover = require "drover"
local cron = require "drover.cron"
local fs = require "drover.fs"
local json = require "drover.json"
local orchestrator = require "drover.orchestrator"
local request_guard = require "drover.request_guard"
local server = require "drover.server"
local states = require "drover.states"
local store_mod = require "drover.store"
local client_api = require "drover.client_api"
local daemon_events = require "drover.daemon_events"
local worker_api = require "drover.worker_api"

local M = {}

M.DEFAULT_PORT = 8765
M.POLL_INTERVAL = 0.5
M.REAP_INTERVAL = 2
M.REMOTE_CHECK_INTERVAL = 5
M.SCHEDULE_INTERVAL = 1
--- Seconds between a worker's heartbeats (told to workers when they
-- fetch their run); a run silent for HEARTBEAT_MISSES of them is asked
-- about, then ended CRASHED.
M.HEARTBEAT = 10
M.HEARTBEAT_MISSES = 3
--- Largest request body, in bytes, on the endpoints that take large ones
-- (LARGE_BODY: a package bundle, a worker's batches and task results).
M.MAX_BODY = 16 * 1024 * 1024
--- Largest request body anywhere else.  Both are enforced from the
-- request's head, with who is asking, before a byte of the body is read
-- (Daemon:check_head).
M.MAX_REQUEST_BODY = 1024 * 1024
--- Connections served at once; one more gets a 503.
M.MAX_CONNECTIONS = 256
--- A fire time later than this (seconds) is skipped, not caught up: after
-- downtime a deployment resumes with its next fire time, not a backlog.
M.MISFIRE_GRACE = 10
--- A run with at most this many task runs gets them in /api/runs/ID; a
-- bigger one gets its summary only (page through /api/runs/ID/task_runs).
M.RUN_TASK_RUNS = 200
--- Groups (task names) in a run's summary, at most.
M.SUMMARY_GROUPS = 500
--- Rows of a task-run page by default, and at most.
M.TASK_RUN_PAGE = 100
M.MAX_TASK_RUN_PAGE = 1000

local LOOPBACK = request_guard.LOOPBACK_BINDS
local ACTIVE = states.active_list
local ALL_STATES = states.all

--- The dashboard's static files live next to this module.
M.dashboard_dir = (debug.getinfo(1, "S").source:match("^@(.*)/daemon%.lua$") or ".") .. "/dashboard"

function M.daemon_file(home) return home .. "/daemon.json" end

--- The daemon.json of a live daemon in `home`, or nil.
function M.running(home)
  local text = fs.read(M.daemon_file(home))
  local info = text and json.decode(text)
  if type(info) ~= "table" or math.type(info.pid) ~= "integer" or info.pid <= 0 then return nil end
  if not drover.kill(info.pid, 0) then return nil end
  return info
end

-- ---- helpers -------------------------------------------------------------------------

local function err(status, message) return server.json(status, { error = message }) end

local LARGE_BODY = { "^/api/v1/packages$", "^/api/v1/runs/%x+/events$", "^/api/v1/runs/%x+/calls$",
  "^/api/v1/runs/%x+/calls/%x+/result$" }

local BYTES = { bytes = true } -- JSON encoding: bytes that are not UTF-8 as {"$bytes": BASE64}

-- Store rows hold JSON text in some columns: the API gives values.
local function decode_fields(row, fields)
  for _, f in ipairs(fields) do
    if type(row[f]) == "string" then
      local v = json.decode(row[f])
      if v ~= nil then row[f] = v end
    end
  end
  return row
end

local function run_view(r)
  r = decode_fields(r, { "params", "result", "source" })
  if r.started then r.duration = (r.ended or store_mod.time()) - r.started end
  return r
end

local function task_view(t)
  t = decode_fields(t, { "params", "result", "tags" })
  t.result_ok = t.result_ok == 1
  if t.started then t.duration = (t.ended or store_mod.time()) - t.started end
  return t
end

local function list(rows, fn)
  local out = json.array()
  for i, r in ipairs(rows) do out[i] = fn and fn(r) or r end
  return out
end

--- A 400 for query argument `name` whose value `v` is not `want`.  A
-- repeated argument (server.decode_args makes it a list) or one without
-- a value (true) is said so, not shown as a Lua value.
local function bad_arg(name, v, want)
  if type(v) == "table" then
    return err(400, "query argument '" .. name .. "' given " .. #v .. " times: give it once")
  elseif type(v) ~= "string" then
    return err(400, "query argument '" .. name .. "' has no value (" .. want .. " expected)")
  end
  return err(400, "bad " .. name .. " '" .. v .. "' (" .. want .. " expected)")
end

local function positive_int(v, default, max)
  if v == nil then return default end
  local n = math.tointeger(tonumber(v))
  if not n or n < 0 then return nil end
  if max and n > max then n = max end
  return n
end

-- ---- the daemon ----------------------------------------------------------------------------

local Daemon = {}
Daemon.__index = Daemon

--- opts: port (default 8765, 0 = any free one), bind (default 127.0.0.1),
-- token, home, auto (started by `drover run`: yield to another live daemon),
-- public_url (the URL others reach this server by: its host is accepted
-- in Host headers), heartbeat (seconds), max_body (bytes, LARGE_BODY
-- endpoints), max_request_body (bytes, the others), max_connections, tls
-- ({cert = PEM file, key = PEM file}: serve HTTPS), retention (seconds:
-- ended runs older than this are pruned hourly).
-- Returns a daemon or nil, message.
function M.new(opts)
  opts = opts or {}
  local bind = opts.bind or "127.0.0.1"
  local token = opts.token
  if token == "" then token = nil end
  if not LOOPBACK[bind] and not token then
    return nil, "drover serve: binding " .. bind .. " (not loopback) requires a token (--token or DROVER_TOKEN)"
  end
  local store, serr = store_mod.open(opts.home, { store = opts.store })
  if not store then return nil, serr end
  local self = setmetatable({ bind = bind, token = token, store = store, home = store.home,
    port = opts.port or M.DEFAULT_PORT, auto = opts.auto, stopping = false,
    stop_event = drover.event(), tasks = {}, check_errors = {},
    heartbeat = opts.heartbeat or M.HEARTBEAT, max_body = opts.max_body or M.MAX_BODY, tls = opts.tls,
    max_request_body = math.min(opts.max_request_body or M.MAX_REQUEST_BODY, opts.max_body or M.MAX_BODY),
    max_connections = opts.max_connections or M.MAX_CONNECTIONS,
    public_url = opts.public_url and opts.public_url:gsub("/+$", "") or nil,
    retention = opts.retention,
    guard = request_guard.new { bind = bind, public_url = opts.public_url, token = token } }, Daemon)
  self.orch = drover.orchestrator("local", { home = store.home })
  self.feed = daemon_events.new(store, { interval = M.POLL_INTERVAL, run_view = run_view })
  return self
end

function Daemon:start()
  -- the head check's token lookup (Store:token_reader: it runs outside
  -- any task, and must not block the loop on a task's transaction)
  local reader, herr = self.store:token_reader()
  if not reader then return nil, herr end
  self.head_reader = reader
  local srv, lerr = server.listen {
    host = self.bind, port = self.port, max_body = self.max_body, tls = self.tls,
    max_connections = self.max_connections,
    check_head = function(head) return self:check_head(head) end,
    handler = function(req, res) return self:handle(req, res) end,
    fast = function(req) return self:runs_fast(req) end,
    on_error = function(e) io.stderr:write("drover serve: handler error: ", tostring(e):match("[^\n]*"), "\n") end,
  }
  if not srv then reader.close(); self.head_reader = nil; return nil, lerr end
  self.srv = srv
  -- the URL handed out (run pages, workers): --public-url when given;
  -- otherwise this host, by loopback when bound to every address
  local wildcard = { ["0.0.0.0"] = "127.0.0.1", ["::"] = "[::1]", ["::1"] = "[::1]", localhost = "127.0.0.1" }
  local host = wildcard[self.bind] or self.bind
  self.url = self.public_url or ((self.tls and "https://" or "http://") .. host .. ":" .. srv.port)
  -- ca_file: what a worker started on this host verifies the server with.
  -- The server's own certificate does (curl trusts a certificate listed in
  -- its CA file even when it is not a root), so a self-signed one works.
  local ca_file = self.tls and self.tls.cert
  if ca_file and ca_file:sub(1, 1) ~= "/" then ca_file = drover.cwd() .. "/" .. ca_file end
  local ok, werr = fs.write(M.daemon_file(self.home),
    json.encode { pid = drover.pid(), port = srv.port, url = self.url, bind = self.bind, ca_file = ca_file })
  if not ok then srv:close(); return nil, werr end
  self.started = store_mod.time()
  self.tasks[#self.tasks + 1] = drover.spawn(function() self:reaper() end)
  self.tasks[#self.tasks + 1] = drover.spawn(function() self:remote_checker() end)
  self.tasks[#self.tasks + 1] = drover.spawn(function() self:scheduler() end)
  if self.auto then self:watch_idle() end
  if self.retention then -- ended runs older than this many seconds go, hourly, in small batches
    self.tasks[#self.tasks + 1] = drover.spawn(function() require("drover.retention").run(self.store, self.retention) end)
  end
  return self
end

--- Block until stop() (or SIGTERM/SIGINT when installed by serve()).
function Daemon:wait() self.stop_event:wait() end

function Daemon:stop()
  if self.stopping then return end
  self.stopping = true
  self.feed:close()
  if self.srv then self.srv:close() end
  for _, t in ipairs(self.tasks) do
    local s = t:status()
    if s ~= "done" and s ~= "failed" and s ~= "cancelled" then t:cancel() end
  end
  -- Remove daemon.json only if it is still ours (a newer daemon may own it).
  local text = fs.read(M.daemon_file(self.home))
  local info = text and json.decode(text)
  if type(info) == "table" and info.pid == drover.pid() then fs.remove(M.daemon_file(self.home)) end
  self.stop_event:set()
end

-- Every REAP_INTERVAL seconds, local runs in an active state whose worker
-- (or `drover exec` process: its pid and start time, so a reused pid does
-- not count) is gone become CRASHED with their task runs (Local:reap: a
-- kill(pid, 0) or a read of /proc/PID/stat each, cheap).  A
-- daemon started automatically by `drover run` also steps aside when
-- another live daemon owns daemon.json (two runs started at once may each
-- have started one).
function Daemon:reaper()
  while not self.stopping do
    drover.sleep(M.REAP_INTERVAL)
    for _, st in ipairs(ACTIVE) do
      for _, r in ipairs(self.store:flow_runs { state = st, backend = "local", limit = 10000 }) do
        self:note_check(r.id, pcall(self.orch.reap, self.orch, r))
      end
    end
    self:reap_silent()
    -- PostgreSQL's run counters arrive as deltas: fold them (/metrics)
    local ok, e = pcall(self.store.compact_counts, self.store)
    if not ok then io.stderr:write("drover serve: compacting the run counters: ", tostring(e), "\n") end
    if self.auto then
      local info = M.running(self.home)
      if info and info.pid ~= drover.pid() then
        drover.spawn(function() self:stop() end)
        return
      end
    end
  end
end

--- Runs whose worker reports over HTTP and has sent nothing for
-- HEARTBEAT_MISSES heartbeat intervals (counted from this daemon's start
-- at the earliest: a restarted server gives its workers time to find it
-- again) are asked about through their backend's liveness hook; unless it
-- says the work is still going, they end CRASHED.
function Daemon:reap_silent()
  local limit = self.heartbeat * M.HEARTBEAT_MISSES
  local before = store_mod.time() - limit
  if self.started > before then return end
  for _, r in ipairs(self.store:silent_runs(before)) do
    local ok, alive = pcall(function()
      local o = r.backend == "local" and self.orch or orchestrator.for_run(self.store, r)
      return o:is_alive(r)
    end)
    if ok and alive == true then
      self.store:update_flow_run(r.id, { heartbeat = store_mod.time() - limit / 2 })
    else
      self.store:end_flow_run(r.id, states.CRASHED, string.format(
        "no heartbeat from its worker for %.0f s (%d intervals of %g s)%s", store_mod.time() - r.heartbeat,
        M.HEARTBEAT_MISSES, self.heartbeat, ok and "" or ("; its backend could not be asked: " .. tostring(alive))))
    end
  end
end

--- A check of run `id` that failed is reported once per distinct message
-- (a backend that stays down would otherwise fill the log every sweep).
function Daemon:note_check(id, ok, why)
  local msg = not ok and tostring(why) or nil
  if msg and self.check_errors[id] ~= msg then
    io.stderr:write("drover serve: checking run ", id, ": ", msg, "\n")
  end
  self.check_errors[id] = msg
end

-- Every REMOTE_CHECK_INTERVAL seconds, the active runs of every other
-- backend (slurm, docker, ...) go through their backend's status, which
-- reconciles the store with the cluster or engine: a job Slurm ended or a
-- container killed from outside while no worker could record it.  This is
-- its own task so that a slow or hung backend never delays the local
-- reaper; each (deployment, backend) gets one orchestrator per sweep,
-- configured as deployed, and after its first failure the rest of its runs
-- wait for the next sweep instead of each timing out in turn.
function Daemon:remote_checker()
  while not self.stopping do
    drover.sleep(M.REMOTE_CHECK_INTERVAL)
    local backends, down = {}, {}
    for _, st in ipairs(ACTIVE) do
      for _, r in ipairs(self.store:flow_runs { state = st, limit = 10000 }) do
        local key = (r.deployment or "") .. "\0" .. r.backend
        if r.backend ~= "local" and not down[key] and not self.stopping then
          local ok, why = pcall(function()
            backends[key] = backends[key] or orchestrator.for_run(self.store, r)
            return backends[key]:status(r.id)
          end)
          if not ok then down[key] = true end
          self:note_check(r.id, ok, why)
        end
      end
    end
  end
end

-- ---- the scheduler ---------------------------------------------------------------------

local function log(...)
  io.stderr:write(os.date("!%Y-%m-%dT%H:%M:%SZ "), "drover serve: ", ...)
  io.stderr:write("\n")
  io.stderr:flush()
end

local function stamp(t) return os.date("%Y-%m-%d %H:%M:%S %z", math.floor(t)) end

-- Right after start, then every SCHEDULE_INTERVAL seconds.
function Daemon:scheduler()
  while not self.stopping do
    local ok, e = pcall(self.schedule_tick, self, store_mod.time())
    if not ok then log("scheduler: ", tostring(e)) end
    drover.sleep(M.SCHEDULE_INTERVAL)
  end
end

function Daemon:schedule_tick(now)
  local ds = self.store:scheduled_deployments()
  for _, d in ipairs(ds) do
    if self.stopping then return end
    local ok, e = pcall(self.schedule_one, self, d, now)
    if not ok then log("schedule of '", d.name, "': ", tostring(e)) end
  end
end

--- Fire every time of `d`'s schedule in (last handled, now].  Each fire
-- time is claimed with a compare-and-set on last_fire before its run
-- starts, so two daemons on one store (or a restarted one) never both
-- start it: a fire is at most once.  `st` is the deployment's
-- daemon_schedule row when the caller has read it already (tests pass an
-- outdated one to stand for a daemon that read it just before another
-- claimed the fire time).
function Daemon:schedule_one(d, now, st)
  self.bad_schedules = self.bad_schedules or {}
  local sch, perr = cron.parse(d.schedule)
  if not sch then
    if self.bad_schedules[d.name] ~= d.schedule then
      self.bad_schedules[d.name] = d.schedule
      log("schedule of '", d.name, "' ignored: ", perr)
    end
    return
  end
  local store = self.store
  st = st or store:fire_state(d.name)
  if not st or st.schedule ~= d.schedule or st.dep_updated ~= d.updated then
    -- first sight (or redeployed, resumed): fire times from now on
    store:rebase_fires(d.name, d.schedule, d.updated, math.floor(now))
    return
  end
  local last = st.last_fire
  local first = sch:next(last)
  if first and first < now - M.MISFIRE_GRACE then
    local skip_to = math.floor(now - M.MISFIRE_GRACE)
    if not store:claim_fire(d.name, last, skip_to) then return end
    log("schedule of '", d.name, "': skipped the fire times from ", stamp(first), " to ", stamp(skip_to),
      " (more than ", M.MISFIRE_GRACE, "s late)")
    last = skip_to
  end
  for _ = 1, 1000 do
    local t = sch:next(last)
    if not t or t > now or self.stopping then return end
    if not store:claim_fire(d.name, last, t) then return end -- another daemon took it
    last = t
    self:fire(d, t)
  end
end

--- Start the run for fire time `t`, as `drover run` would.
function Daemon:fire(d, t)
  if d.max_active then
    local active = #self.store:flow_runs { deployment = d.name, active = true, limit = 100000 }
    if active >= d.max_active then
      log("schedule of '", d.name, "': skipped the fire at ", stamp(t), ": ", active,
        " active run(s), max_active ", d.max_active)
      return
    end
  end
  -- the deployment's own backend, configured as deployed (a docker
  -- deployment's scheduled runs are containers, not local workers)
  local ok, id = pcall(function()
    local o = d.backend == "local" and self.orch or orchestrator.for_deployment(d, nil, self.store.home)
    return o:run(d.name, nil, { source = { kind = "schedule", schedule = d.schedule, fire_time = t } })
  end)
  if ok then
    log("schedule of '", d.name, "': fire at ", stamp(t), " started run ", id)
  else
    log("schedule of '", d.name, "': fire at ", stamp(t), " did not start a run: ", tostring(id))
  end
end

--- A deployment for the API: values for JSON columns, and for a schedule
-- its last handled and next fire times (seconds since the epoch).
function Daemon:deployment_view(d, fires)
  d = decode_fields(d, { "params", "config" })
  if d.schedule and d.schedule ~= "" then
    local sch, perr = cron.parse(d.schedule)
    local st = fires[d.name]
    if st and st.schedule == d.schedule then d.last_fire = st.last_fire end
    if not sch then
      d.schedule_error = perr
    elseif d.paused ~= 1 then
      d.next_fire = sch:next(math.max(store_mod.time(), d.last_fire or 0))
    end
  end
  return d
end

function Daemon:fire_times()
  local ok, fires = pcall(self.store.fire_state, self.store)
  return ok and fires or {}
end

-- ---- routes --------------------------------------------------------------------------------

--- The largest body `path` takes.
function Daemon:body_limit(path)
  for _, p in ipairs(LARGE_BODY) do
    if path:match(p) then return self.max_body end
  end
  return self.max_request_body
end

--- A request with a body, from its head, before the body is read (H2O
-- would buffer all of it before handle() runs): the request checks as
-- handle() does them, and the body's size against the endpoint's limit.
-- So a client without a token, or on a page of another site, never gets
-- a byte of its body into memory.  handle() checks the request again.
function Daemon:check_head(head)
  head.body = "(unread)" -- the guard checks a body's content type
  local who, refusal = request_guard.check(self.guard, head, function(d)
    return self.head_reader.lookup(d)
  end)
  local function answer(status, message, headers)
    local h = headers or {}
    h["content-type"] = "application/json"
    return status, h, json.encode { error = message }
  end
  if not who then return answer(refusal.status, refusal.message, refusal.headers) end
  local limit = self:body_limit(head.path)
  -- a run token the head could not check (on PostgreSQL: Store:token_reader)
  -- gets no more buffered than a worker's request may hold
  if not who.admin and not who.run_id then limit = math.min(limit, self.max_request_body) end
  local len = head.headers["content-length"]
  local n = len and math.tointeger(tonumber(len))
  if len and not n then return answer(400, "bad Content-Length '" .. len .. "'") end
  if n and n > limit then
    return answer(413, string.format("request body of %d bytes is larger than %s takes (%d bytes)", n,
      head.path, limit))
  end
  if not n and limit < self.max_body then
    return answer(411, "a request body needs a Content-Length here")
  end
end

function Daemon:handle(req, res)
  local who, refusal = request_guard.check(self.guard, req, function(d) return self.store:run_by_token(d) end)
  if not who then
    local h = refusal.headers or {}
    h["content-type"] = "application/json"
    return refusal.status, h, json.encode({ error = refusal.message }, BYTES) -- a refused Host may be any bytes
  end
  if req.path:sub(1, 8) == "/api/v1/" then
    local st, h, body = worker_api.route(self, req, who)
    if st then return st, h, body end
    if not who.run_id then
      st, h, body = client_api.route(self, req, who)
      if st then return st, h, body end
    end
  end
  if who.run_id then return err(403, "forbidden: a run's token may use its run's worker endpoints only") end
  local st, h, body = self:route(req, res)
  if who.via_query and type(h) == "table" then
    -- let the browser load the page's assets and call the API without ?token=
    h["set-cookie"] = "drover_token=" .. self.token .. "; Path=/; HttpOnly; SameSite=Strict"
  end
  return st, h, body
end

local static_types = {
  ["app.js"] = "text/javascript; charset=utf-8",
  ["style.css"] = "text/css; charset=utf-8",
  ["index.html"] = "text/html; charset=utf-8",
}

function Daemon:static(name)
  local body = fs.read(M.dashboard_dir .. "/" .. name)
  if not body then return err(404, "dashboard file missing: " .. name) end
  return 200, { ["content-type"] = static_types[name], ["cache-control"] = "no-cache" }, body
end

function Daemon:route(req, res)
  local path, method = req.path, req.method
  if path:sub(1, 5) == "/api/" then
    local id, rest = path:match("^/api/runs/([^/]+)(.*)$")
    if path == "/api/runs" then return self:get_runs(req, method)
    elseif id and rest == "" then return self:get_run(id, method)
    elseif id and rest == "/task_runs" then return self:get_task_runs(id, req, method)
    elseif id and rest == "/logs" then return self:get_logs(id, req, method)
    elseif id and rest == "/cancel" then return self:cancel(id, method)
    elseif path == "/api/deployments" then return self:get_deployments(method)
    elseif path:match("^/api/deployments/[^/]+$") then
      return self:get_deployment(path:match("^/api/deployments/([^/]+)$"), method)
    elseif path == "/api/events" then return self:events(req, res, method)
    end
    return err(404, "no such endpoint: " .. method .. " " .. path)
  end
  if path == "/metrics" then return self:metrics(method) end
  if method ~= "GET" and method ~= "HEAD" then return err(405, "method not allowed") end
  local asset = path:match("^/([%w_]+%.%a+)$")
  if asset and static_types[asset] then return self:static(asset) end
  if path == "/" or path:match("^/runs/[^/]+/?$") or path:match("^/deployments/[^/]+/?$") then
    return self:static("index.html")
  end
  return 404, { ["content-type"] = "text/plain; charset=utf-8" }, "not found\n"
end

--- The run list's cursor: opaque to clients (hex of "created,id" of a
-- page's last row); nil for one that is not ours.
local function encode_run_cursor(r)
  return (string.format("%.17g,%s", r.created, r.id):gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

local function decode_run_cursor(s)
  if type(s) ~= "string" or #s % 2 ~= 0 or s:find("[^%x]") then return nil end
  local text = s:gsub("%x%x", function(h) return string.char(tonumber(h, 16)) end)
  local created, id = text:match("^([^,]+),(.+)$")
  created = tonumber(created)
  if not created then return nil end
  return { created = created, id = id }
end

-- /api/runs answers from a cache of encoded pages, one per (filter, limit,
-- cursor), valid while the store's change mark stays the same
-- (Store:change_mark: this connection's own writes by total_changes(),
-- other processes' commits by data_version), so a hot list is a memory
-- copy.  A page that holds a run still going (started, not ended) carries
-- a duration computed at encoding, so it is kept at most
-- RUNS_CACHE_ACTIVE_AGE seconds.  The whole cache goes when the mark
-- changes, or when it holds RUNS_CACHE_MAX pages (cursors are the client's
-- to choose).  A page read inside a transaction of this connection (which
-- may still roll back) is not kept.
local RUNS_CACHE_MAX = 64
local RUNS_CACHE_ACTIVE_AGE = 1

function Daemon:get_runs(req, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  -- a hit is found by the query as sent: a page is cached only once its
  -- query has passed the checks below
  local key = req.query
  -- req.time: a mark that saw every commit made before the request was
  -- sent will do (the store may then skip looking again)
  local changes, version = self.store:change_mark(req.time)
  local cache = self.runs_cache
  if not cache or cache.changes ~= changes or cache.version ~= version or cache.n >= RUNS_CACHE_MAX then
    cache = { changes = changes, version = version, n = 0, pages = {} }
    self.runs_cache = cache
  end
  local page = cache.pages[key]
  if not page or (page.expires and page.expires < drover.now()) then
    local status, headers, body
    page, status, headers, body = self:runs_page(req.args)
    if not page then return status, headers, body end
    if not self.store:in_transaction() then
      if not cache.pages[key] then cache.n = cache.n + 1 end
      cache.pages[key] = page
    end
  end
  -- fresh headers each time: handle() may add a cookie to them
  return 200, { ["content-type"] = "application/json", ["x-next-cursor"] = page.next }, page.body
end

-- runs_fast's guard finds no run by its token: a run's token goes on to
-- the handler (and its 403)
local function no_run() return nil end

--- A cached /api/runs page for `req` without a task (server.listen's
-- fast: it may not wait), or nothing: the handler then does the work.
-- Only what the handler would answer the same: an admin's GET (the
-- guard, with no run-token lookup), no cookie to set, a page valid for
-- a mark read after req.time.  This is every hit of a busy list, so it
-- makes no table or closure of its own (the page keeps its answer's
-- headers), and reads the mark once for the requests that came in before
-- the last read: server.listen hands fast a pass of the loop's requests
-- together, so under load that is once a pass, not once a request.  The
-- mark read at fast_mark_time has every change made before then (asked
-- for as of then, not as of req.time, which an older read may satisfy),
-- and every change made before a request was sent was made before its
-- req.time; one made since is no older than the request, which may be
-- answered either way.
function Daemon:runs_fast(req)
  if req.path ~= "/api/runs" or req.method ~= "GET" then return end
  local cache = self.runs_cache
  if not cache then return end
  local page = cache.pages[req.query]
  if not page then return end
  local who = request_guard.check(self.guard, req, no_run)
  if not who or not who.admin or who.via_query then return end
  if not self.fast_mark_time or self.fast_mark_time <= req.time then
    local now = drover.now()
    local changes, version = self.store:change_mark(now, true)
    if changes == nil then self.fast_mark_time = nil; return end
    self.fast_mark_time, self.fast_changes, self.fast_version = now, changes, version
  end
  if cache.changes ~= self.fast_changes or cache.version ~= self.fast_version then return end
  if page.expires and page.expires < drover.now() then return end
  return 200, page.headers, page.body
end

--- A page of /api/runs for query arguments `a`: { body (server.body), next (cursor or
-- nil), headers (runs_fast's answer's: not to be changed), expires
-- (drover.now() time, or nil: until the store changes) }, or nil and the
-- error response.
function Daemon:runs_page(a)
  if a.state ~= nil and type(a.state) ~= "string" then return nil, bad_arg("state", a.state, "a state") end
  local state = a.state ~= "" and a.state and a.state:upper() or nil
  if state and not states[state] then return nil, err(400, "unknown state '" .. a.state .. "'") end
  local limit = positive_int(a.limit, 100, 10000)
  if not limit then return nil, bad_arg("limit", a.limit, "a non-negative integer") end
  if a.deployment ~= nil and type(a.deployment) ~= "string" then
    return nil, bad_arg("deployment", a.deployment, "a deployment name")
  end
  local dep = a.deployment ~= "" and a.deployment or nil
  local after
  if a.cursor ~= nil and a.cursor ~= "" then
    after = decode_run_cursor(a.cursor)
    if not after then return nil, bad_arg("cursor", a.cursor, "the x-next-cursor of an earlier page") end
  end
  local rows = self.store:flow_runs_page { state = state, deployment = dep, limit = limit + 1, after = after }
  local next_cursor
  if #rows > limit then
    rows[#rows] = nil
    if limit > 0 then next_cursor = encode_run_cursor(rows[#rows]) end
  end
  local going = false
  for _, r in ipairs(rows) do going = going or (r.started ~= nil and r.ended == nil) end
  local _, _, body = server.json(200, list(rows, run_view))
  -- a body object: every hit hands these bytes to the socket without a copy
  return { body = server.body(body), next = next_cursor,
    headers = { ["content-type"] = "application/json", ["x-next-cursor"] = next_cursor },
    expires = going and drover.now() + RUNS_CACHE_ACTIVE_AGE or nil }
end

function Daemon:find(id)
  if not id:match("^[%x]+$") then return nil end
  return self.store:find_flow_run(id)
end

--- A run's task runs grouped by name, for the API: objects where JSON
-- wants objects even when empty.
local function summary_view(s)
  s.counts = json.object(s.counts)
  for _, g in ipairs(s.groups) do g.counts = json.object(g.counts) end
  s.groups = json.array(s.groups)
  return s
end

--- The run, its state history and its task runs summarised by name
-- (`summary`); the task runs themselves only for a run with at most
-- RUN_TASK_RUNS of them (else task_runs_truncated = true: page them
-- through /api/runs/ID/task_runs), so a 20,000-task run answers in a few
-- kilobytes.
function Daemon:get_run(id, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local r = self:find(id)
  if not r then return err(404, "unknown run '" .. id .. "'") end
  local v = run_view(r)
  v.summary = summary_view(self.store:task_run_summary(r.id, M.SUMMARY_GROUPS))
  if v.summary.total <= M.RUN_TASK_RUNS then
    v.task_runs = list(self.store:task_runs(r.id), task_view)
  else
    v.task_runs_truncated = true
  end
  v.states = list(self.store:flow_run_states(r.id))
  return server.json(200, v)
end

-- A page cursor as the API gives it: "KEY,ID" (the last row's sort key
-- and id), opaque to clients.
local function encode_cursor(c) return c and string.format("%.17g,%s", c.key, c.id) or json.null end
local function decode_cursor(s)
  local key, tid = s:match("^([^,]+),(.+)$")
  key = tonumber(key)
  if not key or key ~= key then return nil end
  return { key = key, id = tid }
end

--- GET /api/runs/ID/task_runs?state=&name=&limit=&cursor=: one page of
-- the run's task runs, in start order: { task_runs, next_cursor } (null
-- on the last page).  A keyset page: each costs the same however deep.
function Daemon:get_task_runs(id, req, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local r = self:find(id)
  if not r then return err(404, "unknown run '" .. id .. "'") end
  local a = req.args
  for k in pairs(a) do
    if k ~= "state" and k ~= "name" and k ~= "limit" and k ~= "cursor" and k ~= "token" then
      return err(400, "unknown query argument '" .. tostring(k) .. "' (state, name, limit, cursor expected)")
    end
  end
  if a.state ~= nil and type(a.state) ~= "string" then return bad_arg("state", a.state, "a state") end
  local state = a.state ~= "" and a.state and a.state:upper() or nil
  if state and not states[state] then return err(400, "unknown state '" .. a.state .. "'") end
  if a.name ~= nil and type(a.name) ~= "string" then return bad_arg("name", a.name, "a task name") end
  local limit = positive_int(a.limit, M.TASK_RUN_PAGE, M.MAX_TASK_RUN_PAGE)
  if not limit or limit == 0 then return bad_arg("limit", a.limit, "a positive integer") end
  local after
  if a.cursor ~= nil and a.cursor ~= "" then
    after = type(a.cursor) == "string" and decode_cursor(a.cursor)
    if not after then return bad_arg("cursor", a.cursor, "a next_cursor from the page before") end
  end
  local rows, next_cursor = self.store:task_run_page(r.id, { state = state, name = a.name ~= "" and a.name or nil,
    limit = limit, after = after })
  return server.json(200, { task_runs = list(rows, task_view), next_cursor = encode_cursor(next_cursor) })
end

function Daemon:get_logs(id, req, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local r = self:find(id)
  if not r then return err(404, "unknown run '" .. id .. "'") end
  local after = positive_int(req.args.after, 0)
  if not after then return bad_arg("after", req.args.after, "a log id") end
  return server.json(200, list(self.store:logs(r.id, after, 10000)))
end

--- The Cancel button: the run's own backend cancels it (two-phase:
-- CANCELLING now, CANCELLED once its work has ended), in a task of its own
-- so the request returns at once with the run as it is then.
function Daemon:cancel(id, method)
  if method ~= "POST" then return err(405, "method not allowed: use POST") end
  -- state-changing: the full id, never a prefix (a prefix is a CLI
  -- convenience; here one hex digit would pick somebody's run)
  local r = id:match("^%x+$") and self.store:flow_run(id)
  if not r then return err(404, "unknown run '" .. id .. "' (a full run id is required)") end
  if not states.active[r.state] then
    return err(400, "run " .. r.id .. " is " .. r.state .. ": only active runs can be cancelled")
  end
  local ok, o = pcall(function()
    return r.backend == "local" and self.orch or orchestrator.for_run(self.store, r)
  end)
  if not ok then return err(502, "cannot reach backend '" .. r.backend .. "': " .. tostring(o)) end
  local store = self.store
  store:set_flow_state(r.id, states.CANCELLING, "cancel requested")
  r.state = states.CANCELLING
  local live = {}
  for _, t in ipairs(self.tasks) do
    local s = t:status()
    if s ~= "done" and s ~= "failed" and s ~= "cancelled" then live[#live + 1] = t end
  end
  self.tasks = live
  self.tasks[#self.tasks + 1] = drover.spawn(function()
    local cok, cerr = pcall(o.cancel, o, r.id)
    if not cok then log("cancel of run ", r.id, " on backend '", r.backend, "': ", tostring(cerr)) end
  end)
  return server.json(202, run_view(store:flow_run(r.id)))
end

function Daemon:get_deployments(method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local fires = self:fire_times()
  return server.json(200, list(self.store:deployments(), function(d) return self:deployment_view(d, fires) end))
end

function Daemon:get_deployment(name, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local d = self.store:deployment(name)
  if not d then return err(404, "unknown deployment '" .. name .. "'") end
  d = self:deployment_view(d, self:fire_times())
  d.runs = list(self.store:flow_runs { deployment = name, limit = 50 }, run_view)
  return server.json(200, d)
end

--- Prometheus text: runs and task runs by state, and the completed task
-- runs' durations, from the counts triggers keep (Store:run_counts): a
-- few rows, whatever the store's size.
function Daemon:metrics(method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local counts = { flow = {}, task = {} }
  local done = { timed = 0, seconds = 0 }
  for _, c in ipairs(self.store:run_counts()) do
    if counts[c.kind] then counts[c.kind][c.state] = c.n end
    if c.kind == "task" and c.state == "COMPLETED" then done = c end
  end
  local out = {}
  local function gauge(name, help, c)
    out[#out + 1] = "# HELP " .. name .. " " .. help
    out[#out + 1] = "# TYPE " .. name .. " gauge"
    for _, s in ipairs(ALL_STATES) do
      out[#out + 1] = string.format('%s{state="%s"} %d', name, s, c[s] or 0)
    end
  end
  gauge("drover_flow_runs", "Flow runs in the store, by state.", counts.flow)
  gauge("drover_task_runs", "Task runs in the store, by state.", counts.task)
  out[#out + 1] = "# HELP drover_task_run_duration_seconds Duration of completed task runs."
  out[#out + 1] = "# TYPE drover_task_run_duration_seconds summary"
  out[#out + 1] = string.format("drover_task_run_duration_seconds_sum %.6f", done.seconds)
  out[#out + 1] = string.format("drover_task_run_duration_seconds_count %d", done.timed)
  return 200, { ["content-type"] = "text/plain; version=0.0.4; charset=utf-8" }, table.concat(out, "\n") .. "\n"
end

--- Server-sent events.  `run` (data: the run's row) whenever a recent run's
-- state changes (for the run named by ?run=, also when its task runs
-- change, and once at the start: the run as it is then); `log` (id: the log id, data: the log row) for each new line of
-- that run, starting after ?after= (or Last-Event-ID).  The changes are
-- computed once per poll for every client (drover.daemon_events); this
-- task sends the run's earlier lines, then what the feed queues for it.
function Daemon:events(req, res, method)
  if method ~= "GET" then return err(405, "method not allowed: use GET") end
  local watch = req.args.run
  local watched
  if watch ~= nil then
    if type(watch) ~= "string" then return bad_arg("run", watch, "a run id") end
    watched = self:find(watch)
    if not watched then return err(404, "unknown run '" .. watch .. "'") end
  end
  local last_log = positive_int(req.args.after or req.headers["last-event-id"], 0)
  if not last_log then return bad_arg("after", req.args.after or req.headers["last-event-id"], "a log id") end
  local feed = self.feed
  -- join first: what the feed queues from now on overlaps the lines read
  -- below, never misses one (log ids only grow); the overlap is skipped
  local client = feed:join(watched and watched.id)
  local ok, e = pcall(function()
    if not res:start(200, { ["content-type"] = "text/event-stream", ["cache-control"] = "no-cache" }) then return end
    if not res:write(server.sse { retry = 2000, data = "" }) then return end
    if watched then
      -- the run as it is now, after joining: a change between the
      -- client's last read and joining is not lost
      local now = self.store:flow_run(watched.id)
      if now and not res:write(server.sse { event = "run", data = json.encode(run_view(now), BYTES) }) then
        return
      end
    end
    while watched do
      local lines = self.store:logs(watched.id, last_log, 1000)
      if #lines == 0 then break end
      local chunks = {}
      for i, l in ipairs(lines) do
        chunks[i] = server.sse { event = "log", id = l.id, data = json.encode(l, BYTES) }
        last_log = l.id
      end
      if not res:write(table.concat(chunks)) then return end
    end
    while true do
      client.ev:wait()
      local items = feed:take(client)
      if not items then break end
      local chunks = {}
      for _, it in ipairs(items) do
        if not it.log_id or it.log_id > last_log then
          chunks[#chunks + 1] = it.chunk
          last_log = it.log_id or last_log
        end
      end
      if #chunks > 0 and not res:write(table.concat(chunks)) then return end
    end
    if client.dropped then res:abort() else res:finish() end
  end)
  feed:leave(client)
  if not ok then error(e, 0) end
end

-- ---- idle exit of an auto-started daemon ----------------------------------------------

--- How long (seconds) a daemon started by `drover run` (--auto) stays up
-- with nothing to do: no active run, no request, no scheduled deployment.
-- DROVER_DAEMON_IDLE overrides it.  A `drover serve` started by hand stays.
M.IDLE = 600

local function idle_limit()
  local v = tonumber(os.getenv("DROVER_DAEMON_IDLE") or "")
  return v and v > 0 and v or M.IDLE
end

--- Does the daemon have anything to do: a request being served, an
-- active run (its worker reports here), a deployment to fire?
function Daemon:busy()
  return self.requests_open > 0 or #self.store:flow_runs { active = true, limit = 1 } > 0
    or #self.store:scheduled_deployments() > 0
end

--- How long an idle daemon, hidden from new `drover run`s, waits for a
-- run one of them created just before (seconds).
M.IDLE_GRACE = 1

--- Hide from new `drover run`s (remove daemon.json: they start a new
-- daemon), then look once more: a `drover run` that found this daemon a
-- moment ago may just have created a run that reports here.  Returns true
-- to exit; false (daemon.json back) when there is work after all.
function Daemon:leave_idle()
  local file = M.daemon_file(self.home)
  local text = fs.read(file)
  local info = text and json.decode(text)
  if type(info) ~= "table" or info.pid ~= drover.pid() then return true end
  fs.remove(file)
  drover.sleep(M.IDLE_GRACE)
  local ok, busy = pcall(self.busy, self)
  if ok and not busy then return true end
  if not fs.read(file) then fs.write(file, text) end -- unless a new daemon took the store meanwhile
  return false
end

--- Count the requests (open ones, the time of the last), and stop the
-- daemon once it has been idle for idle_limit() seconds.
function Daemon:watch_idle()
  local limit = idle_limit()
  self.requests_open, self.last_request = 0, drover.now()
  local handle = Daemon.handle
  self.handle = function(d, req, res)
    d.requests_open = d.requests_open + 1
    local r = table.pack(pcall(handle, d, req, res))
    d.requests_open, d.last_request = d.requests_open - 1, drover.now()
    if not r[1] then error(r[2], 0) end
    return table.unpack(r, 2, r.n)
  end
  self.tasks[#self.tasks + 1] = drover.spawn(function()
    local since = drover.now()
    while not self.stopping do
      drover.sleep(math.min(limit / 4, 30))
      local ok, busy = pcall(self.busy, self)
      if not ok or busy then since = drover.now() end -- a store it cannot read is not idleness
      since = math.max(since, self.last_request)
      if drover.now() - since >= limit and not self.stopping then
        if self:leave_idle() then
          log(string.format("idle for %g s (started by drover run): exiting", limit))
          drover.spawn(function() self:stop() end)
          return
        end
        since = drover.now()
      end
    end
  end)
end

-- ---- the command ------------------------------------------------------------------------

--- `drover serve`: run until SIGTERM/SIGINT.  Returns an exit code.
function M.serve(opts)
  -- a request leaves a few short-lived tables behind; the generational
  -- collector takes them for less than the incremental one
  collectgarbage("generational")
  local d, e = M.new(opts)
  if not d then io.stderr:write(e, "\n"); return 2 end
  if opts.auto then
    local other = M.running(d.home)
    if other and other.pid ~= drover.pid() then d.store:close(); return 0 end
  end
  local ok, lerr = d:start()
  if not ok then io.stderr:write("drover serve: ", tostring(lerr), "\n"); d.store:close(); return 2 end
  local stop = function() d:stop() end
  local s1, s2 = drover.on_signal("TERM", stop), drover.on_signal("INT", stop)
  io.stderr:write("drover serve: listening on ", d.url, " (pid ", drover.pid(), ", store ", d.store.location, ")\n")
  io.stderr:flush()
  d:wait()
  s1:stop(); s2:stop()
  if d.head_reader then d.head_reader.close() end
  d.store:close()
  io.stderr:write("drover serve: stopped\n")
  return 0
end

M.Daemon = Daemon
return M
