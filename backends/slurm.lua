--- The `slurm` backend: each flow run is a Slurm batch job on a cluster.
--
-- It extends the local backend: the bundle, the worker (`drover worker
-- RUN_ID`, now started by Slurm on a compute node), logs from the store and
-- the list of runs are the local backend's.  What differs is how a run
-- starts and ends:
--
--   package  the local bundle (with api_url the nodes download it from the
--            server; without, it is staged into `staging_dir`, which every
--            node must then read)
--   deploy   the deployment plus its Slurm job template (partition, nodes,
--            cpus_per_task, mem, time, account, qos, sbatch options,
--            environment); an unknown partition is refused
--   run      one batch job running `drover worker RUN_ID`; the Slurm job id
--            is kept as the run's external_id
--   map      a job array: one run per item, `%N` limiting concurrency
--   stop     cancels every job named "drover:DEPLOYMENT", marks runs CANCELLED
--   cancel   one run: its own job (for a map run, its array element) and its
--            task jobs (comment "... of run RUN"); the deployment stays active
--   status   the store's state, reconciled with Slurm's job state (a run
--            whose job ended never stays RUNNING)
--
-- Transports: slurmrestd's REST API v0.0.38 over a unix socket (`socket`,
-- rest_auth/local) or over TCP with a JWT (`url` + `token`/`token_file`/
-- `token_command`); with neither, the sbatch/scontrol/scancel commands.
--
-- Where the worker reports:
--
--   api_url set   (multi-host) the batch script runs `drover worker RUN
--                 --api URL`, with the run's own token in the job's
--                 environment (never in argv or the script); the worker
--                 fetches the run and the bundle from `drover serve` and
--                 reports over HTTP.  Nothing on the node reads DROVER_HOME
--                 or staging_dir; the batch script's own output stays on the
--                 node (node_dir, default /tmp: drover-slurm-JOB.out).
--   no api_url    (fallback) the worker opens the store under DROVER_HOME
--                 itself, and the bundle, scripts and output live in
--                 staging_dir: both must be on one host, or on a filesystem
--                 with working POSIX locks (the store then runs without WAL).
--
-- See docs/slurm.md.
local drover = require "drover"
local fs = require "drover.fs"
local states = require "drover.states"
local run_token = require "drover.run_token"
local store_mod = require "drover.store"

local Local = require("drover.orchestrator").backend_class("local")
local Slurm = Local:extend("slurm")
Slurm.backend_name = "slurm"
Slurm.config_keys = {
  drover_bin = "string",     -- the drover binary on the nodes (default: this one)
  stop_timeout = { "number", min = 0 }, -- seconds stop waits for the jobs to end
  url = "string",            -- slurmrestd over TCP, e.g. http://host:6820
  socket = "string",         -- slurmrestd over a unix socket (rest_auth/local)
  token = "string",          -- JWT for url (never logged)
  token_file = "string",     -- ... or a file holding it (SLURM_JWT=... accepted)
  token_command = "strings", -- ... or argv printing it (e.g. scontrol token)
  user = "string",           -- X-SLURM-USER-NAME (default: $USER or root)
  api = "string",            -- OpenAPI version (default v0.0.38)
  commands = "boolean",      -- force the sbatch/scontrol/scancel commands
  staging_dir = "string",    -- shared dir for bundles, scripts, job output
  partition = "string",      -- default partition
  job = "table",             -- default job template (keys as deploy's `job`)
  jobcomp_file = "string",   -- JobCompLoc of jobcomp/filetxt (final states)
  http_timeout = "number",   -- seconds per REST request (default 30)
  slurm_conf = "string",     -- slurm.conf for the commands (default: $SLURM_CONF)
  api_url = "string",        -- drover serve's URL as the nodes reach it, or "daemon" (this store's daemon)
  ca_file = "string",        -- CA bundle on the nodes that verifies api_url's TLS certificate
  node_dir = "string",       -- with api_url: the job's working dir on the node (default /tmp)
}

-- Environment the job inherits from the submitter when set: how the
-- worker finds drover's Lua library and backends, and how it reports.
-- Nothing else of the submitter's environment reaches the job (its
-- DROVER_TOKEN, say).
local PASS_ENV = { "DROVER_ROOT", "DROVER_PATH", "DROVER_BUILD", "LUA_PATH", "LUA_CPATH", "DROVER_DAEMON", "PATH",
  "SLURM_CONF", "DROVER_HEARTBEAT", "DROVER_DELIVERY_TIMEOUT" }

local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local function part(name) return assert(loadfile(here .. "/slurm/" .. name .. ".lua"))() end
local text = part("text")
local jobstate = part("jobstate")
local template = part("template")
local trim, fail, oneline, shell_quote = text.trim, text.fail, text.oneline, text.shell_quote
local minutes, megabytes = template.minutes, template.megabytes
local check_template, merge_templates = template.check, template.merge

-- ---- transports -------------------------------------------------------------------------

function Slurm:mode()
  if self.config.commands then return "commands" end
  if self.config.socket then return "socket" end
  if self.config.url then return "jwt" end
  return "commands"
end

function Slurm:api_base()
  local v = self.config.api or "v0.0.38"
  if self.config.socket then return "http://localhost/slurm/" .. v, "unix:" .. self.config.socket end
  local u = self.config.url:gsub("/+$", "")
  return u .. "/slurm/" .. v, u
end

--- The JWT (read once per instance and cached; rest() drops it and reads
-- it again when slurmrestd refuses it, so a renewed token_file or a new
-- token_command token is picked up; never logged).
function Slurm:token()
  if self._token then return self._token end
  local c = self.config
  local t
  if c.token then t = c.token
  elseif c.token_file then
    local s, err = fs.read(c.token_file)
    if not s then fail("cannot read token_file: %s", oneline(err)) end
    t = s
  elseif c.token_command then
    local out, err = drover.proc.output(c.token_command, { timeout = 30 })
    if not out then fail("token_command failed: %s", oneline(err)) end
    t = out
  else
    t = os.getenv("SLURM_JWT")
  end
  if not t or trim(t) == "" then fail("REST over TCP (%s) needs a token: set token, token_file or token_command", c.url) end
  t = trim(t):gsub("^SLURM_JWT=", "")
  self._token = t
  return t
end

--- Did slurmrestd refuse the request's credentials?  HTTP 401/403 (no or
-- a malformed token), slurmctld's authentication error (5005), or what
-- 22.05 answers for an expired or invalid JWT: HTTP 500 with only
-- "Unspecified error" (errno -1), slurmctld logging "token expired".
local function auth_refused(r, first)
  if r.status == 401 or r.status == 403 then return true end
  if not first then return false end
  if first.error_code == 5005 or first.errno == 5005 then return true end
  local msg = tostring(first.error or "") .. " " .. tostring(first.description or "")
  if msg:lower():find("authentication", 1, true) then return true end
  return r.status == 500 and first.error == "Unspecified error"
end

--- One REST call; returns the decoded body, or raises one line naming the
-- method, the endpoint and the cause.  `ok_errors` lists Slurm error
-- strings the caller handles itself (returned as nil, error).  A refused
-- token (expired, renewed meanwhile) is read again and the call retried
-- once.
function Slurm:rest(method, path, body, ok_errors, retried)
  local base, where = self:api_base()
  local opts = { url = base .. path, method = method, json = body, timeout = self.config.http_timeout or 30,
    headers = {} }
  if self.config.socket then
    opts.unix_socket = self.config.socket
  else
    opts.headers["X-SLURM-USER-NAME"] = self.config.user or os.getenv("USER") or "root"
    opts.headers["X-SLURM-USER-TOKEN"] = self:token()
  end
  local r, err = drover.http.request(opts)
  if not r then fail("slurmrestd at %s is unreachable (%s %s): %s", where, method, path, oneline(err)) end
  local errs = type(r.json) == "table" and type(r.json.errors) == "table" and r.json.errors or {}
  local first = errs[1]
  local what = first and (tostring(first.description or "") ~= "" and first.description or first.error)
  if not self.config.socket and auth_refused(r, first) then
    -- a token from config.token cannot change: reading it again is useless
    if not retried and not self.config.token then
      self._token = nil
      return self:rest(method, path, body, ok_errors, true)
    end
    if r.status == 401 or r.status == 403 then
      fail("slurmrestd at %s refused the token (%s %s: HTTP %d %s)", where, method, path, r.status, oneline(r.body))
    end
  end
  if first and ok_errors and ok_errors[first.error] then return nil, first.error, what end
  if r.status >= 400 or first then
    local cause = oneline(what or r.body)
    local hint = ""
    if not self.config.socket and (first and (first.error_code == 5005 or first.errno == 5005
        or first.error == "Unspecified error")) then
      hint = " (slurmctld rejected the request: is the token valid and unexpired?)"
    end
    fail("slurmrestd at %s: %s %s answered HTTP %d: %s%s", where, method, path, r.status, cause, hint)
  end
  if type(r.json) ~= "table" then fail("slurmrestd at %s: %s %s answered no JSON", where, method, path) end
  return r.json
end

--- The slurm.conf the commands use: config.slurm_conf, else $SLURM_CONF
-- (an empty one counts as unset), else nil (Slurm's own default).
function Slurm:slurm_conf()
  if self.config.slurm_conf then return self.config.slurm_conf end
  local v = os.getenv("SLURM_CONF")
  if v and v ~= "" then return v end
  return nil
end

--- What a deployment keeps: the config, plus the
-- slurm.conf in effect now, so a later process without SLURM_CONF in its
-- environment (the daemon, `drover status` in another shell) reaches the
-- same cluster.
function Slurm:saved_config()
  local out = Local.saved_config(self)
  -- every transport: the commands need it, and the REST ones use it to
  -- find the jobcomp file of jobs slurmctld has forgotten
  if not self.config.slurm_conf and self:slurm_conf() then
    out = out or {}
    out.slurm_conf = self:slurm_conf()
  end
  return out
end

--- The environment of a Slurm command: SLURM_CONF set from slurm_conf
-- (plus `extra`); nil when nothing needs changing.
function Slurm:cmd_env(extra)
  local conf = self:slurm_conf()
  if not conf and not extra then return nil end
  local env = {}
  for k, v in pairs(extra or {}) do env[k] = v end
  if conf then env.SLURM_CONF = conf end
  return env
end

--- Run a Slurm command (argv) for its result table (code, stdout, stderr);
-- raises if it cannot be started.
function Slurm:cmd_run(argv)
  local r, err = drover.proc.run(argv, { stdout = "capture", stderr = "capture", timeout = 60, env = self:cmd_env() })
  if not r then fail("cannot run %s: %s", argv[1], oneline(err)) end
  return r
end

--- Run a Slurm command (argv); returns stdout or raises naming it.
function Slurm:cmd(argv, env)
  local out, err = drover.proc.output(argv, { timeout = 60, env = self:cmd_env(env) })
  if not out then fail("%s", oneline(err)) end
  return out
end

-- ---- job state (parsing: backends/slurm/jobstate.lua) -----------------------------------

--- The final record of a job that left slurmctld (MinJobAge), from the
-- jobcomp/filetxt file.  jobid: the plain job id.
function Slurm:jobcomp(jobid, task)
  local path = self.config.jobcomp_file
  if not path then
    local ok, out = pcall(self.cmd, self, { "scontrol", "show", "config" })
    path = ok and out:match("JobCompLoc%s*=%s*(%S+)")
    if path then self.config.jobcomp_file = path end
  end
  local content = path and fs.read(path)
  if not content then return nil end
  return jobstate.parse_jobcomp(content, jobid, task)
end

--- Slurm's records of job `job` (jobstate.lua's job records), or nil if
-- slurmctld does not know it.
function Slurm:job_records(job)
  if self:mode() == "commands" then
    local r = self:cmd_run({ "scontrol", "show", "job", "-o", job })
    if r.code ~= 0 then
      if ((r.stderr or "") .. (r.stdout or "")):find("Invalid job id", 1, true) then return nil end
      fail("'scontrol show job %s' failed: %s", job, oneline((r.stderr or "") .. " " .. (r.stdout or "")))
    end
    return jobstate.parse_scontrol(r.stdout)
  end
  local body = self:rest("GET", "/job/" .. job, nil, { ["Invalid job id specified"] = true })
  if not body then return nil end
  return jobstate.parse_rest(body)
end

--- Slurm's view of job `ext` ("123" or "123_4" for an array task):
-- { state, reason, exit_code, signal, job_id, node } or nil if Slurm has
-- no record.
function Slurm:job_info(ext)
  local job, task = jobstate.split_id(ext)
  local recs = self:job_records(job)
  local rec = recs and jobstate.pick(recs, task)
  if rec then return rec end
  -- gone from slurmctld: the jobcomp file has the end
  return self:jobcomp(job, task)
end

--- Turn a run its worker ended COMPLETED or FAILED into CANCELLED: the
-- cancel killed the workflow's processes, and the worker, racing the
-- signal, recorded the end of a body it had lost.  Returns true if it did.
function Slurm:cancelled_after_all(id, why)
  return self:store():replace_end(id, states.ended_by_worker_list, states.CANCELLED, why)
end

-- How long after its end a run's Slurm job is still checked for a cancel
-- the worker missed (seconds; slurmctld's MinJobAge defaults to 300).
local RECHECK = 600

-- How long a run may sit without a Slurm job id before it counts as never
-- submitted (its submitter died between recording the run and the job id).
local UNSUBMITTED = 600

--- Bring a run in line with Slurm: while the store calls it active, a job
-- that ended (or vanished) ends the run; a run the worker ended while its
-- job was being cancelled (scancel from outside) becomes CANCELLED.
-- Returns the fresh row.
function Slurm:reconcile(r)
  local store = self:store()
  if not r.external_id then
    if states.active[r.state] and r.created and store_mod.time() - r.created > UNSUBMITTED then
      store:end_flow_run(r.id, states.CRASHED, "never submitted to Slurm (no job id recorded "
        .. UNSUBMITTED // 60 .. " minutes after the run was created)")
      return store:flow_run(r.id)
    end
    return r
  end
  local recent = (r.state == states.COMPLETED or r.state == states.FAILED) and r.ended and store_mod.time() - r.ended < RECHECK
  if not states.active[r.state] and not recent then return r end
  local info = self:job_info(r.external_id)
  if recent then
    local st = info and jobstate.name(info.state)
    if st == "CANCELLED" and self:cancelled_after_all(r.id, "slurm job " .. r.external_id .. " CANCELLED") then
      return store:flow_run(r.id)
    end
    return r
  end
  local final, why = jobstate.run_end(r.external_id, info)
  if not final then return r end
  local fresh = store:flow_run(r.id)      -- the worker may have just recorded its end
  if states.active[fresh.state] then
    store:end_flow_run(r.id, final, why)
  elseif final == states.CANCELLED then
    self:cancelled_after_all(r.id, why)
  end
  return store:flow_run(r.id)
end

-- ---- package and deploy -----------------------------------------------------------------

function Slurm:staging()
  local d = self.config.staging_dir or (self:store().home .. "/slurm")
  fs.mkdir(d)
  return d
end

function Slurm:run_dir(id) return self:staging() .. "/runs/" .. id end

function Slurm:package(class_name, module, entrypoint, opts)
  local p = Local.package(self, class_name, module, entrypoint, opts)
  local dir = self:staging() .. "/packages"
  fs.mkdir(dir)
  local staged = dir .. "/" .. p.sha256 .. ".tar"
  if not fs.exists(staged) then
    local tmp = staged .. ".tmp-" .. store_mod.new_id()
    local ok, err = fs.copy(p.location, tmp)
    if not ok then fail("package: cannot stage the bundle into %s: %s", dir, tostring(err)) end
    assert(fs.rename(tmp, staged))
  end
  p.location, p.backend = staged, "slurm"
  self:store():put_package(p)
  return p
end

--- Is `name` a partition of the cluster?
function Slurm:partition_exists(name)
  if self:mode() == "commands" then
    local r = self:cmd_run({ "scontrol", "show", "partition", "-o", name })
    if r.code == 0 then return true end
    local msg = oneline((r.stderr or "") .. " " .. (r.stdout or ""))
    if msg:find("not found", 1, true) then return false end
    fail("'scontrol show partition %s' failed: %s", name, msg)
  end
  local body, e = self:rest("GET", "/partition/" .. name, nil, { ["Invalid partition name specified"] = true })
  if not body then return false, e end
  for _, p in ipairs(body.partitions or {}) do if p.name == name then return true end end
  return false
end

function Slurm:deploy(name, opts)
  opts = opts or {}
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    fail("deploy: bad deployment name '%s' (letters, digits, _ . - only)", tostring(name))
  end
  local store = self:store()
  if not opts.package then fail("deploy: a package id is required (drover package prints one)") end
  local p = store:package(opts.package)
  if not p then fail("deploy: unknown package '%s'", tostring(opts.package)) end
  local job = merge_templates(check_template(self.config.job, "config.job"),
    check_template(opts.job, "deploy '" .. name .. "'"))
  job.partition = job.partition or self.config.partition
  if job.partition and not self:partition_exists(job.partition) then
    fail("deploy '%s': unknown partition '%s'", name, job.partition)
  end
  if opts.max_active ~= nil and (math.type(opts.max_active) ~= "integer" or opts.max_active < 1) then
    fail("deploy: bad max_active '%s' (a positive integer expected)", tostring(opts.max_active))
  end
  if opts.schedule ~= nil then fail("deploy: schedules are fired by the local daemon; not supported on slurm yet") end
  local ok, err = store:put_deployment({ name = name, backend = "slurm", package_id = p.id,
    params = opts.params, config = { job = job }, max_active = opts.max_active,
    backend_config = self:saved_config() }, opts.replace)
  if not ok then error(err, 0) end
  return { name = name, package = p.id, job = job }
end

-- ---- submitting -------------------------------------------------------------------------

--- The server the workers report to (api_url, without a trailing slash),
-- or nil in the shared-filesystem mode.  "daemon" is the daemon serving
-- this store (`drover run` starts one), at the URL it listens on: for nodes
-- that share this host's network (one host, or the test cluster).
function Slurm:api_url()
  local u = self.config.api_url
  if u == nil or u == "" then return nil end
  if u == "daemon" then
    local url, why = self:daemon_url()
    if not url then fail("api_url is 'daemon': %s", tostring(why)) end
    return url
  end
  if not u:match("^https?://[^/@]+") or u:match("^https?://[^/]*@") then
    fail("bad api_url '%s' (http://HOST:PORT or https://HOST:PORT, as the nodes reach drover serve; no credentials)",
      u:gsub("//[^/]*@", "//...@"))
  end
  return (u:gsub("/+$", ""))
end

--- With api_url: the job's working directory on the node, where Slurm
-- writes the batch script's output (drover-slurm-JOB.out).
function Slurm:node_dir() return self.config.node_dir or "/tmp" end

--- The job's environment: the template's, what the worker needs to find
-- drover (taken from the submitter), and DROVER_HOME in the
-- shared-filesystem mode only (`api`: the worker reports to a server).
function Slurm:job_env(job, api)
  local env = {}
  for _, k in ipairs(PASS_ENV) do
    local v = os.getenv(k)
    if v and v ~= "" then env[k] = v end
  end
  env.SLURM_CONF = self:slurm_conf()
  env.PATH = env.PATH or "/usr/local/bin:/usr/bin:/bin"
  for k, v in pairs(job.environment or {}) do env[k] = tostring(v) end
  if not api then env.DROVER_HOME = self:store().home end
  return env
end

--- Submit a batch job.  spec: script, name, comment, output, dir (its
-- working directory), job (template), array ("0-9%2"), dependency
-- ("afterok:1:2"), api (the worker reports to a server), secrets (more
-- environment: run tokens).  The environment is all the job gets from
-- here: sbatch runs with exactly it (and reads the script from stdin), a
-- REST submission carries it in the body; secrets never reach an argv, a
-- URL or a file.  Returns the Slurm job id.
function Slurm:submit(spec)
  local job = spec.job
  local env = self:job_env(job, spec.api)
  for k, v in pairs(spec.secrets or {}) do env[k] = v end
  if self:mode() == "commands" then
    local argv = { "sbatch", "--parsable", "--no-requeue", "--job-name=" .. spec.name, "--comment=" .. spec.comment,
      "--output=" .. spec.output, "--chdir=" .. spec.dir, "--export=ALL" }
    local function add(o) argv[#argv + 1] = o end
    if job.partition then add("--partition=" .. job.partition) end
    if job.nodes then add("--nodes=" .. job.nodes) end
    if job.cpus_per_task then add("--cpus-per-task=" .. job.cpus_per_task) end
    if job.mem then add("--mem=" .. megabytes(job.mem)) end
    if job.time then add("--time=" .. minutes(job.time)) end
    if job.account then add("--account=" .. job.account) end
    if job.qos then add("--qos=" .. job.qos) end
    if spec.array then add("--array=" .. spec.array) end
    if spec.dependency then add("--dependency=" .. spec.dependency) end
    for _, o in ipairs(job.sbatch or {}) do add(o) end
    local out, err = drover.proc.output(argv, { timeout = 60, env = env, clear_env = true, stdin = spec.script })
    if not out then fail("%s", oneline(err)) end
    local id = out:match("^(%d+)")
    if not id then fail("sbatch printed no job id: %s", oneline(out)) end
    return id
  end
  local j = { name = spec.name, comment = spec.comment, standard_output = spec.output,
    -- no `requeue` key: 22.05's v0.0.38 parser makes any requeue key (even
    -- false) requeue the job; the cluster's JobRequeue default applies
    standard_error = spec.output, current_working_directory = spec.dir, environment = env,
    partition = job.partition, cpus_per_task = job.cpus_per_task, account = job.account, qos = job.qos,
    memory_per_node = job.mem and megabytes(job.mem), time_limit = job.time and minutes(job.time),
    array = spec.array, dependency = spec.dependency }
  if job.nodes then j.nodes = { job.nodes, job.nodes } end
  for k, v in pairs(job.rest or {}) do j[k] = v end
  local body = self:rest("POST", "/job/submit", { script = spec.script, job = j })
  if not body.job_id then fail("slurmrestd accepted the job but returned no job_id") end
  return tostring(math.tointeger(body.job_id) or body.job_id)
end

--- The batch script of deployment `name`: `#SBATCH` lines for the extra
-- options (sbatch reads them), then the worker.  opts: run (shell code
-- yielding the run id), pre (lines before it), api (the server's URL: the
-- worker reports there), array_tokens (each array element takes the token
-- of its own run from DROVER_RUN_TOKEN_<index> and drops the others'),
-- redirect (shared filesystem: output into the run's directory).
function Slurm:script(name, job, opts)
  local lines = { "#!/bin/sh", "# drover: deployment " .. name }
  for _, o in ipairs(job.sbatch or {}) do lines[#lines + 1] = "#SBATCH " .. o end
  for _, l in ipairs(opts.pre or {}) do lines[#lines + 1] = l end
  lines[#lines + 1] = "RUN=" .. opts.run
  local worker = "exec " .. shell_quote(self:drover_bin()) .. ' worker "$RUN"'
  if opts.api then
    if opts.array_tokens then
      lines[#lines + 1] = 'eval "DROVER_RUN_TOKEN=\\${DROVER_RUN_TOKEN_$SLURM_ARRAY_TASK_ID}"'
      lines[#lines + 1] = "export DROVER_RUN_TOKEN"
      lines[#lines + 1] = "unset $(env | sed -n 's/^\\(DROVER_RUN_TOKEN_[0-9][0-9]*\\)=.*/\\1/p')"
    end
    worker = worker .. " --api " .. shell_quote(opts.api)
    if self.config.ca_file then worker = worker .. " --ca-file " .. shell_quote(self.config.ca_file) end
  else
    lines[#lines + 1] = "DIR=" .. shell_quote(self:staging() .. "/runs") .. "/$RUN"
    if opts.redirect then lines[#lines + 1] = 'exec >>"$DIR/slurm.out" 2>&1' end
  end
  lines[#lines + 1] = worker
  return table.concat(lines, "\n") .. "\n"
end

--- The deployment and its job template, with per-run overrides (opts:
-- cpus, mem, time, partition, nodes, or a `job` template).
function Slurm:prepare(name, opts)
  local d = self:runnable_deployment(name)
  if d.backend ~= "slurm" then fail("deployment '%s' belongs to backend '%s'", name, d.backend) end
  local cfg = store_mod.decode(d.config) or {}
  local over = check_template(opts.job, "run '" .. name .. "'")
  local short = {}
  if opts.cpus then short.cpus_per_task = opts.cpus end
  if opts.mem then short.mem = opts.mem end
  if opts.time then short.time = opts.time end
  if opts.partition then short.partition = opts.partition end
  check_template(short, "run '" .. name .. "'")
  return d, merge_templates(cfg.job, over, short)
end

--- afterok dependency on other runs of this store (opts.after: run ids).
function Slurm:dependency(after)
  if not after or #after == 0 then return nil end
  local ids = {}
  for _, rid in ipairs(after) do
    local r = self:store():find_flow_run(rid)
    if not r or not r.external_id then fail("run: 'after' names run '%s', which has no Slurm job", tostring(rid)) end
    ids[#ids + 1] = r.external_id
  end
  return "afterok:" .. table.concat(ids, ":")
end

function Slurm:run_url(id, fallback)
  if os.getenv("DROVER_DAEMON") == "0" then return fallback end
  local url = Local.run_url(self, id, (self:daemon_url()))
  if url:match("^file://") then return fallback end
  return url
end

--- The URL of job `job_id`: its REST resource, or its output file.
function Slurm:job_url(job_id, out)
  if self:mode() == "commands" then return "file://" .. out end
  local base = self:api_base()
  if self.config.socket then return "http+unix://" .. self.config.socket .. "/slurm/" .. (self.config.api or "v0.0.38") .. "/job/" .. job_id end
  return base .. "/job/" .. job_id
end

--- run(name, params [, opts]) -> id, url.  opts: after (run ids this run
-- waits for, afterok), cpus, mem, time, partition, job (template overrides).
function Slurm:run(name, params, opts)
  opts = opts or {}
  if params ~= nil and type(params) ~= "table" then
    fail("run: bad argument 'params' (table expected, got %s)", type(params))
  end
  local store = self:store()
  local d, job = self:prepare(name, opts)
  local merged = store_mod.decode(d.params) or {}
  for k, v in pairs(params or {}) do merged[k] = v end
  -- everything that can fail before the run is recorded: a run is never
  -- left PENDING without a job
  local api = self:api_url()
  local id = store_mod.new_id()
  local dir, out
  if api then
    dir = self:node_dir()
    out = dir .. "/drover-slurm-%j.out"
  else
    dir = self:run_dir(id)
    fs.mkdir(dir)
    out = dir .. "/slurm.out"
  end
  local spec = { script = self:script(name, job, { run = shell_quote(id), api = api }), job = job,
    name = "drover:" .. name, comment = "drover run " .. id .. " of deployment " .. name, output = out, dir = dir,
    dependency = self:dependency(opts.after), api = api ~= nil }
  store:create_flow_run { id = id, name = name, deployment = name, backend = "slurm", state = states.PENDING,
    params = merged, source = opts.source or { kind = "deployment" }, resumed_from = opts.resumed_from }
  if api then spec.secrets = { DROVER_RUN_TOKEN = run_token.issue(store, id) } end
  local ok, job_id = pcall(self.submit, self, spec)
  if not ok then
    store:end_flow_run(id, states.CRASHED, "submit failed: " .. tostring(job_id))
    error(job_id, 0)
  end
  local url
  if api then
    url = api .. "/runs/" .. id
    store:log(id, nil, "info", "slurm job " .. job_id .. " runs `drover worker " .. id .. " --api " .. api ..
      "`; the batch script's own output stays on its node, in " .. out:gsub("%%j", job_id))
  else
    local url_ok
    url_ok, url = pcall(function() return self:run_url(id, self:job_url(job_id, out)) end)
    if not url_ok then url = "file://" .. out end
  end
  store:update_flow_run(id, { external_id = job_id, url = url })
  return id, url
end

--- map(name, items [, opts]) -> { job_id, runs = { run ids } }: one run of
-- deployment `name` per item, all in one Slurm job array.  Each run's
-- params are the deployment's, opts.params, and [opts.param or "item"] =
-- the item, index = its position.  opts.concurrency: at most N array tasks
-- at once (`%N`); opts.after/cpus/mem/time/partition/job as for run.
function Slurm:map(name, items, opts)
  opts = opts or {}
  if type(items) ~= "table" or #items == 0 then fail("map: bad argument 'items' (non-empty list expected)") end
  local conc = opts.concurrency
  if conc ~= nil and (math.type(conc) ~= "integer" or conc < 1) then
    fail("map: option 'concurrency' must be a positive integer")
  end
  local store = self:store()
  local d, job = self:prepare(name, opts)
  local base = store_mod.decode(d.params) or {}
  for k, v in pairs(opts.params or {}) do base[k] = v end
  local key = opts.param or "item"
  local api = self:api_url()
  -- the ids, their directories, the runs file and the job are all made
  -- before the runs are recorded: a run is never left PENDING without a job
  local ids = {}
  for i = 1, #items do ids[i] = store_mod.new_id() end
  local spec = { job = job, name = "drover:" .. name, comment = "drover map of " .. #ids .. " runs of deployment " .. name,
    array = "0-" .. (#ids - 1) .. (conc and ("%" .. conc) or ""), dependency = self:dependency(opts.after),
    api = api ~= nil }
  local url_of
  if api then
    -- array task i (0-based) runs the (i+1)th id the script lists
    local quoted = {}
    for i, id in ipairs(ids) do quoted[i] = shell_quote(id) end
    spec.script = self:script(name, job, { pre = { "set -- " .. table.concat(quoted, " "), 'shift "$SLURM_ARRAY_TASK_ID"' },
      run = '"$1"', api = api, array_tokens = true })
    spec.dir = self:node_dir()
    spec.output = spec.dir .. "/drover-slurm-%A_%a.out"
    function url_of(id) return api .. "/runs/" .. id end
  else
    for _, id in ipairs(ids) do fs.mkdir(self:run_dir(id)) end
    local adir = self:staging() .. "/arrays/" .. store_mod.new_id()
    fs.mkdir(adir)
    local wrote, werr = fs.write(adir .. "/runs", table.concat(ids, "\n") .. "\n")
    if not wrote then fail("map: cannot write %s/runs: %s", adir, tostring(werr)) end
    -- array task i (0-based) runs line i+1 of the runs file
    local expr = '$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" ' .. shell_quote(adir .. "/runs") .. ")"
    spec.script = self:script(name, job, { run = expr, redirect = true })
    spec.dir, spec.output = adir, adir .. "/%a.out"
    function url_of() return self:job_url(spec.job_id, adir) end
  end
  store:transaction(function()
    for i, item in ipairs(items) do
      local p = {}
      for k, v in pairs(base) do p[k] = v end
      p[key], p.index = item, i
      store:create_flow_run { id = ids[i], name = name, deployment = name, backend = "slurm", state = states.PENDING,
        params = p, source = { kind = "deployment" } }
    end
  end)
  if api then
    spec.secrets = {}
    store:transaction(function()
      for i, id in ipairs(ids) do spec.secrets["DROVER_RUN_TOKEN_" .. (i - 1)] = run_token.issue(store, id) end
    end)
  end
  local ok, job_id = pcall(self.submit, self, spec)
  if not ok then
    for _, id in ipairs(ids) do store:end_flow_run(id, states.CRASHED, "submit failed: " .. tostring(job_id)) end
    error(job_id, 0)
  end
  spec.job_id = job_id
  store:transaction(function()
    for i, id in ipairs(ids) do
      store:update_flow_run(id, { external_id = job_id .. "_" .. (i - 1), url = url_of(id) })
    end
  end)
  return { job_id = job_id, runs = ids }
end

-- ---- status, logs, list, stop -----------------------------------------------------------

function Slurm:status(run_id)
  local store = self:store()
  local r = self:find_run(run_id)
  r = self:reconcile(r)
  r.task_runs = store:task_runs(r.id)
  return r
end

--- The store's log lines (what the workflow printed, tracked), then the
-- job's output file (Slurm's own messages, a worker that could not start).
function Slurm:logs(run_id, opts)
  local lines = Local.logs(self, run_id, opts)
  local r = self:store():find_flow_run(run_id)
  local out = fs.read(self:run_dir(r.id) .. "/slurm.out")
  if out then
    local seen = {}
    for _, l in ipairs(lines) do seen[l] = true end
    for line in out:gmatch("[^\n]+") do
      if not seen[line] then lines[#lines + 1] = line end -- printed lines are in both
    end
  end
  return lines
end

function Slurm:list(opts)
  local runs = self:store():flow_runs { backend = "slurm", deployment = opts and opts.deployment, limit = 1000 }
  for i, r in ipairs(runs) do
    local ok, fresh = pcall(self.reconcile, self, r)
    if ok then runs[i] = fresh end
  end
  return runs
end

--- Active Slurm jobs named "drover:NAME" (the name drover gives them):
-- { id, state, comment }.  The comment tells whose job it is: "drover run
-- RUN of deployment NAME", "drover map of N runs...", or, for a task with
-- resources, "drover call CALL (task C.m) of run RUN".
function Slurm:jobs_of(name)
  local want = "drover:" .. name
  if self:mode() == "commands" then
    return jobstate.parse_squeue(self:cmd({ "squeue", "-h", "--name=" .. want, "-o", "%A|%T|%k" }))
  end
  return jobstate.active_named(self:rest("GET", "/jobs"), want)
end

--- Cancel job `id`.  soft: SIGTERM to every process of the job, batch
-- shell included, so the worker records CANCELLED itself (as a local
-- worker does); otherwise a hard cancel (SIGKILL, or scancel's
-- TERM-then-KILL).
local GONE = { ["Invalid job id specified"] = true, ["Job/step already completing or completed"] = true,
  ["Requested operation is presently disabled"] = true }
-- slurmctld refuses to signal a job still starting (its batch launch not
-- yet confirmed): "Job can not be altered now, try again later".  How long
-- such a refusal is retried (seconds).
local BUSY_RETRY = 10
function Slurm:cancel_job(id, soft)
  local deadline = drover.now() + BUSY_RETRY
  while true do
    local ok, err
    if self:mode() == "commands" then
      local argv = soft and { "scancel", "--full", "--signal=TERM", id } or { "scancel", id }
      local rok, r = pcall(self.cmd_run, self, argv) -- a job already gone is what was wanted
      ok = not (rok and r.code ~= 0 and ((r.stderr or "") .. (r.stdout or "")):find("try again later", 1, true))
      err = ok or ("scancel " .. id .. ": " .. oneline((r.stderr or "") .. " " .. (r.stdout or "")))
    else
      ok, err = pcall(self.rest, self, "DELETE", "/job/" .. id .. (soft and "?signal=SIGTERM" or ""), nil, GONE)
      if not ok and not tostring(err):find("try again later", 1, true) then error(err, 0) end
    end
    if ok then return end
    if drover.now() >= deadline then fail("cannot cancel job %s: %s", id, oneline(tostring(err))) end
    drover.sleep(0.2)
  end
end

--- Does job `id` (a whole array for an array id; one element for
-- "ARRAY_TASK") still hold or wait for resources?
function Slurm:job_active(id)
  id = tostring(id)
  if id:match("^%d+_%d+$") then
    local ok, info = pcall(self.job_info, self, id)
    return ok and info ~= nil and jobstate.is_active(info.state)
  end
  local ok, recs = pcall(self.job_records, self, id)
  if not ok or not recs then return false end
  for _, rec in ipairs(recs) do
    if jobstate.is_active(rec.state) then return true end
  end
  return false
end

--- The liveness hook (orchestrator.lua): does run `r`'s job still hold or
-- wait for resources (PENDING, RUNNING...) as Slurm sees it?  nil when
-- Slurm cannot be asked, or the run has no job id yet.  The server asks
-- before it ends a run whose worker went silent: a job that waits in the
-- queue, or runs while the server was unreachable, is not a crash.
function Slurm:is_alive(r)
  if not r.external_id then return nil end
  local ok, info = pcall(self.job_info, self, r.external_id)
  if not ok then return nil end
  if not info then return false end
  return jobstate.is_active(info.state)
end

--- The two phases of stop and cancel (Local:cancel_runs, with Slurm jobs
-- instead of worker processes): `runs` (store rows) go CANCELLING
-- (message `asked`); their Slurm `jobs` ({ id, state }) are cancelled --
-- running ones with SIGTERM first, so workers end their flows as CANCELLED
-- themselves; pending ones (and what is left after the grace period) for
-- good; then, once no job is active (or stop_timeout passed), every run
-- ends CANCELLED (message `ended`: slurm job ... cancelled).  Returns the
-- run ids and the job ids.
function Slurm:cancel_with_jobs(runs, jobs, asked, ended)
  local store = self:store()
  for _, r in ipairs(runs) do
    if r.state ~= states.CANCELLING then store:set_flow_state(r.id, states.CANCELLING, asked) end
  end
  local ids = {}
  for _, j in ipairs(jobs) do
    ids[#ids + 1] = j.id
    -- a signal slurmctld kept refusing: the hard cancel below follows
    pcall(self.cancel_job, self, j.id, j.state == "RUNNING")
  end
  local timeout = self.config.stop_timeout or 60
  local grace = drover.now() + math.min(10, timeout)
  local function wait_jobs(deadline)
    for _, j in ipairs(jobs) do
      while self:job_active(j.id) and drover.now() < deadline do drover.sleep(0.1) end
    end
  end
  wait_jobs(grace)
  for _, j in ipairs(jobs) do if self:job_active(j.id) then self:cancel_job(j.id, false) end end
  wait_jobs(drover.now() + timeout)
  local done = {}
  for _, r in ipairs(runs) do
    local why = ended .. ": slurm job " .. tostring(r.external_id) .. " cancelled"
    -- a worker that raced the signal and recorded an end was still cancelled
    if not store:end_flow_run(r.id, states.CANCELLED, why) then self:cancelled_after_all(r.id, why) end
    done[#done + 1] = r.id
  end
  return done, ids
end

--- stop(name): pause the deployment and cancel all its runs: every active
-- Slurm job named "drover:NAME" (runs, arrays, tasks with resources).
function Slurm:stop(name, _opts)
  local runs = self:pause_deployment(name)
  local stopped, ids = self:cancel_with_jobs(runs, self:jobs_of(name), "stop requested", "stopped")
  return { name = name, cancelled = stopped, jobs = ids }
end

--- The active Slurm jobs of run `r`: its own job (for a run of a map, its
-- array element only) and the jobs of its tasks with resources (their comment
-- ends "of run RUN").
function Slurm:jobs_of_run(r)
  local jobs = {}
  if r.external_id then
    local ok, info = pcall(self.job_info, self, r.external_id)
    local st = ok and info and jobstate.name(info.state)
    -- an array element is cancelled (or signalled) as "ARRAY_TASK", by
    -- scancel and slurmrestd alike, never by the array's id: the last
    -- element to start runs under the array's own job id, and signalling
    -- that id would reach every element
    if not ok or jobstate.ACTIVE[st] then jobs[#jobs + 1] = { id = r.external_id, state = st } end
  end
  if r.deployment then
    local tail = " of run " .. r.id
    for _, j in ipairs(self:jobs_of(r.deployment)) do
      if j.comment:sub(-#tail) == tail then jobs[#jobs + 1] = j end
    end
  end
  return jobs
end

--- cancel(run_id): cancel one active run (CANCELLING at once, CANCELLED
-- once its jobs have stopped), leaving its deployment active.  Returns the
-- run's record.
function Slurm:cancel(run_id)
  local r = self:cancellable_run(run_id) -- a job that already ended ends its run first
  self:cancel_with_jobs({ r }, self:jobs_of_run(r), "cancel requested", "cancelled")
  return self:status(r.id)
end


-- ---- tasks as jobs: resources (backends/slurm/calls.lua) ---------------------------------

part("calls").install(Slurm, Local)

return Slurm
