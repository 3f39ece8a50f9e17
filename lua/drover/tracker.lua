--- Tracked calls: what a decorated function does around the real call.
--
-- A flow run is one execution of a workflow; every decorated call inside it
-- (a runner, pipeline or component method, or a drover.task function) is a
-- task run: a row in the store with its parameters, result, state, start
-- and end, attempts and log lines, and the id of the run it was called from.
--
-- Where a call sits is its *call key*: the parent's key, the call's name and
-- how many times the parent had called that name before ("/train#1/fit#2").
-- `drover resume` matches calls of the new run to COMPLETED calls of the old
-- one by call key and parameters, and reuses their stored results.
--
-- Around each call, in order: reuse (on resume), cache lookup, tag
-- concurrency limits, then attempts with retry delays; a timeout runs the
-- call in its own task so that cancelling it reaches whatever it waits on,
-- processes included.
local core = require "drover.core"
local context = require "drover.context"
local store_mod = require "drover.store"
local states = require "drover.states"

local T = {}

--- Optional observer of task runs, for live progress: observer(event, run,
-- detail) with event "start", "retry", "done", "failed", "cancelled",
-- "reused".  The CLI sets it when stderr is a terminal.
T.observer = nil
local function notify(event, run, detail)
  local o = T.observer
  if o then pcall(o, event, run, detail) end
end

-- ---- options -----------------------------------------------------------------

local option_types = {
  name = "string", retries = "number", retry_delay = { "number", "table", "function" },
  retry_jitter = "number", timeout = "number", cache_key = "function",
  cache_expiration = "number", tags = "table", catch = "boolean",
  on_completion = "function", on_failure = "function", kind = "string",
  resources = "table", -- read by backends that run calls elsewhere (slurm: cpus, mem, time, partition)
}

--- Check a table of task options; an unknown key or a wrong type is an error
-- naming it and `where`.
function T.check_options(opts, where)
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(where .. ": task options must be a table, got " .. type(opts), 3)
  end
  for k, v in pairs(opts) do
    local want = option_types[k]
    if not want then
      error(where .. ": unknown task option '" .. tostring(k) .. "'", 3)
    end
    local ok = false
    if type(want) == "table" then
      for _, w in ipairs(want) do if type(v) == w then ok = true end end
      want = table.concat(want, " or ")
    else
      ok = type(v) == want
    end
    if not ok then
      error(where .. ": task option '" .. k .. "' must be " .. want .. ", got " .. type(v), 3)
    end
  end
  if opts.kind and opts.kind ~= "flow" and opts.kind ~= "task" then
    error(where .. ": task option 'kind' must be 'flow' or 'task'", 3)
  end
  return opts
end

--- Delay before retry number `attempt` (1 = the first retry).
function T.retry_delay(opts, attempt)
  local d = opts.retry_delay or 0
  if type(d) == "table" then
    d = d[math.min(attempt, #d)] or 0
  elseif type(d) == "function" then
    d = d(attempt)
  end
  local j = opts.retry_jitter
  if j and j > 0 then d = d * (1 + j * (2 * math.random() - 1)) end
  return math.max(0, d)
end

--- Exponential backoff: base * factor^(attempt-1), at most max seconds.
function T.backoff(base, factor, max)
  base, factor, max = base or 1, factor or 2, max or 3600
  return function(attempt) return math.min(max, base * factor ^ (attempt - 1)) end
end

-- ---- canonical parameters ---------------------------------------------------

-- Parameters are stored as JSON with sorted keys, so the same arguments
-- always give the same text: that text is what resume compares.  A string
-- that is not UTF-8 is {"$bytes": BASE64}, as in the rest of the store
-- (drover.json's bytes option): the text is then valid UTF-8 on either
-- database, and decodes to the same bytes.
local canon
local function canon_string(s)
  if not utf8.len(s) then
    return '{"$bytes":"' .. require("drover.events").b64encode(s) .. '"}'
  end
  return '"' .. s:gsub('[%c"\\]', function(c)
    local map = { ['"'] = '\\"', ['\\'] = '\\\\', ['\n'] = '\\n', ['\t'] = '\\t', ['\r'] = '\\r' }
    return map[c] or string.format("\\u%04x", c:byte())
  end) .. '"'
end

function canon(v, seen)
  local t = type(v)
  if t == "nil" then return "null"
  elseif t == "boolean" then return tostring(v)
  elseif t == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return canon_string(tostring(v)) end
    if math.type(v) == "integer" then return tostring(v) end
    return string.format("%.17g", v)
  elseif t == "string" then return canon_string(v)
  elseif t == "table" then
    seen = seen or {}
    if seen[v] then return '"<cycle>"' end
    seen[v] = true
    local mt = getmetatable(v)
    if mt and mt.__name and mt ~= getmetatable("") and rawget(v, "__name") == nil and mt.__index == mt then
      -- an instance of a class: stored by class name only
      seen[v] = nil
      return canon_string("<" .. tostring(mt.__name) .. ">")
    end
    local n = #v
    local parts = {}
    local count = 0
    for _ in pairs(v) do count = count + 1 end
    if count == n then
      for i = 1, n do parts[i] = canon(v[i], seen) end
      seen[v] = nil
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(v) do keys[#keys + 1] = k end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    for i, k in ipairs(keys) do parts[i] = canon_string(tostring(k)) .. ":" .. canon(v[k], seen) end
    seen[v] = nil
    return "{" .. table.concat(parts, ",") .. "}"
  else
    return canon_string("<" .. t .. ">")
  end
end
T.canonical = canon

-- ---- tag concurrency limits ---------------------------------------------------

-- tag -> { limit, count, waiters, head, tail }: waiters[head..tail] are
-- the events of the tasks waiting for a slot, in the order they came (a
-- false is one that left); a queue by indices, since table.remove(t, 1)
-- moves every other waiter one place down, through the C API, on every
-- release (a DAG of 1,000 tasks had hundreds waiting: ~11k instructions
-- per task)
local limits = {}

--- Allow at most n concurrent task runs carrying `tag` in this process.
function T.set_limit(tag, n)
  if type(tag) ~= "string" then error("drover.limit: bad argument 'tag' (string expected)", 2) end
  if math.type(n) ~= "integer" or n < 1 then
    error("drover.limit: bad argument 'n' (positive integer expected)", 2)
  end
  local l = limits[tag]
  if l then l.limit = n else limits[tag] = { limit = n, count = 0, waiters = {}, head = 1, tail = 0 } end
end

--- Wake the first task still waiting for a slot of `l`, if any.
local function wake_next(l)
  local w, h = l.waiters, l.head
  while h <= l.tail do
    local ev = w[h]
    w[h] = nil
    h = h + 1
    if ev then
      l.head = h
      ev:set()
      return
    end
  end
  l.head = h
end

local function acquire(tag)
  local l = limits[tag]
  if not l then return end
  while l.count >= l.limit do
    local ev = core.event()
    local t = l.tail + 1
    l.tail = t
    l.waiters[t] = ev
    local ok, err = pcall(ev.wait, ev)
    if not ok then
      if l.waiters[t] == ev then
        l.waiters[t] = false -- still queued: leave the queue
      elseif l.count < l.limit then
        wake_next(l) -- woken for a slot it will not take: the next one's
      end
      error(err, 0)
    end
  end
  l.count = l.count + 1
end

local function release(tag)
  local l = limits[tag]
  if not l then return end
  l.count = l.count - 1
  wake_next(l)
end

local function acquire_tags(tags)
  if not tags then return end
  local got = {}
  for _, tag in ipairs(tags) do
    local ok, err = pcall(acquire, tag)
    if not ok then
      for _, g in ipairs(got) do release(g) end
      error(err, 0)
    end
    got[#got + 1] = tag
  end
end

local function release_tags(tags)
  if not tags then return end
  for _, tag in ipairs(tags) do release(tag) end
end

-- ---- flows -----------------------------------------------------------------------

local Flow = {}
Flow.__index = Flow

--- Start tracking a flow run.  info: name, params, backend, deployment,
-- source (how to run it again), resumed_from, id (an existing run row, as
-- a worker has), store, pid and external_id (what the reaper and a cancel
-- need to find the process running it: `drover exec` records its own).
function T.begin_flow(info)
  local store = info.store or T.default_store()
  local id = info.id
  if id then
    store:set_flow_state(id, states.RUNNING, nil)
    if info.pid then store:update_flow_run(id, { pid = info.pid }) end
  else
    id = store:create_flow_run {
      name = info.name, params = info.params, backend = info.backend or "local",
      deployment = info.deployment, source = info.source, state = states.RUNNING,
      resumed_from = info.resumed_from, pid = info.pid, external_id = info.external_id,
    }
  end
  local flow = setmetatable({
    id = id, name = info.name, store = store, scope = context.scope(),
    root = { key = "", counters = {}, id = nil },
    cancel_requested = false,
  }, Flow)
  if info.resumed_from then flow.reuse = store:completed_calls(info.resumed_from) end
  return flow
end

local function first_line(e)
  local s = type(e) == "string" and e or tostring(e)
  return (s:match("^[^\n]*"))
end

-- A failure caught by protected_call: the error and the traceback taken
-- where it was raised.  The xpcall handler wraps both into the failing
-- call's own results, so each call keeps its own traceback however many
-- tasks fail at once.
local Failure = {}
local function capture_failure(e)
  return setmetatable({ error = e, trace = debug.traceback(type(e) == "string" and e or tostring(e), 2) }, Failure)
end

--- xpcall's results {n, false, failure} made {n = 2, false, error, trace =
-- traceback} (a handler that failed itself leaves no Failure: no trace).
local function unwrap_failure(r)
  local f = r[2]
  if getmetatable(f) == Failure then r[2], r.trace = f.error, f.trace end
  return r
end

--- fn(...) under xpcall: {n, true, results...}, or {n = 2, false, error,
-- trace = traceback}.
local function protected_call(fn, ...)
  local r = table.pack(xpcall(fn, capture_failure, ...))
  if not r[1] then unwrap_failure(r) end
  return r
end

--- Run fn(...) as the body of the flow, in its own task so that cancelling
-- the flow reaches it.  Records the final state; returns ok, result-or-error.
function Flow:run(fn, ...)
  local flow = self
  local ctx = { flow = flow, node = flow.root, scope = flow.scope }
  local h = core.spawn(function(...)
    context.set(ctx)
    return protected_call(fn, ...)
  end, ...)
  flow.task = h
  flow.scope:add(h)
  local ran, r, err_trace = h:wait()
  local ok, value, trace
  if ran then
    ok, value, trace = r[1], r[2], r.trace
  else -- the body task itself was cancelled before xpcall could catch it
    ok, value, trace = false, r, err_trace
  end
  local store = flow.store
  local recorded, why = pcall(function()
    store:flush()
    if ok then
      local enc = store_mod.encode(value)
      flow:record_end(states.COMPLETED, nil, { result = enc })
    elseif flow.cancel_requested or value == "cancelled" then
      flow:record_end(states.CANCELLED, flow.cancel_message or "cancelled")
    else
      if trace then store:log(flow.id, nil, "error", trace) end
      store:flush()
      flow:record_end(states.FAILED, first_line(value))
    end
  end)
  if not recorded or store.write_error then
    flow:end_unrecorded(store.write_error or why)
    return false, flow.final_message
  end
  flow.end_recorded = true
  return ok, value, trace
end

--- Record the flow's final state (kept in final_state/final_message too,
-- for a caller that cannot read the store back).
function Flow:record_end(state, message, extra)
  self.final_state, self.final_message = state, message
  self.store:set_flow_state(self.id, state, message, extra)
end

--- The store would not take the flow's queued writes (`why`: disk full,
-- ...): drop them and end the run FAILED, with its active task runs, in
-- the few small writes that may still fit.  If even those fail, the run
-- stays active in the store with this process's pid, and the reaper ends
-- it CRASHED once the process is gone.  Sets store_failed, final_state,
-- final_message and end_recorded.
function Flow:end_unrecorded(why)
  local store = self.store
  local dropped = store.drop_pending and store:drop_pending() or 0
  self.store_failed = true
  self.final_state = states.FAILED
  self.final_message = "the store could not be written (" .. first_line(why):gsub("^drover%.db%.%w+: ", "") ..
    ")" .. (dropped > 0 and string.format("; %d tracking write(s) lost", dropped) or "")
  self.end_recorded = pcall(function()
    if store.end_flow_run then
      store:end_flow_run(self.id, states.FAILED, self.final_message)
    else
      store:set_flow_state(self.id, states.FAILED, self.final_message)
    end
  end)
end

--- The workflow called os.exit(code) while the flow ran: nothing after
-- the call runs, so the end is recorded now.  Exit code 0 (or true, or
-- none) ends the flow COMPLETED, any other FAILED; task runs still active
-- end CANCELLED (exit 0) or FAILED, so none is left RUNNING.
function Flow:exiting(code)
  local store = self.store
  local clean = code == nil or code == true or code == 0
  local shown = code == nil and "" or tostring(code)
  local message = "the workflow called os.exit(" .. shown .. ")"
  if not pcall(store.flush, store) then return self:end_unrecorded(store.write_error or "flush failed") end
  local ok = pcall(function()
    if clean then
      self:record_end(states.COMPLETED, message)
      store:end_active_task_runs(self.id, states.CANCELLED, message)
    else
      self.final_state, self.final_message = states.FAILED, message
      store:end_flow_run(self.id, states.FAILED, message)
    end
  end)
  if not ok then self:end_unrecorded(store.write_error or "write failed") end
end

--- Phase one of a cancel: CANCELLING, and every task of the flow is asked
-- to stop.  Phase two (CANCELLED) is recorded by Flow:run once they have.
function Flow:cancel(message)
  if self.cancel_requested then return false end
  self.cancel_requested = true
  self.cancel_message = message
  self.store:set_flow_state(self.id, states.CANCELLING, message or "cancel requested")
  self.scope:cancel()
  return true
end

-- ---- the tracked call ----------------------------------------------------------------

-- T.call runs these steps in order; each takes `call`, the state of one
-- tracked call: opts, fn, run (the task run's row, also what the observer
-- sees; run.args are the call's arguments) and cache_key.  A call is also
-- the context its body runs in (flow, scope, node = the call itself) and
-- the node the body's own tracked calls nest under (key, counters, id):
-- one table per call rather than three, on the path every task run takes.

--- Where a call sits: the parent's key, the call's name and how many times
-- the parent had called that name before.  A node's counters are made on
-- its first call: most task runs call nothing tracked.
local function next_call_key(parent, name)
  local counters = parent.counters
  if not counters then
    counters = {}
    parent.counters = counters
  end
  local c = (counters[name] or 0) + 1
  counters[name] = c
  return parent.key .. "/" .. name .. "#" .. c
end

--- The arguments from args[first] on (at least one), as canonical JSON:
-- what resume compares.
local function canonical_params(args, first)
  local plist = {}
  for i = first, args.n do plist[#plist + 1] = canon(args[i]) end
  return "[" .. table.concat(plist, ",") .. "]"
end

local new_task_id = store_mod.new_task_id

local function new_call(ctx, spec, fn, args)
  local flow, parent, opts, name = ctx.flow, ctx.node, spec.opts, spec.name
  local first = spec.method and 2 or 1
  local params = args.n < first and "[]" or canonical_params(args, first) -- "[]": no call for no arguments
  local id, key = new_task_id(), next_call_key(parent, name)
  local run = {
    id = id, flow_run_id = flow.id, parent_id = parent.id, name = name,
    kind = spec.kind, call_key = key, state = states.RUNNING, params = params,
    params_hash = params, attempts = 0, started = nil, args = args,
    tags = opts.tags and table.concat(opts.tags, ",") or nil,
  }
  -- eight fields: the table is made at its final size (counters, added by
  -- the first nested call, and cache_key are rare)
  local call = { flow = flow, scope = ctx.scope, node = nil, key = key, id = id, opts = opts, fn = fn, run = run }
  call.node = call
  return call
end

--- On resume (flow.reuse): the row of the same call (call key and
-- parameters) that COMPLETED in the run being resumed, or nil.
local function reuse_completed(call)
  local run = call.run
  local prev = call.flow.reuse[run.call_key]
  if prev and prev.params_hash == run.params and prev.result_ok == 1 then return prev end
end

--- With opts.cache_key: an unexpired COMPLETED result stored under the same
-- name and key, or nil.  Sets call.cache_key (the key is recorded, and a
-- result stored, whether it hits or not).  A cache_key function that fails
-- or returns nil means no caching for this call.
local function cached_result(call)
  local args = call.run.args
  local ok, k = pcall(call.opts.cache_key, table.unpack(args, 1, args.n))
  if not ok or k == nil then return nil end
  local run = call.run
  call.cache_key = tostring(k)
  run.cache_key = call.cache_key
  return call.flow.store:cached_result(run.name, call.cache_key, store_mod.time())
end

--- Record the call as COMPLETED with `prev`'s stored result, without
-- running it; returns that result.
local function record_reused(call, prev, message)
  local run, store = call.run, call.flow.store
  run.state = states.COMPLETED
  notify("reused", run, { message = message })
  run.started = store_mod.time()
  store:task_run_started(run)
  store:task_run_finished(run.id, states.COMPLETED, message, prev.result, true, 0,
    run.started, nil, prev.id)
  return store_mod.decode(prev.result)
end

local function record_start(call)
  local run = call.run
  run.started = store_mod.time()
  call.flow.store:task_run_started(run)
  if T.observer then notify("start", run) end
end

--- One attempt: {n, true, results...}, or {n = 2, false, error, trace =
-- this attempt's traceback or nil}.
local function run_attempt(call)
  local opts, fn, args = call.opts, call.fn, call.run.args
  if not opts.timeout then
    local prev = context.set(call)
    local r = table.pack(xpcall(fn, capture_failure, table.unpack(args, 1, args.n)))
    context.set(prev)
    if not r[1] then unwrap_failure(r) end
    return r
  end
  -- With a timeout the call runs in a task of its own, under a scope of its
  -- own, so the timer can cancel it and everything it spawned.
  local scope = context.scope(call.scope)
  local inner = { flow = call.flow, node = call, scope = scope }
  local h = core.spawn(function()
    context.set(inner)
    return fn(table.unpack(args, 1, args.n))
  end)
  scope:add(h)
  local timed_out = false
  local timer = core.spawn(function()
    core.sleep(opts.timeout)
    timed_out = true
    scope:cancel()
  end)
  local r = table.pack(pcall(h.wait, h))
  timer:cancel()
  if not r[1] then -- we were cancelled while waiting: stop the call, then pass it on
    scope:cancel()
    pcall(h.wait, h)
    return { n = 2, false, r[2] }
  end
  if r[2] then return { n = r.n - 1, table.unpack(r, 2, r.n) } end
  if timed_out then return { n = 2, false, "timed out after " .. opts.timeout .. " s", trace = r[4] } end
  return { n = 2, false, r[3], trace = r[4] }
end

--- Where a failed attempt of a call with retries is told, one line each
-- (the traceback goes to the run's logs).  Not while an observer shows
-- live progress: it has a line of its own for each retry.
function T.notice(line)
  io.stderr:write("drover: ", line, "\n")
end

--- A failed attempt: its traceback to the run's logs (stream "error"), and
-- one line through T.notice for a call that has retries.  `delay`: seconds
-- until the next attempt, nil after the last.
local function attempt_failed(call, attempt, retries, r, delay)
  local run, flow = call.run, call.flow
  local why = first_line(r[2])
  if r.trace then
    flow.store:log(flow.id, run.id, "error", "attempt " .. attempt .. " of " .. run.name .. " failed: " .. r.trace)
  end
  if retries == 0 or T.observer then return end
  local line = string.format("task %s attempt %d/%d failed: %s", run.name, attempt, retries + 1, why)
  if delay then line = line .. string.format("; retrying in %.3gs", delay) end
  pcall(T.notice, line)
end

--- Before retry number `attempt`: SCHEDULED with the reason, then the
-- delay.  Returns true, or false and the error that cancelled the wait.
local function wait_before_retry(call, attempt, retries, r, delay)
  local run = call.run
  local why = first_line(r[2])
  notify("retry", run, { attempt = attempt, retries = retries, delay = delay, error = why })
  call.flow.store:task_run_state(run.id, states.SCHEDULED, string.format("retry %d of %d in %.3g s after: %s",
    attempt, retries, delay, why), attempt)
  return pcall(core.sleep, delay)
end

--- Attempts until one succeeds, the call is cancelled or no retries are
-- left.  Returns the last attempt's results and "ok", "cancelled" or
-- "failed".
local function attempt_loop(call)
  local run, flow, scope, opts = call.run, call.flow, call.scope, call.opts
  local retries = opts.retries or 0
  local r
  for attempt = 1, retries + 1 do
    run.attempts = attempt
    if attempt > 1 then
      call.counters = nil -- a retry's calls count from 1 again
      flow.store:task_run_state(run.id, states.RUNNING, nil, attempt)
    end
    r = run_attempt(call)
    if r[1] then return r, "ok" end
    if r[2] == "cancelled" or flow.cancel_requested or (scope and scope.cancelled) then
      return r, "cancelled"
    end
    local delay = attempt <= retries and T.retry_delay(opts, attempt) or nil
    attempt_failed(call, attempt, retries, r, delay)
    if delay then
      local ok, err = wait_before_retry(call, attempt, retries, r, delay)
      if not ok then return { n = 2, false, err }, "cancelled" end
    end
  end
  return r, "failed"
end

local function run_hook(call, which, value)
  local hook = call.opts[which]
  if not hook then return end
  local run, flow = call.run, call.flow
  local info = { id = run.id, name = run.name, flow_run_id = run.flow_run_id, state = run.state,
    attempts = run.attempts, params = run.args }
  local ok, err = pcall(hook, info, value)
  if not ok then
    flow.store:log(flow.id, run.id, "error", which .. " hook of " .. run.name .. " failed: " .. tostring(err))
  end
end

--- Record the call as COMPLETED with its `n` results `...`.
local function record_completed(call, n, ...)
  local run, opts, store = call.run, call.opts, call.flow.store
  local now = store_mod.time()
  run.state = states.COMPLETED
  if T.observer then notify("done", run) end
  local enc, round_trips
  if n > 1 then
    enc, round_trips = store_mod.encode({ ... }), false -- several results: kept for people, not reused
  elseif (...) ~= nil then
    enc, round_trips = store_mod.encode((...))
  else
    round_trips = true -- no result (most calls): nothing to encode
  end
  local expires
  if call.cache_key and opts.cache_expiration then expires = now + opts.cache_expiration end
  store:task_run_finished(run.id, states.COMPLETED, nil, enc, round_trips, run.attempts, now, expires, nil)
end

--- Record how the attempts ended (`outcome` from attempt_loop, `r` the
-- last attempt's results).
local function record_end(call, r, outcome)
  if outcome == "ok" then return record_completed(call, r.n - 1, table.unpack(r, 2, r.n)) end
  local run, store = call.run, call.flow.store
  local now = store_mod.time()
  if outcome == "cancelled" then
    run.state = states.CANCELLED
    store:task_run_finished(run.id, states.CANCELLED, "cancelled", nil, true, run.attempts, now, nil, nil)
    notify("cancelled", run)
  else
    local why = first_line(r[2])
    run.state = states.FAILED
    store:task_run_finished(run.id, states.FAILED, why, nil, true, run.attempts, now, nil, nil)
    notify("failed", run, { error = why })
  end
end

--- The hook for the outcome: on_completion(info, result) or
-- on_failure(info, error), `value` being the first result or the error.
-- A failing hook is logged, not raised.
local function run_hooks(call, outcome, value)
  if outcome == "ok" then run_hook(call, "on_completion", value)
  elseif outcome == "failed" then run_hook(call, "on_failure", value) end
end

--- After the attempts: tags released, the end recorded, the hook run;
-- the call's results, nil and the error (catch), or the error raised.
local function conclude(call, r, outcome)
  local opts = call.opts
  if opts.tags then release_tags(opts.tags) end
  record_end(call, r, outcome)
  if opts.on_completion or opts.on_failure then run_hooks(call, outcome, r[2]) end
  if outcome == "ok" then return table.unpack(r, 2, r.n) end
  if outcome == "failed" and opts.catch then return nil, r[2] end
  error(r[2], 0)
end

--- The end of a call's only attempt (no retries, no timeout), given
-- xpcall's results: what attempt_loop and conclude do, without packing
-- the results into a table when the call succeeded (most calls).
local function conclude_one(call, prev, ok, ...)
  context.set(prev)
  if ok then
    local opts = call.opts
    if opts.tags then release_tags(opts.tags) end
    record_completed(call, select("#", ...), ...)
    if opts.on_completion then run_hook(call, "on_completion", (...)) end
    return ...
  end
  local r = unwrap_failure({ n = 2, false, (...) })
  if r[2] == "cancelled" or call.flow.cancel_requested or (call.scope and call.scope.cancelled) then
    return conclude(call, r, "cancelled")
  end
  attempt_failed(call, 1, 0, r, nil)
  return conclude(call, r, "failed")
end

-- The arguments of a call that has none (never written to).
local NO_ARGS = table.pack()

--- Call fn(...) as a tracked run described by spec {name, kind, opts, method}.
function T.call(spec, fn, ...)
  local ctx = context.get()
  if not ctx or not ctx.flow then return T.adhoc(spec, fn, ...) end
  -- a flow whose tracking the store will not take (disk full) stops here
  -- rather than running on untracked
  local write_error = ctx.flow.store.write_error
  if write_error then error("the store cannot be written: " .. first_line(write_error), 0) end

  local call = new_call(ctx, spec, fn, select("#", ...) == 0 and NO_ARGS or table.pack(...))
  local opts = call.opts
  if ctx.flow.reuse then
    local prev = reuse_completed(call)
    if prev then return record_reused(call, prev, "reused from the resumed run") end
  end
  if opts.cache_key then
    local hit = cached_result(call)
    if hit then return record_reused(call, hit, "cache hit") end
  end

  if opts.tags then acquire_tags(opts.tags) end
  record_start(call)
  if opts.timeout or (opts.retries or 0) > 0 then return conclude(call, attempt_loop(call)) end
  -- one attempt, in this task (run_attempt's first branch, with `...`
  -- passed on as it came)
  call.run.attempts = 1
  return conclude_one(call, context.set(call), xpcall(fn, capture_failure, ...))
end

-- ---- outside any flow -----------------------------------------------------------

local default_store
function T.default_store()
  if not default_store then
    local s, err = store_mod.open()
    if not s then error(err, 0) end
    default_store = s
  end
  return default_store
end

--- A tracked call made outside any flow run gets a flow run of its own.
function T.adhoc(spec, fn, ...)
  local flow = T.begin_flow { name = spec.name, params = nil, backend = "local" }
  local ok, value = flow:run(function(...) return table.pack(T.call(spec, fn, ...)) end, ...)
  if not ok then error(value, 0) end
  return table.unpack(value, 1, value.n)
end

--- The flow run and task run the caller is inside, or nil.
function T.current()
  local ctx = context.get()
  if not ctx or not ctx.flow then return nil end
  return { flow_run_id = ctx.flow.id, task_run_id = ctx.node.id, flow = ctx.flow }
end

--- Route print() to stdout and to the logs of whichever run calls it, as
-- workers and `drover exec` want.  Returns a function restoring print.
function T.capture_print()
  local real_print = print
  _G.print = function(...)
    real_print(...)
    local parts = table.pack(...)
    for i = 1, parts.n do parts[i] = tostring(parts[i]) end
    T.log("stdout", table.concat(parts, "\t", 1, parts.n))
  end
  return function() _G.print = real_print end
end

--- Record a log line for the current run (no-op outside runs).
function T.log(stream, line)
  local ctx = context.get()
  if not ctx or not ctx.flow then return false end
  ctx.flow.store:log(ctx.flow.id, ctx.node.id, stream, line)
  return true
end

return T
