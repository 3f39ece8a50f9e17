-- Fuzz harness: the daemon's request path, in process and without sockets:
-- Daemon:handle (request_guard.check, then worker_api.route,
-- client_api.route and the dashboard's routes) against a store in a
-- scratch directory holding one RUNNING run with a run token.
--
-- The input is a request as text:
--   METHOD TARGET\n            TARGET = PATH[?QUERY]
--   name: value\n ...          headers (names lower-cased, repeats joined
--                              with ", ", as drover.server gives them)
--   \n
--   BODY                       the rest
-- A header "x-fuzz-daemon: locked" sends it to a daemon started with
-- the token "fuzz-token" instead of one without a token.
--
-- Properties:
--   handle never raises, and answers a status 100-599, a table of string
--   headers and a string, a server.body object or no body;
--   a request whose Host is not a loopback name (with a port or a path
--   after it, or not; "[::1]" with anything after it) gets 421;
--   without the text "fuzz-token" anywhere in the request, the locked
--   daemon refuses (401, 403, 405, 413, 415 or 421), unless the request
--   carries the run's own token ("fuzz-run-token", in the seed corpus)
--   and asks for one of that run's worker endpoints, the bundle or the
--   cache: those are what a run token is for.
-- Not sent: GET /api/events (a server-sent event stream, open until the
-- client goes) and POST /api/v1/deployments/NAME/runs (starts worker
-- processes).
local daemon = require "drover.daemon"
local server = require "drover.server"
local run_token = require "drover.run_token"

local helpers = ...
local open = assert(daemon.new { home = helpers.home .. "/store", port = 0 })
local locked = assert(daemon.new { home = helpers.home .. "/store", port = 0, token = "fuzz-token" })
local RUN = "0123456789abcdef0123456789abcdef"
open.store:create_flow_run { id = RUN, name = "fuzz", state = "RUNNING", params = {} }
open.store:set_run_token(RUN, run_token.digest("fuzz-run-token"))
open.store:flush()

local LOOPBACK = { "127.0.0.1", "localhost", "[::1]", "::1" }
local REFUSALS = { [401] = true, [403] = true, [405] = true, [413] = true, [415] = true, [421] = true }

-- what a run token may reach (worker_api's routes open to a run token)
local function worker_path(path)
  return path:find("^/api/v1/runs/" .. RUN .. "/") or path:find("^/api/v1/packages/%x+/bundle$")
    or path == "/api/v1/cache"
end

local function parse(data)
  local head, body = data:match("^(.-)\n\n(.*)$")
  head = head or data
  body = body or ""
  local lines = {}
  for l in (head .. "\n"):gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  local method, target = (lines[1] or ""):match("^(%S+) (%S+)")
  if not method then return nil end
  local path, query = target:match("^([^?]*)%??(.*)$")
  if path:sub(1, 1) ~= "/" then path = "/" .. path end
  local headers = {}
  for i = 2, #lines do
    local k, v = lines[i]:match("^([^:]+):%s*(.-)%s*$")
    if k then
      k = k:lower()
      headers[k] = headers[k] and headers[k] .. ", " .. v or v
    end
  end
  return setmetatable({ method = method, path = path, query = query, target = target, headers = headers,
    body = body, version = "HTTP/1.1", remote_addr = "127.0.0.1", remote_port = 40000 },
    { __index = function(req, k)
      if k == "args" then
        local a = server.decode_args(rawget(req, "query"))
        rawset(req, "args", a)
        return a
      end
    end })
end

local function loopback_host(h)
  h = (h or ""):lower()
  for _, name in ipairs(LOOPBACK) do
    local after = h:sub(#name + 1, #name + 1)
    -- after "[::1]" the guard ignores the rest: no browser sends a Host
    -- with bytes after the bracket, so that is no way in for a page
    if h:sub(1, #name) == name and (after == "" or after == ":" or after == "/" or name == "[::1]") then
      return true
    end
  end
  return false
end

-- a response object for handlers that stream; none should get here
local res = setmetatable({}, { __index = function(_, k) error("a handler streamed (res:" .. k .. ")") end })

return function(data)
  local req = parse(data)
  if not req then return end
  if req.path == "/api/events" or (req.method == "POST" and req.path:find("^/api/v1/deployments/.*/runs$")) then
    return
  end
  local d = req.headers["x-fuzz-daemon"] == "locked" and locked or open
  local ok, status, headers, body = pcall(d.handle, d, req, res)
  local where = req.method .. " " .. req.target
  if not ok then error("handle raised on " .. where .. ": " .. tostring(status)) end
  if math.type(status) ~= "integer" or status < 100 or status > 599 then
    error("status " .. tostring(status) .. " for " .. where)
  end
  if headers ~= nil and type(headers) ~= "table" then error("headers " .. type(headers) .. " for " .. where) end
  for k, v in pairs(headers or {}) do
    if type(k) ~= "string" or type(v) ~= "string" then
      error("header " .. tostring(k) .. " = " .. tostring(v) .. " for " .. where)
    end
  end
  -- a body: a string, or a body object (server.body: cached pages)
  if type(body) == "userdata" then
    local ok_b, bytes = pcall(function() return body:bytes() end)
    if not ok_b or type(bytes) ~= "string" then error("body userdata that is not a server.body for " .. where) end
  elseif body ~= nil and type(body) ~= "string" then
    error("body " .. type(body) .. " for " .. where)
  end
  if not loopback_host(req.headers.host) and status ~= 421 then
    error("Host " .. tostring(req.headers.host) .. " got " .. status .. " for " .. where)
  end
  if d == locked and not data:find("fuzz-token", 1, true) and not REFUSALS[status]
    and not (data:find("fuzz-run-token", 1, true) and worker_path(req.path)) then
    error("the locked daemon answered " .. status .. " without the token for " .. where)
  end
end
