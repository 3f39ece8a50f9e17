#!/usr/bin/env bash
# bench/remote.sh -- the cost of reporting over HTTP (the worker protocol,
# docs/protocol.md) against writing the store directly.  Not a test.
#
#   (a) N (10,000) tracked no-op tasks in one worker: `drover worker ID
#       --api URL` reporting to `drover serve`, against the peer `drover
#       worker ID` writing the store itself; each whole worker process is
#       timed (exec, run and bundle, the flow, and every event applied by
#       the server / flushed to the store).  RUNS (3) pairs, alternating
#       which goes first; the median ratio (target: at most 1.5x).
#   (b) WORKERS (50) workers of TASKS (1,000) tasks each reporting at once:
#       events per second the server applied (over the whole time, and
#       while events arrived) and its CPU time per event (utime+stime of
#       the `drover serve` process, from /proc/PID/stat, before and after).
#   (c) COUNT (10) runs of one task: time from `drover run` returning to the
#       first task starting, with a daemon serving the store (the local
#       backend then starts the worker with --api: the remote path) against
#       DROVER_DAEMON=0 (the worker writes the store: the local path).
#
# The workflow is bench/remote_flow.lua; the measurements are in
# bench/remote_bench.lua.  The server is a `drover serve --port 0` started
# here on a fresh DROVER_HOME and stopped at the end.
#
#   DROVER_BUILD=build-x bash bench/remote.sh     (N=10000 RUNS=3 WORKERS=50 TASKS=1000 COUNT=10)
#   PARTS="a c" bash bench/remote.sh              some of the parts
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
N=${N:-10000}
RUNS=${RUNS:-3}
WORKERS=${WORKERS:-50}
TASKS=${TASKS:-1000}
COUNT=${COUNT:-10}
PARTS=${PARTS:-a b c}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"

work=$(mktemp -d /tmp/drover-bench-remote.XXXXXX)
export DROVER_HOME=$work/home DROVER_BIN=$DROVER
serve_pid=
cleanup() {
  if [ -n "$serve_pid" ]; then
    kill "$serve_pid" 2>/dev/null || true
    wait "$serve_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# package and deploy without a daemon (nothing here may start one but us)
pkg=$(DROVER_DAEMON=0 "$DROVER" package --module remote_flow --class RemoteBench --entrypoint main \
  --path bench --json | sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p')
[ -n "$pkg" ] || { echo "bench/remote: drover package printed no id" >&2; exit 1; }
DROVER_DAEMON=0 "$DROVER" deploy bench --package "$pkg" >/dev/null

"$DROVER" serve --port 0 >"$work/serve.log" 2>&1 &
serve_pid=$!
for _ in $(seq 600); do
  grep -q "\"pid\":${serve_pid}[,}]" "$DROVER_HOME/daemon.json" 2>/dev/null && break
  kill -0 "$serve_pid" 2>/dev/null || { cat "$work/serve.log" >&2; exit 1; }
  sleep 0.05
done
url=$(sed -n 's/.*"url":"\([^"]*\)".*/\1/p' "$DROVER_HOME/daemon.json")
[ -n "$url" ] || { echo "bench/remote: drover serve did not start" >&2; cat "$work/serve.log" >&2; exit 1; }
echo "server: $url (pid $serve_pid), $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg)"

for part in $PARTS; do
  case $part in
    a) "$DROVER" bench/remote_bench.lua a "$url" "$N" "$RUNS" ;;
    b) "$DROVER" bench/remote_bench.lua b "$url" "$serve_pid" "$WORKERS" "$TASKS" ;;
    c) "$DROVER" bench/remote_bench.lua c "$COUNT" ;;
    *) echo "bench/remote: unknown part '$part' (a, b or c)" >&2; exit 1 ;;
  esac
done
