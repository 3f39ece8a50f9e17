--- The daemon's server-sent events (GET /api/events), computed once and
-- fanned out.  The store is polled by one task for every client: each
-- poll reads the recent runs, the watched runs' task signatures and their
-- new log lines once, encodes each event once, and appends the same
-- strings to the queue of every client that wants them.  A client's own
-- task only waits for its queue and writes it; 500 idle clients cost one
-- poll, not 500.
--
--   local feed = daemon_events.new(store, { interval = 0.5, run_view = fn })
--   local client = feed:join(run_id_or_nil)   -- starts the poller if needed
--   client.ev:wait() ... feed:take(client) -> items, or nil when dropped
--   feed:leave(client)
--   feed:close()                             -- wakes every client to finish
--
-- A client that does not keep up (more than MAX_QUEUED bytes waiting) is
-- dropped: its connection ends and EventSource reconnects, with
-- Last-Event-ID, where it left off.
local drover = require "drover"
local json = require "drover.json"
local server = require "drover.server"

local M = {}

M.MAX_QUEUED = 8 * 1024 * 1024
--- Polls with nothing for a client before it gets a keep-alive comment.
M.KEEPALIVE_POLLS = 30

local BYTES = { bytes = true }

local Feed = {}
Feed.__index = Feed

--- opts: interval (seconds between polls), run_view (row -> value for a
-- `run` event's data).
function M.new(store, opts)
  return setmetatable({ store = store, interval = opts.interval, run_view = opts.run_view,
    clients = {}, nclients = 0, watched = {}, seen = nil, task = nil, closed = false }, Feed)
end

local function recent_states(store)
  local seen = {}
  for _, r in ipairs(store:flow_runs { limit = 200 }) do seen[r.id] = r.state end
  return seen
end

--- A new client, following run `run_id` (its log lines and task changes)
-- when given.  Events from now on go to its queue.
function Feed:join(run_id)
  local c = { ev = drover.event(), queue = {}, bytes = 0, idle = 0, watch = run_id, dropped = false }
  if not self.seen then self.seen = recent_states(self.store) end
  if run_id then
    local w = self.watched[run_id]
    if not w then
      local r = self.store:flow_run(run_id)
      w = { n = 0, state = r and r.state, sig = self.store:task_signature(run_id),
        last_log = self.store:last_log_id(run_id) }
      self.watched[run_id] = w
    end
    w.n = w.n + 1
  end
  self.clients[c] = true
  self.nclients = self.nclients + 1
  if not self.task then
    self.task = drover.spawn(function()
      local ok, e = pcall(self.run, self)
      self.task = nil
      if not ok and not self.closed then io.stderr:write("drover serve: events: ", tostring(e), "\n") end
    end)
  end
  return c
end

function Feed:leave(c)
  if not self.clients[c] then return end
  self.clients[c] = nil
  self.nclients = self.nclients - 1
  local w = c.watch and self.watched[c.watch]
  if w then
    w.n = w.n - 1
    if w.n == 0 then self.watched[c.watch] = nil end
  end
end

--- The client's queued items ({chunk =, log_id =}), emptied; nil when the
-- client was dropped or the feed closed.
function Feed:take(c)
  c.ev:clear()
  if c.dropped or self.closed then return nil end
  local q = c.queue
  c.queue, c.bytes = {}, 0
  return q
end

local function push(c, item)
  if c.dropped then return end
  c.queue[#c.queue + 1] = item
  c.bytes = c.bytes + #item.chunk
  if c.bytes > M.MAX_QUEUED then c.dropped = true end
  c.ev:set()
end

--- One poll: what changed since the last, to every client that wants it.
function Feed:poll()
  local store = self.store
  local all = {}      -- `run` events every client gets
  local rows = store:flow_runs { limit = 200 }
  local seen, old = {}, self.seen or {}
  local by_id = {}
  for _, r in ipairs(rows) do
    seen[r.id] = r.state
    by_id[r.id] = r
    if old[r.id] ~= r.state then all[r.id] = r end -- a run new in the window too
  end
  self.seen = seen
  local per_run = {}  -- watched run id -> items for its clients only
  for id, w in pairs(self.watched) do
    local items = {}
    local r = by_id[id] or store:flow_run(id)
    local sig = self.store:task_signature(id)
    if r and (sig ~= w.sig or r.state ~= w.state) and not all[id] then
      items[#items + 1] = { chunk = server.sse { event = "run", data = json.encode(self.run_view(r), BYTES) } }
    end
    w.sig, w.state = sig, r and r.state
    for _, l in ipairs(store:logs(id, w.last_log, 1000)) do
      w.last_log = l.id
      items[#items + 1] = { chunk = server.sse { event = "log", id = l.id, data = json.encode(l, BYTES) }, log_id = l.id }
    end
    per_run[id] = items
  end
  local common = {}
  for _, r in pairs(all) do
    common[#common + 1] = { chunk = server.sse { event = "run", data = json.encode(self.run_view(r), BYTES) } }
  end
  for c in pairs(self.clients) do
    local n = 0
    for _, it in ipairs(common) do push(c, it); n = n + 1 end
    for _, it in ipairs(c.watch and per_run[c.watch] or {}) do push(c, it); n = n + 1 end
    c.idle = n == 0 and c.idle + 1 or 0
    if c.idle >= M.KEEPALIVE_POLLS then
      push(c, { chunk = server.sse {} }) -- a comment: keeps the connection alive
      c.idle = 0
    end
  end
end

function Feed:run()
  local last_error
  while self.nclients > 0 and not self.closed do
    drover.sleep(self.interval)
    if self.nclients == 0 or self.closed then break end
    -- a poll that fails (the store locked past its timeout) is tried
    -- again next time; its message is written once, not every poll
    local ok, e = pcall(self.poll, self)
    if not ok and tostring(e) ~= last_error and e ~= "cancelled" then
      io.stderr:write("drover serve: events: ", tostring(e), "\n")
    end
    if e == "cancelled" then error(e, 0) end
    last_error = not ok and tostring(e) or nil
  end
  if self.nclients == 0 then self.seen = nil end -- the next first client starts afresh
end

--- Wake every client: the daemon stops.
function Feed:close()
  self.closed = true
  for c in pairs(self.clients) do c.ev:set() end
end

return M
