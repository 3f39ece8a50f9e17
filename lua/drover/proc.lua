--- drover.proc: child processes, shaped like Neovim's vim.system.
--
--   local r = drover.proc.run({ "git", "status", "--short" }, { cwd = dir, timeout = 30 })
--   -- r.code, r.signal, r.stdout, r.stderr, r.timed_out, r.duration
--
--   local p = drover.proc.spawn({ "sort" }, { stdin = true })
--   p:write("b\na\n"); p:close()
--   local r = p:wait()
--
-- argv[1] is looked up in PATH; nothing goes through a shell.  A program
-- that cannot be started returns nil, message.  Every child leads its own
-- process group, and kills, timeouts and cancels reach the whole group.
-- The work is done by drover.core (engine/src/proc.c).
local core = require "drover.core"

local M = {
  run = core.proc.run,
  spawn = core.proc.spawn,
}

--- Run argv and return its stdout if it exits with code 0; otherwise
-- nil and a message naming the program, the exit status and the end of
-- its stderr.  opts as for run (stdout is always captured).
function M.output(argv, opts)
  if type(opts) ~= "nil" and type(opts) ~= "table" then
    error("drover.proc.output: bad argument 'opts' (table expected, got " .. type(opts) .. ")", 2)
  end
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.stdout = "capture"
  if o.stderr == nil then o.stderr = "capture" end
  local r, err = core.proc.run(argv, o)
  if not r then return nil, err end
  if r.code == 0 then return r.stdout end
  local how = r.timed_out and "timed out" or r.signal ~= 0 and ("killed by signal " .. r.signal)
    or ("exited with code " .. r.code)
  local tail = r.stderr or ""
  if #tail > 2000 then tail = "..." .. tail:sub(-2000) end
  tail = tail:gsub("%s+$", "")
  return nil, string.format("'%s' %s%s", tostring(argv[1]), how, tail ~= "" and (": " .. tail) or ""), r
end

return M
