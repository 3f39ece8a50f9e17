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

--- Returns the number of events sent and the run id, or nil and a message.
function M.file(path, opts)
  local f, ferr = io.open(path, "rb")
  if not f then return nil, "drover replay: " .. tostring(ferr) end
  local header = json.decode(f:read("l") or "")
  if type(header) ~= "table" or type(header.run) ~= "string" or not header.run:match("^%x+$") then
    f:close()
    return nil, "drover replay: " .. path .. " is not a drover spool file"
  end
  local url = opts.api or header.api
  local ok, client = pcall(api_client.new, { url = url, token = opts.token, ca_file = opts.ca_file })
  if not ok then f:close(); return nil, client end
  local endpoint = "/api/v1/runs/" .. header.run .. "/events"
  local sent, lineno = 0, 1
  local function post(first, texts)
    local body = '{"first_seq":' .. first .. ',"events":[' .. table.concat(texts, ",") .. "]}"
    local res, err = client:call("POST", endpoint, body, "application/json")
    if not res then return nil, "drover replay: " .. err end
    if res.status ~= 200 then return nil, "drover replay: " .. api_client.error_of(res, "POST", url .. endpoint) end
    return true
  end
  local first, texts = nil, {}
  for line in f:lines() do
    lineno = lineno + 1
    local seq, text = line:match("^(%d+)\t(.+)$")
    if not seq then f:close(); return nil, "drover replay: " .. path .. ":" .. lineno .. ": not an event line" end
    first = first or math.tointeger(seq)
    texts[#texts + 1] = text
    if #texts >= M.BATCH then
      local pok, perr = post(first, texts)
      if not pok then f:close(); return nil, perr end
      sent, first, texts = sent + #texts, nil, {}
    end
  end
  f:close()
  if #texts > 0 then
    local pok, perr = post(first, texts)
    if not pok then return nil, perr end
    sent = sent + #texts
  end
  os.remove(path)
  return sent, header.run
end

return M
