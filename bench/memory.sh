#!/usr/bin/env bash
# bench/memory.sh -- resident memory of an idle engine: drover running a
# script that sleeps 1 s (drover.sleep: the loop waits on a timer) versus
# lua5.4 doing the same with a busy-free wait (os.execute("sleep 1")).
# Not a test.  Both scripts print "ready" when they start waiting; 0.2 s
# later VmRSS (resident now) and VmHWM (peak resident so far) are read from
# /proc/PID/status, with its split into RssAnon (the process's own memory)
# and RssFile (mapped files: mostly the shared libraries).  Each is
# measured RUNS times; the medians are printed.
#
#   DROVER_BUILD=build-x bash bench/memory.sh      (RUNS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
RUNS=${RUNS:-3}
DROVER=$PWD/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"

work=$(mktemp -d /tmp/drover-bench-memory.XXXXXX)
trap 'rm -rf "$work"' EXIT
export DROVER_HOME=$work/home
cat >"$work/drover-idle.lua" <<'LUA'
local drover = require "drover"
io.write("ready\n"); io.flush()
drover.sleep(1)
LUA
cat >"$work/lua-idle.lua" <<'LUA'
io.write("ready\n"); io.flush()
os.execute("sleep 1")
LUA

# measure CMD... -> prints "rss hwm anon file" in KiB
measure() {
  local out=$work/out pid rss hwm anon file
  : >"$out"
  "$@" >"$out" &
  pid=$!
  for _ in $(seq 200); do [ -s "$out" ] && break; sleep 0.05; done
  [ -s "$out" ] || { echo "bench/memory: $* did not start" >&2; kill "$pid" 2>/dev/null; exit 1; }
  sleep 0.2
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status")
  hwm=$(awk '/^VmHWM:/ {print $2}' "/proc/$pid/status")
  anon=$(awk '/^RssAnon:/ {print $2}' "/proc/$pid/status")
  file=$(awk '/^RssFile:/ {print $2}' "/proc/$pid/status")
  wait "$pid"
  echo "$rss $hwm $anon $file"
}

median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

: >"$work/drover.txt"; : >"$work/lua.txt"
for _ in $(seq "$RUNS"); do
  measure "$DROVER" "$work/drover-idle.lua" >>"$work/drover.txt"
  measure lua5.4 "$work/lua-idle.lua" >>"$work/lua.txt"
done
d_rss=$(awk '{print $1}' "$work/drover.txt" | median)
d_hwm=$(awk '{print $2}' "$work/drover.txt" | median)
l_rss=$(awk '{print $1}' "$work/lua.txt" | median)
l_hwm=$(awk '{print $2}' "$work/lua.txt" | median)
d_anon=$(awk '{print $3}' "$work/drover.txt" | median)
d_file=$(awk '{print $4}' "$work/drover.txt" | median)
l_anon=$(awk '{print $3}' "$work/lua.txt" | median)
l_file=$(awk '{print $4}' "$work/lua.txt" | median)

awk -v dr="$d_rss" -v dh="$d_hwm" -v lr="$l_rss" -v lh="$l_hwm" -v runs="$RUNS" \
    -v da="$d_anon" -v df="$d_file" -v la="$l_anon" -v lf="$l_file" 'BEGIN {
  printf "idle memory (median of %d runs):\n", runs
  printf "  drover (drover.sleep(1)):       VmRSS %6d KiB  VmHWM %6d KiB\n", dr, dh
  printf "  lua5.4 (os.execute(\"sleep 1\")): VmRSS %6d KiB  VmHWM %6d KiB\n", lr, lh
  printf "  of VmRSS, private (RssAnon) / mapped files, mostly shared libraries (RssFile):\n"
  printf "    drover %d / %d KiB, lua5.4 %d / %d KiB\n", da, df, la, lf
  printf "ratio drover/lua5.4: %.2fx VmRSS, %.2fx VmHWM, %.2fx RssAnon\n", dr / lr, dh / lh, da / la
  printf "RESULT memory rss_kib=%d lua_rss_kib=%d ratio=%.2f\n", dr, lr, dr / lr
}'
