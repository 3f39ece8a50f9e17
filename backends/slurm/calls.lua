--- Tasks as jobs: a method whose task options carry `resources = { cpus =,
-- mem =, time =, partition = }` does not run in the flow's worker.  Each
-- call (each attempt) is a Slurm job of its own running `drover worker
-- --call RUN CALL`, which calls the method on a fresh object of the
-- deployed class and records the result; the flow's worker waits for it.
-- The tracked call (state, retries, timeout, catch, cancel) stays in the
-- flow.
--
-- A call travels through the run's call records (the store's run_calls),
-- reached one of two ways, as the flow's worker reaches its run:
--
--   the server  (api_url: the worker has a drover.worker remote source)
--               POST /api/v1/runs/RUN/calls {task_run_id, spec} makes the
--               call; the call's job gets the run's token in its
--               environment, fetches the spec (GET .../calls/CALL) and the
--               bundle over the API and posts {ok, result | error, node,
--               job} to .../calls/CALL/result; the flow's worker polls
--               GET .../calls/CALL.  Nothing on either node reads
--               DROVER_HOME or staging_dir.
--   the store   (shared-filesystem fallback) the same records, written and
--               read in the store under DROVER_HOME directly.
--
-- Installed into the Slurm class by backends/slurm.lua: install(Slurm, Local).
local drover = require "drover"
local json = require "drover.json"
local states = require "drover.states"

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local text = assert(loadfile(here .. "/text.lua"))()
local template = assert(loadfile(here .. "/template.lua"))()
local jobstate = assert(loadfile(here .. "/jobstate.lua"))()
local fail, oneline, shell_quote = text.fail, text.oneline, text.shell_quote

-- ---- the two ways to the call records ----------------------------------------------------------

--- Through the store (shared filesystem).
local StoreCalls = {}
StoreCalls.__index = StoreCalls

function StoreCalls:create(task_run_id, spec)
  return self.store:create_call { flow_run_id = self.run_id, task_run_id = task_run_id, spec = json.encode(spec) }
end

--- The call's record: { state, spec, result } (JSON decoded), or nil.
function StoreCalls:get(call_id)
  local c = self.store:call(self.run_id, call_id)
  if not c then return nil end
  return { state = c.state, spec = c.spec and json.decode(c.spec), result = c.result and json.decode(c.result) }
end

function StoreCalls:finish(call_id, t, body)
  self.store:finish_call(self.run_id, call_id, t.ok and states.COMPLETED or states.FAILED, body)
  return true
end

--- Through `drover serve` (the worker's API client, with the run's token).
local ApiCalls = {}
ApiCalls.__index = ApiCalls

--- One request, retried with backoff while the server is unreachable or
-- answers 5xx (it may be restarting), for up to `patience` seconds.
-- Returns the response (any status below 500) or raises one line.
function ApiCalls:request(method, path, body, patience)
  local delay, deadline = 0.2, drover.now() + (patience or self.patience)
  while true do
    local res, err = self.client:call(method, path, body, body and "application/json" or nil)
    if res and res.status < 500 then return res end
    if drover.now() > deadline then
      fail("%s %s%s: %s", method, self.client.url, path, res and ("HTTP " .. res.status) or tostring(err))
    end
    drover.sleep(delay)
    delay = math.min(delay * 2, 5)
  end
end

local function answer(res, method, url)
  if res.status >= 200 and res.status < 300 and type(res.json) == "table" then return res.json end
  error("slurm: " .. require("drover.api_client").error_of(res, method, url), 0)
end

function ApiCalls:create(task_run_id, spec)
  local path = "/api/v1/runs/" .. self.run_id .. "/calls"
  local body = json.encode { task_run_id = task_run_id, spec = spec }
  local res = self:request("POST", path, body)
  return answer(res, "POST", self.client.url .. path).id
end

--- The call's record, or nil when it is unknown; `patience` seconds of
-- retries (0: one try, raising if the server cannot be reached).
function ApiCalls:get(call_id, patience)
  local path = "/api/v1/runs/" .. self.run_id .. "/calls/" .. call_id
  local res = self:request("GET", path, nil, patience)
  if res.status == 404 then return nil end
  local c = answer(res, "GET", self.client.url .. path)
  local function v(x) if x == json.null then return nil end return x end
  return { state = c.state, spec = v(c.spec), result = v(c.result) }
end

function ApiCalls:finish(call_id, _, body)
  local path = "/api/v1/runs/" .. self.run_id .. "/calls/" .. call_id .. "/result"
  local res = self:request("POST", path, body)
  if res.status == 409 then return true end -- recorded already (a retried post whose answer was lost)
  answer(res, "POST", self.client.url .. path)
  return true
end

--- The call records of the run a worker source (drover.worker) serves.
local function calls_of(source, run_id)
  if source.client then
    return setmetatable({ client = source.client, run_id = run_id,
      patience = source.opts and source.opts.delivery_timeout or 300 }, ApiCalls)
  end
  return setmetatable({ store = source.store, run_id = run_id }, StoreCalls)
end

-- ---- install -------------------------------------------------------------------------------------

local RESOURCE_KEYS = { cpus = "cpus_per_task", mem = "mem", time = "time", partition = "partition" }

local M = {}

function M.install(Slurm, Local)
  --- The `resources` task option of method `name` of cls (merged as
  -- Base:decorator merges task options: backend, class "*", method), checked.
  function Slurm:resources_of(cls, name)
    local res
    local function take(src) if type(src) == "table" and src.resources ~= nil then res = src.resources end end
    take(self.config.task_options)
    local per_class = cls and cls.task_options
    if type(per_class) == "table" then
      take(per_class["*"])
      if name then take(per_class[name]) end
    end
    if res == nil then return nil end
    local where = "task " .. tostring(cls and cls.__name or "?") .. "." .. tostring(name)
    if type(res) ~= "table" then fail("%s: task option 'resources' must be a table, got %s", where, type(res)) end
    local short = {}
    for k, v in pairs(res) do
      local key = RESOURCE_KEYS[k]
      if not key then fail("%s: unknown resource '%s' (cpus, mem, time, partition)", where, tostring(k)) end
      short[key] = v
    end
    template.check(short, where)
    return short
  end

  function Slurm:decorator(func, cls, name)
    local job = (type(func) == "function" and name) and self:resources_of(cls, name)
    if not job then return Local.decorator(self, func, cls, name) end
    local backend = self
    local function remote(_, ...) return backend:remote_call(cls, name, job, ...) end
    return Local.decorator(self, remote, cls, name)
  end

  --- A JSON-able copy of an argument list (nil holes as null).
  local function encode_args(args, what)
    local list = json.array()
    for i = 1, args.n do if args[i] == nil then list[i] = json.null else list[i] = args[i] end end
    local ok, t = pcall(json.encode, { n = args.n, args = list })
    if not ok then fail("%s: arguments must be JSON-serialisable to run as a Slurm job: %s", what, oneline(t)) end
    return json.decode(t)
  end

  --- The batch script of call `call_id` of run `run_id`, and where it works
  -- and writes its output: in the staging directory (shared filesystem),
  -- or on the node (api: the worker's server URL and CA file).
  function Slurm:call_job(run_id, call_id, what, api)
    local argv = { self:drover_bin(), "worker", "--call", run_id, call_id }
    local dir, out
    if api then
      argv[#argv + 1] = "--api"
      argv[#argv + 1] = api.url
      if api.ca_file then argv[#argv + 1] = "--ca-file"; argv[#argv + 1] = api.ca_file end
      dir = self:node_dir()
      out = dir .. "/drover-slurm-%j.out"
    else
      dir = self:run_dir(run_id) .. "/calls/" .. call_id
      drover.fs.mkdir(dir)
      out = dir .. "/slurm.out"
    end
    local words = {}
    for i, a in ipairs(argv) do words[i] = shell_quote(a) end
    local script = "#!/bin/sh\n# drover: " .. what .. " of run " .. run_id .. "\nexec " .. table.concat(words, " ") .. "\n"
    return script, dir, out
  end

  --- The body of a task with resources: one Slurm job per call, waited for.
  function Slurm:remote_call(cls, name, job, ...)
    local tracker = require "drover.tracker"
    local what = "task " .. tostring(cls and cls.__name or "?") .. "." .. tostring(name)
    local cur = tracker.current()
    local source = self.worker_source
    local info = cur and source and (source.info or source:job())
    local r = info and info.run
    if not r or r.id ~= cur.flow_run_id or r.backend ~= "slurm" or not r.deployment then
      fail("%s has resources, so it runs as a Slurm job: call it inside a run of a slurm deployment", what)
    end
    local cfg = info.deployment and info.deployment.config
    if type(cfg) ~= "table" then cfg = {} end
    -- the deployment's template (account, qos, environment...), the task's
    -- resources on top; the flow's own cpus/mem/time are not the task's
    local base = {}
    for k, v in pairs(cfg.job or {}) do
      if k ~= "cpus_per_task" and k ~= "mem" and k ~= "time" and k ~= "nodes" then base[k] = v end
    end
    local tmpl = template.merge(base, job)
    local spec = { method = name, class = cls and cls.__name, task_run_id = cur.task_run_id,
      args = encode_args(table.pack(...), what) }
    local calls = calls_of(source, r.id)
    local call_id = calls:create(cur.task_run_id, spec)
    local api = source.client and { url = source.client.url, ca_file = source.client.ca_file, token = source.client.token }
    local script, dir, out = self:call_job(r.id, call_id, what, api)
    local job_id = self:submit({ script = script, job = tmpl, name = "drover:" .. r.deployment,
      comment = "drover call " .. call_id .. " (" .. what .. ") of run " .. r.id, output = out, dir = dir,
      api = api ~= nil, secrets = api and { DROVER_RUN_TOKEN = api.token } or nil })
    tracker.log("info", "slurm job " .. job_id .. " runs " .. what .. " (call " .. call_id .. ")")
    local result = self:await_call(calls, call_id, job_id, what, not api and out or nil)
    if result.node then tracker.log("info", "slurm job " .. job_id .. " ran " .. what .. " on " .. tostring(result.node)) end
    if not result.ok then error(tostring(result.error), 0) end
    local res = result.result
    if res == nil or res == json.null then return nil end
    return res
  end

  --- Wait for the job of a call to record its result (or to end without
  -- one): polled, each wait longer (up to 3 s), with Slurm asked about the
  -- job each time, so a job that died is not waited on forever.  Cancelled
  -- while waiting: cancels the job, then passes the cancel on.  `out`: the
  -- job's output file, when this host can read it (shared filesystem).
  function Slurm:await_call(calls, call_id, job_id, what, out)
    local delay = 0.2
    local function result(patience)
      local ok, c = pcall(calls.get, calls, call_id, patience)
      if ok and c and type(c.result) == "table" then return c.result end
      if not ok and c == "cancelled" then error(c, 0) end
      return nil
    end
    local function cancelled(e)
      pcall(self.cancel_job, self, job_id, false)
      error(e, 0)
    end
    while true do
      local ok, err = pcall(drover.sleep, delay)
      if not ok then cancelled(err) end
      delay = math.min(delay * 1.5, 3)
      local rok, res = pcall(result, 0)
      if not rok then cancelled(res) end
      if res then return res end
      local iok, info = pcall(self.job_info, self, job_id)
      if not iok and info == "cancelled" then cancelled(info) end
      local st = iok and info and jobstate.name(info.state)
      if iok and (not info or not jobstate.ACTIVE[st]) then
        -- posted just before the job ended (the server may be blinking: wait for it)
        rok, res = pcall(result, 60)
        if not rok then cancelled(res) end
        if res then return res end
        local tail = out and drover.fs.read(out) or ""
        local where = out and "" or ("; its output is on " .. tostring(info and info.node or "its node") ..
          " in " .. self:node_dir() .. "/drover-slurm-" .. job_id .. ".out")
        fail("%s: slurm job %s ended %s without a result%s%s", what, job_id, tostring(st or "(unknown to Slurm)"),
          tail ~= "" and (": " .. oneline(tail:sub(-400))) or "", where)
      end
    end
  end

  --- Runs inside `drover worker --call RUN CALL` (a job of its own), with
  -- the worker source the CLI made (the server or the store): the call's
  -- method on a fresh object of the deployed class; its result (or error)
  -- recorded.  Returns the exit code.
  function Slurm:work_call(run_id, call_id, source)
    source = source or require("drover.worker").direct(self:store(), run_id)
    local calls = calls_of(source, run_id)
    local function finish(t)
      t.node = os.getenv("SLURMD_NODENAME")
      t.job = os.getenv("SLURM_JOB_ID")
      local ok, body = pcall(json.encode, t)
      if not ok then
        t = { ok = false, error = "result of the call is not JSON-serialisable: " .. oneline(body), node = t.node, job = t.job }
        body = json.encode(t)
      end
      local fok, ferr = pcall(calls.finish, calls, call_id, t, body)
      pcall(source.finish, source)
      if not fok then
        io.stderr:write("drover worker --call: cannot record the result: ", tostring(ferr), "\n")
        return 1
      end
      if not t.ok then io.stderr:write("drover worker --call: ", tostring(t.error), "\n") end
      return t.ok and 0 or 1
    end
    local function body()
      local c = calls:get(call_id)
      if not c or type(c.spec) ~= "table" then error("unknown call '" .. tostring(call_id) .. "' of run " .. run_id, 0) end
      local spec = c.spec
      local job = source.info or source:job()
      local p = job.package
      if not p then error("package of deployment '" .. tostring(job.run.deployment) .. "' is missing", 0) end
      local bdir = source:work_dir() .. "/calls/" .. call_id .. "/bundle"
      drover.fs.mkdir(bdir)
      local uok, uerr = source:unpack(p, bdir)
      if not uok then error("bad package: " .. tostring(uerr), 0) end
      package.path = bdir .. "/src/?.lua;" .. bdir .. "/src/?/init.lua;" .. package.path
      local mod = require(p.module)
      local cls = mod
      if p.class and type(mod) == "table" and type(mod[p.class]) == "table" then cls = mod[p.class] end
      if type(cls) ~= "table" then error("module '" .. p.module .. "' did not return a class", 0) end
      -- the class as written (not decorated): nested calls run plainly in this job
      local params = job.run.params
      if type(params) ~= "table" then params = {} end
      local obj = cls.new and cls:new(params) or cls
      local m = obj[spec.method]
      if type(m) ~= "function" then error("class has no method '" .. tostring(spec.method) .. "'", 0) end
      local args = type(spec.args) == "table" and spec.args or {}
      local list = type(args.args) == "table" and args.args or {}
      local n = math.tointeger(args.n) or #list
      for i = 1, n do if list[i] == json.null then list[i] = nil end end
      return m(obj, table.unpack(list, 1, n))
    end
    -- in a task of its own, so that SIGTERM (scancel, stop) cancels it and
    -- what it waits on (processes included) instead of orphaning them
    local core = require "drover.core"
    local h = core.spawn(function() return table.pack(xpcall(body, function(e) return e end)) end)
    local function on_term() h:cancel() end
    local s1 = drover.on_signal("TERM", on_term)
    local s2 = drover.on_signal("INT", on_term)
    local ran, r = h:wait()
    s1:stop(); s2:stop()
    if not ran then r = { false, r } end
    if r[1] then return finish({ ok = true, result = r[2] }) end
    return finish({ ok = false, error = type(r[2]) == "string" and r[2] or tostring(r[2]) })
  end
end

return M
