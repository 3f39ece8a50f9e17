--- The HTTP sink: how a worker reports its run to `drover serve`.
--
-- It has the store methods the tracker calls (set_flow_state,
-- task_run_started, task_run_state, task_run_finished, log, flush, and the
-- reads completed_calls and cached_result), so the tracker runs unchanged
-- on top of it.  Each call becomes an event (drover.events); a sender task
-- posts them in batches (at most `batch_size` events, or every
-- `batch_delay` seconds) to POST /api/v1/runs/ID/events, each batch naming
-- the sequence number of its first event.  The server applies a batch in
-- one transaction and skips sequence numbers it already has, so a batch
-- retried after a lost answer is never recorded twice.
--
-- The server may blink; the run goes on.  A refused connection, a timeout
-- or a 5xx keeps the events: in memory up to `memory_limit`, beyond that
-- appended to a spool file, and retried with backoff (up to 5 s apart)
-- until the server answers; the spool is sent first, so order is kept.
-- The flow itself never waits for the server.  At the end, close() keeps
-- trying for `delivery_timeout` seconds; what is still undelivered then
-- stays in the spool, which `drover replay FILE` sends later.
--
-- While nothing else is to be sent, an empty batch every `heartbeat`
-- seconds tells the server the worker lives.  Every answer carries the
-- run's state as the server sees it: CANCELLING (a cancel asked through
-- the API) calls on_cancel; a 409 saying the run has ended (the server
-- marked it CRASHED or CANCELLED meanwhile) calls on_refused, and nothing
-- more is sent.
local core = require "drover.core"
local events = require "drover.events"
local json = require "drover.json"
local fs = require "drover.fs"

local M = {}
local R = {}
R.__index = R

M.defaults = { batch_size = 1000, batch_delay = 0.1, heartbeat = 10, memory_limit = 20000,
  delivery_timeout = 300, max_backoff = 5 }

--- The spool directory: DROVER_SPOOL_DIR, else $TMPDIR/drover-spool.
function M.spool_dir()
  local d = os.getenv("DROVER_SPOOL_DIR")
  if d and d ~= "" then return d end
  return (os.getenv("TMPDIR") or "/tmp") .. "/drover-spool"
end

--- opts: client (drover.api_client), run_id, and optionally the numbers in
-- M.defaults, spool (file path), on_cancel(), on_refused(message),
-- first_seq (the next sequence number: the server's event_seq + 1).
function M.new(opts)
  local self = setmetatable({ client = opts.client, run_id = opts.run_id, on_cancel = opts.on_cancel,
    on_refused = opts.on_refused, home = nil }, R)
  for k, v in pairs(M.defaults) do self[k] = opts[k] or v end
  -- retry at least twice a heartbeat interval, so a restarted server hears
  -- from this worker before it could take the silence for a crash
  self.max_backoff = math.min(self.max_backoff, self.heartbeat / 2)
  self.path = "/api/v1/runs/" .. opts.run_id .. "/events"
  self.spool = opts.spool or (M.spool_dir() .. "/" .. opts.run_id .. ".events")
  -- events not yet sent: q[head..tail]; q[i] has sequence number qseq + (i - head)
  self.q, self.head, self.tail = {}, 1, 0
  self.next_seq = opts.first_seq or 1
  self.qseq = self.next_seq
  self.open = {}            -- task run id -> its task_started event, while unsent (folding)
  self.spooled = 0          -- events in the spool file not yet delivered
  self.spool_offset = 0     -- where the undelivered part of the spool starts
  self.last_contact = core.now()
  self.down_since = nil
  self.refused = nil
  self.done = core.event()
  self.sender = core.spawn(function() self:send_loop() end)
  return self
end

-- ---- the store methods the tracker calls ---------------------------------------------------

function R:push(e)
  local t = self.tail + 1
  self.q[t] = e
  self.tail = t
  self.next_seq = self.next_seq + 1
  if self.tail - self.head + 1 > self.memory_limit then self:spill() end
  return e
end

function R:set_flow_state(_, state, message, extra)
  self:push(events.event("state", { state = state, message = message, result = extra and extra.result }))
  self.urgent = true
  return true
end

function R:update_flow_run(_, fields)
  for k, v in pairs(fields) do
    if k == "pid" then self:push(events.event("pid", { pid = v }))
    else error("reporter: a worker cannot update flow run field '" .. tostring(k) .. "'", 2) end
  end
end

function R:task_run_started(t)
  local e = self:push(events.event("task_started", { id = t.id, parent_id = t.parent_id, name = t.name,
    kind = t.kind, call_key = t.call_key, state = t.state, params = t.params, params_hash = t.params_hash,
    attempts = t.attempts, cache_key = t.cache_key, tags = t.tags, started = t.started }))
  self.open[t.id] = e
end

-- While a task run's task_started event is unsent, later changes are
-- folded into it (as the store folds them into its queued INSERT): one
-- event per short task instead of two.
function R:task_run_state(id, state, message, attempts)
  local e = self.open[id]
  if e then
    e.state, e.message, e.attempts = state, message, attempts
    return
  end
  self:push(events.event("task_state", { id = id, state = state, message = message, attempts = attempts }))
end

function R:task_run_finished(id, state, message, result, result_ok, attempts, ended, cache_expires, reused_from)
  local e = self.open[id]
  if e then
    e.state, e.message, e.result, e.result_ok, e.attempts = state, message, result, result_ok and true or false, attempts
    e.ended, e.cache_expires, e.reused_from = ended, cache_expires, reused_from
    self.open[id] = nil
    return
  end
  self:push(events.event("task_finished", { id = id, state = state, message = message, result = result,
    result_ok = result_ok and true or false, attempts = attempts, ended = ended,
    cache_expires = cache_expires, reused_from = reused_from }))
end

function R:log(_, task_run_id, stream, line, ts)
  self:push(events.event("log", { task_run_id = task_run_id, stream = stream, line = line,
    ts = ts or core.time() }))
end

--- The tracker flushes before it records a final state: here that only
-- asks the sender to go now (delivery never blocks the flow).
function R:flush() self.urgent = true end

--- COMPLETED task runs of the run being resumed, by call key.
function R:completed_calls(_)
  local rows, err = self.client:json("GET", "/api/v1/runs/" .. self.run_id .. "/reusable")
  if not rows then error("resume: cannot read the resumed run's results: " .. tostring(err), 0) end
  local out = {}
  for _, r in ipairs(rows) do out[r.call_key] = r end
  return out
end

local function urlencode(s)
  return (s:gsub("[^%w%-%._~]", function(c) return string.format("%%%02X", c:byte()) end))
end

--- A cached result, or nil (also when the server cannot be asked: a cache
-- miss costs a rerun, never the run).
function R:cached_result(name, cache_key, _)
  local hit = self.client:json("GET", "/api/v1/cache?name=" .. urlencode(name) .. "&key=" .. urlencode(cache_key))
  if type(hit) == "table" and hit.id then return hit end
  return nil
end

-- ---- the spool -----------------------------------------------------------------------------

local function encode_event(e)
  local ok, text = pcall(json.encode, events.pack(e))
  if ok then return text end
  return json.encode { t = "log", stream = "error", ts = core.time(),
    line = "drover worker: an event could not be encoded and was dropped: " .. tostring(text) }
end

--- Move the oldest events from memory to the spool file (in order: the
-- spool only ever holds events older than those in memory).
function R:spill(all)
  local n = self.tail - self.head + 1
  local keep = all and 0 or math.floor(self.memory_limit / 2)
  if n <= keep then return true end
  fs.mkdir(self.spool:match("^(.*)/[^/]*$") or ".")
  local f, err = io.open(self.spool, "ab")
  if not f then
    if not self.spool_warned then
      io.stderr:write("drover worker: cannot write the spool ", self.spool, ": ", tostring(err),
        "; keeping events in memory\n")
      self.spool_warned = true
    end
    return false
  end
  if self.spooled == 0 and self.spool_offset == 0 then
    f:write(json.encode { run = self.run_id, api = self.client.url, first_seq = self.qseq }, "\n")
  end
  local lines = {}
  for i = self.head, self.tail - keep do
    local e = self.q[i]
    if e.t == "task_started" then self.open[e.id] = nil end
    lines[#lines + 1] = (self.qseq + i - self.head) .. "\t" .. encode_event(e)
    self.q[i] = nil
  end
  f:write(table.concat(lines, "\n"), "\n")
  f:close()
  self.qseq = self.qseq + (self.tail - keep - self.head + 1)
  self.head = self.tail - keep + 1
  self.spooled = self.spooled + #lines
  return true
end

--- Up to `max` spooled events from the undelivered part: first seq, texts,
-- and the offset just after them.
function R:read_spool(max)
  local f = assert(io.open(self.spool, "rb"))
  local off = self.spool_offset
  if off == 0 then f:read("l"); off = f:seek() end
  f:seek("set", off)
  local first, texts = nil, {}
  while #texts < max do
    local line = f:read("l")
    if not line then break end
    local seq, text = line:match("^(%d+)\t(.*)$")
    first = first or math.tointeger(seq)
    texts[#texts + 1] = text
  end
  local after = f:seek()
  f:close()
  return first, texts, after
end

-- ---- the sender ----------------------------------------------------------------------------

--- The next batch: first seq, JSON texts, and how to drop it once sent.
function R:take()
  if self.spooled > 0 then
    local first, texts, after = self:read_spool(self.batch_size)
    return first, texts, function()
      self.spooled = self.spooled - #texts
      self.spool_offset = after
      if self.spooled == 0 then os.remove(self.spool); self.spool_offset = 0 end
    end
  end
  local n = math.min(self.tail - self.head + 1, self.batch_size)
  local first, texts = self.qseq, {}
  for i = self.head, self.head + n - 1 do
    local e = self.q[i]
    if e.t == "task_started" then self.open[e.id] = nil end -- frozen from here on
    texts[#texts + 1] = encode_event(e)
  end
  return first, texts, function()
    for i = self.head, self.head + n - 1 do self.q[i] = nil end
    self.head = self.head + n
    self.qseq = self.qseq + n
  end
end

function R:pending() return self.spooled + (self.tail - self.head + 1) end

--- Post one batch; returns "ok", "retry" (server unreachable or 5xx) or
-- "stop" (refused for good).
function R:post(first, texts, last)
  local body = '{"first_seq":' .. first .. (last and (',"last_seq":' .. last) or "") ..
    ',"events":[' .. table.concat(texts, ",") .. "]}"
  local res, err = self.client:call("POST", self.path, body, "application/json")
  if not res or res.status >= 500 then
    if not self.down_since then
      self.down_since = core.now()
      io.stderr:write("drover worker: the server did not take events (",
        res and ("HTTP " .. res.status) or tostring(err), "); keeping them and retrying\n")
    end
    return "retry"
  end
  if self.down_since then
    io.stderr:write(string.format("drover worker: the server is back after %.1f s\n", core.now() - self.down_since))
    self.down_since = nil
  end
  self.last_contact = core.now()
  local answer = type(res.json) == "table" and res.json or {}
  if res.status == 200 then
    if answer.state == "CANCELLING" and not self.cancel_seen then
      self.cancel_seen = true
      if self.on_cancel then core.spawn(self.on_cancel) end
    end
    return "ok"
  end
  local msg = require("drover.api_client").error_of(res, "POST", self.client.url .. self.path)
  if res.status == 409 and answer.reason == "ended" then
    self.refused = msg
    io.stderr:write("drover worker: ", msg, "\n")
    if self.on_refused then core.spawn(function() self.on_refused(msg) end) end
    return "stop"
  end
  if res.status == 401 or res.status == 403 then
    self.refused = msg
    io.stderr:write("drover worker: ", msg, "\n")
    return "stop"
  end
  -- 400 (or a gap): the server will never take these; say so in their
  -- place, so the sequence stays whole and later batches still apply
  io.stderr:write("drover worker: ", msg, "\n")
  local note = encode_event(events.event("log", { stream = "error", ts = core.time(),
    line = "drover worker: " .. #texts .. " events were refused: " .. msg }))
  if #texts == 0 or last then return "ok" end -- a heartbeat or a note refused: nothing to replace
  return self:post(first, { note }, first + #texts - 1)
end

function R:send_loop()
  local backoff = 0.2
  while true do
    local n = self:pending()
    local due = n >= self.batch_size or (n > 0 and (self.urgent or self.closing or self.waited))
    local beat = core.now() - self.last_contact >= self.heartbeat
    if self.refused then
      self.done:set()
      return
    end
    if due or beat then
      self.urgent, self.waited = false, false
      local first, texts, drop
      if n > 0 then first, texts, drop = self:take() else first, texts = self.next_seq, {} end
      local r = self:post(first, texts)
      if r == "ok" then
        if drop then drop() end
        backoff = 0.2
      elseif r == "stop" then
        self.done:set()
        return
      else
        if self.closing and core.now() > self.give_up_at then
          self:spill(true)
          self.done:set()
          return
        end
        local ok = pcall(core.sleep, backoff * (0.75 + 0.5 * math.random()))
        if not ok then return end
        backoff = math.min(backoff * 2, self.max_backoff)
      end
    elseif self.closing and n == 0 then
      self.done:set()
      return
    else
      local ok = pcall(core.sleep, self.batch_delay)
      if not ok then return end
      self.waited = true
    end
  end
end

--- Deliver everything (trying for up to delivery_timeout seconds).
-- Returns true, or false and the spool file now holding what was not
-- delivered (or the reason it was refused).
function R:close()
  self.closing = true
  self.give_up_at = core.now() + self.delivery_timeout
  self.urgent = true
  self.done:wait()
  if self.refused then return false, nil, self.refused end
  if self:pending() > 0 then
    self:spill(true)
    return false, self.spool
  end
  return true
end

return M
