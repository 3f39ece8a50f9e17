--- drover.pg: PostgreSQL for drover, on libpq's asynchronous API.
--
--   local pg = require "drover.pg"                 -- or drover.pg
--   local db = assert(pg.pool(os.getenv("DROVER_PG_URL"), {size = 4}))
--   db:run("INSERT INTO runs(name, state) VALUES($1, $2)", "build", "running")
--   for _, r in ipairs(assert(db:rows("SELECT * FROM runs WHERE state = $1", "done"))) do ... end
--   db:transaction(function(c) ... end)            -- BEGIN ... COMMIT / ROLLBACK
--
-- A query yields its task while the server works (other tasks run); outside
-- any task it runs the loop until the answer is in.  The C side is
-- engine/src/pg.c (its header comment explains the design); this file adds
-- the pool and transactions.
--
--   connect(conninfo, opts) -> one connection, or nil and
--                              "drover.pg.connect: user@host:port/db: reason"
--                              (the password never appears).  conninfo: a
--                              postgresql:// URL or "key=value ..." (libpq's).
--                              opts: connect_timeout=10 (s), cache_size=64
--                              (prepared statements kept per connection),
--                              null (the value NULL becomes; default nil)
--   pool(conninfo, opts)    -> a pool with the same methods; opts as above
--                              plus size=4.  Opens one connection at once
--                              (so a wrong password fails here) and the
--                              others when calls overlap; each call (or
--                              transaction) takes an idle connection, or
--                              waits for one to be handed back.
--   bytea(s)                -> a value that binds as bytea (binary)
--
--   c:rows(sql, ...)        -> list of rows {column = value}, or nil, message
--   c:first(sql, ...)       -> the first row or nil;  nil, message on error
--   c:value(sql, ...)       -> first column of the first row or nil; nil, message
--   c:run(sql, ...)         -> rows affected;  nil, message on error
--   c:exec(script)          -> true: several statements, no parameters (a
--                              migration); nil, message on error
--   c:transaction(fn, ...)  -> fn(c, ...)'s results (see below)
--   c:close(), c:isopen(), c:stats(), c:label(); for a connection also
--   c:backend_pid(), c:txstatus()
--
-- Parameters: $1, $2... from the varargs, always bound, never spliced.
-- nil and drover.json.null bind NULL, booleans bind as bool, integers and
-- floats as their exact text, strings as text (a string holding a zero
-- byte, or pg.bytea(s), binds as binary bytea).  Untyped placeholders take
-- the type PostgreSQL infers; `SELECT $1` alone is text: cast it ($1::int8).
--
-- Values: int2/int4/int8/oid -> Lua integers (exact int64); float4/float8
-- -> numbers; numeric -> an integer when integral and in int64, a number
-- with at most 15 significant digits, else its exact decimal text (a
-- string); bool -> boolean; bytea -> the bytes; everything else (text,
-- json, dates, arrays) -> the server's text.  NULL -> nil, i.e. the column
-- is absent from the row, unless opts.null says otherwise
-- (`{null = drover.json.null}`).
--
-- Errors come back as nil, "drover.pg: SQLSTATE: message (detail)", e.g.
-- "drover.pg: 42P01: relation "x" does not exist".  Wrong arguments raise.
--
-- Reconnecting.  Between calls the connection's socket is watched, so a
-- session the server ends (a restart, pg_terminate_backend) is noticed;
-- the next call reconnects once and runs.  A statement that may have
-- reached the server is never sent twice: if the connection dies under it,
-- that call returns nil, "... connection lost ..." and the next one
-- reconnects.  Nothing reconnects inside a transaction (its statements
-- fail until it ends).
--
-- Transactions.  c:transaction(fn, ...) runs fn(c, ...) inside BEGIN ...
-- COMMIT on one connection (a pool picks one; fn gets that connection and
-- should use it).  Nested calls use SAVEPOINTs, so an inner failure rolls
-- back only the inner part.  fn raising rolls back its level and the error
-- is raised again; a failed BEGIN or COMMIT, or a statement inside fn that
-- failed while fn returned normally, rolls back and returns nil, message.
-- While a task is inside a transaction, other tasks' calls on that
-- connection wait for it to end (a pool never hands it out meanwhile); so
-- work inside fn must be done by the task that called transaction().
local core = require "drover.core"

local pack, unpack = table.pack, table.unpack

local M = {
  connect = core.pg.connect,
  bytea = core.pg.bytea,
}

local methods = core.pg.methods

local function is_callable(fn)
  if type(fn) == "function" then return true end
  local mt = getmetatable(fn)
  return type(mt) == "table" and mt.__call ~= nil
end

-- Undo one level: the whole transaction, or back to its savepoint.
local function rollback_level(c, level)
  if level == 1 then return c:run("ROLLBACK") end
  local ok, err = c:run("ROLLBACK TO SAVEPOINT drover_" .. level)
  if not ok then return nil, err end
  return c:run("RELEASE SAVEPOINT drover_" .. level)
end

function methods:transaction(fn, ...)
  if not is_callable(fn) then
    error("drover.pg.transaction: bad argument 'fn' (function expected, got " .. type(fn) .. ")", 2)
  end
  local level = self:_enter() + 1
  local ok, err = self:run(level == 1 and "BEGIN" or ("SAVEPOINT drover_" .. level))
  if not ok then
    self:_depth(level - 1)
    return nil, err
  end
  self:_depth(level)
  local r = pack(pcall(fn, self, ...))
  if not r[1] then
    rollback_level(self, level)
    self:_depth(level - 1)
    error(r[2], 0)
  end
  if self:txstatus() == "inerror" then
    rollback_level(self, level)
    self:_depth(level - 1)
    return nil, "drover.pg.transaction: a statement inside the transaction failed; rolled back"
  end
  ok, err = self:run(level == 1 and "COMMIT" or ("RELEASE SAVEPOINT drover_" .. level))
  if not ok then rollback_level(self, level) end
  self:_depth(level - 1)
  if not ok then return nil, err end
  return unpack(r, 2, r.n)
end

-- ---- the pool ------------------------------------------------------------

local CONNECT_OPTS = { connect_timeout = true, cache_size = true, null = true }

local Pool = {}
Pool.__index = Pool

--- A pool of up to opts.size connections to one server.
function M.pool(conninfo, opts)
  if type(conninfo) ~= "string" then
    error("drover.pg.pool: bad argument 'conninfo' (string expected, got " .. type(conninfo) .. ")", 2)
  end
  if opts ~= nil and type(opts) ~= "table" then
    error("drover.pg.pool: bad argument 'opts' (table expected, got " .. type(opts) .. ")", 2)
  end
  local copts, size = {}, 4
  for k, v in pairs(opts or {}) do
    if k == "size" then
      if math.type(v) ~= "integer" or v < 1 or v > 100 then
        error("drover.pg.pool: bad option 'size' (an integer from 1 to 100)", 2)
      end
      size = v
    elseif CONNECT_OPTS[k] then
      copts[k] = v
    else
      error(("drover.pg.pool: unknown option '%s' (known: size, connect_timeout, cache_size, null)")
        :format(tostring(k)), 2)
    end
  end
  local first, err = core.pg.connect(conninfo, copts)
  if not first then return nil, err end
  return setmetatable({ conninfo = conninfo, opts = copts, size = size, conns = { first },
    idle = { first }, opening = 0, freed = core.event(), closed = false }, Pool)
end

-- A connection for one call (or one transaction): an idle one, else a new
-- one while below size, else wait until one is handed back.
function Pool:_checkout()
  while true do
    if self.closed then error("drover.pg: the pool is closed (" .. self.conns[1]:label() .. ")", 3) end
    local c = table.remove(self.idle)
    if c then return c end
    if #self.conns + self.opening < self.size then
      self.opening = self.opening + 1
      local err
      c, err = core.pg.connect(self.conninfo, self.opts)
      self.opening = self.opening - 1
      if c and self.closed then c:close() end
      if c and not self.closed then
        self.conns[#self.conns + 1] = c
        return c
      end
      if not c then return nil, err end
    else
      self.freed:clear()
      self.freed:wait()
    end
  end
end

function Pool:_checkin(c)
  self.idle[#self.idle + 1] = c
  self.freed:set()
end

local function finish(self, c, r)
  self:_checkin(c)
  if not r[1] then error(r[2], 0) end
  return unpack(r, 2, r.n)
end

for _, name in ipairs { "rows", "first", "value", "run", "exec", "transaction" } do
  Pool[name] = function(self, ...)
    local c, err = self:_checkout()
    if not c then return nil, err end
    return finish(self, c, pack(pcall(c[name], c, ...)))
  end
end

function Pool:close()
  if self.closed then return end
  self.closed = true
  for _, c in ipairs(self.conns) do c:close() end
  self.freed:set()
end
Pool.__close = Pool.close

function Pool:isopen() return not self.closed end

function Pool:label() return self.conns[1]:label() end

--- Totals over the pool's connections, plus how many are open.
function Pool:stats()
  local s = { connections = #self.conns, size = self.size }
  for _, c in ipairs(self.conns) do
    for k, v in pairs(c:stats()) do s[k] = (s[k] or 0) + v end
  end
  return s
end

return M
