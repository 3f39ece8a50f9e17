#!/usr/bin/env bash
# bench/proc.sh -- process spawning throughput: N `true` processes at
# concurrency 2 through drover.proc (a drover script whose 2 worker tasks
# pull from a shared counter) versus `seq N | xargs -P2 -n1 true`.
# Not a test.  Prints, per process, the wall time of each command and the
# CPU time drover's own process spent (not the children's), for both ways
# drover starts children: clone + pidfd (spawn.c, the default) and libuv's
# uv_spawn (fork; DROVER_SPAWN=uv), and the ratio drover/xargs.
#
#   DROVER_BUILD=build-proc bash bench/proc.sh    (N=2000 ROUNDS=3 RUNS=2)
#
# The machine is usually shared, so the commands are timed in interleaved
# rounds (each round runs every command RUNS times, with hyperfine when it
# is installed) and the median and the minimum over all runs are reported:
# a load spike then hits every command instead of whichever ran during it.
# Drover's CPU comes from /proc/self/schedstat (nanoseconds on a CPU) and
# /proc/self/stat (user/system ticks, minor page faults), read by the
# script itself before and after the loop, so start-up is not counted.
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
-- arg[1]: how many processes; arg[2]: stdout/stderr mode ("capture", "null");
-- arg[3]: optional file to append "cpu_ns utime_ticks stime_ticks minflt" to
local drover = require "drover"
local n, mode, cpufile = tonumber(arg[1]), arg[2] or "capture", arg[3]
local function cpu()
  local f = assert(io.open("/proc/self/schedstat"))
  local ns = tonumber(f:read("a"):match("^(%d+)"))
  f:close()
  f = assert(io.open("/proc/self/stat"))
  local rest = f:read("a"):match("%) (.*)$") -- after the command name
  f:close()
  local fields = {}
  for v in rest:gmatch("%S+") do fields[#fields + 1] = v end
  -- fields[1] is stat field 3 (state): minflt is field 10, utime 14, stime 15
  return ns, tonumber(fields[12]), tonumber(fields[13]), tonumber(fields[8])
end
local opts = { stdout = mode, stderr = mode }
local started = 0
local function worker()
  while started < n do
    started = started + 1
    local r = drover.proc.run({ "true" }, opts)
    if r.code ~= 0 then error("true exited with " .. r.code) end
  end
end
local ns0, ut0, st0, mf0 = cpu()
drover.run(function()
  local a, b = drover.spawn(worker), drover.spawn(worker)
  a:join()
  b:join()
end)
local ns1, ut1, st1, mf1 = cpu()
if cpufile then
  local f = assert(io.open(cpufile, "a"))
  f:write(string.format("%d %d %d %d\n", ns1 - ns0, ut1 - ut0, st1 - st0, mf1 - mf0))
  f:close()
end
LUA
seq "$N" >"$work/seq"
names=(drover drover-null drover-uv drover-uv-null xargs)
cmds=("$DROVER $work/spawn.lua $N capture $work/cpu.drover"
      "$DROVER $work/spawn.lua $N null $work/cpu.drover-null"
      "env DROVER_SPAWN=uv $DROVER $work/spawn.lua $N capture $work/cpu.drover-uv"
      "env DROVER_SPAWN=uv $DROVER $work/spawn.lua $N null $work/cpu.drover-uv-null"
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

lua5.4 - "$work" "$N" "$(getconf CLK_TCK)" <<'LUA'
local work, n, hz = arg[1], tonumber(arg[2]), tonumber(arg[3])
local t = {}
for line in io.lines(work .. "/times") do
  local name, v = line:match("^(%S+) (%S+)$")
  t[name] = t[name] or {}
  table.insert(t[name], tonumber(v))
end
local function median(xs)
  table.sort(xs)
  return #xs % 2 == 1 and xs[(#xs + 1) // 2] or (xs[#xs // 2] + xs[#xs // 2 + 1]) / 2
end
local function stats(xs)
  local m = median(xs)
  return m, xs[1], #xs
end
local labels = { drover = "clone (capture)", ["drover-null"] = "clone (null)",
                 ["drover-uv"] = "uv_spawn (capture)", ["drover-uv-null"] = "uv_spawn (null)",
                 xargs = "xargs -P2" }
local order = { "drover", "drover-null", "drover-uv", "drover-uv-null", "xargs" }
local med, min = {}, {}
print(string.format("%d `true` processes at concurrency 2, per process (median / min of runs)", n))
print(string.format("  %-22s %19s   %s", "", "wall ms", "drover CPU us: total (user+sys), minor faults"))
for _, name in ipairs(order) do
  local m, lo, runs = stats(t[name])
  med[name], min[name] = m, lo
  local cpu = ""
  local f = io.open(work .. "/cpu." .. name)
  if f then
    local ns, ut, st, mf = {}, {}, {}, {}
    for line in f:lines() do
      local a, b, c, d = line:match("^(%d+) (%d+) (%d+) (%d+)$")
      ns[#ns + 1], ut[#ut + 1], st[#st + 1], mf[#mf + 1] = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
    end
    f:close()
    cpu = string.format("%6.0f (%4.0f + %4.0f), %5.1f", median(ns) / 1e3 / n, median(ut) / hz * 1e6 / n,
      median(st) / hz * 1e6 / n, median(mf) / n)
  end
  print(string.format("  %-22s %7.3f / %7.3f   %s   (%d runs)", labels[name], m * 1000 / n, lo * 1000 / n,
    cpu, runs))
end
for _, name in ipairs({ "drover", "drover-null", "drover-uv", "drover-uv-null" }) do
  print(string.format("ratio %s/xargs: %.2f median, %.2f min", labels[name], med[name] / med.xargs,
    min[name] / min.xargs))
end
LUA
