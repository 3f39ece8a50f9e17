--- The API v1 endpoints for clients (people and programs with the
-- server's token, or anyone on loopback): what `drover --api URL ...`
-- uses to package, deploy, run and watch against a remote server.
local M = {}

--- daemon: the Daemon (store, orch...).  Returns status, headers, body,
-- or nil when no client route matches.
function M.route(_daemon, _req, _who)
  return nil
end

return M
