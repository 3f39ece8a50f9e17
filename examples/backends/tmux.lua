--- The `tmux` backend: a complete small drover backend, the worked example
-- of docs/backends.md.  Each run is a detached tmux session, named after
-- the deployment and the run, in which `drover worker RUN_ID` runs the
-- workflow; `tmux -L drover attach -t SESSION` shows it live.
--
--   package  the local backend's bundle (a deterministic tar + manifest:
--            the format `drover worker` unpacks), borrowed as is
--   deploy   a deployment row in the store, backend "tmux"
--   run      a flow run row, then `tmux new-session -d` running the worker
--   stop     TERM to the worker (it cancels its flow run and ends its
--            children), then kill-session; the run ends CANCELLED
--   status, logs, list   read the store; a run whose session vanished
--            without recording an end becomes CRASHED
--
-- Load it with DROVER_PATH=/path/to/examples/backends; check it with
--   DROVER_PATH=$PWD/examples/backends tests/conformance/run.sh tmux
local drover = require "drover"
local states = require "drover.states"
local store_mod = require "drover.store"
local orchestrator = require "drover.orchestrator"

local Tmux = drover.BaseOrchestrator:extend("tmux")
Tmux.backend_name = "tmux"
Tmux.config_keys = {
  socket = "string",       -- tmux server socket name (tmux -L); default "drover"
  drover_bin = "string",   -- the drover binary the sessions run (default: found as local does)
  stop_timeout = "number", -- seconds stop waits for a worker before killing its session
}

-- The bundle format and the worker are the local backend's; reuse them.
local Local = orchestrator.backend_class("local")
Tmux.package = Local.package
Tmux.drover_bin = Local.drover_bin

--- Run `tmux -L SOCKET args...`; its stdout, or raise with tmux's error.
-- A tmux server exits when its last session ends; a command that reaches
-- it in that moment fails with "server exited unexpectedly", and the next
-- attempt starts a fresh server: so that one error is retried.
function Tmux:tmux(...)
  local argv = { "tmux", "-L", self.config.socket or "drover", ... }
  local out, err
  for attempt = 1, 20 do
    out, err = drover.proc.output(argv, { stdin = "" })
    if out or not tostring(err):find("server exited unexpectedly", 1, true) then break end
    drover.sleep(0.01 * attempt)
  end
  if not out then error("tmux backend: " .. tostring(err), 0) end
  return out
end

--- Does session NAME exist?  (has-session exits 1 when it does not, or
-- when no server runs at all.)
function Tmux:has_session(name)
  local r = drover.proc.run({ "tmux", "-L", self.config.socket or "drover", "has-session", "-t", "=" .. name },
    { stdin = "", stdout = "capture", stderr = "capture" })
  return r ~= nil and r.code == 0
end

-- tmux reserves '.' and ':' in target names.
local function session_name(deployment, run_id)
  return ("drover-" .. deployment .. "-" .. run_id):gsub("[.:]", "_")
end

function Tmux:deploy(name, opts)
  opts = opts or {}
  if type(name) ~= "string" or not name:match("^[%w_%.%-]+$") then
    error("tmux.deploy: bad deployment name '" .. tostring(name) .. "' (letters, digits, _ . - only)", 2)
  end
  local store = self:store()
  local p = opts.package and store:package(opts.package)
  if not p then error("tmux.deploy: unknown package '" .. tostring(opts.package) .. "'", 2) end
  local ok, err = store:put_deployment({ name = name, backend = "tmux", package_id = p.id,
    params = opts.params }, opts.replace)
  if not ok then error(err, 0) end
  return { name = name, package = p.id }
end

function Tmux:run(name, params)
  if params ~= nil and type(params) ~= "table" then
    error("tmux.run: bad argument 'params' (table expected, got " .. type(params) .. ")", 2)
  end
  local store = self:store()
  local d = store:deployment(name)
  if not d then error("unknown deployment '" .. tostring(name) .. "'", 0) end
  if d.paused == 1 then error("deployment '" .. name .. "' is stopped; deploy it again to run it", 0) end
  local merged = store_mod.decode(d.params) or {}
  for k, v in pairs(params or {}) do merged[k] = v end
  local id = store_mod.new_id()
  local session = session_name(name, id)
  local url = "tmux://" .. (self.config.socket or "drover") .. "/" .. session
  store:create_flow_run { id = id, name = name, deployment = name, backend = "tmux",
    state = states.PENDING, params = merged, source = { kind = "deployment" }, url = url }
  -- argv after the session options is run as is (no shell); -P -F prints the worker's pid
  local ok, out = pcall(self.tmux, self, "new-session", "-d", "-s", session, "-P", "-F", "#{pane_pid}",
    "env", "DROVER_HOME=" .. store.home, self:drover_bin(), "worker", id)
  if not ok then
    store:set_flow_state(id, states.CRASHED, "session did not start: " .. tostring(out))
    error(out, 0)
  end
  store:update_flow_run(id, { pid = math.tointeger(tonumber(out:match("%d+"))) })
  return id, url
end

--- A run still marked active whose session is gone died without
-- recording its end: mark it CRASHED.
function Tmux:reap(run)
  if run and states.active[run.state] and run.backend == "tmux"
      and not self:has_session(session_name(run.deployment, run.id)) then
    local store = self:store()
    if states.active[store:flow_run(run.id).state] then
      store:set_flow_state(run.id, states.CRASHED, "tmux session ended")
    end
    return store:flow_run(run.id)
  end
  return run
end

function Tmux:status(run_id)
  local store = self:store()
  local r = store:find_flow_run(run_id)
  if not r then error("unknown run '" .. tostring(run_id) .. "'", 0) end
  r = self:reap(r)
  r.task_runs = store:task_runs(r.id)
  return r
end

function Tmux:logs(run_id, opts)
  local store = self:store()
  local r = store:find_flow_run(run_id)
  if not r then error("unknown run '" .. tostring(run_id) .. "'", 0) end
  local lines = {}
  for _, l in ipairs(store:logs(r.id, opts and opts.after or 0)) do lines[#lines + 1] = l.line end
  return lines
end

function Tmux:list(opts)
  local runs = self:store():flow_runs { backend = "tmux", deployment = opts and opts.deployment, limit = 1000 }
  for i, r in ipairs(runs) do runs[i] = self:reap(r) end
  return runs
end

function Tmux:stop(name, opts)
  local store = self:store()
  if not store:deployment(name) then error("unknown deployment '" .. tostring(name) .. "'", 0) end
  store:set_paused(name, true)
  local runs = store:flow_runs { deployment = name, active = true, limit = 100000 }
  local stopped = {}
  for _, r in ipairs(runs) do
    store:set_flow_state(r.id, states.CANCELLING, "stop requested")
    -- the pane's process leads its own process group: TERM lets the worker
    -- cancel its flow run, which ends the process groups it started
    if r.pid then drover.kill(-math.tointeger(r.pid), "TERM") end
  end
  for _, r in ipairs(runs) do
    local session = session_name(name, r.id)
    local deadline = drover.now() + (self.config.stop_timeout or 20)
    while self:has_session(session) and drover.now() < deadline do drover.sleep(0.05) end
    if self:has_session(session) then pcall(self.tmux, self, "kill-session", "-t", "=" .. session) end
    store:set_flow_state(r.id, states.CANCELLED, "stopped")
    stopped[#stopped + 1] = r.id
  end
  return { name = name, cancelled = stopped }
end

return Tmux
