--- drover: the Lua face of the runtime.
--
-- `require "drover"` works the same in the drover binary (where drover.core
-- is linked in) and in stock lua5.4 (where drover/core.so is loaded from
-- package.cpath).  Submodules load on first use, so a script that only
-- spawns processes pays nothing for HTTP or JSON.
local core = require "drover.core"

local context = require "drover.context"

local M = {
  version = core.version,
  -- spawn carries the caller's run context into the new task, so tracked
  -- calls made there still know their flow run and parent.
  spawn = context.spawn,
  run = core.run,
  sleep = core.sleep,
  now = core.now,
  time = core.time,
  cwd = core.cwd,
  isatty = core.isatty,
  current = core.current,
  yield = core.yield,
  on_signal = core.on_signal,
  event = core.event,
  kill = core.kill,
  pid = core.pid,
  exepath = core.exepath,
}

--- Run functions concurrently; return their first results in order.
-- If one fails, the others are cancelled and its error is raised.
function M.all(fns)
  if type(fns) ~= "table" then
    error("drover.all: bad argument 'fns' (table expected, got " .. type(fns) .. ")", 2)
  end
  local handles = {}
  for i, fn in ipairs(fns) do
    if type(fn) ~= "function" then
      error("drover.all: bad argument 'fns[" .. i .. "]' (function expected, got " .. type(fn) .. ")", 2)
    end
    handles[i] = context.spawn(fn)
  end
  local results, failure = {}, nil
  for i, h in ipairs(handles) do
    local ok, value, trace = h:wait()
    if ok then
      results[i] = value
    elseif not failure then
      failure = trace or value
      for j = i + 1, #handles do handles[j]:cancel() end
    end
  end
  if failure then error(failure, 0) end
  return results
end

--- Call fn(item, i) for every item, at most opts.concurrency at a time
-- (default: all at once); results in order.  The first failure cancels the
-- calls still running and is raised.
function M.map(fn, items, opts)
  if type(fn) ~= "function" and not (getmetatable(fn) or {}).__call then
    error("drover.map: bad argument 'fn' (function expected, got " .. type(fn) .. ")", 2)
  end
  if type(items) ~= "table" then
    error("drover.map: bad argument 'items' (table expected, got " .. type(items) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("drover.map: bad argument 'opts' (table expected, got " .. type(opts) .. ")", 2)
  end
  local n = #items
  local limit = opts and opts.concurrency or n
  if math.type(limit) ~= "integer" or limit < 1 then
    if n == 0 then return {} end
    error("drover.map: option 'concurrency' must be a positive integer", 2)
  end
  local results, next_i, failure = {}, 1, nil
  local workers = {}
  local function worker()
    while not failure and next_i <= n do
      local i = next_i
      next_i = i + 1
      results[i] = fn(items[i], i)
    end
  end
  for w = 1, math.min(limit, n) do workers[w] = context.spawn(worker) end
  for w, h in ipairs(workers) do
    local ok, err, trace = h:wait()
    if not ok and not failure then
      failure = trace or err
      for j = w + 1, #workers do workers[j]:cancel() end
    end
  end
  if failure then error(failure, 0) end
  return results
end

-- The orchestration layer: loaded on first use, so plain scripts that only
-- use the primitives do not open a store.
local orchestration = {
  BaseOrchestrator = function() return require("drover.orchestrator").BaseOrchestrator end,
  orchestrator = function() return require("drover.orchestrator").orchestrator end,
  decorate = function() return require("drover.orchestrator").decorate end,
  class = function() return require "drover.class" end,
  --- drover.host.NAME: the C functions an embedding program registered
  -- with drover_register (drover.h); none in a plain lua5.4 or drover.
  host = function()
    local ok, h = pcall(require, "drover.host")
    if ok and type(h) == "table" then return h end
    return setmetatable({}, { __index = function(_, k)
      error("drover.host." .. tostring(k) .. ": no host function of that name (only programs " ..
        "embedding drover register them, with drover_register)", 2)
    end })
  end,
  states = function() return require "drover.states" end,
  backoff = function() return require("drover.tracker").backoff end,
  limit = function() return require("drover.tracker").set_limit end,
  --- drover.task(name, fn, opts) / drover.flow(name, fn, opts): a function
  -- tracked as a task run / flow run, Prefect-style, without a class.
  task = function()
    return function(name, fn, opts) return M.tracked("task", name, fn, opts) end
  end,
  flow = function()
    return function(name, fn, opts) return M.tracked("flow", name, fn, opts) end
  end,
  --- drover.log(...): a line in the current run's logs (and on stderr, or
  -- through the embedding program's log callback).
  log = function()
    local tracker = require "drover.tracker"
    return function(...)
      local parts = table.pack(...)
      for i = 1, parts.n do parts[i] = tostring(parts[i]) end
      local line = table.concat(parts, " ", 1, parts.n)
      if core.log then core.log("info", line) else io.stderr:write(line, "\n") end
      tracker.log("log", line)
    end
  end,
}

function M.tracked(kind, name, fn, opts)
  local tracker = require "drover.tracker"
  local where = "drover." .. kind
  if type(name) ~= "string" then
    error(where .. ": bad argument 'name' (string expected, got " .. type(name) .. ")", 3)
  end
  if type(fn) ~= "function" then
    error(where .. ": bad argument 'fn' (function expected, got " .. type(fn) .. ")", 3)
  end
  opts = tracker.check_options(opts, where)
  local spec = { name = name, kind = kind, opts = opts }
  return function(...) return tracker.call(spec, fn, ...) end
end

local lazy = { proc = true, http = true, fs = true, json = true, db = true, pg = true, server = true }

return setmetatable(M, {
  __index = function(t, k)
    if lazy[k] then
      local m = require("drover." .. k)
      rawset(t, k, m)
      return m
    end
    local f = orchestration[k]
    if f then
      local v = f()
      rawset(t, k, v)
      return v
    end
  end,
})
