#!/usr/bin/env bash
# drover.db micro-benchmark: the tracking store's pattern -- insert a
# task-run row when a task starts, update it when it ends -- 100,000 times,
# batched 1,000 pairs per transaction, on a real file (WAL, synchronous=NORMAL).
#
#   DROVER_BUILD=build bash bench/db.sh [pairs] [batch]
#
# Prints microseconds per insert+update pair for: the statement cache on
# (the default), the cache off (every call prepares), the same inside a
# drover task, and, for scale, without batching (each statement its own
# transaction, fewer pairs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;;"
export LUA_CPATH="$ROOT/$BUILD/lua/?.so;;"
[ -e "$BUILD/lua/drover/core.so" ] || { echo "bench/db.sh: build first (make BUILD=$BUILD)" >&2; exit 1; }
tmp=$(mktemp -d /tmp/drover-bench-db.XXXXXX)
trap 'rm -rf "$tmp"' EXIT

lua5.4 - "$tmp" "${1:-100000}" "${2:-1000}" <<'EOF'
local drover = require "drover"
local dir, N, BATCH = arg[1], tonumber(arg[2]), tonumber(arg[3])

local SCHEMA = [[
  CREATE TABLE runs(
    id INTEGER PRIMARY KEY, workflow TEXT NOT NULL, task TEXT NOT NULL,
    state TEXT NOT NULL, attempt INTEGER NOT NULL, started REAL, finished REAL,
    exit_code INTEGER, output TEXT);
  CREATE INDEX runs_workflow ON runs(workflow, task);
]]
local INSERT = "INSERT INTO runs(workflow, task, state, attempt, started) VALUES (?, ?, 'running', ?, ?)"
local UPDATE = "UPDATE runs SET state = :state, finished = :finished, exit_code = :code, output = :output WHERE id = :id"

local function one(label, opts, n, batch, in_task)
  local path = ("%s/%s.db"):format(dir, label:gsub("%W", "_"))
  local db = assert(drover.db.open(path, opts))
  db:exec(SCHEMA)
  local function pair(i)
    local _, id = db:run(INSERT, "wf-" .. (i % 17), "task-" .. (i % 101), 1, 1.7e9 + i)
    db:run(UPDATE, { state = "done", finished = 1.7e9 + i + 0.5, code = 0, output = "ok", id = id })
  end
  local function body()
    if batch then
      for b = 0, n // batch - 1 do
        db:transaction(function()
          for i = b * batch + 1, (b + 1) * batch do pair(i) end
        end)
      end
    else
      for i = 1, n do pair(i) end
    end
  end
  collectgarbage()
  local t0, c0 = drover.now(), os.clock()
  if in_task then drover.run(body) else body() end
  local wall, cpu = drover.now() - t0, os.clock() - c0
  assert(db:value("SELECT count(*) FROM runs WHERE state = 'done'") == n)
  local st = db:stats()
  db:close()
  print(("%-44s %8d pairs  %7.2f us/pair wall  %7.2f us/pair cpu  (%d prepares)")
    :format(label, n, wall / n * 1e6, cpu / n * 1e6, st.prepares))
end

print(("drover.db bench: SQLite %s, WAL, synchronous=NORMAL, batch %d"):format(
  assert(drover.db.open(":memory:")):value("SELECT sqlite_version()"), BATCH))
one("cached statements, batched", {}, N, BATCH)
one("no statement cache (cache_size=0), batched", { cache_size = 0 }, N, BATCH)
one("cached, batched, inside a drover task", {}, N, BATCH, true)
one("cached, no batching (autocommit)", {}, math.min(N, 2000), nil)
EOF
