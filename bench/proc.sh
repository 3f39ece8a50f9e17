#!/usr/bin/env bash
# bench/proc.sh -- process spawning throughput: N `true` processes at
# concurrency 2 through drover.proc (a drover script whose 2 worker tasks
# pull from a shared counter) versus `seq N | xargs -P2 -n1 true`.
# Not a test.  Prints ms per process for each and the ratio drover/xargs.
#
#   DROVER_BUILD=build-proc bash bench/proc.sh    (N=2000 ROUNDS=3 RUNS=2)
#
# The machine is usually shared, so the commands are timed in interleaved
# rounds (each round runs every command RUNS times, with hyperfine when it
# is installed) and the median and the minimum over all runs are reported:
# a load spike then hits every command instead of whichever ran during it.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
N=${N:-2000}
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-2}
DROVER=$PWD/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"

work=$(mktemp -d /tmp/drover-bench-proc.XXXXXX)
trap 'rm -rf "$work"' EXIT
cat >"$work/spawn.lua" <<'LUA'
-- arg[1]: how many processes; arg[2]: stdout/stderr mode ("capture", "null")
local drover = require "drover"
local n, mode = tonumber(arg[1]), arg[2] or "capture"
local opts = { stdout = mode, stderr = mode }
local started = 0
local function worker()
  while started < n do
    started = started + 1
    local r = drover.proc.run({ "true" }, opts)
    if r.code ~= 0 then error("true exited with " .. r.code) end
  end
end
drover.run(function()
  local a, b = drover.spawn(worker), drover.spawn(worker)
  a:join()
  b:join()
end)
LUA
seq "$N" >"$work/seq"
names=(drover drover-null xargs)
cmds=("$DROVER $work/spawn.lua $N capture" "$DROVER $work/spawn.lua $N null"
      "xargs -a $work/seq -P2 -n1 true")
"$DROVER" "$work/spawn.lua" 10 capture # fail early if the script does not run

if ! command -v hyperfine >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q hyperfine >/dev/null 2>&1 || true
fi

: >"$work/times"
for round in $(seq "$ROUNDS"); do
  for i in "${!names[@]}"; do
    if command -v hyperfine >/dev/null; then
      warmup=$(( round == 1 ? 1 : 0 ))
      hyperfine -N --style none --warmup "$warmup" --runs "$RUNS" --export-json "$work/h.json" \
        "${cmds[$i]}" >/dev/null
      # every individual run time from the JSON export
      tr -d ' \n' <"$work/h.json" | grep -o '"times":\[[^]]*\]' | grep -o '[0-9.e+-]*[0-9]' |
        sed "s/^/${names[$i]} /" >>"$work/times"
    else
      for _ in $(seq "$RUNS"); do
        t0=$(date +%s%N); ${cmds[$i]} >/dev/null; t1=$(date +%s%N)
        echo "${names[$i]} $(( t1 - t0 ))e-9" >>"$work/times"
      done
    fi
  done
  echo "round $round/$ROUNDS done" >&2
done

lua5.4 - "$work/times" "$N" <<'LUA'
local file, n = arg[1], tonumber(arg[2])
local t = {}
for line in io.lines(file) do
  local name, v = line:match("^(%S+) (%S+)$")
  t[name] = t[name] or {}
  table.insert(t[name], tonumber(v))
end
local function stats(xs)
  table.sort(xs)
  local m = #xs % 2 == 1 and xs[(#xs + 1) // 2] or (xs[#xs // 2] + xs[#xs // 2 + 1]) / 2
  return m, xs[1], #xs
end
local med, min = {}, {}
print(string.format("%d `true` processes at concurrency 2; ms per process (median / min of runs)", n))
for _, name in ipairs({ "drover", "drover-null", "xargs" }) do
  local m, lo, runs = stats(t[name])
  med[name], min[name] = m, lo
  local label = ({ drover = "drover.proc (capture)", ["drover-null"] = "drover.proc (null)",
                   xargs = "xargs -P2" })[name]
  print(string.format("  %-22s %7.3f / %7.3f ms   (%d runs)", label, m * 1000 / n, lo * 1000 / n, runs))
end
print(string.format("ratio drover/xargs: %.2f median, %.2f min (capture); %.2f median, %.2f min (null)",
  med.drover / med.xargs, min.drover / min.xargs, med["drover-null"] / med.xargs,
  min["drover-null"] / min.xargs))
LUA
