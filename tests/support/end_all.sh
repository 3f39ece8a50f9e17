# end_all PID...: TERM the pids given, wait up to 20 s, KILL what is left
# (saying so on stderr, as "$END_ALL_WHO: ..."), and wait up to 5 s for
# it to go.  Sourced by the service scripts (tests/services/docker.sh,
# podman.sh) to stop what an engine left behind, by PID.
end_all() {
  local p i left
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  for i in $(seq 1 100); do
    left=
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -n "$left" ] || return 0
    sleep 0.2
  done
  echo "${END_ALL_WHO:-end_all}: killing what was left:$left" >&2
  kill -KILL $left 2>/dev/null || true
  for i in $(seq 1 50); do
    left=
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -n "$left" ] || return 0
    sleep 0.1
  done
}
