#!/usr/bin/env bash
# The tmux service: a private tmux server for the example backend in
# examples/backends/tmux.lua, so that the conformance kit runs on it (and
# on the minimal example, examples/backends/nohup.lua).
#   tmux.sh packages    Debian packages it needs
#   tmux.sh start DIR   start the server (socket under DIR, never the user's),
#                       write DIR/env and DIR/conformance
#   tmux.sh stop DIR    kill the server it started, by PID
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

case "${1:-}" in
packages)
  echo tmux
  ;;
start)
  DIR=${2:?usage: tmux.sh start DIR}
  mkdir -p "$DIR/tmux"
  DIR=$(cd "$DIR" && pwd)
  command -v tmux >/dev/null || { echo "tmux.sh: tmux is not installed (make deps installs it)" >&2; exit 1; }
  export TMUX_TMPDIR=$DIR/tmux
  unset TMUX
  # A placeholder session keeps the server up between runs (the server
  # exits when its last session ends); its pid is the server's.
  tmux -L drover new-session -d -s keepalive -- sleep 2147483647
  pid=$(tmux -L drover display-message -p -t =keepalive '#{pid}')
  [[ $pid =~ ^[0-9]+$ ]] || { echo "tmux.sh: could not read the tmux server's pid (got '$pid')" >&2; exit 1; }
  echo "$pid" >"$DIR/tmux.pid"
  # no env for the specs: the conformance line below carries TMUX_TMPDIR,
  # and a tmux deployment keeps it (config key tmpdir)
  : >"$DIR/env"
  # and the minimal example (examples/backends/nohup.lua), which needs
  # nothing but this machine: it rides on this service's line
  {
    echo "tmux DROVER_PATH=$ROOT/examples/backends TMUX_TMPDIR=$TMUX_TMPDIR"
    echo "nohup DROVER_PATH=$ROOT/examples/backends"
  } >"$DIR/conformance"
  ;;
stop)
  DIR=${2:?usage: tmux.sh stop DIR}
  if [ -f "$DIR/tmux.pid" ]; then
    pid=$(cat "$DIR/tmux.pid")
    # kill-server ends every session (and the placeholder); TERM is the fallback
    TMUX_TMPDIR=$DIR/tmux tmux -L drover kill-server 2>/dev/null || kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$DIR/tmux.pid"
  fi
  ;;
*)
  echo "usage: tmux.sh packages | start DIR | stop DIR" >&2
  exit 2
  ;;
esac
