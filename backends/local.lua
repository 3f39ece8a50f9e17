--- The `local` backend: drover's embedded default.  Runs each flow run in a
-- detached, supervised worker process on this machine, tracked in the
-- store under DROVER_HOME.
--
-- From BaseOrchestrator it inherits what does not depend on where the
-- worker runs (drover/orchestrator/bundle.lua and runs.lua): package (the
-- bundle), deploy, status, logs, list, resume, and stop and cancel (two
-- phases over the hooks below).  Its own:
--
--   run      a worker process (`drover worker RUN_ID`) in its own process
--            group, outliving the terminal; returns id, url.  The worker
--            reports to the daemon serving the store when one does (the
--            CLI's `drover run` starts one), else writes the store itself
--   reap     a run still active whose worker died becomes CRASHED
--   interrupt, is_alive, kill_run
--            TERM to the worker's process group, "is it there?", KILL to
--            it and to every process group it started (process_identity.kill_group_tree)
local drover = require "drover"
local fs = require "drover.fs"
local states = require "drover.states"
local process_identity = require "drover.process_identity"

local Local = drover.BaseOrchestrator:extend("local")
Local.backend_name = "local"
Local.config_keys = {
  drover_bin = "string",   -- the drover binary workers run (default: found automatically)
  stop_timeout = { "number", min = 0 }, -- seconds stop waits for a worker to end before SIGKILL
  -- resource limits of the worker and every process it starts (rlimits,
  -- set by prlimit(1) before the worker starts): unset means inherited
  max_memory = { "integer", min = 64 * 1024 * 1024 }, -- bytes of address space (RLIMIT_AS), each process
  max_open_files = { "integer", min = 16 },           -- file descriptors (RLIMIT_NOFILE), each process
  max_processes = { "integer", min = 1 },             -- processes of the user (RLIMIT_NPROC; root is exempt)
}

--- The argv prefix that applies the deployment's resource limits, or {}.
function Local:limits_prefix()
  local c, argv = self.config, {}
  for key, flag in pairs { max_memory = "--as", max_open_files = "--nofile", max_processes = "--nproc" } do
    if c[key] then argv[#argv + 1] = flag .. "=" .. math.tointeger(c[key]) end
  end
  if #argv == 0 then return argv end
  table.sort(argv)
  table.insert(argv, 1, "prlimit")
  argv[#argv + 1] = "--"
  return argv
end

-- ---- run -------------------------------------------------------------------------------

function Local:run(name, params, opts)
  -- a daemon serves the store: the worker reports to it over HTTP (the
  -- same path as a worker on another host), with a token of its own run
  local api, why, ca_file = self:daemon_url()
  local id, url = self:create_run(name, params, opts, function(id) return self:run_url(id, api) end)
  local store = self:store()
  local dir = store.home .. "/runs/" .. id
  fs.mkdir(dir)
  fs.mkdir(self:spool_dir(id))
  local argv, env = self:limits_prefix(), { DROVER_HOME = store.home }
  for _, a in ipairs { self:drover_bin(), "worker", id } do argv[#argv + 1] = a end
  if api then
    argv[#argv + 1] = "--api"
    argv[#argv + 1] = api
    env = { DROVER_HOME = false, DROVER_RUN_TOKEN = require("drover.run_token").issue(store, id),
      DROVER_SPOOL_DIR = self:spool_dir(id), DROVER_CA_FILE = ca_file }
  elseif why ~= "DROVER_DAEMON=0" then -- (asked for: nothing to explain)
    store:log(id, nil, "info", "the worker writes the store directly: " .. why)
  end
  local proc, err = drover.proc.spawn(argv, {
    detach = true, stdin = "", stdout = dir .. "/worker.log", stderr = dir .. "/worker.log", env = env,
  })
  if not proc then
    store:end_flow_run(id, states.CRASHED, "worker did not start: " .. tostring(err))
    error("local.run: " .. tostring(err), 0)
  end
  store:update_flow_run(id, { pid = proc.pid, host = process_identity.host() })
  return id, url
end

-- ---- the reaper and the cancel hooks ------------------------------------------------------

-- Runs of `drover exec` are the local backend's too: the exec records its
-- own process as "proc:PID:START" (drover.process_identity) in
-- external_id.  That is one process, not a process group (it shares its
-- terminal's), and not whichever process later gets the same pid.
local function exec_process(r)
  return process_identity.parse(r.external_id) and r.external_id or nil
end

--- Is the process running `r` (its worker, or its `drover exec`) alive?
local function process_alive(r)
  local tag = exec_process(r)
  if tag then return process_identity.alive(tag) end
  return drover.kill(math.tointeger(r.pid), 0) == true
end

--- A run whose worker (or `drover exec` process) died without recording
-- an end becomes CRASHED, and its task runs with it.
--- Where run `id`'s worker keeps the events it could not deliver.
function Local:spool_dir(id) return self:store().home .. "/runs/" .. id .. "/spool" end

--- A worker that gave up delivering (the server was down past its
-- delivery timeout) finished its flow and left its events in its spool,
-- on this host: apply them to the store as the server would have, so the
-- run ends as it really did instead of CRASHED.  A spool that cannot be
-- applied is kept (and said in the run's log) for `drover replay`.
function Local:recover_spool(run)
  local store = self:store()
  for _, name in ipairs(fs.list(self:spool_dir(run.id)) or {}) do
    if name:match("%.events$") then
      local path = self:spool_dir(run.id) .. "/" .. name
      local n, err = require("drover.replay").into_store(store, path)
      if n then
        store:log(run.id, nil, "info", "recovered " .. n .. " event(s) the worker could not deliver, from " .. path)
      else
        store:log(run.id, nil, "error", "could not recover the worker's undelivered events: " .. tostring(err))
      end
    end
  end
end

--- Is `r`'s process one of this host's (a store shared by servers on
-- several hosts holds runs whose pids mean nothing here)?
local function here(r) return r.host == nil or r.host == process_identity.host() end

function Local:reap(run)
  -- another host's run is its own server's to reap
  if run and states.active[run.state] and run.pid and here(run) and not process_alive(run) then
    local store = self:store()
    self:recover_spool(run)
    if states.active[store:flow_run(run.id).state] then -- its own end, recorded meanwhile, stands
      store:end_flow_run(run.id, states.CRASHED,
        (exec_process(run) and "drover exec process " or "worker process ") .. run.pid .. " died")
    end
    return store:flow_run(run.id)
  end
  return run
end

--- How stop and cancel reach a run's work: TERM to the worker's process
-- group lets it cancel its flow run and end the groups it started; KILL,
-- when it will not end, goes to those groups too (kill_group_tree).  A
-- `drover exec` gets them on its one process (on TERM it cancels its flow
-- run), and only while it is the one recorded.
local function signal_run(r, sig)
  if not r.pid or not here(r) then return end -- never a stranger with another host's pid
  local pid = math.tointeger(r.pid)
  if not exec_process(r) then
    if sig == "KILL" then process_identity.kill_group_tree(pid) else drover.kill(-pid, sig) end
  elseif process_identity.alive(r.external_id) then
    drover.kill(pid, sig)
  end
end
function Local:interrupt(r) signal_run(r, "TERM") end
function Local:kill_run(r) signal_run(r, "KILL") end
function Local:is_alive(r)
  if r.pid == nil then return false end
  -- another host's process: nothing here shows it alive (its heartbeats,
  -- when it reports over HTTP, are what keep it from being CRASHED)
  if not here(r) then return false end
  if exec_process(r) then return process_identity.alive(r.external_id) end
  return drover.kill(-math.tointeger(r.pid), 0) == true
end

return Local
