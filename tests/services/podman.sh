#!/usr/bin/env bash
# Podman's Docker-compatible API for the docker backend's conformance runs
# (protocol: tests/run.sh): the same backend, a third docker mode.
#
#   podman.sh packages    Debian packages it needs
#   podman.sh start DIR   start `podman system service` (rootful, no
#                         systemd: setsid, pid in DIR/podman.pid) on the
#                         unix socket DIR/podman.sock, its storage, run and
#                         tmp dirs under DIR (no clash with dockerd or with
#                         another podman); build the base image drover
#                         images start from; write DIR/env and
#                         DIR/conformance (container mode reporting to the
#                         store's daemon; podman has no swarm)
#   podman.sh stop DIR    stop the service and what it ran, remove DIR's storage
#
# The base image is made as docker.sh makes it (no registry is reachable):
# FROM scratch with the shared libraries $DROVER_BIN loads, /bin/sh and a
# few coreutils, imported with the podman CLI on the service's storage.
#
# Podman, unlike dockerd, gives containers rlimits of its own (nofile
# 1048576, nproc 4194304 rootful) whatever the host allows; on a host whose
# hard limits are lower the runtime cannot set them and no container
# starts.  The backend asks for HostConfig.Ulimits within its own hard
# limits (docs/docker.md, "Podman").  Init: true needs catatonit.
set -euo pipefail

BASE_IMAGE=${DROVER_DOCKER_BASE_IMAGE:-drover-base:latest}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

die() { echo "podman.sh: $*" >&2; exit 1; }

# The podman CLI on this service's storage (the same flags as the service:
# the CLI and the service share the storage, with podman's own locks).
pm() {
  podman --root "$DIR/storage" --runroot "$DIR/run" --tmpdir "$DIR/tmp" --volumepath "$DIR/storage/volumes" \
    --network-config-dir "$DIR/networks" --storage-driver overlay --cgroup-manager cgroupfs \
    --events-backend file "$@"
}

ping() { curl -sf --max-time 2 --unix-socket "$DIR/podman.sock" http://podman/_ping >/dev/null 2>&1; }

# Build the base image: a root filesystem of copied binaries and libraries
# (tests/support/base_rootfs.sh, as docker.sh does), imported with podman.
build_base() {
  local bin=$1
  bash "$ROOT/tests/support/base_rootfs.sh" "$bin" "$DIR/rootfs.tar"
  pm import --quiet --change 'ENV PATH=/opt/drover/bin:/usr/local/bin:/usr/bin:/bin' \
    --change 'LABEL drover.base=1' "$DIR/rootfs.tar" "$BASE_IMAGE" >"$DIR/import.log" 2>&1 ||
    { cat "$DIR/import.log" >&2; die "podman import of the base image $BASE_IMAGE failed"; }
  rm -f "$DIR/rootfs.tar"
}

start() {
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  command -v podman >/dev/null || die "podman not found: install podman and catatonit (make deps)"
  # Init: true (which the backend asks for) runs podman's init_path
  [ -x /usr/libexec/podman/catatonit ] || command -v catatonit >/dev/null ||
    die "catatonit not found: install it (podman runs it as the containers' init)"
  if [ -f "$DIR/podman.pid" ] && kill -0 "$(cat "$DIR/podman.pid")" 2>/dev/null; then
    die "a podman service started from $DIR already runs (pid $(cat "$DIR/podman.pid")): stop it first"
  fi
  mkdir -p "$DIR"/{storage,run,tmp,networks}
  rm -f "$DIR/podman.sock"
  # --time 0: the service never exits for being idle
  setsid podman --root "$DIR/storage" --runroot "$DIR/run" --tmpdir "$DIR/tmp" \
    --volumepath "$DIR/storage/volumes" --network-config-dir "$DIR/networks" --storage-driver overlay \
    --cgroup-manager cgroupfs --events-backend file \
    system service --time 0 "unix://$DIR/podman.sock" >"$DIR/podman.log" 2>&1 </dev/null &
  echo $! >"$DIR/podman.pid"
  local i
  for i in $(seq 1 600); do
    ping && break
    kill -0 "$(cat "$DIR/podman.pid")" 2>/dev/null || { tail -n 20 "$DIR/podman.log" >&2; die "podman system service exited while starting"; }
    sleep 0.2
  done
  ping || { tail -n 20 "$DIR/podman.log" >&2; die "podman did not answer on $DIR/podman.sock within 120 s"; }
  local bin=${DROVER_BIN:-$ROOT/build/drover}
  [ -x "$bin" ] || die "the drover binary '$bin' is missing (build it first: make)"
  build_base "$bin"
  # No DROVER_DOCKER_SOCKET here: that is dockerd's (docker.sh's env), which
  # the docker specs use; the podman mode names its socket in its config.
  cat >"$DIR/env" <<EOF
export DROVER_PODMAN_SOCKET=$DIR/podman.sock
EOF
  printf '{"socket": "%s", "base_image": "%s", "mode": "container", "api_url": "auto"}\n' \
    "$DIR/podman.sock" "$BASE_IMAGE" >"$DIR/container.json"
  printf 'docker %s\n' "$DIR/container.json" >"$DIR/conformance"
  echo "Podman $(pm --version | awk '{print $3}') ready on $DIR/podman.sock, base image $BASE_IMAGE"
}


# The conmon processes of this service's containers (their command lines
# name its run dir): conmon daemonises, so the service is not their parent.
conmons() { pids_with_cmdline "conmon --api-version" "$DIR/"; }

END_ALL_WHO=podman.sh
. "$ROOT/tests/support/procs.sh"

stop() {
  [ -d "$DIR" ] || return 0
  DIR=$(cd "$DIR" && pwd)
  # what the tests left: every container (of this storage only), then the service
  timeout 120 bash -c "$(declare -f pm); DIR='$DIR'; pm rm --all --force --time 5" >/dev/null 2>&1 ||
    echo "podman.sh: podman rm --all failed" >&2
  if [ -f "$DIR/podman.pid" ]; then
    local pid i
    pid=$(cat "$DIR/podman.pid")
    if kill -0 "$pid" 2>/dev/null; then
      local kids
      kids=$(children_of "$pid")
      kill -TERM "$pid"
      for i in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "podman.sh: podman $pid did not stop in 60 s, killing it" >&2
        kill -KILL "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
      end_all $kids
    fi
    rm -f "$DIR/podman.pid"
  fi
  end_all $(conmons)
  # the storage: its mounts (containers/storage bind-mounts DIR/storage/overlay
  # on itself), then the files.  Not `podman system reset`: that also
  # removes things outside this storage (podman machine's files)
  local m
  for m in $(awk -v d="$DIR/" 'index($2, d) == 1 { print $2 }' /proc/self/mounts | sort -r); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  rm -rf "$DIR"/{storage,run,tmp,networks,rootfs,rootfs.tar} "$DIR/podman.sock"
}

case ${1:-} in
  packages) echo podman catatonit ;;
  start) [ $# -ge 2 ] || die "usage: podman.sh start DIR"; DIR=$2; start ;;
  stop) [ $# -ge 2 ] || die "usage: podman.sh stop DIR"; DIR=$2; stop ;;
  *) die "usage: podman.sh packages | start DIR | stop DIR" ;;
esac
