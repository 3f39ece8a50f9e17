--- Task-local context, inherited by tasks spawned from a task (like
-- Python's contextvars).  The tracker keeps "which run am I inside" here, so
-- a task run started from a spawned task or a drover.map item still knows
-- its parent, and so does the cancellation scope.
local core = require "drover.core"

local M = {}
local by_thread = setmetatable({}, { __mode = "k" })

--- The current context table (or nil) of the running task.
function M.get()
  return by_thread[coroutine.running()]
end

--- Replace the current context; returns the previous one.
function M.set(ctx)
  local co = coroutine.running()
  local prev = by_thread[co]
  by_thread[co] = ctx
  return prev
end

--- spawn that carries the caller's context into the new task, and registers
-- the child with the caller's cancellation scope.
function M.spawn(fn, ...)
  local ctx = by_thread[coroutine.running()]
  local h
  if ctx == nil then
    h = core.spawn(fn, ...)
  else
    h = core.spawn(function(...)
      by_thread[coroutine.running()] = ctx
      return fn(...)
    end, ...)
    local scope = ctx.scope
    if scope then scope:add(h) end
  end
  return h
end

--- A cancellation scope: every task spawned under it, transitively.
local Scope = {}
Scope.__index = Scope

function M.scope(parent)
  local s = setmetatable({ tasks = setmetatable({}, { __mode = "k" }), children = {}, cancelled = false }, Scope)
  if parent then parent.children[#parent.children + 1] = s end
  return s
end

function Scope:add(h)
  self.tasks[h] = true
  if self.cancelled then h:cancel() end
end

--- Cancel every task of the scope and of its child scopes.
function Scope:cancel()
  self.cancelled = true
  for h in pairs(self.tasks) do h:cancel() end
  for _, c in ipairs(self.children) do c:cancel() end
end

return M
