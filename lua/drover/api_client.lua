--- A client of `drover serve`'s API, for workers (with their run's token)
-- and for the command line against a remote server (with the server's
-- token).  The token travels only in the Authorization header: never in a
-- URL, never in an error message.
--
--   local c = api_client.new { url = "http://host:8765", token = T, ca_file = F }
--   local res, err = c:call("GET", "/api/v1/runs/ID/worker")
--   -- res: the drover.http response (status, headers, body, json)
--   -- err: nil, or one line naming the method and URL and what failed
--   local body, err = c:json("GET", "/api/v1/...")   -- 2xx JSON, else nil, message
local http = require "drover.http"
local fs = require "drover.fs"

local M = {}
local Client = {}
Client.__index = Client

--- The token a worker or a client uses: DROVER_RUN_TOKEN (or the file
-- DROVER_RUN_TOKEN_FILE names) for a worker, DROVER_TOKEN (or
-- DROVER_TOKEN_FILE) for a client.  Never from the command line, where
-- `ps` would show it.
function M.token_from_env(name)
  local v = os.getenv(name)
  if v and v ~= "" then return v end
  local file = os.getenv(name .. "_FILE")
  if file and file ~= "" then
    local text, err = fs.read(file)
    if not text then error("cannot read " .. name .. "_FILE: " .. tostring(err), 0) end
    return (text:gsub("%s+$", ""))
  end
end

--- A query value, percent-encoded (RFC 3986 unreserved characters kept).
function M.urlencode(s)
  return (tostring(s):gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

--- opts: url (required, http:// or https://), token, ca_file, timeout
-- (seconds per request, default 30).
function M.new(opts)
  local url = opts.url
  if type(url) ~= "string" or not url:match("^https?://[^/]") then
    error("drover: bad API URL '" .. tostring(url) .. "' (http://HOST:PORT or https://... expected)", 0)
  end
  if url:match("^https?://[^/]*@") then
    error("drover: the API URL must not carry credentials; use DROVER_TOKEN", 0)
  end
  return setmetatable({ url = url:gsub("/+$", ""), token = opts.token, ca_file = opts.ca_file,
    timeout = opts.timeout or 30 }, Client)
end

--- One request.  `body` is a table (sent as JSON) or a string (sent as
-- is, with `ctype`); `o` may add `headers` and a `timeout` of its own
-- (an upload that the server packages may take minutes).  Returns the
-- response, or nil and a message when the server could not be reached.
function Client:call(method, path, body, ctype, o)
  local headers = { accept = "application/json" }
  for k, v in pairs(o and o.headers or {}) do headers[k] = v end
  if self.token then headers.authorization = "Bearer " .. self.token end
  local req = { method = method, url = self.url .. path, headers = headers, timeout = o and o.timeout or self.timeout,
    ca_file = self.ca_file }
  if type(body) == "table" then
    req.json = body
  elseif body ~= nil then
    req.body = body
    headers["content-type"] = ctype or "application/json"
  end
  local res, err = http.request(req)
  if res and type(res.json) == "table" and res.body:find('"$bytes"', 1, true) then
    -- strings that are not UTF-8 come as {"$bytes": BASE64}: the bytes again
    res.json = require("drover.json").decode(res.body, { bytes = true })
  end
  return res, err
end

--- Is `err` (a failed request's message) one that retrying cannot mend:
-- the server's certificate is not trusted (a missing or wrong CA file)?
-- An outage heals by itself; a trust failure does not.
function M.untrusted(err)
  local e = tostring(err):lower()
  return e:find("certificate", 1, true) ~= nil or e:find("ssl peer", 1, true) ~= nil
end

--- The server's message for a response that is not 2xx.
function M.error_of(res, method, url)
  local msg = type(res.json) == "table" and res.json.error or nil
  if type(msg) ~= "string" then msg = (res.body or ""):match("^[^\n]*") end
  return string.format("%s %s: %d %s", method, url, res.status, msg ~= "" and msg or "(no message)")
end

--- A request whose 2xx answer is JSON: the decoded value, or nil, message
-- (and the response, when there was one).
function Client:json(method, path, body)
  local res, err = self:call(method, path, body)
  if not res then return nil, err end
  if res.status < 200 or res.status > 299 then
    return nil, M.error_of(res, method, self.url .. path), res
  end
  if res.json == nil and res.body ~= "" then
    return nil, method .. " " .. self.url .. path .. ": " .. tostring(res.json_error or "not JSON"), res
  end
  return res.json, nil, res
end

M.Client = Client
return M
