--- Applying one batch of a worker's events to the store: the rules the
-- worker protocol promises (docs/protocol.md), in one place for the two
-- ways a batch arrives -- a POST /api/v1/runs/ID/events (worker_api.lua)
-- and a spool file the server reads itself (replay.lua, for a local run
-- whose worker gave up delivering).
--
-- Checked whole before anything is written (a bad event refuses the
-- batch, naming it); applied in one transaction; sequence numbers already
-- applied are skipped (a retried batch records nothing twice); a gap is
-- refused.  A run that has ended (the server marked it CRASHED or
-- CANCELLED, or it finished) takes log lines only: anything else is a late
-- report, refused with 409 and noted in the run's log.
local events = require "drover.events"
local states = require "drover.states"

local M = {}

--- Most events one batch may carry (a worker sends at most 2,000).
M.MAX_EVENTS = 10000

local function refuse(status, message, extra)
  local body = { error = message }
  for k, v in pairs(extra or {}) do body[k] = v end
  return status, body
end

--- Apply batch `b` ({first_seq, [last_seq], events}, decoded JSON) to run
-- `id`.  `b64`: some event may carry FIELD@b64 fields (unpacked here).
-- Returns an HTTP status and the answer's body (a table).
function M.apply(store, id, b, b64)
  local first, last, list = b.first_seq, b.last_seq, b.events
  if math.type(first) ~= "integer" or first < 1 then return refuse(400, "first_seq must be an integer >= 1") end
  if type(list) ~= "table" or (next(list) ~= nil and list[1] == nil) then
    return refuse(400, "events must be an array")
  end
  if #list > M.MAX_EVENTS then return refuse(413, "too many events in one batch (at most " .. M.MAX_EVENTS .. ")") end
  last = last or first + #list - 1
  if math.type(last) ~= "integer" or last < first + #list - 1 then
    return refuse(400, "last_seq must be an integer >= first_seq + #events - 1")
  end
  local only_logs = true
  for i, e in ipairs(list) do
    local ok, msg = e, nil
    if b64 and type(e) == "table" then ok, msg = events.unpack(e) end
    if ok then ok, msg = events.check(e) end
    if not ok then return refuse(400, "event " .. i .. " (seq " .. (first + i - 1) .. "): " .. msg) end
    if e.t ~= "log" then only_logs = false end
  end
  local out = store:apply_batch(id, function(run)
    if not run then return { 404, { error = "unknown run '" .. id .. "'" } } end
    local applied = run.event_seq
    if last <= applied and #list > 0 then
      return { 200, { applied = applied, state = run.state, duplicate = true } }
    end
    if first > applied + 1 then
      return { 409, { error = "sequence gap: the server has events up to " .. applied ..
        ", this batch starts at " .. first, reason = "gap", applied = applied } }
    end
    if states.final[run.state] and not only_logs then
      store:log(id, nil, "error", "late report refused: " .. #list .. " event(s) (seq " .. first .. "-" .. last ..
        ") arrived after the run ended " .. run.state .. "; drover resume is the way back")
      return { 409, { error = "run " .. id .. " has ended (" .. run.state .. "): late report refused",
        reason = "ended", state = run.state, applied = applied } }
    end
    for i, e in ipairs(list) do
      if first + i - 1 > applied then events.apply(store, id, e) end
    end
    local now = store:flow_run(id)
    return { 200, { applied = math.max(last, applied), state = now and now.state } }, math.max(last, applied)
  end)
  return out[1], out[2]
end

return M
