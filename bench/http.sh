#!/usr/bin/env bash
# HTTP client benchmark (not a test): N GETs of / from the test server
# (tests/support/httpd.c) with 64 in flight,
#   drover     the drover binary running a Lua script: 64 tasks share the N
#              requests, one curl multi handle underneath
#   parallel   curl --parallel --parallel-max 64 over a config of N urls
#   serial     one curl process fetching the N urls one after another
#              (keep-alive: one connection)
# Each is run RUNS times; the best time is reported, with the ratios.
# Target: drover within 1.5x of curl's parallel mode.
#
#   bash bench/http.sh            (DROVER_BUILD=build-x to pick a build dir)
#   N=5000 RUNS=5 bash bench/http.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
N=${N:-1000}
CONC=${CONC:-64}
RUNS=${RUNS:-5}

[ -x "$BUILD/drover" ] || make -s BUILD="$BUILD" "$BUILD/drover"
mkdir -p "$BUILD"
make -s BUILD="$BUILD" "$BUILD/httpd-test"

tmp=$(mktemp -d /tmp/drover-bench-http.XXXXXX)
server_pid=
cleanup() {
  [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null
  rm -rf "$tmp"
}
trap cleanup EXIT

"$BUILD/httpd-test" 0 >"$tmp/port" &
server_pid=$!
for _ in $(seq 100); do [ -s "$tmp/port" ] && break; sleep 0.05; done
port=$(head -1 "$tmp/port")
[ -n "$port" ] || { echo "bench/http: the test server did not start" >&2; exit 1; }
url="http://127.0.0.1:$port/"

for _ in $(seq "$N"); do echo "url = \"$url\""; done >"$tmp/urls.cfg"

cat >"$tmp/bench.lua" <<'EOF'
local drover = require "drover"
local http = drover.http
local url, n, conc = arg[1], tonumber(arg[2]), tonumber(arg[3])
local next_i, ok = 0, 0
local workers = {}
for w = 1, conc do
  workers[w] = drover.spawn(function()
    while next_i < n do
      next_i = next_i + 1
      local r = assert(http.get(url))
      if r.status == 200 and r.body == "hello\n" then ok = ok + 1 end
    end
  end)
end
for _, w in ipairs(workers) do w:join() end
assert(ok == n, "only " .. ok .. " of " .. n .. " requests succeeded")
EOF

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# best_of CMD...: run RUNS times, print the best wall time in ms
best_of() {
  local best= t0 t1 d
  for _ in $(seq "$RUNS"); do
    t0=$(now_ms)
    "$@" >/dev/null
    t1=$(now_ms)
    d=$((t1 - t0))
    if [ -z "$best" ] || [ "$d" -lt "$best" ]; then best=$d; fi
  done
  echo "$best"
}

# warm up (page cache, server)
"$BUILD/drover" "$tmp/bench.lua" "$url" 100 "$CONC"
curl -s --no-progress-meter --parallel --parallel-max "$CONC" -K "$tmp/urls.cfg" >/dev/null

drover_ms=$(best_of "$BUILD/drover" "$tmp/bench.lua" "$url" "$N" "$CONC")
par_ms=$(best_of curl -s --no-progress-meter --parallel --parallel-max "$CONC" -K "$tmp/urls.cfg")
ser_ms=$(best_of curl -s -K "$tmp/urls.cfg")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) b = 1; printf "%.2f", a / b }'; }
echo "http: $N GETs of $url, $CONC in flight, best of $RUNS runs ($(curl --version | head -1 | cut -d' ' -f1-2))"
printf '  %-28s %6d ms\n' "drover ($CONC tasks)" "$drover_ms"
printf '  %-28s %6d ms\n' "curl --parallel-max $CONC" "$par_ms"
printf '  %-28s %6d ms\n' "curl sequential keep-alive" "$ser_ms"
echo "  drover / curl parallel   = $(ratio "$drover_ms" "$par_ms")x  (target <= 1.5x)"
echo "  drover / curl sequential = $(ratio "$drover_ms" "$ser_ms")x"
