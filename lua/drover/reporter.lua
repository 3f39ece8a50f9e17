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
-- The sender is woken at once by a full batch, a flow state change, a
-- flush and close(), so a run's first and last events wait for no timer.
-- A flow that never waits would keep the sender from running until it
-- ends: at every full batch push() yields (where it may), so the batch
-- goes out and the server applies it while the flow goes on, and every 32
-- events while a batch is in flight, so its body is sent and its answer
-- read without delay; the next batch is encoded while one is in flight.
--
-- The server may blink; the run goes on.  A refused connection, a timeout
-- or a 5xx keeps the events: in memory up to `memory_limit`, beyond that
-- appended to a spool file, and retried with backoff (up to 5 s apart)
-- until the server answers; the spool is sent first, so order is kept.
-- The flow itself never waits for the server.  At the end, close() keeps
-- trying for `delivery_timeout` seconds; what is still undelivered then
-- stays in the spool, which `drover replay FILE` sends later (also after
-- the server refused this worker's token: replay with the server's).
--
-- A batch larger than the server takes (413) is split in halves.  A
-- server that has fewer events than it acknowledged (409 gap: restored
-- from a backup, say) cannot get them back, since a worker drops what was
-- acknowledged: what is unsent is renumbered to follow what the server
-- has, led by a log line saying how many events were lost.
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

M.defaults = { batch_size = 2000, batch_delay = 0.1, heartbeat = 10, memory_limit = 20000,
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
  self.wake = core.event()  -- set to send now (see nap)
  self.sender = core.spawn(function()
    -- a bug here must not leave close() waiting for good, nor lose events
    local ok, err = xpcall(self.send_loop, debug.traceback, self)
    if not ok then
      self.failed = tostring(err)
      io.stderr:write("drover worker: the reporter failed: ", self.failed, "\n")
      self.done:set()
    end
  end)
  return self
end

-- ---- the store methods the tracker calls ---------------------------------------------------

--- Queue event `e`: always the last thing a store method does, since it
-- may yield (other tasks run, the sender may take `e`).
function R:push(e)
  local t = self.tail + 1
  self.q[t] = e
  self.tail = t
  self.next_seq = self.next_seq + 1
  local n = t - self.head + 1
  if n > self.memory_limit then self:spill() end
  -- a full batch wakes the sender; while a batch is in flight, yielding
  -- often lets this process send its body and read the answer (each
  -- takes a turn of the event loop).  Only a drover task may yield here
  -- (not a coroutine of the flow's own, nor a metamethod).
  if (n % self.batch_size == 0 or (self.sending and n % 32 == 0))
      and coroutine.isyieldable() and core.current() then
    if n % self.batch_size == 0 then self.wake:set() end
    core.yield()
  end
end

--- `extra.ts`, else now, dates the change (the server applies it later).
function R:set_flow_state(_, state, message, extra)
  self.urgent = true
  self.wake:set()
  self:push(events.event("state", { state = state, message = message, result = extra and extra.result,
    ts = extra and extra.ts or core.time() }))
  return true
end

function R:update_flow_run(_, fields)
  for k, v in pairs(fields) do
    if k == "pid" then self:push(events.event("pid", { pid = v }))
    else error("reporter: a worker cannot update flow run field '" .. tostring(k) .. "'", 2) end
  end
end

function R:task_run_started(t)
  local e = events.event("task_started", { id = t.id, parent_id = t.parent_id, name = t.name,
    kind = t.kind, call_key = t.call_key, state = t.state, params = t.params, params_hash = t.params_hash,
    attempts = t.attempts, cache_key = t.cache_key, tags = t.tags, started = t.started })
  self.open[t.id] = e
  self:push(e)
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
function R:flush()
  self.urgent = true
  self.wake:set()
end

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

-- Keys in any order (sorting them costs a third of the encoding); JSON
-- first: only an event with bytes that are not UTF-8 needs packing.
local UNSORTED = { sort_keys = false }
local function encode_event(e)
  local ok, text = pcall(json.encode, e, UNSORTED)
  if ok then return text end
  ok, text = pcall(json.encode, events.pack(e), UNSORTED)
  if ok then return text end
  return json.encode { t = "log", stream = "error", ts = core.time(),
    line = "drover worker: an event could not be encoded and was dropped: " .. tostring(text) }
end

--- The spool file's path, chosen at the first spill: `self.spool`, unless
-- a file of that name is already there (left by an earlier worker of the
-- same run, maybe still to be replayed): then the first free
-- RUN_ID.2.events, RUN_ID.3.events, ...  One writer and one header per
-- file, so each file replays on its own.
function R:spool_path()
  if not self.spool_claimed then
    local base, ext = self.spool:match("^(.*)(%.events)$")
    if not base then base, ext = self.spool, "" end
    local n = 1
    while fs.exists(self.spool) do
      n = n + 1
      self.spool = base .. "." .. n .. ext
    end
    self.spool_claimed = true
  end
  return self.spool
end

local function spool_header(self, first_seq)
  return json.encode { run = self.run_id, api = self.client.url, first_seq = first_seq }
end

local function cannot_spool(self, path, err)
  if not self.spool_warned then
    io.stderr:write("drover worker: cannot write the spool ", path, ": ", tostring(err),
      "; keeping events in memory\n")
    self.spool_warned = true
  end
  return false
end

--- Move the oldest events from memory to the spool file (in order: the
-- spool only ever holds events older than those in memory).
function R:spill(all)
  local n = self.tail - self.head + 1
  local keep = all and 0 or math.floor(self.memory_limit / 2)
  if n <= keep then return true end
  local path = self:spool_path()
  fs.mkdir(path:match("^(.*)/[^/]*$") or ".")
  local f, err = io.open(path, "ab")
  if not f then return cannot_spool(self, path, err) end
  if f:seek("end") == 0 then f:write(spool_header(self, self.qseq), "\n") end
  local lines = {}
  for i = self.head, self.tail - keep do
    local e = self.q[i]
    if e.t == "task_started" then self.open[e.id] = nil end
    lines[#lines + 1] = (self.qseq + i - self.head) .. "\t" .. encode_event(e)
    self.q[i] = nil
  end
  f:write(table.concat(lines, "\n"), "\n")
  f:close()
  self.pre = nil
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

--- After a gap: the server has events up to `applied` and this worker's
-- unsent events start at `first`.  The numbers between are lost for good
-- (acknowledged, so dropped here).  Number what is unsent from applied + 1,
-- led by a log line saying so (it takes the first free number), so the
-- sequence is whole again and the run's log shows the loss.
function R:resync(applied, first)
  local msg = string.format("drover worker: the server lost %d event(s) of this run (seq %d-%d: it has "
    .. "events up to %d only, e.g. its store was restored from a backup); reporting goes on from there",
    first - applied - 1, applied + 1, first - 1, applied)
  io.stderr:write(msg, "\n")
  local note = events.event("log", { stream = "error", line = msg, ts = core.time() })
  self.pre = nil
  if self.spooled > 0 then
    -- rewrite the undelivered part of the spool with the new numbers
    local path, tmp = self.spool, self.spool .. ".tmp"
    local f, err = io.open(tmp, "wb")
    if not f then
      cannot_spool(self, tmp, err)
      return false
    end
    f:write(spool_header(self, applied + 1), "\n", applied + 1, "\t", encode_event(note), "\n")
    local seq = applied + 2
    while self.spooled > 0 do
      local _, texts, after = self:read_spool(self.batch_size)
      if #texts == 0 then break end
      for i, text in ipairs(texts) do texts[i] = (seq + i - 1) .. "\t" .. text end
      f:write(table.concat(texts, "\n"), "\n")
      seq = seq + #texts
      self.spooled = self.spooled - #texts
      self.spool_offset = after
    end
    f:close()
    local ok, rerr = os.rename(tmp, path)
    if not ok then error("drover worker: cannot replace the spool " .. path .. ": " .. tostring(rerr), 0) end
    self.spooled, self.spool_offset = seq - applied - 1, 0
    self.qseq = seq
  else
    self.head = self.head - 1
    self.q[self.head] = note
    self.qseq = applied + 1
  end
  self.next_seq = self.qseq + (self.tail - self.head + 1)
  return true
end

-- ---- the sender ----------------------------------------------------------------------------

--- The next batch: its first seq and JSON texts (the spool's oldest
-- undelivered events, else memory's).
function R:take()
  if self.spooled > 0 then
    local first, texts = self:read_spool(self.batch_size)
    return first, texts
  end
  local n = math.min(self.tail - self.head + 1, self.batch_size)
  local pre = self.pre
  self.pre = nil
  if pre and pre.head == self.head and #pre.texts == n then return self.qseq, pre.texts end
  return self.qseq, self:encode(self.head, n)
end

--- The server has every event up to `upto`: drop them, from the spool and
-- from memory.  By number, not by position: while a batch was in flight
-- the flow may have pushed enough to spill it from memory to the spool.
function R:acknowledge(upto)
  if self.spooled > 0 then
    local f = assert(io.open(self.spool, "rb"))
    local off = self.spool_offset
    if off == 0 then f:read("l"); off = f:seek() end
    f:seek("set", off)
    while self.spooled > 0 do
      local line = f:read("l")
      local digits = line and line:match("^(%d+)\t")
      local seq = digits and tonumber(digits)
      if not seq or seq > upto then break end
      self.spooled = self.spooled - 1
      off = f:seek()
    end
    f:close()
    self.spool_offset = off
    if self.spooled == 0 then os.remove(self.spool); self.spool_offset = 0 end
  end
  local q = self.q
  while self.head <= self.tail and self.qseq <= upto do
    q[self.head] = nil
    self.head, self.qseq = self.head + 1, self.qseq + 1
  end
end

--- JSON texts of q[from .. from + n - 1], frozen from here on (no more
-- folding into a task_started once its text is made).
function R:encode(from, n)
  local texts, q, open = {}, self.q, self.open
  for i = from, from + n - 1 do
    local e = q[i]
    if e.t == "task_started" then open[e.id] = nil end
    texts[i - from + 1] = encode_event(e)
  end
  return texts
end

--- Encode the full batch after the one in flight, while the server
-- applies that one: in slices, yielding between them, so this worker
-- still sends the batch in flight and reads its answer meanwhile.
function R:encode_ahead(from)
  if self.tail - from + 1 < self.batch_size then return end
  local head, texts, q, open = self.head, {}, self.q, self.open
  for i = from, from + self.batch_size - 1 do
    local e = q[i]
    if e == nil or self.head ~= head then return end -- spilled or renumbered meanwhile
    if e.t == "task_started" then open[e.id] = nil end
    texts[i - from + 1] = encode_event(e)
    if (i - from) % 32 == 31 then core.yield() end
  end
  self.pre = { head = from, texts = texts }
end

-- "Expect: 100-continue": the server answers (413) before the body is sent
local EXPECT = { headers = { expect = "100-continue" } }

function R:pending() return self.spooled + (self.tail - self.head + 1) end

--- Post one batch; returns "ok", "retry" (server unreachable or 5xx),
-- "resync" (a gap: the unsent events were renumbered) or "stop" (refused
-- for good).
function R:post(first, texts, last)
  local body = '{"first_seq":' .. first .. (last and (',"last_seq":' .. last) or "") ..
    ',"events":[' .. table.concat(texts, ",") .. "]}"
  self.sending = true
  local res, err = self.client:call("POST", self.path, body, "application/json",
    (self.too_large or self.ask_first) and EXPECT or nil)
  self.sending = false
  -- a server refusing a large body (413) may close the connection before
  -- reading it, which looks like a failed send: ask it first next time
  self.ask_first = not res and #body > 65536
  if not res and require("drover.api_client").untrusted(err) then
    -- retrying cannot mend trust: keep the events for drover replay
    self.refused, self.refused_token = tostring(err), true
    io.stderr:write("drover worker: ", tostring(err), "\n")
    return "stop"
  end
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
  if res.status == 413 then self.too_large = true end
  if res.status == 413 and #texts > 1 then
    -- larger than the server's --max-body (or its count limit): halves
    local h = #texts // 2
    local r = self:post(first, table.move(texts, 1, h, 1, {}))
    if r ~= "ok" then return r end
    return self:post(first + h, table.move(texts, h + 1, #texts, 1, {}))
  end
  local msg = require("drover.api_client").error_of(res, "POST", self.client.url .. self.path)
  if res.status == 409 and answer.reason == "ended" then
    self.refused = msg
    io.stderr:write("drover worker: ", msg, "\n")
    if self.on_refused then core.spawn(function() self.on_refused(msg) end) end
    return "stop"
  end
  local applied = answer.applied
  if res.status == 409 and answer.reason == "gap" and math.type(applied) == "integer" and applied >= 0
      and applied < first - 1 and not last then
    if self:resync(applied, first) then return "resync" end
    return "retry"
  end
  if res.status == 401 or res.status == 403 then
    self.refused, self.refused_token = msg, true
    io.stderr:write("drover worker: ", msg, "\n")
    return "stop"
  end
  -- 400 (or a 413 for one event): the server will never take these; say
  -- so in their place, so the sequence stays whole and later batches
  -- still apply
  io.stderr:write("drover worker: ", msg, "\n")
  local note = encode_event(events.event("log", { stream = "error", ts = core.time(),
    line = "drover worker: " .. #texts .. " events were refused: " .. msg }))
  if #texts == 0 or last then return "ok" end -- a heartbeat or a note refused: nothing to replace
  return self:post(first, { note }, first + #texts - 1)
end

--- Post a batch taken from memory; when more full batches wait behind it,
-- encode the next one while this one is in flight.
function R:post_ahead(first, texts)
  if self.spooled > 0 or #texts == 0 or self.tail - self.head + 1 < #texts + self.batch_size then
    return self:post(first, texts)
  end
  local t = core.spawn(function() return self:post(first, texts) end)
  core.yield() -- let it send before encoding
  self:encode_ahead(self.head + #texts)
  local ok, ran, r = pcall(t.wait, t)
  if not ok then t:cancel(); error(ran, 0) end
  return ran and r or "retry"
end

--- Wait up to `t` seconds, or until something wakes the sender (a full
-- batch, a state change, a flush, close).  Returns whether the time ran
-- out; raises if the sender was cancelled.
function R:nap(t)
  local timed_out = false
  self.wake:clear()
  local timer = core.spawn(function()
    core.sleep(t)
    timed_out = true
    self.wake:set()
  end)
  local ok, err = pcall(self.wake.wait, self.wake)
  timer:cancel()
  if not ok then error(err, 0) end
  return timed_out
end

function R:send_loop()
  local backoff = 0.2
  while not self.refused do
    local n = self:pending()
    local due = n >= self.batch_size or (n > 0 and (self.urgent or self.closing or self.waited))
    local beat = core.now() - self.last_contact >= self.heartbeat
    if due or beat then
      self.urgent, self.waited = false, false
      local first, texts
      if n > 0 then first, texts = self:take() else first, texts = self.next_seq, {} end
      local r = self:post_ahead(first, texts)
      if r == "ok" then
        self:acknowledge(first + #texts - 1)
        backoff = 0.2
      elseif r == "resync" then
        self.urgent = true
      elseif r == "stop" then
        break
      else
        if self.closing and core.now() > self.give_up_at then
          self:spill(true)
          break
        end
        local ok = pcall(core.sleep, backoff * (0.75 + 0.5 * math.random()))
        if not ok then return end
        backoff = math.min(backoff * 2, self.max_backoff)
      end
    elseif self.closing and n == 0 then
      break
    else
      local ok, timed_out = pcall(self.nap, self, self.batch_delay)
      if not ok then return end
      self.waited = timed_out
    end
  end
  self.done:set()
end

--- Deliver everything (trying for up to delivery_timeout seconds).
-- Returns true, or false and the spool file now holding what was not
-- delivered (nil if none could be written) and, when the server refused
-- the run's reports, why.  After a 401 or 403 (this token is not good
-- there) the events are spooled too, for `drover replay` with the server's
-- token; after a 409 `ended` they are not (the run is over).
function R:close()
  self.closing = true
  self.give_up_at = core.now() + self.delivery_timeout
  self.urgent = true
  self.wake:set()
  self.done:wait()
  if self.failed then
    local ok = self:pending() > 0 and self:spill(true)
    return false, ok and self.spool or nil, "the reporter failed: " .. self.failed:match("^[^\n]*")
  end
  if self.refused and not self.refused_token then return false, nil, self.refused end
  if self:pending() > 0 then
    local ok = self:spill(true)
    return false, ok and self.spool or nil, self.refused
  end
  if self.refused then return false, nil, self.refused end
  return true
end

return M
