--- drover.server: an HTTP/1.1 server on drover's loop, OpenResty-style:
-- every request runs the handler as a drover task, so a handler may wait
-- (query the store, drover.sleep, drover.http calls) while the server goes
-- on serving other connections.  The protocol work is H2O's
-- (engine/src/server.c): keep-alive, chunked encoding, 100-continue.
--
--   local server = require("drover").server
--   local srv = assert(server.listen{
--     port = 8080,                      -- 0 or absent: the system picks
--     handler = function(req, res)
--       if req.path == "/hello" then
--         return 200, { ["content-type"] = "text/plain" }, "hello " .. (req.args.name or "you")
--       end
--       return 404, "not found\n"
--     end,
--   })
--   print(srv.url, srv.port)
--   ...
--   srv:close()
--
-- server.listen(opts) -> server | nil, message
--   handler   function(req, res), required
--   on_error  function(err, trace): called (as its own task) when a handler
--             raises; the client gets a 500 with a short body, never the
--             trace.  Default: one line on stderr.
--   host      numeric address to bind, default "127.0.0.1" (loopback);
--             "0.0.0.0" or "::" for every interface; "localhost" works too
--   port      integer, default 0 (a free port; read it from server.port)
--   unix      path: listen on a unix socket instead of TCP (a stale socket
--             file nobody listens on is replaced; the file is removed on
--             close)
--   backlog, max_body (bytes, default 64 MiB: larger bodies get 413),
--   keepalive_timeout (seconds, default 10)
--   max_connections  connections served at once (default 1024); a client
--             beyond them gets a 503 and its connection closes
--   check_head  function(head): asked once the head of a request that has
--             a body is in, before the body is read (H2O reads a whole body
--             before the handler runs): head is req without body.  Return
--             nothing to let the request go on, or status (400-599) [,
--             headers] [, body] to refuse it: the client gets that answer,
--             the connection closes, and the body is never buffered.  It
--             may not wait (no queries that yield, no sleep); an error in
--             it refuses with a 500.  The handler still sees every request
--             it lets through.
--   fast      function(req): asked first, for every request, before a
--             task is made for it: return nothing to hand the request to
--             the handler, or status [, headers] [, body] (the forms a
--             handler returns) to answer it there and then, with no task
--             and no res object -- for answers already at hand (a cached
--             page).  It runs outside any task, so it may not wait (no
--             queries that yield, no sleep); an error in it, or values
--             that are no answer, give the client a 500 and a line on
--             stderr.  The requests read in one pass of the loop are
--             asked together once the pass has read them all (under load,
--             tens at a time): each one's req.time is earlier than the
--             first of them is asked, so a check of state made for one of
--             them, after its req.time, holds for the others of the pass.
--   tls       { cert = FILE, key = FILE }: serve HTTPS (TLS 1.3 only).
--             cert: PEM, the server's certificate first, then any
--             intermediate ones; key: its PEM private key, unencrypted.
--             Clients check the certificate against the name in their
--             URL: give it the addresses they use (subjectAltName, e.g.
--             IP:127.0.0.1, DNS:localhost).  A plain http:// request to
--             the port gets a 400 saying to use https://.
--   A bind that fails (address in use, permission), or a certificate or
--   key that cannot be read or used, returns nil and a message naming the
--   address or file and the reason ("drover.server.listen: tls.cert:
--   cannot read /x: No such file or directory"); bad arguments (an
--   unknown option included) raise.
--
-- server object: server.port, server.host, server.url ("http://127.0.0.1:PORT",
--   "https://..." with tls; "http://localhost" for unix sockets),
--   server.tls (boolean), server.unix, server.closed,
--   server:close() stops accepting and closes idle connections (requests
--   in progress finish, with Connection: close), server:stats() ->
--   { connections =, active = requests in progress, requests = served }.
--   Closing the engine (the end of the script) closes everything.
--
-- req: method, path (decoded and normalized, without the query), query
--   (raw string, "" if none), args (the query decoded: args.a == "1";
--   a repeated key gives a list; a key without "=" gives true), target
--   (the request target as sent), headers (lower-case names; repeats
--   joined with ", "), body (string, "" if none), version ("HTTP/1.1"),
--   remote_addr ("127.0.0.1", or "unix:"), remote_port, time (when the
--   server had the whole request, on drover.now()'s clock: anything the
--   client did before sending it happened before then -- a cache checked
--   for changes later than req.time may answer it).
--
-- Answering, either way:
--   return status, headers, body    (or: return body / return status, body;
--                                    returning nothing gives 204).  The
--                                    server sets content-length; the default
--                                    content-type is text/plain; charset=utf-8.
--   res:respond(status [, headers] [, body])   the same, from inside (also
--     res:respond(status, body)); the handler may go on working after it
--   res:start(status [, headers])   then res:write(chunk) any number of
--     times, then res:finish([chunk]): a chunked response (server-sent
--     events, log tails).  start and write wait until the bytes are handed
--     to the socket (backpressure).  When the client has gone they return
--     nil, "closed" and res.closed is true: the handler should stop.
--   res:abort()  drop the connection (a streamed body ends incomplete).
--   A handler that returns after res:start without finishing is finished
--   for it.  When the client disconnects before the response is done, a
--   handler waiting in res:start / res:write gets nil, "closed"; one
--   waiting for anything else (drover.sleep, an event, a query) has its
--   task cancelled: that wait raises "cancelled".  Either way the server
--   holds nothing for the request any more.
--
-- Bodies sent many times: server.body(bytes) -> a body object holding a
--   copy of bytes outside Lua; return it (or give it to res:respond) in
--   place of a string body and the response hands those bytes to the
--   socket as they are, with no copy per response (a cached page).  #body
--   is its length, body:bytes() the string again.  The bytes are freed
--   once the object is collected and every response carrying it is done;
--   server.body_stats() -> { count =, bytes = } counts the live ones (in
--   this process).
--
-- Helpers: server.json(status, value [, headers]) -> status, headers, body
--   (a string in value that is not UTF-8 is sent as {"$bytes": BASE64},
--   drover.json's bytes option: bytes never turn an answer into a 500);
-- server.sse{ data =, event =, id =, retry = } -> one server-sent event;
-- server.decode_args(query) -> table.
local core = require "drover.core"

local M = {}

local clisten = core.server.listen
M.body = core.server.body
M.body_stats = core.server.body_stats

local function unescape(s)
  s = s:gsub("+", " ")
  return (s:gsub("%%(%x%x)", function(h) return string.char(tonumber(h, 16)) end))
end

--- Decode a query string: "a=1&b=x+y&a=2&flag" -> { a = {"1","2"}, b = "x y", flag = true }
function M.decode_args(query)
  if type(query) ~= "string" then
    error("drover.server.decode_args: bad argument 'query' (string expected, got " .. type(query) .. ")", 2)
  end
  local args = {}
  for pair in query:gmatch("[^&;]+") do
    local k, v = pair:match("^([^=]*)=(.*)$")
    if k then
      k, v = unescape(k), unescape(v)
    else
      k, v = unescape(pair), true
    end
    if k ~= "" then
      local old = args[k]
      if old == nil then
        args[k] = v
      elseif type(old) == "table" then
        old[#old + 1] = v
      else
        args[k] = { old, v }
      end
    end
  end
  return args
end

-- req.args is decoded on first use.
local req_mt = {
  __index = function(req, k)
    if k == "args" then
      local a = M.decode_args(rawget(req, "query") or "")
      rawset(req, "args", a)
      return a
    end
  end,
}

local function callable(f)
  if type(f) == "function" then return true end
  local mt = getmetatable(f)
  return type(mt) == "table" and mt.__call ~= nil
end

local OPTIONS = { handler = true, on_error = true, host = true, port = true, unix = true, backlog = true,
  max_body = true, keepalive_timeout = true, tls = true, max_connections = true, check_head = true, fast = true }
local TLS_OPTIONS = { cert = true, key = true }

-- An option name nobody reads is a typo that would go unnoticed (a `tsl`
-- table serving plain HTTP): refuse it.
local function check_keys(t, known, prefix)
  for k in pairs(t) do
    if not known[k] then
      local names = {}
      for n in pairs(known) do names[#names + 1] = n end
      table.sort(names)
      error("drover.server.listen: unknown option '" .. prefix .. tostring(k) .. "' (known: "
        .. table.concat(names, ", ") .. ")", 3)
    end
  end
end

function M.listen(opts)
  if type(opts) ~= "table" then
    error("drover.server.listen: bad argument 'opts' (table expected, got " .. type(opts) .. ")", 2)
  end
  check_keys(opts, OPTIONS, "")
  local tls = opts.tls
  if tls ~= nil then
    if type(tls) ~= "table" then
      error("drover.server.listen: bad option 'tls' (table expected, got " .. type(tls) .. ")", 2)
    end
    check_keys(tls, TLS_OPTIONS, "tls.")
    for _, k in ipairs { "cert", "key" } do
      if type(tls[k]) ~= "string" or tls[k] == "" then
        error("drover.server.listen: bad option 'tls." .. k .. "' (a file name expected, got "
          .. (tls[k] == "" and "an empty string" or type(tls[k])) .. ")", 2)
      end
    end
  end
  local handler, on_error, check_head, fast = opts.handler, opts.on_error, opts.check_head, opts.fast
  if not callable(handler) then
    error("drover.server.listen: bad option 'handler' (function expected, got " .. type(handler) .. ")", 2)
  end
  if check_head ~= nil and not callable(check_head) then
    error("drover.server.listen: bad option 'check_head' (function expected, got " .. type(check_head) .. ")", 2)
  end
  if fast ~= nil and not callable(fast) then
    error("drover.server.listen: bad option 'fast' (function expected, got " .. type(fast) .. ")", 2)
  end
  if on_error ~= nil and not callable(on_error) then
    error("drover.server.listen: bad option 'on_error' (function expected, got " .. type(on_error) .. ")", 2)
  end
  local o = {}
  for k, v in pairs(opts) do o[k] = v end
  o.handler = function(req, res)
    setmetatable(req, req_mt)
    return handler(req, res)
  end
  if check_head ~= nil then
    o.check_head = function(head)
      setmetatable(head, req_mt)
      return check_head(head)
    end
  end
  if fast ~= nil then
    o.fast = function(req)
      setmetatable(req, req_mt)
      return fast(req)
    end
  end
  if on_error ~= nil and type(on_error) ~= "function" then
    o.on_error = function(err, trace) return on_error(err, trace) end -- a callable table
  end
  return clisten(o)
end

local BYTES = { bytes = true }

--- A JSON response: return server.json(200, { ok = true })
function M.json(status, value, headers)
  if math.type(status) ~= "integer" then
    error("drover.server.json: bad argument 'status' (integer expected, got " .. type(status) .. ")", 2)
  end
  if headers ~= nil and type(headers) ~= "table" then
    error("drover.server.json: bad argument 'headers' (table expected, got " .. type(headers) .. ")", 2)
  end
  local h = {}
  for k, v in pairs(headers or {}) do h[k] = v end
  local has_ct = false
  for k in pairs(h) do
    if k:lower() == "content-type" then has_ct = true end
  end
  if not has_ct then h["content-type"] = "application/json" end
  return status, h, require("drover.json").encode(value, BYTES)
end

--- One server-sent event (text/event-stream): server.sse{ event = "log", data = "a\nb", id = 7 }
-- or server.sse("data").  Multi-line data becomes several data: lines.
function M.sse(ev)
  if type(ev) == "string" then ev = { data = ev } end
  if type(ev) ~= "table" then
    error("drover.server.sse: bad argument 'event' (table or string expected, got " .. type(ev) .. ")", 2)
  end
  local out = {}
  for _, field in ipairs { "event", "id", "retry" } do
    local v = ev[field]
    if v ~= nil then
      v = tostring(v)
      if v:find("[\r\n]") then
        error("drover.server.sse: field '" .. field .. "' must be a single line", 2)
      end
      out[#out + 1] = field .. ": " .. v .. "\n"
    end
  end
  if ev.data ~= nil then
    local data = tostring(ev.data):gsub("\r\n", "\n"):gsub("\r", "\n")
    for line in (data .. "\n"):gmatch("(.-)\n") do
      out[#out + 1] = "data: " .. line .. "\n"
    end
  end
  if #out == 0 then out[1] = ":\n" end -- a comment: keeps the connection alive
  out[#out + 1] = "\n"
  return table.concat(out)
end

return M
