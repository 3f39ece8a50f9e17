--- Run tokens: each run that a worker reports over HTTP gets a token of
-- its own when it is submitted.  The worker gets the token (in its
-- environment, never on a command line); the store keeps only its SHA-256
-- digest, so a copy of the store lets nobody write to a run.
local fs = require "drover.fs"

local M = {}

--- 32 random bytes from /dev/urandom, as 64 hex digits.
function M.new()
  local f = assert(io.open("/dev/urandom", "rb"))
  local bytes = f:read(32)
  f:close()
  return (bytes:gsub(".", function(c) return string.format("%02x", c:byte()) end))
end

function M.digest(token) return fs.sha256_string(token) end

--- A new token for run `run_id`, its digest kept in `store`.
function M.issue(store, run_id)
  local token = M.new()
  store:set_run_token(run_id, M.digest(token))
  return token
end

return M
