--- The `tmux` backend: a complete small drover backend, the worked example
-- of docs/backends.md.  Each run is a detached tmux session, named after
-- the deployment and the run, in which `drover worker RUN_ID` runs the
-- workflow; `tmux -L drover attach -t SESSION` shows it live.
--
-- It extends BaseOrchestrator, so it inherits what does not depend on
-- where the worker runs (drover/orchestrator/bundle.lua and runs.lua):
--   package        the bundle `drover worker` unpacks (a deterministic tar
--                  + manifest)
--   deploy         a deployment row with backend "tmux" (self.backend_name)
--                  that keeps the config (socket, tmpdir) for later
--                  commands and the daemon
--   status, logs, list, resume
--                  the store's records; status and list call self:reap,
--                  which is this file's
--   stop, cancel   two phases over the three hooks below
--   create_run, drover_bin, find_run, runnable_deployment
--                  helpers for run
-- and implements:
--   run      a flow run row (create_run), then `tmux new-session -d`
--            running the worker
--   reap     a run still active whose session is gone becomes CRASHED
--   interrupt, is_alive, kill_run
--            how stop and cancel reach a run: TERM to the worker (it
--            cancels its flow run and ends its children), "is its session
--            there?", kill-session
--
-- Load it with DROVER_PATH=/path/to/examples/backends; check it with
--   DROVER_PATH=$PWD/examples/backends tests/conformance/run.sh tmux
local drover = require "drover"
local fs = require "drover.fs"
local states = require "drover.states"

local Tmux = drover.BaseOrchestrator:extend("tmux")
Tmux.backend_name = "tmux"
Tmux.config_keys = {
  socket = "string",       -- tmux server socket name (tmux -L); default "drover"
  tmpdir = "string",       -- where tmux keeps its sockets (TMUX_TMPDIR); default: TMUX_TMPDIR, else /tmp
  drover_bin = "string",   -- the drover binary the sessions run (default: found as local does)
  stop_timeout = { "number", min = 0 }, -- seconds stop waits for a worker before killing its session
}

function Tmux:socket() return self.config.socket or "drover" end

function Tmux:tmpdir()
  local env = os.getenv("TMUX_TMPDIR")
  return self.config.tmpdir or (env and env ~= "" and env) or "/tmp"
end

--- The config a deployment keeps: with the socket directory as resolved
-- here, so that a daemon or a `drover status` with another TMUX_TMPDIR
-- still finds this server (and does not take its sessions for gone).
function Tmux:saved_config()
  local out = drover.BaseOrchestrator.saved_config(self) or {}
  out.tmpdir = self:tmpdir()
  return out
end

--- Run `tmux -L SOCKET args...` (never the user's server: our socket, our
-- socket directory); the result of drover.proc.run, or raise.
function Tmux:tmux_run(...)
  -- tmux quietly falls back to /tmp when TMUX_TMPDIR does not exist: the
  -- wrong server would then answer "no such session"
  local st = fs.stat(self:tmpdir())
  if not (st and st.type == "directory") then
    error("tmux backend: the tmux socket directory " .. self:tmpdir() .. " does not exist " ..
      "(config key tmpdir, or TMUX_TMPDIR)", 0)
  end
  local r, err = drover.proc.run({ "tmux", "-L", self:socket(), ... }, { stdin = "",
    stdout = "capture", stderr = "capture", env = { TMUX_TMPDIR = self:tmpdir(), TMUX = false } })
  if not r then error("tmux backend: cannot run tmux: " .. tostring(err), 0) end
  return r
end

--- tmux's stderr as one line for an error message.
local function one_line(s)
  s = tostring(s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  return #s > 200 and (s:sub(1, 197) .. "...") or s
end

--- `tmux ARGS...`; its stdout, or raise with tmux's error.
-- A tmux server exits when its last session ends; a command that reaches
-- it in that moment fails with "server exited unexpectedly", and the next
-- attempt starts a fresh server: so that one error is retried.
function Tmux:tmux(...)
  local r
  for attempt = 1, 20 do
    r = self:tmux_run(...)
    if r.code == 0 or not (r.stderr or ""):find("server exited unexpectedly", 1, true) then break end
    drover.sleep(0.01 * attempt)
  end
  if r.code ~= 0 then error("tmux backend: tmux " .. (...) .. ": " .. one_line(r.stderr), 0) end
  return r.stdout
end

--- Does session NAME exist?  Only tmux's own "no such session" answers
-- (exit 1 with "can't find session" or "no server running") mean no;
-- anything else -- tmux missing, a socket directory that does not exist
-- (tmux_run), a socket file missing -- raises, so that nobody marks a live run CRASHED
-- because it looked in the wrong place.
function Tmux:has_session(name)
  local r = self:tmux_run("has-session", "-t", "=" .. name)
  if r.code == 0 then return true end
  local err = r.stderr or ""
  if r.code == 1 and (err:find("can't find session", 1, true) or err:find("no server running", 1, true)) then
    return false
  end
  error("tmux backend: cannot tell whether session " .. name .. " exists (tmux -L " .. self:socket() ..
    ", TMUX_TMPDIR " .. self:tmpdir() .. "): " .. one_line(err), 0)
end

-- tmux reserves '.' and ':' in target names.
local function session_name(deployment, run_id)
  return ("drover-" .. deployment .. "-" .. run_id):gsub("[.:]", "_")
end

function Tmux:run(name, params, opts)
  -- the run's row first (PENDING), so that status works from the first moment
  local session
  local id, url = self:create_run(name, params, opts, function(id)
    session = session_name(name, id)
    return "tmux://" .. self:socket() .. "/" .. session
  end)
  local store = self:store()
  -- argv after the session options is run as is (no shell); -P -F prints the worker's pid.
  -- The worker loads this backend to run the flow's calls: it needs DROVER_PATH too
  -- (a session gets the tmux server's environment, not ours).
  local ok, out = pcall(self.tmux, self, "new-session", "-d", "-s", session, "-P", "-F", "#{pane_pid}",
    "env", "DROVER_HOME=" .. store.home, "DROVER_PATH=" .. (os.getenv("DROVER_PATH") or ""),
    self:drover_bin(), "worker", id)
  if not ok then
    store:end_flow_run(id, states.CRASHED, "session did not start: " .. tostring(out))
    error(out, 0)
  end
  store:update_flow_run(id, { pid = math.tointeger(tonumber(out:match("%d+"))) })
  return id, url
end

--- A run still marked active whose session is gone died without
-- recording its end: CRASHED.  (The inherited status and list call this.)
function Tmux:reap(run)
  if run and states.active[run.state] and not self:has_session(session_name(run.deployment, run.id)) then
    local store = self:store()
    store:end_flow_run(run.id, states.CRASHED, "tmux session ended") -- keeps an end already recorded
    return store:flow_run(run.id)
  end
  return run
end

-- stop and cancel are inherited (two-phase, over these three): TERM to the
-- pane's process, which leads its own process group, lets the worker cancel
-- its flow run and end the groups it started; the run's work is alive while
-- its session is; kill-session when it will not end.
function Tmux:interrupt(r) if r.pid then drover.kill(-math.tointeger(r.pid), "TERM") end end
function Tmux:is_alive(r) return self:has_session(session_name(r.deployment, r.id)) end
function Tmux:kill_run(r) pcall(self.tmux, self, "kill-session", "-t", "=" .. session_name(r.deployment, r.id)) end

return Tmux
