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
-- always give the same text: that text is what resume compares.
local canon
local function canon_string(s)
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

local limits = {} -- tag -> { limit, count, waiters = {events} }

--- Allow at most n concurrent task runs carrying `tag` in this process.
function T.set_limit(tag, n)
  if type(tag) ~= "string" then error("drover.limit: bad argument 'tag' (string expected)", 2) end
  if math.type(n) ~= "integer" or n < 1 then
    error("drover.limit: bad argument 'n' (positive integer expected)", 2)
  end
  local l = limits[tag]
  if l then l.limit = n else limits[tag] = { limit = n, count = 0, waiters = {} } end
end

local function acquire(tag)
  local l = limits[tag]
  if not l then return end
  while l.count >= l.limit do
    local ev = core.event()
    l.waiters[#l.waiters + 1] = ev
    local ok, err = pcall(ev.wait, ev)
    if not ok then
      for i, w in ipairs(l.waiters) do if w == ev then table.remove(l.waiters, i) break end end
      error(err, 0)
    end
  end
  l.count = l.count + 1
end

local function release(tag)
  local l = limits[tag]
  if not l then return end
  l.count = l.count - 1
  local ev = table.remove(l.waiters, 1)
  if ev then ev:set() end
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

local last_trace
local function traceback_handler(e)
  last_trace = debug.traceback(type(e) == "string" and e or tostring(e), 2)
  return e
end

local function first_line(e)
  local s = type(e) == "string" and e or tostring(e)
  return (s:match("^[^\n]*"))
end

--- Run fn(...) as the body of the flow, in its own task so that cancelling
-- the flow reaches it.  Records the final state; returns ok, result-or-error.
function Flow:run(fn, ...)
  local flow = self
  local ctx = { flow = flow, node = flow.root, scope = flow.scope }
  local h = core.spawn(function(...)
    context.set(ctx)
    local r = table.pack(xpcall(fn, traceback_handler, ...))
    if not r[1] then r.trace = last_trace end
    return r
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
      store:write([[UPDATE task_runs SET state = ?, message = ? WHERE flow_run_id = ?
          AND state IN ('RUNNING','PENDING','SCHEDULED','CANCELLING')]], states.CANCELLED, message, self.id)
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

local function invoke(ctx, node, opts, fn, args)
  local inner = { flow = ctx.flow, node = node, scope = ctx.scope }
  if not opts.timeout then
    local prev = context.set(inner)
    local r = table.pack(xpcall(fn, traceback_handler, table.unpack(args, 1, args.n)))
    context.set(prev)
    return r
  end
  -- With a timeout the call runs in a task of its own, under a scope of its
  -- own, so the timer can cancel it and everything it spawned.
  local scope = context.scope(ctx.scope)
  inner.scope = scope
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
  last_trace = r[4]
  if timed_out then return { n = 2, false, "timed out after " .. opts.timeout .. " s" } end
  return { n = 2, false, r[3] }
end

local function run_hook(flow, run, hook, which, value)
  if not hook then return end
  local info = { id = run.id, name = run.name, flow_run_id = run.flow_run_id, state = run.state,
    attempts = run.attempts, params = run.args }
  local ok, err = pcall(hook, info, value)
  if not ok then
    flow.store:log(flow.id, run.id, "error", which .. " hook of " .. run.name .. " failed: " .. tostring(err))
  end
end

--- Record one finished run and return its results (or raise).
local function finish_ok(flow, run, opts, r, cache_key)
  local store = flow.store
  run.state = states.COMPLETED
  local enc, round_trips
  if r.n <= 2 then
    enc, round_trips = store_mod.encode(r[2])
  else
    enc = store_mod.encode({ table.unpack(r, 2, r.n) })
    round_trips = false -- several results: kept for people, not reused
  end
  local expires
  if cache_key and opts.cache_expiration then expires = store_mod.time() + opts.cache_expiration end
  store:task_run_finished(run.id, states.COMPLETED, nil, enc, round_trips, run.attempts,
    store_mod.time(), expires, nil)
  run_hook(flow, run, opts.on_completion, "on_completion", r[2])
  return table.unpack(r, 2, r.n)
end

local function record_reused(flow, run, prev, message)
  run.state = states.COMPLETED
  notify("reused", run, { message = message })
  run.started = store_mod.time()
  flow.store:task_run_started(run)
  flow.store:task_run_finished(run.id, states.COMPLETED, message, prev.result, true, 0,
    run.started, nil, prev.id)
  return store_mod.decode(prev.result)
end

--- Call fn(...) as a tracked run described by spec {name, kind, opts, method}.
function T.call(spec, fn, ...)
  local ctx = context.get()
  if not ctx or not ctx.flow then return T.adhoc(spec, fn, ...) end
  local flow, parent = ctx.flow, ctx.node
  local store, opts, name = flow.store, spec.opts, spec.name
  -- a flow whose tracking the store will not take (disk full) stops here
  -- rather than running on untracked
  if store.write_error then error("the store cannot be written: " .. first_line(store.write_error), 0) end

  local c = (parent.counters[name] or 0) + 1
  parent.counters[name] = c
  local key = parent.key .. "/" .. name .. "#" .. c

  local args = table.pack(...)
  local first = spec.method and 2 or 1
  local params
  if args.n < first then
    params = "[]"
  else
    local plist = {}
    for i = first, args.n do plist[#plist + 1] = canon(args[i]) end
    params = "[" .. table.concat(plist, ",") .. "]"
  end
  local run = {
    id = store_mod.new_id(), flow_run_id = flow.id, parent_id = parent.id, name = name,
    kind = spec.kind, call_key = key, state = states.RUNNING, params = params,
    params_hash = params, attempts = 0, started = nil, args = args,
    tags = opts.tags and table.concat(opts.tags, ",") or nil,
  }

  -- 1. resume: reuse what COMPLETED in the run being resumed
  if flow.reuse then
    local prev = flow.reuse[key]
    if prev and prev.params_hash == params and prev.result_ok == 1 then
      return record_reused(flow, run, prev, "reused from the resumed run")
    end
  end

  -- 2. cache
  local cache_key
  if opts.cache_key then
    local ok, k = pcall(opts.cache_key, table.unpack(args, 1, args.n))
    if ok and k ~= nil then
      cache_key = tostring(k)
      run.cache_key = cache_key
      local hit = store:cached_result(name, cache_key, store_mod.time())
      if hit then return record_reused(flow, run, hit, "cache hit") end
    end
  end

  -- 3. concurrency limits by tag
  acquire_tags(opts.tags)

  run.started = store_mod.time()
  store:task_run_started(run)
  notify("start", run)
  local node = { key = key, counters = {}, id = run.id }
  local retries = opts.retries or 0
  local r
  for attempt = 1, retries + 1 do
    run.attempts = attempt
    if attempt > 1 then
      node.counters = {}
      store:task_run_state(run.id, states.RUNNING, nil, attempt)
    end
    last_trace = nil
    r = invoke(ctx, node, opts, fn, args)
    if r[1] then
      release_tags(opts.tags)
      notify("done", run)
      return finish_ok(flow, run, opts, r, cache_key)
    end
    if r[2] == "cancelled" or flow.cancel_requested or (ctx.scope and ctx.scope.cancelled) then
      release_tags(opts.tags)
      run.state = states.CANCELLED
      store:task_run_finished(run.id, states.CANCELLED, "cancelled", nil, true, attempt,
        store_mod.time(), nil, nil)
      notify("cancelled", run)
      error(r[2], 0)
    end
    if last_trace then
      store:log(flow.id, run.id, "error", "attempt " .. attempt .. " of " .. name .. " failed: " .. last_trace)
    end
    if attempt <= retries then
      local delay = T.retry_delay(opts, attempt)
      notify("retry", run, { attempt = attempt, retries = retries, delay = delay, error = first_line(r[2]) })
      store:task_run_state(run.id, states.SCHEDULED, string.format("retry %d of %d in %.3g s after: %s",
        attempt, retries, delay, first_line(r[2])), attempt)
      local ok, err = pcall(core.sleep, delay)
      if not ok then
        release_tags(opts.tags)
        store:task_run_finished(run.id, states.CANCELLED, "cancelled", nil, true, attempt,
          store_mod.time(), nil, nil)
        error(err, 0)
      end
    end
  end
  release_tags(opts.tags)
  run.state = states.FAILED
  store:task_run_finished(run.id, states.FAILED, first_line(r[2]), nil, true, run.attempts,
    store_mod.time(), nil, nil)
  notify("failed", run, { error = first_line(r[2]) })
  run_hook(flow, run, opts.on_failure, "on_failure", r[2])
  if opts.catch then return nil, r[2] end
  error(r[2], 0)
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
