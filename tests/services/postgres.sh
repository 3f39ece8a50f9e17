#!/usr/bin/env bash
# The PostgreSQL service: a private PostgreSQL 15 server for drover.pg and,
# later, the store on PostgreSQL.
#   postgres.sh packages      Debian packages it needs
#   postgres.sh start DIR     initdb a cluster (data under /var/tmp, owned by
#                             a non-root user: the server refuses to run as
#                             root), start it with pg_ctl on a unix socket and
#                             a free TCP port on 127.0.0.1 (scram-sha-256 over
#                             TCP, trust on the socket), create the role and
#                             database `drover`, write DIR/env
#   postgres.sh restart DIR   pg_ctl restart -m fast (the specs' server-restart case)
#   postgres.sh stop DIR      stop the server it started, by PID, and remove the cluster
#
# DIR/env exports DROVER_PG_URL (TCP, with the password), DROVER_PG_SOCKET_URL
# (the unix socket, no password) and DROVER_PG_DIR (DIR, for restart).
set -euo pipefail
PGBIN=/usr/lib/postgresql/15/bin
PGUSER_OS=drover-pg

# Run a command as the cluster's owner (root cannot run PostgreSQL).
as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PGUSER_OS" -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

case "${1:-}" in
packages)
  echo postgresql-15 libpq-dev
  ;;
start)
  DIR=${2:?usage: postgres.sh start DIR}
  mkdir -p "$DIR"
  DIR=$(cd "$DIR" && pwd)
  [ -x "$PGBIN/initdb" ] || { echo "postgres.sh: $PGBIN/initdb is missing (make deps installs postgresql-15)" >&2; exit 1; }
  if [ "$(id -u)" = 0 ] && ! id "$PGUSER_OS" >/dev/null 2>&1; then
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PGUSER_OS"
  fi
  # DIR may sit under a directory only root can enter: the cluster lives
  # under /var/tmp, and DIR records where.
  CLUSTER=$(mktemp -d /var/tmp/drover-pg.XXXXXX)
  echo "$CLUSTER" >"$DIR/cluster"
  cd /
  [ "$(id -u)" = 0 ] && chown "$PGUSER_OS" "$CLUSTER"
  chmod 755 "$CLUSTER"
  as_owner "$PGBIN/initdb" -D "$CLUSTER/data" -U postgres --auth-local=trust \
    --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$DIR/initdb.log" 2>&1 ||
    { cat "$DIR/initdb.log" >&2; exit 1; }
  as_owner mkdir -p "$CLUSTER/sock"
  PORT=$(free_port)
  # A throwaway test server: durability off, so the suite stays fast.
  cat >>"$CLUSTER/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$CLUSTER/sock'
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
EOF
  cat >"$CLUSTER/data/pg_hba.conf" <<EOF
local all all trust
host  all all 127.0.0.1/32 scram-sha-256
EOF
  as_owner "$PGBIN/pg_ctl" -D "$CLUSTER/data" -l "$CLUSTER/server.log" -w -t 120 start >/dev/null ||
    { cat "$CLUSTER/server.log" >&2; exit 1; }
  head -n 1 "$CLUSTER/data/postmaster.pid" >"$DIR/postgres.pid"
  PASSWORD=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  as_owner "$PGBIN/psql" -q -v ON_ERROR_STOP=1 -h "$CLUSTER/sock" -p "$PORT" -U postgres -d postgres <<EOF
CREATE ROLE drover LOGIN CREATEDB PASSWORD '$PASSWORD';
CREATE DATABASE drover OWNER drover;
EOF
  cat >"$DIR/env" <<EOF
export DROVER_PG_URL=postgresql://drover:$PASSWORD@127.0.0.1:$PORT/drover
export DROVER_PG_SOCKET_URL='postgresql:///drover?host=$CLUSTER/sock&port=$PORT&user=drover'
export DROVER_PG_DIR=$DIR
EOF
  ;;
restart)
  DIR=${2:?usage: postgres.sh restart DIR}
  CLUSTER=$(cat "$DIR/cluster")
  cd /
  as_owner "$PGBIN/pg_ctl" -D "$CLUSTER/data" -l "$CLUSTER/server.log" -m fast -w -t 120 restart >/dev/null
  head -n 1 "$CLUSTER/data/postmaster.pid" >"$DIR/postgres.pid"
  ;;
stop)
  DIR=${2:?usage: postgres.sh stop DIR}
  if [ -f "$DIR/postgres.pid" ]; then
    pid=$(cat "$DIR/postgres.pid")
    # SIGINT is PostgreSQL's fast shutdown; KILL is the fallback
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$DIR/postgres.pid"
  fi
  if [ -f "$DIR/cluster" ]; then
    CLUSTER=$(cat "$DIR/cluster")
    case $CLUSTER in /var/tmp/drover-pg.*) rm -rf "$CLUSTER" ;; esac
    rm -f "$DIR/cluster"
  fi
  ;;
*)
  echo "usage: postgres.sh packages | start DIR | restart DIR | stop DIR" >&2
  exit 2
  ;;
esac
