--- The store's queued writes, run in order in the caller's transaction,
-- with consecutive single-row INSERTs of one statement (task runs, log
-- lines: most of a batch) sent as multi-row INSERTs: every statement costs
-- something fixed (a round trip to PostgreSQL; on SQLite the statement's
-- setup and the count trigger's frame), paid then once per chunk.  Chunks
-- are a power of two rows, so an INSERT has a few statement shapes (each
-- prepared once per connection), not one per batch size.  Used by both
-- dialects (lua/drover/store/sqlite.lua, postgresql.lua).
local M = {}

-- "INSERT INTO t(cols) VALUES(?,?,?)" -> { head, row, [k] = SQL of k rows },
-- or false; by SQL text (the store queues a few fixed statements, and a
-- pattern match per entry would cost ~2k instructions a row)
local shapes = {}
local function shape(sql)
  local s = shapes[sql]
  if s == nil then
    local head, row = sql:match("^%s*(INSERT%s+INTO%s+[%w_]+%s*%b())%s*VALUES%s*(%([?,%s]*%))%s*$")
    s = head and { head = head, row = row } or false
    shapes[sql] = s
  end
  return s
end

-- The values of one multi-row statement, reused: a new table per chunk
-- costs ~8k instructions a row, since values that are nil (parent_id,
-- cache_key...) keep a growing table's array part from growing.  (No task
-- fills it while another uses it: the values are on the stack before
-- db:run can yield.)
local args = {}

--- Run q[1..n] ({sql, nargs, values...}) on `db` (a connection, or a
-- drover.db.batch, whose run_rows copies a chunk's values straight from
-- the entries), at most `max_rows` rows (a power of two) per multi-row
-- INSERT.
function M.run_queue(db, q, n, max_rows)
  local i = 1
  while i <= n do
    local sql = q[i][1]
    local s = shape(sql)
    local j = i
    if s then
      local limit = math.min(max_rows, 60000 // math.max(q[i][2], 1)) -- PostgreSQL: 65,535 values
      while j < n and j - i + 1 < limit and q[j + 1][1] == sql do j = j + 1 end
    end
    while i <= j do
      local k = 1
      while k * 2 <= j - i + 1 do k = k * 2 end
      if k == 1 then
        db:run(q[i][1], table.unpack(q[i], 3, 2 + q[i][2]))
      else
        local text = s[k]
        if not text then
          text = s.head .. " VALUES" .. string.rep(s.row, k, ",")
          s[k] = text
        end
        if db.run_rows then -- a drover.db.batch reads the entries itself
          db:run_rows(text, q, i, k)
        else
          local m = 0
          for r = i, i + k - 1 do
            local ra = q[r]
            table.move(ra, 3, 2 + ra[2], m + 1, args)
            m = m + ra[2]
          end
          db:run(text, table.unpack(args, 1, m))
        end
      end
      i = i + k
    end
  end
end

return M
