--- Job templates of the slurm backend: what a deployment, a run or a task
-- with resources asks Slurm for (partition, nodes, cpus_per_task, mem,
-- time, account, qos, extra sbatch options, environment, raw REST keys),
-- checked key by key and merged later-wins.
local here = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
local text = assert(loadfile(here .. "/text.lua"))()
local fail = text.fail

local M = {}

--- Minutes from a time limit: integer minutes, or "MM", "HH:MM:SS", "D-HH[:MM[:SS]]".
function M.minutes(t)
  if math.type(t) == "integer" then return t end
  if type(t) ~= "string" then return nil end
  local d, rest = t:match("^(%d+)%-(.+)$")
  rest = rest or t
  local p = {}
  for n in rest:gmatch("[^:]+") do p[#p + 1] = tonumber(n) end
  if #p == 0 or #p > 3 then return nil end
  for _, n in ipairs(p) do if not n then return nil end end
  local h, m, s
  if d then h, m, s = p[1], p[2] or 0, p[3] or 0
  elseif #p == 1 then h, m, s = 0, p[1], 0
  elseif #p == 2 then h, m, s = 0, p[1], p[2]
  else h, m, s = p[1], p[2], p[3] end
  return math.tointeger((tonumber(d) or 0) * 1440 + h * 60 + m + math.ceil(s / 60))
end

--- Megabytes from a memory size: integer MB, or "500M", "4G", "1T".
function M.megabytes(m)
  if math.type(m) == "integer" then return m end
  if type(m) ~= "string" then return nil end
  local n, unit = m:match("^(%d+)([KMGTkmgt]?)$")
  if not n then return nil end
  local f = ({ k = 1 / 1024, m = 1, g = 1024, t = 1024 * 1024, [""] = 1 })[unit:lower()]
  return math.tointeger(math.ceil(tonumber(n) * f))
end

-- The job template's keys and how each is checked.
local KEYS = {
  partition = "string", nodes = "integer", cpus_per_task = "integer", mem = "mem", time = "time",
  account = "string", qos = "string", sbatch = "list", environment = "table", rest = "table",
}

--- Template `t` checked (nil: an empty one); raises one line naming
-- `where` and the bad key or value.
function M.check(t, where)
  if t == nil then return {} end
  if type(t) ~= "table" then fail("%s: job template must be a table, got %s", where, type(t)) end
  for k, v in pairs(t) do
    local want = KEYS[k]
    if not want then fail("%s: unknown job template key '%s'", where, tostring(k)) end
    local ok = (want == "string" and type(v) == "string")
      or (want == "integer" and math.type(v) == "integer" and v > 0)
      or (want == "mem" and M.megabytes(v) ~= nil)
      or (want == "time" and M.minutes(v) ~= nil)
      or (want == "table" and type(v) == "table")
      or (want == "list" and type(v) == "table")
    if not ok then fail("%s: bad job template value for '%s': %s", where, k, tostring(v)) end
  end
  if t.partition and not t.partition:match("^[%w_%.%-]+$") then
    fail("%s: bad partition name '%s'", where, t.partition)
  end
  for _, o in ipairs(t.sbatch or {}) do
    if type(o) ~= "string" or not o:match("^%-") then fail("%s: bad sbatch option '%s' (e.g. '--exclusive')", where, tostring(o)) end
  end
  return t
end

--- Merge job templates, later ones winning (environment merged key by key).
function M.merge(...)
  local out, env, sb, rest = {}, {}, {}, {}
  for i = 1, select("#", ...) do
    local t = select(i, ...)
    for k, v in pairs(t or {}) do
      if k == "environment" then for ek, ev in pairs(v) do env[ek] = ev end
      elseif k == "sbatch" then for _, o in ipairs(v) do sb[#sb + 1] = o end
      elseif k == "rest" then for rk, rv in pairs(v) do rest[rk] = rv end
      else out[k] = v end
    end
  end
  out.environment, out.sbatch, out.rest = env, sb, rest
  return out
end

return M
