--- drover.http: HTTP client on libcurl's multi interface and drover's loop.
--
-- Every call waits without blocking the thread: inside a task it suspends
-- the task, in a plain script it runs the loop until the response is in.
-- All requests of an engine share one curl multi handle, hence one
-- connection cache: sequential requests to the same host reuse the
-- keep-alive connection, concurrent ones from many tasks run in parallel.
--
--   drover.http.request(opts)            -> response | nil, message
--   drover.http.get(url [, opts])        -> response | nil, message
--   drover.http.head(url [, opts])       -> response | nil, message
--   drover.http.delete(url [, opts])     -> response | nil, message (opts may carry a body)
--   drover.http.post(url [, body_or_opts]) -> response | nil, message
--   drover.http.put(url [, body_or_opts])  -> response | nil, message
--   drover.http.patch(url [, body_or_opts])-> response | nil, message
--
-- opts (request):
--   url          string, required (http:// or https://)
--   method       string, default "GET", or "POST" when body/json is given
--   headers      table name -> string|number (sent as given; never logged)
--   body         string, sent as is (no content-type is invented for it)
--   json         any JSON-encodable value: encoded as the body, with
--                content-type application/json unless headers say otherwise
--   timeout      seconds for the whole transfer (default: none)
--   unix_socket  path: talk HTTP over this unix socket (Docker's API...)
--   on_chunk     function(data) called for each piece of the response body
--                as it arrives; the body is then not kept (response.body is
--                ""). It runs inside the loop: it must not wait (no sleep, no
--                requests); an error in it aborts the transfer and is
--                returned as nil, message.
--   insecure     true: do not verify the TLS certificate
--   ca_file      path: verify the server's certificate against this CA
--                bundle (PEM) instead of the system's
--
-- response: { status = 200, headers = { ["content-type"] = ... }, body = "",
--             json = <decoded>, json_error = <message> }
--   headers have lower-case names; a repeated header's values are joined
--   with ", ".  json is set when the content-type is JSON
--   (application/json, application/something+json) and the body is not
--   empty; if that body does not parse, json is nil and json_error says
--   why and for which URL.  Decoding is drover.json's: JSON null is
--   drover.json.null (also drover.http.null), integers stay integers.
--
-- HTTP error statuses (404, 500...) are ordinary responses.  nil, message is
-- for transfers that failed: connection refused, DNS failure, timeout, TLS
-- failure, on_chunk error; the message names the method, the URL (without
-- any user:password) and curl's reason.  Bad arguments raise an error.
--
-- Shorthands: get/head/delete take an optional opts table (as request's,
-- without url/method; only delete's may carry body= or json=).  post/put/patch take either a string (the body) or
-- an opts table (body=, json=, headers=, ...): post(url, "raw"),
-- post(url, { json = { a = 1 } }).
local core = require "drover.core"
local json = require "drover.json"

local M = {}

M.null = json.null

local crequest = core.http.request

local known = {
  url = true, method = true, headers = true, body = true, json = true, timeout = true,
  unix_socket = true, on_chunk = true, insecure = true, ca_file = true,
}

local function check_opts(fname, opts, level)
  for k in pairs(opts) do
    if not known[k] then
      error(fname .. ": unknown option '" .. tostring(k) .. "'", level + 1)
    end
  end
end

local function redact(url)
  return (url:gsub("^(%a[%w+.-]*://)[^/?#]*@", "%1***@"))
end

local function is_json_type(ct)
  if type(ct) ~= "string" then return false end
  ct = ct:lower():match("^%s*([^;%s]+)")
  return ct == "application/json" or (ct ~= nil and ct:match("^application/[%w.!#$&^_-]+%+json$") ~= nil)
end

local function perform(fname, opts, level)
  local jbody
  if opts.json ~= nil then
    if opts.body ~= nil then
      error(fname .. ": options 'body' and 'json' cannot be used together", level + 1)
    end
    local ok, enc = pcall(json.encode, opts.json)
    if not ok then
      error(fname .. ": bad option 'json' (cannot encode: " .. tostring(enc) .. ")", level + 1)
    end
    jbody = enc
  end
  local r, err = crequest(opts, jbody)
  if not r then
    if fname ~= "drover.http.request" and err:sub(1, 20) == "drover.http.request:" then
      err = fname .. err:sub(20)
    end
    return nil, err
  end
  if r.body ~= "" and is_json_type(r.headers["content-type"]) then
    local v, jerr = json.decode(r.body)
    if jerr == nil then
      r.json = v
    else
      r.json_error = "drover.http: malformed JSON in the response from " .. redact(opts.url)
        .. ": " .. tostring(jerr)
    end
  end
  return r
end

--- request(opts) -> response | nil, message
function M.request(opts)
  if type(opts) ~= "table" then
    error("drover.http.request: bad argument 'opts' (table expected, got " .. type(opts) .. ")", 2)
  end
  check_opts("drover.http.request", opts, 2)
  local r, err = perform("drover.http.request", opts, 2)
  return r, err
end

-- Build a request from (url, arg) for a shorthand.  kind: "none" (no body:
-- get, head), "opts" (an opts table that may carry a body: delete), "body"
-- (a string body or an opts table: post, put, patch).  No tail calls here
-- or in the functions above: error levels count these frames.
local function shorthand(fname, method, url, arg, kind)
  if type(url) ~= "string" then
    error(fname .. ": bad argument 'url' (string expected, got " .. type(url) .. ")", 3)
  end
  local o = { url = url, method = method }
  if type(arg) == "string" and kind == "body" then
    o.body = arg
  elseif type(arg) == "table" then
    for k, v in pairs(arg) do
      if k == "url" or k == "method" then
        error(fname .. ": option '" .. tostring(k) .. "' is given by the call itself", 3)
      end
      o[k] = v
    end
    check_opts(fname, o, 3)
    if kind == "none" and (o.body ~= nil or o.json ~= nil) then
      error(fname .. ": a " .. method .. " request takes no body (use drover.http.request)", 3)
    end
  elseif arg ~= nil then
    local name, want = "opts", "table"
    if kind == "body" then name, want = "body_or_opts", "string or table" end
    error(fname .. ": bad argument '" .. name .. "' (" .. want .. " expected, got " .. type(arg) .. ")", 3)
  end
  local r, err = perform(fname, o, 3)
  return r, err
end

--- get(url [, opts])
function M.get(url, opts)
  local r, err = shorthand("drover.http.get", "GET", url, opts, "none")
  return r, err
end

--- head(url [, opts])
function M.head(url, opts)
  local r, err = shorthand("drover.http.head", "HEAD", url, opts, "none")
  return r, err
end

--- delete(url [, opts]): opts may carry body= or json=; some APIs want one
function M.delete(url, opts)
  local r, err = shorthand("drover.http.delete", "DELETE", url, opts, "opts")
  return r, err
end

--- post(url [, body_or_opts])
function M.post(url, b)
  local r, err = shorthand("drover.http.post", "POST", url, b, "body")
  return r, err
end

--- put(url [, body_or_opts])
function M.put(url, b)
  local r, err = shorthand("drover.http.put", "PUT", url, b, "body")
  return r, err
end

--- patch(url [, body_or_opts])
function M.patch(url, b)
  local r, err = shorthand("drover.http.patch", "PATCH", url, b, "body")
  return r, err
end

return M
