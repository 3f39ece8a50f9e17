--- The `nohup` backend: the smallest complete drover backend, the second
-- example of docs/backends.md.  Each run is `drover worker RUN_ID` started
-- detached on this machine, as `nohup drover worker RUN_ID &` would, and
-- writing the store itself; its output goes to a file, the run's URL.
--
-- Everything but where the worker runs is BaseOrchestrator's: package,
-- deploy, status, logs, list, resume, stop and cancel.  This file adds
-- `run`, `reap` and the three hooks stop and cancel reach a run through.
--
--   DROVER_PATH=$PWD/examples/backends tests/conformance/run.sh nohup
local drover = require "drover"
local states = require "drover.states"

local Nohup = drover.BaseOrchestrator:extend("nohup")
Nohup.backend_name = "nohup"
Nohup.config_keys = {
  outdir = "string",                    -- where workers' output goes (default: DROVER_HOME/nohup)
  stop_timeout = { "number", min = 0 }, -- seconds stop and cancel wait before kill_run
}

function Nohup:outdir() return self.config.outdir or (self:store().home .. "/nohup") end

function Nohup:run(name, params, opts)
  local out = self:outdir()
  -- the run's row (PENDING) first: from here on, a failure must end the run
  local id, url = self:create_run(name, params, opts, function(id) return "file://" .. out .. "/" .. id .. ".out" end)
  local store = self:store()
  drover.fs.mkdir(out)
  local proc, err = drover.proc.spawn({ self:drover_bin(), "worker", id }, { detach = true, stdin = "",
    stdout = out .. "/" .. id .. ".out", stderr = out .. "/" .. id .. ".out", env = { DROVER_HOME = store.home } })
  if not proc then
    store:end_flow_run(id, states.CRASHED, "worker did not start: " .. tostring(err))
    error("nohup.run: " .. tostring(err), 0)
  end
  store:update_flow_run(id, { pid = proc.pid })
  return id, url
end

--- The worker is the run's work: TERM asks it to cancel its flow (it ends
-- the processes it started, and records CANCELLED); it is alive while its
-- pid is; KILL ends it and every process group it started (each process
-- a worker starts leads a group of its own).
function Nohup:interrupt(r) drover.kill(math.tointeger(r.pid), "TERM") end
function Nohup:is_alive(r) return drover.kill(math.tointeger(r.pid), 0) == true end
function Nohup:kill_run(r) require("drover.process_identity").kill_group_tree(math.tointeger(r.pid)) end

--- A run still active whose worker is gone died without recording its
-- end: CRASHED (an end the worker recorded meanwhile is kept).
function Nohup:reap(r)
  if states.active[r.state] and r.pid and not self:is_alive(r) then
    self:store():end_flow_run(r.id, states.CRASHED, "worker " .. r.pid .. " is gone")
    return self:store():flow_run(r.id)
  end
  return r
end

return Nohup
