--- `drover replay SPOOL`: send the events a worker could not deliver.
--
-- A spool file (drover.reporter) is a header line {"run", "api",
-- "first_seq"} then one line per event, "SEQ<TAB>JSON", in order.  They are
-- posted in batches as the worker would have; the server skips what it
-- already has, so a replay may be repeated, and refuses a run that has
-- ended meanwhile (409).  The file is removed once everything is in.
local api_client = require "drover.api_client"
local json = require "drover.json"

local M = {}

M.BATCH = 1000

local EXPECT = { headers = { expect = "100-continue" } }

--- The header of spool file `path`, with the file open after it; or nil
-- and a message.
local function open_spool(path)
  local f, ferr = io.open(path, "rb")
  if not f then return nil, "drover replay: " .. tostring(ferr) end
  local header = json.decode(f:read("l") or "")
  if type(header) ~= "table" or type(header.run) ~= "string" or not header.run:match("^%x+$") then
    f:close()
    return nil, "drover replay: " .. path .. " is not a drover spool file"
  end
  return f, header
end

--- Call fn(first_seq, texts) for each batch of the events in `f` (texts:
-- the events' JSON); closes f.  Returns the number of events, or nil and
-- the first error fn returned.
local function each_batch(f, path, fn)
  local sent, lineno, first, texts = 0, 1, nil, {}
  for line in f:lines() do
    lineno = lineno + 1
    local seq, text = line:match("^(%d+)\t(.+)$")
    if not seq then f:close(); return nil, "drover replay: " .. path .. ":" .. lineno .. ": not an event line" end
    first = first or math.tointeger(seq)
    texts[#texts + 1] = text
    if #texts >= M.BATCH then
      local ok, err = fn(first, texts)
      if not ok then f:close(); return nil, err end
      sent, first, texts = sent + #texts, nil, {}
    end
  end
  f:close()
  if #texts > 0 then
    local ok, err = fn(first, texts)
    if not ok then return nil, err end
    sent = sent + #texts
  end
  return sent
end

--- opts: api (the server's URL; default the spool header's, else
-- $DROVER_API), token, ca_file.  Returns the number of events sent and the
-- run id, or nil and a message.
function M.file(path, opts)
  local f, header = open_spool(path)
  if not f then return nil, header end
  -- the URL asked for, else the one the worker reported to, else $DROVER_API
  local url = opts.api or header.api
  if url == nil or url == "" then url = os.getenv("DROVER_API") end
  local ok, client = pcall(api_client.new, { url = url, token = opts.token, ca_file = opts.ca_file })
  if not ok then f:close(); return nil, client end
  local endpoint = "/api/v1/runs/" .. header.run .. "/events"
  -- (asking first, so that a body over the server's --max-body gets its
  -- 413 and is sent in halves)
  local function post(first, texts)
    local body = '{"first_seq":' .. first .. ',"events":[' .. table.concat(texts, ",") .. "]}"
    local res, err = client:call("POST", endpoint, body, "application/json", EXPECT)
    if not res then return nil, "drover replay: " .. err end
    if res.status == 413 and #texts > 1 then
      local h = #texts // 2
      local sent_half, perr = post(first, table.move(texts, 1, h, 1, {}))
      if not sent_half then return nil, perr end
      return post(first + h, table.move(texts, h + 1, #texts, 1, {}))
    end
    if res.status ~= 200 then return nil, "drover replay: " .. api_client.error_of(res, "POST", url .. endpoint) end
    return true
  end
  local sent, perr = each_batch(f, path, post)
  if not sent then return nil, perr end
  os.remove(path)
  return sent, header.run
end

--- Apply spool file `path` to `store` directly, as the server would: for a
-- local run whose worker gave up delivering (the server was down past its
-- delivery timeout) and exited, found by the reaper on the server's own
-- host.  Returns the number of events and the run id, or nil and a message
-- (the file is kept then).
function M.into_store(store, path)
  local event_batch = require "drover.event_batch"
  local f, header = open_spool(path)
  if not f then return nil, header end
  local n, err = each_batch(f, path, function(first, texts)
    local list = json.decode("[" .. table.concat(texts, ",") .. "]")
    if type(list) ~= "table" then return nil, "drover replay: " .. path .. ": malformed events" end
    local status, body = event_batch.apply(store, header.run, { first_seq = first, events = list }, true)
    if status ~= 200 then return nil, "drover replay: " .. path .. ": " .. tostring(body.error) end
    return true
  end)
  if not n then return nil, err end
  os.remove(path)
  return n, header.run
end

return M
