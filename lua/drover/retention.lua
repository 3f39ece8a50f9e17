--- Retention: ended runs older than a cutoff leave the store, with all
-- their rows, and the space they took goes back to the filesystem.
--
-- Used by `drover prune` (one pass, now) and `drover serve --retention
-- AGE` (a pass every INTERVAL seconds, in the daemon's loop).  A pass
-- deletes in batches of BATCH runs, one short write transaction each
-- (Store:prune_batch), and pauses between them so the lock passes to
-- workers and requests; then gives the free pages back a VACUUM_PAGES step
-- at a time (Store:vacuum_step) and checkpoints the WAL so the file
-- shrinks.  Active runs are never candidates (the store picks final runs
-- only, inside each batch's transaction).
local drover = require "drover"
local store_mod = require "drover.store"

local M = {}

--- Runs deleted per transaction: 100 runs of 20 task runs and 20 log
-- lines each is ~4k rows, 20-70 ms of write lock (bench/scale.sh).
M.BATCH = 100
--- The daemon's batches are smaller: its loop serves no request while one
-- runs.
M.DAEMON_BATCH = 50
--- Seconds between two batches (and two vacuum steps).
M.PAUSE = 0.01
--- Pages (4 KiB) handed back to the filesystem per vacuum step (each
-- step moves up to that many pages inside the file: a write transaction
-- of ~12 ms, median, on the 100k-run fixture).
M.VACUUM_PAGES = 128
--- Seconds between the daemon's passes.
M.INTERVAL = 3600

local UNITS = { s = 1, m = 60, h = 3600, d = 86400, w = 7 * 86400 }

--- Seconds in a duration like "30d", "12h", "90m", "45s" or "2w", or nil
-- and a message saying what is wrong with it.
function M.parse_duration(s)
  local n, unit = tostring(s):match("^(%d+)([smhdw])$")
  local v = n and math.tointeger(tonumber(n))
  if not v then
    return nil, "'" .. tostring(s) .. "' is not a duration (a whole number and a unit: 30d, 12h, 90m, 45s, 2w)"
  end
  return v * UNITS[unit]
end

local function add(total, counts)
  for k, v in pairs(counts) do total[k] = (total[k] or 0) + v end
end

local function median(list)
  table.sort(list)
  return list[(#list + 1) // 2] or 0
end

--- One pass over `store`: prune the runs `filter` chooses (Store:prune_batch:
-- before, states, deployment), then vacuum.  opts: batch, pause,
-- vacuum_pages, checkpoint (the WAL checkpoint after vacuuming: "PASSIVE",
-- the default, never waits; "TRUNCATE" waits for readers and empties the
-- WAL), stopping (a function: true ends the pass early).  Returns
-- { runs, task_runs, logs, states, calls, batches, max_batch_seconds,
-- median_batch_seconds (each batch's write transaction), vacuumed (free
-- pages handed back), vacuum_seconds, median_vacuum_step_seconds,
-- max_vacuum_step_seconds, seconds }.
function M.pass(store, filter, opts)
  opts = opts or {}
  local batch = opts.batch or M.BATCH
  local pause = opts.pause or M.PAUSE
  local stopping = opts.stopping or function() return false end
  local t0 = store_mod.time()
  local total = { runs = 0, task_runs = 0, logs = 0, states = 0, calls = 0, batches = 0,
    max_batch_seconds = 0, vacuumed = 0, vacuum_seconds = 0, median_vacuum_step_seconds = 0,
    max_vacuum_step_seconds = 0 }
  local cursor, took_all = nil, {}
  repeat
    local tb = store_mod.time()
    local counts, next_cursor = store:prune_batch(filter, cursor, batch)
    local took = store_mod.time() - tb
    if counts.runs > 0 then
      add(total, counts)
      total.batches = total.batches + 1
      if took > total.max_batch_seconds then total.max_batch_seconds = took end
      took_all[#took_all + 1] = took
    end
    cursor = next_cursor
    if cursor and pause > 0 then drover.sleep(pause) end
  until not cursor or stopping()
  if total.runs > 0 and store:incremental_vacuum() then
    local pages = opts.vacuum_pages or M.VACUUM_PAGES
    local tv = store_mod.time()
    local before = store:free_pages()
    local left, steps = before, {}
    while left > 0 and not stopping() do
      local ts = store_mod.time()
      left = store:vacuum_step(pages)
      steps[#steps + 1] = store_mod.time() - ts
      total.max_vacuum_step_seconds = math.max(total.max_vacuum_step_seconds, steps[#steps])
      if left > 0 and pause > 0 then drover.sleep(pause) end
    end
    total.median_vacuum_step_seconds = median(steps)
    total.vacuumed = before - left
    store:checkpoint(opts.checkpoint or "PASSIVE")
    total.vacuum_seconds = store_mod.time() - tv
  end
  total.median_batch_seconds = median(took_all)
  total.seconds = store_mod.time() - t0
  return total
end

--- The daemon's retention task: every `opts.interval` seconds (default
-- INTERVAL; the first pass right away), prune ended runs older than
-- `older_than` seconds.  opts.stopping (a function) ends the loop;
-- opts.log (a function taking a line) reports each pass that pruned;
-- opts.batch: runs per transaction (default DAEMON_BATCH).
function M.run(store, older_than, opts)
  opts = opts or {}
  local stopping = opts.stopping or function() return false end
  local log = opts.log or function(line) io.stderr:write(line, "\n") end
  if not store:incremental_vacuum() then
    log("drover serve: retention: this store predates incremental vacuum: pruned space is reused but the "
      .. "file does not shrink until `drover prune --full-vacuum` rewrites it once")
  end
  while not stopping() do
    local ok, r = pcall(M.pass, store, { before = store_mod.time() - older_than },
      { stopping = stopping, batch = opts.batch or M.DAEMON_BATCH })
    if not ok then
      log("drover serve: retention: " .. tostring(r):match("[^\n]*"))
    elseif r.runs > 0 then
      log(string.format("drover serve: retention: pruned %d run(s), %d task run(s), %d log line(s) in %d batch(es)",
        r.runs, r.task_runs, r.logs, r.batches))
    end
    local deadline = drover.now() + (opts.interval or M.INTERVAL)
    while not stopping() and drover.now() < deadline do drover.sleep(math.min(1, deadline - drover.now())) end
  end
end

return M
