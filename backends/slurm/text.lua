--- Text helpers of the slurm backend: its one-line errors and the quoting
-- of words in the batch scripts it writes.
local M = {}

function M.trim(s) return (s:gsub("^%s+", ""):gsub("%s+$", "")) end

--- Raise one line, "slurm: ..." (no position: it is meant for the user).
function M.fail(fmt, ...) error("slurm: " .. string.format(fmt, ...), 0) end

--- Text from outside (a response body, a command's output) fit for a
-- one-line error: whitespace collapsed, cut to about 200 characters.
function M.oneline(s)
  s = M.trim(tostring(s or ""):gsub("%s+", " "))
  if #s > 200 then s = s:sub(1, 200) .. "..." end
  return s
end

--- One word for sh, whatever it holds.
function M.shell_quote(s) return "'" .. tostring(s):gsub("'", "'\\''") .. "'" end

return M
