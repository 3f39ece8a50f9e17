# Process helpers for the service scripts (tests/services/docker.sh,
# podman.sh), which stop what an engine left behind by PID:
#
#   children_of PID   the pids whose parent is PID (from /proc: no procps)
#   pids_with_cmdline TEXT...
#                     the pids whose command line holds every TEXT
#   end_all PID...    TERM the pids given, wait up to 20 s, KILL what is
#                     left (saying so on stderr, as "$END_ALL_WHO: ..."),
#                     and wait up to 5 s for it to go
#   gone_within TRIES SECONDS PID...
#                     wait for the pids to be gone (end_all's two waits)

children_of() {
  local f
  for f in /proc/[0-9]*/status; do
    grep -qE "^PPid:[[:space:]]+$1\$" "$f" 2>/dev/null && { f=${f#/proc/}; echo "${f%/status}"; }
  done
  return 0
}

pids_with_cmdline() {
  local f cmd t ok
  for f in /proc/[0-9]*/cmdline; do
    cmd=$({ tr '\0' ' ' <"$f"; } 2>/dev/null) || continue
    ok=1
    for t in "$@"; do [[ $cmd == *"$t"* ]] || { ok=; break; }; done
    [ -n "$ok" ] && { f=${f#/proc/}; echo "${f%/cmdline}"; }
  done
  return 0
}

# gone_within TRIES SECONDS PID...: poll every SECONDS, at most TRIES
# times, until none of the pids is alive; the ones left go in $left
# (returns 1 if any is).
gone_within() {
  local tries=$1 every=$2 p i
  shift 2
  for i in $(seq 1 "$tries"); do
    left=
    for p in "$@"; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -n "$left" ] || return 0
    sleep "$every"
  done
  return 1
}

end_all() {
  local left
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  gone_within 100 0.2 "$@" && return 0
  echo "${END_ALL_WHO:-end_all}: killing what was left:$left" >&2
  kill -KILL $left 2>/dev/null || true
  gone_within 50 0.1 "$@" || true
}
