--- The checks every request to `drover serve` passes before any handler
-- runs, old endpoints and new alike: one middleware, so an endpoint added
-- later cannot forget them.
--
-- 1. Host.  A daemon on loopback answers only requests whose Host is a
--    loopback name or address (or the host of --public-url): a web page
--    that rebinds its own DNS name to 127.0.0.1 sends its own name as Host
--    and is refused, so it cannot read the API through the user's browser.
-- 2. Cross-site writes.  A request that changes state (any method but GET
--    and HEAD) is refused when its Origin is not this server or its
--    Sec-Fetch-Site says another site, and it must carry a JSON (or, for
--    bundle uploads, a tar) content type: the content types a cross-site
--    form may send without a CORS preflight are refused.
-- 3. Who is asking.  The server's token (when it has one) makes an admin;
--    a run's token (docs/protocol.md) makes a worker of that run, allowed
--    only the worker endpoints of its own run; no token is an admin only
--    when the server has none (loopback).  Tokens are compared as SHA-256
--    digests, so the comparison's time says nothing about the token.
local run_token = require "drover.run_token"

local M = {}

local LOOPBACK_HOSTS = { ["127.0.0.1"] = true, ["localhost"] = true, ["[::1]"] = true, ["::1"] = true }
M.LOOPBACK_BINDS = { ["127.0.0.1"] = true, ["::1"] = true, ["localhost"] = true }

local BODY_TYPES = { ["application/json"] = true, ["application/x-tar"] = true }

M.digest = run_token.digest

--- The host part of a Host header or an origin ("http://h:1234" -> "h").
local function host_of(s)
  if type(s) ~= "string" then return nil end
  s = s:lower():gsub("^%a[%w+.-]*://", ""):gsub("/.*$", "")
  if s:sub(1, 1) == "[" then return s:match("^(%[[^%]]*%])") end
  return (s:gsub(":%d*$", ""))
end
M.host_of = host_of

--- The host a Host header names, or nil: a Host header is host[:port],
-- never a URL (a scheme or a path there is refused, not read past).
local function header_host(h)
  if type(h) ~= "string" or h:find("/", 1, true) then return nil end
  return host_of(h)
end

--- opts: bind (the address listened on), public_url, token.
function M.new(opts)
  local allowed = nil
  if M.LOOPBACK_BINDS[opts.bind or "127.0.0.1"] or opts.public_url then
    allowed = {}
    for h in pairs(LOOPBACK_HOSTS) do allowed[h] = true end
    if opts.public_url then allowed[host_of(opts.public_url)] = true end
  end
  return { allowed_hosts = allowed, token_digest = opts.token and M.digest(opts.token) or nil,
    good_hosts = {}, ngood_hosts = 0 }
end

--- Host headers found allowed, as sent: every request names its host, and
-- the few spellings clients use (127.0.0.1:8765) then cost a table lookup,
-- not a parse.  At most GOOD_HOSTS_MAX of them (a client may send any
-- number of spellings: "LOCALHOST:1", ":2", ...): then they start over.
local GOOD_HOSTS_MAX = 64

local function host_allowed(guard, value)
  if guard.good_hosts[value] then return true end
  local host = header_host(value)
  if not host or not guard.allowed_hosts[host] then return false end
  if guard.ngood_hosts >= GOOD_HOSTS_MAX then guard.good_hosts, guard.ngood_hosts = {}, 0 end
  guard.good_hosts[value] = true
  guard.ngood_hosts = guard.ngood_hosts + 1
  return true
end

local function refuse(status, message, headers)
  return { status = status, message = message, headers = headers }
end

--- Check `req` against `guard`; `runs_by_token(digest)` finds the run a
-- token belongs to.  Returns the principal ({admin = true}, or {run_id =
-- ID}, with via_query when the token came in ?token=), or nil and a
-- refusal {status, message}.
function M.check(guard, req, runs_by_token)
  local h = req.headers
  if guard.allowed_hosts then
    if not host_allowed(guard, h.host) then
      return nil, refuse(421, "refused: Host '" .. tostring(h.host) ..
        "' is not this server (use 127.0.0.1, localhost or the --public-url host)")
    end
  end
  if req.method ~= "GET" and req.method ~= "HEAD" then
    -- Origin is scheme://host:port; this server is whatever Host names
    -- ("null", an opaque origin, matches nothing)
    local origin = h.origin
    if origin and origin:lower():gsub("^%a[%w+.-]*://", ""):gsub("/.*$", "") ~= (h.host or ""):lower() then
      return nil, refuse(403, "refused: a cross-site request (Origin " .. origin .. ")")
    end
    local site = h["sec-fetch-site"]
    if site and site ~= "same-origin" and site ~= "none" then
      return nil, refuse(403, "refused: a cross-site request (Sec-Fetch-Site " .. site .. ")")
    end
    local ctype = (h["content-type"] or ""):lower():match("^%s*([^;%s]+)")
    if req.body ~= "" and not BODY_TYPES[ctype] then
      return nil, refuse(415, "a request body must be application/json or application/x-tar (got " ..
        tostring(h["content-type"] or "no content type") .. ")")
    end
  end
  local bearer = h.authorization and h.authorization:match("^[Bb]earer%s+(.-)%s*$")
  -- (no query, no token: the common case decodes nothing)
  local query = req.query ~= "" and type(req.args.token) == "string" and req.args.token or nil
  local cookie = h.cookie and h.cookie:match("drover_token=([^;%s]+)")
  local given = bearer or query or cookie
  if given then
    local d = M.digest(given)
    if guard.token_digest and d == guard.token_digest then
      return { admin = true, via_query = query ~= nil and bearer == nil }
    end
    if bearer then
      local run = runs_by_token(d)
      if run then return { run_id = run.id } end
    end
    return nil, refuse(401, "unauthorized: the token is not valid here",
      { ["www-authenticate"] = 'Bearer realm="drover", error="invalid_token"' })
  end
  if guard.token_digest then
    return nil, refuse(401, "unauthorized: a token is required", { ["www-authenticate"] = 'Bearer realm="drover"' })
  end
  return { admin = true }
end

return M
