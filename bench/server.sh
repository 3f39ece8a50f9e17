#!/usr/bin/env bash
# HTTP server benchmark (not a test): wrk against
#   drover   the drover binary serving GET / from a Lua handler that returns
#            a small fixed body ("hello\n"): one task per request
#   h2o      tests/support/httpd.c, a plain H2O server in C on libuv
#            answering the same body (the ceiling: same HTTP library, no Lua)
# with the same load: wrk -t THREADS -c CONNS -d DURATION (2 threads, 64
# keep-alive connections, 10 s by default).  Prints requests/s for both and
# drover's share of the C server's rate.
#
#   bash bench/server.sh          (DROVER_BUILD=build-x picks a build dir)
#   DURATION=30s CONNS=128 bash bench/server.sh
#
# wrk comes from Debian: apt-get install wrk.  The machine has 2 cores: wrk
# and the server share them, so absolute figures are low; the ratio is what
# to watch.
#
# Both servers run with glibc's heap trim threshold raised to 64 MiB
# (TRIM=0 keeps glibc's default).  With the default, the C server hands its
# freed request memory back to the kernel and asks for it again every few
# requests (a brk() pair per ~12 requests) and runs at a third of its speed,
# which would make a meaningless "ceiling".
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
TRIM=${TRIM:-1}
if [ "$TRIM" = 1 ]; then export GLIBC_TUNABLES=glibc.malloc.trim_threshold=67108864; fi

command -v wrk >/dev/null || { echo "bench/server: wrk is not installed (apt-get install wrk)" >&2; exit 1; }
[ -x "$BUILD/drover" ] || make -s BUILD="$BUILD" "$BUILD/drover"
have_httpd=1
make -s BUILD="$BUILD" "$BUILD/httpd-test" >/dev/null 2>&1 || have_httpd=0

tmp=$(mktemp -d /tmp/drover-bench-server.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT

cat >"$tmp/server.lua" <<'EOF'
local drover = require "drover"
local srv = assert(drover.server.listen {
  port = 0,
  handler = function(req, res) return 200, nil, "hello\n" end,
})
io.stdout:write(srv.port, "\n")
io.stdout:flush()
local stop = drover.event()
drover.on_signal("TERM", function() stop:set() end)
stop:wait()
srv:close()
EOF

# start CMD... ; waits for the port on the first stdout line; sets $port
start() {
  local out=$tmp/port.$#
  : >"$out"
  "$@" >"$out" &
  pids+=($!)
  for _ in $(seq 200); do [ -s "$out" ] && break; sleep 0.05; done
  port=$(head -1 "$out")
  [ -n "$port" ] || { echo "bench/server: $1 did not start" >&2; exit 1; }
}

# rps URL: requests/s from wrk (after a short warm-up)
rps() {
  local url=$1 body
  body=$(curl -s "$url")
  [ "$body" = "hello" ] || { echo "bench/server: unexpected body from $url: $body" >&2; exit 1; }
  wrk -t "$THREADS" -c "$CONNS" -d 2s "$url" >/dev/null
  wrk -t "$THREADS" -c "$CONNS" -d "$DURATION" "$url" >"$tmp/wrk.out"
  if grep -q "Non-2xx\|Socket errors" "$tmp/wrk.out"; then
    echo "bench/server: errors from $url:" >&2
    cat "$tmp/wrk.out" >&2
  fi
  awk '/^Requests\/sec:/ { print $2 }' "$tmp/wrk.out"
}

start "$BUILD/drover" "$tmp/server.lua"
drover_pid=${pids[-1]}
drover_rps=$(rps "http://127.0.0.1:$port/")
kill -TERM "$drover_pid"

echo "wrk -t $THREADS -c $CONNS -d $DURATION, GET / -> \"hello\\n\""
printf '  %-34s %10.0f req/s\n' "drover (Lua handler per request)" "$drover_rps"
if [ "$have_httpd" = 1 ]; then
  start "$BUILD/httpd-test" 0
  h2o_rps=$(rps "http://127.0.0.1:$port/")
  printf '  %-34s %10.0f req/s\n' "plain H2O in C (httpd-test)" "$h2o_rps"
  awk -v d="$drover_rps" -v h="$h2o_rps" \
    'BEGIN { printf "  drover / plain H2O: %.2f (%.0f%% of the C server'"'"'s rate)\n", d / h, 100 * d / h }'
else
  echo "  (tests/support/httpd.c not buildable here: no C baseline)"
fi
