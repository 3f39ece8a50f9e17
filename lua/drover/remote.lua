--- The command line against a remote `drover serve` (`--api URL` or
-- DROVER_API, with the server's token in DROVER_TOKEN or the file
-- DROVER_TOKEN_FILE names: never on the command line).
--
-- A Remote stands where the command line otherwise opens the store: it
-- answers the store calls the client commands make (find_flow_run,
-- flow_run, task_runs, flow_runs, deployments, logs) and hands out backend
-- proxies (Remote:backend, :deployment_backend, :run_backend) answering
-- the orchestrator calls (package, deploy, run, stop, status, cancel) with
-- the endpoints of client_api.lua.  Nothing here opens or creates a store:
-- the client's DROVER_HOME is never touched.
--
-- Every failure raises one line naming what was wrong: the server that
-- cannot be reached, a refused token, an answer that is not what the API
-- promises, or the server's own message (an unknown deployment...).
local api_client = require "drover.api_client"
local drover = require "drover"
local fs = require "drover.fs"
local json = require "drover.json"
local states = require "drover.states"

local M = {}

--- Seconds cancel and stop wait for the runs to end on the server.
M.WAIT = 300
--- Seconds an upload may take (the server's backend packages it: a
-- docker build may take minutes).
M.UPLOAD_TIMEOUT = 900

local Remote = {}
Remote.__index = Remote
--- Marks a Remote where the command line expects a store.
Remote.remote = true

--- opts: url, token, ca_file, timeout (seconds per request, default 60).
function M.new(opts)
  local c = api_client.new { url = opts.url, token = opts.token, ca_file = opts.ca_file, timeout = opts.timeout or 60 }
  return setmetatable({ client = c, url = c.url, has_token = opts.token ~= nil }, Remote)
end

local function fail(fmt, ...) error(string.format(fmt, ...):gsub("[\r\n]+", " "), 0) end

--- One request; the 2xx answer's JSON value, or (with o.missing_ok) nil
-- for a 404.  Raises one line for everything else.
function Remote:request(method, path, body, o)
  o = o or {}
  local res, cerr = self.client:call(method, path, body, o.ctype, o)
  if not res then
    fail("cannot reach the drover server at %s: %s", self.url, (tostring(cerr):gsub("^drover%.http%.request: ", "")))
  end
  local where = method .. " " .. self.url .. path
  local st = res.status
  local msg = type(res.json) == "table" and type(res.json.error) == "string" and res.json.error or nil
  if st == 401 then
    if self.has_token then
      fail("the drover server at %s refused the token (401 %s); check DROVER_TOKEN or DROVER_TOKEN_FILE",
        self.url, msg or "unauthorized")
    end
    fail("the drover server at %s requires a token (401); set DROVER_TOKEN or DROVER_TOKEN_FILE", self.url)
  end
  if st == 404 and o.missing_ok and msg then return nil end
  if st < 200 or st > 299 then
    if msg then fail("%s (%s: %d)", msg, where, st) end
    fail("%s (is %s a drover server?)", api_client.error_of(res, method, self.url .. path), self.url)
  end
  if type(res.json) ~= "table" then
    fail("malformed answer from the drover server to %s: %s", where,
      res.json_error or ("expected JSON, got " .. tostring(res.headers["content-type"] or "no content type")))
  end
  return res.json
end

--- `v` when check(v) holds, else raise "malformed answer ...".
function Remote:expect(v, ok, what, where)
  if not ok then fail("malformed answer from the drover server to %s: %s expected", where, what) end
  return v
end

-- JSON nulls become absent fields, as in a store row.
local function row(r)
  for k, v in pairs(r) do if v == json.null then r[k] = nil end end
  return r
end

local function rows(list)
  local out = {}
  for i, r in ipairs(list) do out[i] = type(r) == "table" and row(r) or r end
  return out
end

local function hex(id) return type(id) == "string" and id:match("^%x+$") ~= nil end

local function query(t)
  local parts = {}
  for _, k in ipairs(t) do
    if t[k] ~= nil then parts[#parts + 1] = k .. "=" .. api_client.urlencode(t[k]) end
  end
  return #parts > 0 and ("?" .. table.concat(parts, "&")) or ""
end

-- ---- what the command line asks a store -----------------------------------------------------

--- The task runs of run `r` (as GET /api/v1/runs/ID answered): its own
-- list, or for a big run (task_runs_truncated) every page of them.
function Remote:run_task_runs(r)
  if r.task_runs_truncated ~= true then return rows(type(r.task_runs) == "table" and r.task_runs or {}) end
  local out, cursor = {}, nil
  repeat
    local path = "/api/v1/runs/" .. r.id .. "/task_runs" .. query { "limit", "cursor", limit = 1000, cursor = cursor }
    local page = self:request("GET", path)
    self:expect(page, type(page.task_runs) == "table", "a page of task runs", "GET " .. path)
    for _, t in ipairs(rows(page.task_runs)) do out[#out + 1] = t end
    cursor = page.next_cursor ~= json.null and page.next_cursor or nil
  until not cursor
  r.task_runs_truncated = nil -- every one is here now
  return out
end

--- Run `id` (a full id or a unique prefix), with its task_runs; nil if unknown.
function Remote:find_flow_run(id)
  if not hex(id) then return nil end
  local path = "/api/v1/runs/" .. id
  local r = self:request("GET", path, nil, { missing_ok = true })
  if r == nil then return nil end
  self:expect(r, hex(r.id) and type(r.state) == "string", "a run with an id and a state", "GET " .. path)
  r.task_runs = self:run_task_runs(r)
  return row(r)
end
Remote.flow_run = Remote.find_flow_run

function Remote:task_runs(id)
  local r = self:find_flow_run(id)
  return r and r.task_runs or {}
end

--- filter: deployment, state, limit.
function Remote:flow_runs(filter)
  filter = filter or {}
  local path = "/api/v1/runs" .. query { "deployment", "state", "limit", deployment = filter.deployment,
    state = filter.state, limit = filter.limit }
  local list = self:request("GET", path)
  return rows(self:expect(list, list[1] ~= nil or next(list) == nil, "a list of runs", "GET " .. path))
end

function Remote:deployments()
  local list = self:request("GET", "/api/v1/deployments")
  return rows(self:expect(list, list[1] ~= nil or next(list) == nil, "a list of deployments", "GET /api/v1/deployments"))
end

--- Log lines of run `id` after log id `after` (every one: the server
-- answers a page at a time).
function Remote:logs(id, after)
  local out = {}
  after = after or 0
  repeat
    local path = "/api/v1/runs/" .. id .. "/logs" .. query { "after", after = after }
    local list = self:request("GET", path)
    self:expect(list, list[1] ~= nil or next(list) == nil, "a list of log lines", "GET " .. path)
    for _, l in ipairs(list) do
      self:expect(l, type(l) == "table" and math.type(l.id) == "integer" and l.id > after, "log lines with increasing ids",
        "GET " .. path)
      out[#out + 1] = row(l)
      after = l.id
    end
  until #list == 0
  return out
end

-- ---- what the command line asks a backend ----------------------------------------------------

local Backend = {}
Backend.__index = Backend

--- The backend NAME on the server, with `config` (-c/--set) for it.
function Remote:backend(name, config)
  return setmetatable({ remote = self, name = name, config = config or {} }, Backend)
end

--- Deployment NAME's backend on the server (as deployed, `config` on top).
function Remote:deployment_backend(name, config)
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    fail("bad deployment name '%s' (letters, digits, _ . - only)", tostring(name))
  end
  return setmetatable({ remote = self, deployment = name, config = config or {} }, Backend)
end

--- Run `run`'s backend on the server.
function Remote:run_backend(run, config)
  return setmetatable({ remote = self, name = run.backend, config = config or {} }, Backend)
end

local function object(t) return next(t) == nil and json.object() or t end

--- Build the bundle here (the local backend's bundler: the module and
-- the project files it requires, in a temporary directory, not a store),
-- upload it with its SHA-256, and let the server's backend package it.
function Backend:package(class_name, module, entrypoint, opts)
  local tmp = assert(fs.tempdir("drover-package-"))
  local ok, p = pcall(function()
    local o = require("drover.orchestrator").orchestrator("local", {})
    o._store = { home = tmp, put_package = function() end }
    return o:package(class_name, module, entrypoint, { path = opts and opts.path })
  end)
  local data = ok and fs.read(p.location)
  fs.remove(tmp, { recursive = true })
  if not ok then error((tostring(p):gsub("^[^%s:]+%.lua:%d+: ", "")), 0) end
  local headers = { ["x-drover-sha256"] = p.sha256 }
  if next(self.config) then headers["x-drover-config"] = json.encode(self.config) end
  local path = "/api/v1/packages" .. query { "backend", "module", "class", "entrypoint", backend = self.name,
    module = module, class = class_name, entrypoint = p.entrypoint }
  local out = self.remote:request("POST", path, data, { ctype = "application/x-tar", headers = headers,
    timeout = M.UPLOAD_TIMEOUT })
  self.remote:expect(out, hex(out.id), "a package with an id", "POST " .. path)
  out.location = self.remote.url .. "/api/v1/packages/" .. out.id .. "/bundle"
  return row(out)
end

function Backend:deploy(name, opts)
  opts = opts or {}
  local b = { name = name, backend = self.name, package = opts.package, params = object(opts.params or {}),
    schedule = opts.schedule, max_active = opts.max_active, replace = opts.replace or nil,
    config = object(self.config) }
  local d = self.remote:request("POST", "/api/v1/deployments", b)
  return row(d)
end

--- Start a run of the deployment: its id and URL.
function Backend:run(name, params)
  local path = "/api/v1/deployments/" .. name .. "/runs"
  local r = self.remote:request("POST", path, { params = object(params or {}), config = object(self.config) })
  self.remote:expect(r, hex(r.id) and type(r.url) == "string", "{id, url}", "POST " .. path)
  return r.id, r.url
end

--- Poll until every run of `ids` has ended (and `also()` holds); raises
-- one line naming a run that has not ended after M.WAIT seconds.
function Remote:wait_ended(ids, what, also)
  local deadline = drover.now() + M.WAIT
  local last = {}
  while true do
    local pending
    for _, id in ipairs(ids) do
      local r = self:flow_run(id)
      last[id] = r
      if r and states.active[r.state] then pending = r end
    end
    if not pending and (not also or also()) then return last end
    if drover.now() > deadline then
      fail("%s: run %s is still %s on the server after %d s", what, pending and pending.id or "?",
        pending and pending.state or "going", M.WAIT)
    end
    drover.sleep(0.2)
  end
end

--- Stop the deployment: the server cancels its active runs and pauses it;
-- returns once they have ended.
function Backend:stop(name, _opts)
  local path = "/api/v1/deployments/" .. name .. "/stop"
  local r = self.remote:request("POST", path, { config = object(self.config) })
  if r.done == true then return { name = name, cancelled = r.cancelled } end
  local ids = self.remote:expect(r.cancelling, type(r.cancelling) == "table", "{cancelling = [run ids]}", "POST " .. path)
  self.remote:wait_ended(ids, "stop of " .. name, function()
    local d = self.remote:request("GET", "/api/v1/deployments/" .. name)
    return d.paused == 1
  end)
  return { name = name, cancelled = ids }
end

--- The run as its backend sees it now (the server asks it); raises the
-- backend's message when it could not be asked.
function Backend:status(id)
  local path = "/api/v1/runs/" .. id .. "?refresh=1"
  local r = self.remote:request("GET", path)
  self.remote:expect(r, hex(r.id) and type(r.state) == "string", "a run with an id and a state", "GET " .. path)
  if type(r.backend_error) == "string" then error(r.backend_error, 0) end
  r.task_runs = self.remote:run_task_runs(r)
  return row(r)
end

--- Cancel run `id` (a full id): two-phase on the server; returns the run
-- once it has ended.
function Backend:cancel(id)
  self.remote:request("POST", "/api/v1/runs/" .. id .. "/cancel", {})
  return self.remote:wait_ended({ id }, "cancel of " .. id)[id]
end

M.Remote = Remote
return M
