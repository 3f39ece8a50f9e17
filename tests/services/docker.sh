#!/usr/bin/env bash
# A Docker Engine for the docker backend's specs and conformance runs
# (protocol: tests/run.sh).
#
#   docker.sh packages    Debian packages it needs
#   docker.sh start DIR   use the engine on /var/run/docker.sock, or start
#                         dockerd (no systemd: setsid, pid in DIR/dockerd.pid);
#                         make it a swarm manager; build the base image
#                         drover images start from; write DIR/env and
#                         DIR/conformance (container and swarm mode
#                         reporting to the store's daemon, and container
#                         mode on the shared store)
#   docker.sh stop DIR    leave the swarm and stop dockerd, if start did so
#
# No registry is reachable, so the base image is made here: FROM scratch
# with the shared libraries the drover binary ($DROVER_BIN) loads (ldd, plus
# libcurl/libcrypto, which drover dlopen()s), and /bin/sh and a few
# coreutils for workflows that start processes.  The backend's `package`
# adds drover itself, its Lua library and the workflow bundle on top.
set -euo pipefail

SOCK=/var/run/docker.sock
BASE_IMAGE=${DROVER_DOCKER_BASE_IMAGE:-drover-base:latest}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

die() { echo "docker.sh: $*" >&2; exit 1; }

ping() { curl -sf --max-time 2 --unix-socket "$SOCK" http://docker/_ping >/dev/null 2>&1; }

# Build the base image: a root filesystem of copied binaries and libraries
# (tests/support/base_rootfs.sh), imported.
build_base() {
  local dir=$1 bin=$2
  bash "$ROOT/tests/support/base_rootfs.sh" "$bin" "$dir/rootfs.tar"
  docker import --change 'ENV PATH=/opt/drover/bin:/usr/local/bin:/usr/bin:/bin' \
    --change 'LABEL drover.base=1' "$dir/rootfs.tar" "$BASE_IMAGE" >/dev/null
  rm -f "$dir/rootfs.tar"
}

start() {
  local dir=$1
  mkdir -p "$dir"
  command -v dockerd >/dev/null || die "dockerd not found: install docker.io (make deps)"
  # two test runs starting at once must not start two engines on one socket
  exec 9>/tmp/drover-docker-service.lock
  flock -w 300 9 || die "another docker.sh start holds /tmp/drover-docker-service.lock"
  if ping; then
    echo "using the Docker Engine already answering on $SOCK"
    : >"$dir/external"
  else
    rm -f "$dir/external"
    setsid dockerd --storage-driver=overlay2 >"$dir/dockerd.log" 2>&1 </dev/null 9>&- &
    echo $! >"$dir/dockerd.pid"
    local i
    for i in $(seq 1 600); do
      ping && break
      kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null || { tail -n 20 "$dir/dockerd.log" >&2; die "dockerd exited while starting"; }
      sleep 0.2
    done
    ping || { tail -n 20 "$dir/dockerd.log" >&2; die "dockerd did not answer on $SOCK within 120 s"; }
  fi
  local state
  state=$(docker info --format '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown)
  if [ "$state" != active ]; then
    docker swarm init --advertise-addr 127.0.0.1 >"$dir/swarm-init.log" 2>&1 ||
      { cat "$dir/swarm-init.log" >&2; die "docker swarm init failed"; }
    : >"$dir/swarm-initialised"
  fi
  local bin=${DROVER_BIN:-$ROOT/build/drover}
  [ -x "$bin" ] || die "the drover binary '$bin' is missing (build it first: make)"
  build_base "$dir" "$bin"
  exec 9>&-
  cat >"$dir/env" <<EOF
export DROVER_DOCKER_SOCKET=$SOCK
export DROVER_DOCKER_BASE_IMAGE=$BASE_IMAGE
EOF
  # The kit's store is made per run, so its server is the daemon `run`
  # starts for it (api_url "auto"): containers report over HTTP with no
  # mount of the store.  shared.json is the shared-store fallback.
  printf '{"socket": "%s", "base_image": "%s", "mode": "container", "api_url": "auto"}\n' \
    "$SOCK" "$BASE_IMAGE" >"$dir/container.json"
  printf '{"socket": "%s", "base_image": "%s", "mode": "swarm", "api_url": "auto"}\n' \
    "$SOCK" "$BASE_IMAGE" >"$dir/swarm.json"
  printf '{"socket": "%s", "base_image": "%s", "mode": "container"}\n' "$SOCK" "$BASE_IMAGE" >"$dir/shared.json"
  printf 'docker %s\ndocker %s\ndocker %s\n' "$dir/container.json" "$dir/swarm.json" "$dir/shared.json" \
    >"$dir/conformance"
  echo "Docker Engine ready on $SOCK, base image $BASE_IMAGE"
}


pgid_of() { awk '{ sub(/^.*\) /, ""); print $3 }' "/proc/$1/stat" 2>/dev/null; }

# The shims of the containerd that dockerd manages (its socket under
# /var/run/docker): left behind when dockerd and containerd were killed.
shims() { pids_with_cmdline "containerd-shim" "/var/run/docker/containerd/containerd.sock"; }

END_ALL_WHO=docker.sh
. "$ROOT/tests/support/procs.sh"

stop() {
  local dir=$1
  if [ -f "$dir/swarm-initialised" ]; then
    docker swarm leave --force >/dev/null 2>&1 || echo "docker.sh: swarm leave failed" >&2
    rm -f "$dir/swarm-initialised"
  fi
  if [ -f "$dir/dockerd.pid" ]; then
    local pid i
    pid=$(cat "$dir/dockerd.pid")
    # an engine this script started: take away what the tests left in it
    # (containers and services labelled drover=1, drover's images)
    docker service rm $(docker service ls -q --filter label=drover=1 2>/dev/null) >/dev/null 2>&1 || true
    docker rm -f $(docker ps -aq --filter label=drover=1 2>/dev/null) >/dev/null 2>&1 || true
    docker rmi $(docker images -q "drover/*" 2>/dev/null) >/dev/null 2>&1 || true
    if kill -0 "$pid" 2>/dev/null; then
      # containerd and the shims run in sessions of their own, so dockerd's
      # process group does not hold them: note them now, while dockerd is
      # their parent, to make sure they end too
      local kids
      kids=$(children_of "$pid")
      kill -TERM "$pid"
      for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "docker.sh: dockerd $pid did not stop in 60 s, killing it" >&2
        # setsid made dockerd a process group leader: the group goes with it
        if [ "$(pgid_of "$pid")" = "$pid" ]; then kill -KILL -- "-$pid" 2>/dev/null || true
        else kill -KILL "$pid" 2>/dev/null || true; fi
        for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
      end_all $kids $(shims)
    fi
    rm -f "$dir/dockerd.pid"
  fi
}

case ${1:-} in
  packages) echo docker.io ;;
  start) [ $# -ge 2 ] || die "usage: docker.sh start DIR"; start "$2" ;;
  stop) [ $# -ge 2 ] || die "usage: docker.sh stop DIR"; stop "$2" ;;
  *) die "usage: docker.sh packages | start DIR | stop DIR" ;;
esac
