#!/usr/bin/env bash
# A real, private Slurm cluster on this machine for the slurm backend's
# specs: munged, slurmctld, four slurmd nodes and two slurmrestd (REST over a
# unix socket with rest_auth/local, REST over TCP with JWT).
#
#   slurm.sh packages             Debian packages it needs
#   slurm.sh start DIR            start it all, write DIR/env, DIR/conformance
#   slurm.sh start-node DIR NODE  (re)start one slurmd (a test killed it)
#   slurm.sh stop DIR             stop what start started, by PID
#
# The nodes stand for other hosts.  n1..n3 (partition `debug`, the default)
# each run in a mount namespace of their own (unshare -m) where /tmp, the
# submitter's DROVER_HOME and ~/.drover are empty tmpfs mounts: a job there
# cannot see the store or the staging directory of a test (both live under
# /tmp), only the drover binary and its Lua library (in the checkout), and
# reaches `drover serve` by URL only.  n4 (partition `shared`) sees this
# host's filesystem as it is: the shared-filesystem fallback runs there.
#
# So that the hidden nodes still find their own files, the cluster's files
# (config, state, spool, logs, munge key and socket, JWT key, REST socket)
# live outside /tmp, in a directory under /var/tmp named in DIR/cluster-dir;
# DIR keeps the pid files, env and conformance.  The TCP ports are picked
# free, so it never collides with a system Slurm or another copy of this
# cluster.  Runs as root.
set -uo pipefail

cmd=${1:-}
DIR=${2:-}
C=  # the cluster's files, outside /tmp (see above)

die() { echo "slurm.sh: $*" >&2; exit 1; }

# Is TCP port $1 unused (no socket bound to it, any state, v4 or v6)?
port_free() {
  local hex
  hex=$(printf '%04X' "$1")
  ! awk -v h=":$hex" 'NR > 1 && substr($2, length($2) - 4) == h { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# N distinct free ports, random in 20000-59999 (a second cluster picks others).
free_ports() {
  local n=$1 got=() p tries=0
  while [ ${#got[@]} -lt "$n" ]; do
    tries=$((tries + 1)); [ $tries -gt 1000 ] && die "no free TCP ports found"
    p=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
    [[ " ${got[*]-} " == *" $p "* ]] && continue
    port_free "$p" && got+=("$p")
  done
  echo "${got[@]}"
}

# Start argv in its own session, output to a log, pid into DIR/NAME.pid.
launch() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$C/log/$name.out" 2>&1 &
  echo $! >"$DIR/$name.pid"
}

# Poll until "$@" succeeds or $1 seconds pass (no fixed sleeps: a loaded
# machine just takes longer).
wait_for() {
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $end ] && die "timed out after ${secs}s waiting for $what (logs in $C/log)"
    for f in "$DIR"/*.pid; do
      [ -e "$f" ] || continue
      kill -0 "$(cat "$f")" 2>/dev/null || die "$(basename "$f" .pid) exited while waiting for $what: $(tail -n 5 "$C/log/$(basename "$f" .pid).out" 2>/dev/null)"
    done
    sleep 0.2
  done
}

nodes_idle() { [ "$(sinfo -h -N -o '%N %t' 2>/dev/null | grep -c ' idle$')" -ge 4 ]; }
rest_unix() { curl -sf --max-time 5 --unix-socket "$C/slurmrestd.sock" http://localhost/slurm/v0.0.38/ping; }
# the JWT goes in a header file (mode 600), never on curl's command line,
# which every user can read in /proc
rest_tcp() {
  curl -sf --max-time 5 -H @"$C/rest-headers" "http://127.0.0.1:$REST_PORT/slurm/v0.0.38/ping"
}

# Directories a hidden node must not see besides /tmp: the submitter's
# store (when it is not under /tmp) and the default one.
# The checkout, when /tmp (which the hidden nodes replace) holds it; else "-".
checkout_under_tmp() {
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
  if [[ "$root" == /tmp/* ]]; then echo "$root"; else echo -; fi
}

hidden_dirs() {
  local d
  for d in "${DROVER_HOME:-}" "${HOME:-/root}/.drover"; do
    [ -n "$d" ] && [ -d "$d" ] && [[ "$d" != /tmp/* ]] && echo "$d"
  done
}

# What a hidden node's mount namespace does before slurmd starts: an empty
# writable tmpfs on /tmp (the node's own local disk), an empty read-only
# one on each hidden directory (a worker that tried to open a store there
# fails instead of silently making a new one).  The drover checkout (the
# binary the jobs run) stays visible even when it lives under /tmp (a CI
# clone may): it is bind-mounted aside first and moved back onto the new
# /tmp.  Args: NODE CONF KEEP_DIR|- STAGE DIR...
# shellcheck disable=SC2016 # expanded by that shell, not this one
NODE_SETUP='n=$1 conf=$2 keep=$3 stage=$4; shift 4
mount --make-rprivate / || exit 1
if [ "$keep" != - ]; then mkdir -p "$stage" && mount --bind "$keep" "$stage" || exit 1; fi
mount -t tmpfs -o mode=1777,size=512m drover-node-tmp /tmp || exit 1
if [ "$keep" != - ]; then mkdir -p "$keep" && mount --move "$stage" "$keep" || exit 1; fi
for d in "$@"; do mount -t tmpfs -o ro,mode=755,size=1m drover-hidden "$d" || exit 1; done
exec slurmd -D -N "$n" -f "$conf"'

# (Re)start the slurmd of node $1: n1..n3 each in a mount namespace of its
# own (unshare -m) hiding /tmp and the stores, n4 (the shared-filesystem
# node) as is.
start_node() {
  local n=$1
  case "$n" in
    n4) launch "slurmd-$n" slurmd -D -N "$n" -f "$C/slurm.conf" ;;
    n[123])
      # shellcheck disable=SC2046 # one word per directory (no spaces in them)
      launch "slurmd-$n" unshare -m sh -c "$NODE_SETUP" node-setup "$n" "$C/slurm.conf" \
        "$(checkout_under_tmp)" "$C/keep-$n" $(hidden_dirs) ;;
    *) die "unknown node '$n' (n1..n4)" ;;
  esac
}

# start-node DIR NODE: a test killed a node's slurmd and wants it back.
start_one_node() {
  if [ -z "$DIR" ] || [ -z "${3:-}" ]; then die "usage: slurm.sh start-node DIR NODE"; fi
  DIR=$(cd "$DIR" && pwd)
  C=$(cat "$DIR/cluster-dir" 2>/dev/null) || die "no cluster started in $DIR"
  export SLURM_CONF=$C/slurm.conf
  start_node "$3"
}

start() {
  [ -n "$DIR" ] || die "usage: slurm.sh start DIR"
  [ "$(id -u)" = 0 ] || die "must run as root (slurmd needs it)"
  for b in munged slurmctld slurmd slurmrestd sinfo scontrol sbatch curl; do
    command -v "$b" >/dev/null || die "'$b' not found: install $("$0" packages)"
  done
  command -v unshare >/dev/null || die "'unshare' not found: install util-linux"
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ -e "$DIR/slurmctld.pid" ] && stop
  # a fresh cluster each time: slurmctld refuses state saved under another
  # ClusterName (the name carries this script's pid)
  C=$(mktemp -d /var/tmp/drover-slurm.XXXXXX) || die "cannot make a directory under /var/tmp"
  echo "$C" >"$DIR/cluster-dir"
  ln -sfn "$C/log" "$DIR/log"
  mkdir -p "$C"/{log,state,spool,munge-key,munge-run,jobs}
  chmod 700 "$C/munge-key"; chmod 755 "$C" "$C/munge-run"

  # munge: its own key and socket
  head -c 1024 /dev/urandom >"$C/munge-key/munge.key"
  chmod 400 "$C/munge-key/munge.key"
  launch munged munged -F --force --key-file="$C/munge-key/munge.key" \
    --socket="$C/munge-run/munge.sock" --pid-file="$C/munge-run/munged.pid" \
    --seed-file="$C/munge-run/munge.seed" --log-file="$C/log/munged.log"
  wait_for 30 "munged's socket" test -S "$C/munge-run/munge.sock"

  # JWT key for slurmrestd over TCP
  head -c 32 /dev/urandom >"$C/jwt.key"; chmod 600 "$C/jwt.key"

  read -r CTLD_PORT P1 P2 P3 P4 REST_PORT <<<"$(free_ports 6)"
  local cluster="drover$$"
  cat >"$C/slurm.conf" <<EOF
# private test cluster written by tests/services/slurm.sh
ClusterName=$cluster
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$C/munge-run/munge.sock
AuthAltTypes=auth/jwt
AuthAltParameters=jwt_key=$C/jwt.key
CredType=cred/munge
StateSaveLocation=$C/state
SlurmdSpoolDir=$C/spool/%n
SlurmctldPidFile=$C/slurmctld.daemon.pid
SlurmdPidFile=$C/slurmd-%n.daemon.pid
SlurmctldLogFile=$C/log/slurmctld.log
SlurmdLogFile=$C/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$C/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
MpiDefault=none
MinJobAge=300
ReturnToService=2
SlurmdTimeout=15
KillWait=5
JobRequeue=0
InactiveLimit=0
MaxArraySize=10001
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P1 CPUs=4 RealMemory=2000
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P2 CPUs=4 RealMemory=2000
NodeName=n3 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P3 CPUs=4 RealMemory=2000
NodeName=n4 NodeHostname=localhost NodeAddr=127.0.0.1 Port=$P4 CPUs=4 RealMemory=2000
PartitionName=debug Nodes=n1,n2,n3 Default=YES MaxTime=INFINITE State=UP
PartitionName=shared Nodes=n4 Default=NO MaxTime=INFINITE State=UP
EOF
  export SLURM_CONF=$C/slurm.conf
  mkdir -p "$C/spool/n1" "$C/spool/n2" "$C/spool/n3" "$C/spool/n4"

  launch slurmctld slurmctld -D -i -f "$SLURM_CONF"
  wait_for 60 "slurmctld to answer" scontrol ping
  for n in n1 n2 n3 n4; do start_node "$n"; done
  wait_for 120 "4 idle nodes in sinfo" nodes_idle

  export SLURMRESTD_SECURITY=disable_user_check
  launch slurmrestd-unix slurmrestd -a rest_auth/local -s openapi/v0.0.38 "unix:$C/slurmrestd.sock"
  SLURM_JWT=daemon launch slurmrestd-tcp slurmrestd -a rest_auth/jwt -s openapi/v0.0.38 "127.0.0.1:$REST_PORT"
  (umask 077; scontrol token lifespan=86400 | sed -n 's/^SLURM_JWT=//p' >"$C/token")
  [ -s "$C/token" ] || die "scontrol token gave no token"
  (umask 077; printf 'X-SLURM-USER-NAME: root\nX-SLURM-USER-TOKEN: %s\n' "$(cat "$C/token")" >"$C/rest-headers")
  wait_for 60 "slurmrestd on $C/slurmrestd.sock" rest_unix
  wait_for 60 "slurmrestd on 127.0.0.1:$REST_PORT" rest_tcp

  cat >"$DIR/env" <<EOF
export SLURM_CONF=$C/slurm.conf
export DROVER_SLURM_DIR=$DIR
export DROVER_SLURM_CLUSTER_DIR=$C
export DROVER_SLURM_SOCKET=$C/slurmrestd.sock
export DROVER_SLURM_URL=http://127.0.0.1:$REST_PORT
export DROVER_SLURM_TOKEN_FILE=$C/token
export DROVER_SLURM_JOBCOMP=$C/jobcomp.txt
export DROVER_SLURM_PARTITION=debug
export DROVER_SLURM_SHARED_PARTITION=shared
EOF
  # The kit once per transport (REST over the unix socket, REST with JWT
  # over TCP, the sbatch/squeue/scancel commands), each with the workers on
  # the hidden nodes reporting to the daemon of the kit's store (api_url
  # "daemon": the nodes share this host's network, not its files); and once
  # in the shared-filesystem fallback, on n4.
  cat >"$DIR/conformance-socket.json" <<EOF
{"socket": "$C/slurmrestd.sock", "partition": "debug", "jobcomp_file": "$C/jobcomp.txt", "api_url": "daemon"}
EOF
  cat >"$DIR/conformance-jwt.json" <<EOF
{"url": "http://127.0.0.1:$REST_PORT", "token_file": "$C/token", "user": "root", "partition": "debug", "jobcomp_file": "$C/jobcomp.txt", "api_url": "daemon"}
EOF
  cat >"$DIR/conformance-commands.json" <<EOF
{"commands": true, "partition": "debug", "jobcomp_file": "$C/jobcomp.txt", "api_url": "daemon"}
EOF
  cat >"$DIR/conformance-shared.json" <<EOF
{"socket": "$C/slurmrestd.sock", "partition": "shared", "jobcomp_file": "$C/jobcomp.txt"}
EOF
  cat >"$DIR/conformance" <<EOF
slurm $DIR/conformance-socket.json SLURM_CONF=$C/slurm.conf
slurm $DIR/conformance-jwt.json SLURM_CONF=$C/slurm.conf
slurm $DIR/conformance-commands.json SLURM_CONF=$C/slurm.conf
slurm $DIR/conformance-shared.json SLURM_CONF=$C/slurm.conf DROVER_DAEMON=0
EOF
  echo "slurm cluster up: $DIR (slurmctld :$CTLD_PORT, nodes :$P1 :$P2 :$P3 :$P4, REST :$REST_PORT)"
}

# Stop every daemon start started, by the pid it saved, and wait for it.
stop() {
  [ -n "$DIR" ] || die "usage: slurm.sh stop DIR"
  local pids=() f p
  C=$(cat "$DIR/cluster-dir" 2>/dev/null)
  # jobs first, so no slurmstepd or job process outlives the cluster
  if [ -n "$C" ] && [ -e "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$C/slurm.conf
    scancel --quiet --user=root 2>/dev/null
    local jend=$((SECONDS + 30))
    while [ -n "$(squeue -h -o %i 2>/dev/null | head -1)" ] && [ $SECONDS -lt $jend ]; do sleep 0.2; done
  fi
  for f in "$DIR"/slurmrestd-*.pid "$DIR"/slurmd-n?.pid "$DIR"/slurmctld.pid "$DIR"/munged.pid; do
    [ -e "$f" ] || continue
    p=$(cat "$f")
    kill -TERM "$p" 2>/dev/null && pids+=("$p")
    rm -f "$f"
  done
  local end=$((SECONDS + 30))
  for p in ${pids[@]+"${pids[@]}"}; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
    kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
  done
  kill_leftovers
  # the cluster's files: only a directory start made (the name it gave)
  if [[ "$C" == /var/tmp/drover-slurm.* ]] && [ -d "$C" ]; then rm -rf "$C"; fi
  rm -f "$DIR/cluster-dir" "$DIR/log"
  return 0
}

# This (sub)shell and its ancestors (their command lines may name DIR: never
# killed).
own_tree() {
  local p=$BASHPID ppid
  while [ -n "$p" ] && [ "$p" -gt 1 ]; do
    echo "$p"
    ppid=$(awk '/^PPid:/ { print $2 }' "/proc/$p/status" 2>/dev/null)
    p=$ppid
  done
}

# Processes the cluster left behind: slurmstepd and job processes (their
# environment carries SLURM_CONF=C/slurm.conf, jobs also SLURM_JOB_ID),
# and anything whose command line names DIR or C (a slurmd a test restarted).
# Other clusters' processes name their own DIR; the caller's are skipped.
leftovers() {
  local own p d
  own=" $(own_tree | tr '\n' ' ') "
  for d in /proc/[0-9]*; do
    p=${d#/proc/}
    [[ "$own" == *" $p "* ]] && continue
    if grep -qzF -e "$DIR/" ${C:+-e "$C/"} "$d/cmdline" 2>/dev/null; then echo "$p"; continue; fi
    grep -qzF -e "$DIR/" ${C:+-e "$C/"} "$d/environ" 2>/dev/null || continue
    if grep -qz '^slurmstepd' "$d/cmdline" 2>/dev/null || grep -qz '^SLURM_JOB_ID=' "$d/environ" 2>/dev/null; then
      echo "$p"
    fi
  done
}

# TERM the leftovers, by PID; KILL what is still there after 10 s; wait.
kill_leftovers() {
  local pids p end
  pids=$(leftovers)
  [ -n "$pids" ] || return 0
  local what=""
  for p in $pids; do what+=" $p($(cat "/proc/$p/comm" 2>/dev/null))"; done
  echo "slurm.sh: killing leftover processes of $DIR ($C):$what" >&2
  for p in $pids; do kill -TERM "$p" 2>/dev/null; done
  end=$((SECONDS + 10))
  for p in $pids; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
  done
  for p in $pids; do kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null; done
  end=$((SECONDS + 10))
  for p in $pids; do
    while kill -0 "$p" 2>/dev/null && [ $SECONDS -lt $end ]; do sleep 0.1; done
  done
  return 0
}

case "$cmd" in
  packages) echo "slurm-wlm slurmctld slurmd slurm-client munge slurmrestd slurm-wlm-jwt-plugin curl" ;;
  start) start ;;
  start-node) start_one_node "$@" ;;
  stop) stop ;;
  *) die "usage: slurm.sh packages | start DIR | start-node DIR NODE | stop DIR" ;;
esac
