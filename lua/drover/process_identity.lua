--- Which process a stored pid names: the pid plus the process's start time.
--
-- A run recorded with only a pid (a `drover exec`, which is not a worker
-- the local backend started) cannot be told from a later process that got
-- the same pid once the first one is gone, so the reaper would keep it
-- RUNNING and a cancel would signal a stranger.  The start time
-- (/proc/PID/stat, clock ticks since boot) does not repeat for a pid, so
-- "proc:PID:START" names one process for good.  Where /proc is missing the
-- tag is nil and callers fall back to the pid alone.
local drover_core = require "drover.core"
local fs = require "drover.fs"

local M = {}

--- /proc/PID/stat of `pid`: { state = "R"|"S"|"Z"|..., ppid = n, pgrp = n, start = n },
-- or nil when there is no such process (or no /proc).
function M.stat(pid)
  local f = io.open("/proc/" .. math.tointeger(pid) .. "/stat", "r")
  if not f then return nil end
  local text = f:read("a")
  f:close()
  -- the command name (field 2) is in parentheses and may hold anything:
  -- the fields that follow start after the last ')'
  local rest = text and text:match("^.*%)%s+(.*)$")
  if not rest then return nil end
  local fields = {}
  for w in rest:gmatch("%S+") do fields[#fields + 1] = w end
  -- rest starts at field 3 (state): ppid is field 4, pgrp field 5, starttime field 22
  local ppid, pgrp, start = math.tointeger(tonumber(fields[2])), math.tointeger(tonumber(fields[3])),
    math.tointeger(tonumber(fields[20]))
  if not (ppid and pgrp and start) then return nil end
  return { state = fields[1], ppid = ppid, pgrp = pgrp, start = start }
end

--- "proc:PID:START" for process `pid`, or nil when it cannot be read.
function M.tag(pid)
  local s = M.stat(pid)
  return s and string.format("proc:%d:%d", pid, s.start) or nil
end

--- The pid and start time in `tag`, or nil when it is not a process tag.
function M.parse(tag)
  local pid, start = tostring(tag or ""):match("^proc:(%d+):(%d+)$")
  if not pid then return nil end
  return math.tointeger(tonumber(pid)), math.tointeger(tonumber(start))
end

--- This machine's identity for stored pids: the kernel's boot id (one per
-- boot of one host; containers share their host's), else the hostname.
-- A pid means something only where it was recorded: a store shared by
-- servers on several hosts (PostgreSQL) keeps this next to it.
local host
function M.host()
  if host then return host end
  local f = io.open("/proc/sys/kernel/random/boot_id", "r")
  host = f and f:read("l")
  if f then f:close() end
  if not host or host == "" then
    f = io.open("/etc/hostname", "r")
    host = f and f:read("l") or "unknown"
    if f then f:close() end
  end
  return host
end

--- Is the process `tag` names still running?  A zombie (dead, not yet
-- waited for) counts as gone, and so does another process with its pid.
function M.alive(tag)
  local pid, start = M.parse(tag)
  if not pid then return false end
  local s = M.stat(pid)
  if s then return s.start == start and s.state ~= "Z" and s.state ~= "X" end
  if M.stat(drover_core.pid()) then return false end -- /proc works: the process is gone
  -- no /proc here: the pid alone is all there is to go on
  return drover_core.kill(pid, 0) == true
end

--- Every process on this host as { [ppid] = { {pid, pgrp}, ... } }, from
-- /proc (empty where there is none).
local function children_by_parent()
  local by = {}
  for _, name in ipairs(fs.list("/proc") or {}) do
    local pid = name:match("^%d+$") and math.tointeger(tonumber(name))
    local s = pid and M.stat(pid)
    if s then
      local list = by[s.ppid] or {}
      by[s.ppid] = list
      list[#list + 1] = { pid, s.pgrp }
    end
  end
  return by
end

--- The process groups of `root`'s descendants other than `root`'s own.
local function descendant_groups(root)
  local by, groups, seen, queue = children_by_parent(), {}, { [root] = true }, { root }
  local i = 1
  while queue[i] do
    for _, c in ipairs(by[queue[i]] or {}) do
      queue[#queue + 1] = c[1]
      if c[2] and not seen[c[2]] then
        seen[c[2]] = true
        groups[#groups + 1] = c[2]
      end
    end
    i = i + 1
  end
  return groups
end

--- KILL process group `pid` (a worker: its leader) and every process group
-- its processes started.  Each process a
-- worker starts (drover.proc) leads a process group of its own, in a new
-- session, so KILL to the worker's group alone would leave them running,
-- orphaned, after the run was recorded CANCELLED: its TERM handler, which
-- ends them, is what KILL cuts short.  The worker's group, then each group
-- found under it, is stopped first, so none starts another group while
-- the tree is read; a stopped process still dies of KILL.
function M.kill_group_tree(pid)
  -- only the leader of group `pid` is the worker (drover.proc made it one):
  -- a pid reused by some other process must not have its tree walked
  local s = M.stat(pid)
  if not (s and s.pgrp == pid) then
    drover_core.kill(-pid, "KILL")
    return
  end
  drover_core.kill(-pid, "STOP")
  local groups, seen = {}, {}
  for _ = 1, 20 do -- rounds until no new group shows up (each round stops what it found)
    local found = false
    for _, g in ipairs(descendant_groups(pid)) do
      if not seen[g] then
        seen[g], found = true, true
        groups[#groups + 1] = g
        drover_core.kill(-g, "STOP")
      end
    end
    if not found then break end
  end
  for _, g in ipairs(groups) do drover_core.kill(-g, "KILL") end
  drover_core.kill(-pid, "KILL")
end

return M
