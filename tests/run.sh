#!/usr/bin/env bash
# The whole test suite: C tests, then every busted spec under tests/ (stock
# lua5.4 loading build/lua/drover/core.so).  The last line is always
# "N passed, N failed".  DROVER_BUILD picks the build dir (build-asan for
# the sanitizer run).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
export DROVER_BUILD=$BUILD DROVER_ROOT=$ROOT DROVER_BIN=$ROOT/$BUILD/drover
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/tests/?.lua;;"
export LUA_CPATH="$ROOT/$BUILD/lua/?.so;;"
export DROVER_HOME=$(mktemp -d /tmp/drover-test-home.XXXXXX)
passed=0 failed=0
log=$(mktemp /tmp/drover-test.XXXXXX)
SERVICES=$(mktemp -d /tmp/drover-services.XXXXXX)
stop_services() {
  for svc in tests/services/*.sh; do
    [ -e "$svc" ] || continue
    name=$(basename "$svc" .sh)
    [ -d "$SERVICES/$name" ] && bash "$svc" stop "$SERVICES/$name" >>"$SERVICES/$name.log" 2>&1
  done
}
# Remove a store directory the specs used, after stopping the daemon a
# `drover run` may have started on it (daemon.json names its pid).
remove_home() {
  local pid
  pid=$(sed -n 's/.*"pid":\([0-9][0-9]*\).*/\1/p' "$1/daemon.json" 2>/dev/null)
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null
  rm -rf "$1"
}
trap 'stop_services; remove_home "$DROVER_HOME"; rm -rf "$log" "$SERVICES"' EXIT
LUA=lua5.4
if [[ $BUILD == build-asan ]]; then
  # An interpreter linked with the sanitizer runtime (tests/support/lua.c);
  # leak checking is valgrind's job (bench/ and docs say how), not this run's.
  LUA=$ROOT/$BUILD/lua5.4
  export DROVER_LUA=$LUA
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi

# Services: the real daemons some specs need (a Slurm cluster, dockerd...).
# Each tests/services/NAME.sh takes `packages` (Debian packages, installed
# by make deps), `start DIR` (start, leave pids in DIR, `export K=V` lines
# in DIR/env and conformance-kit lines "BACKEND [CONFIG.json] [K=V...]" in
# DIR/conformance) and `stop DIR` (stop what start started, by PID).  They
# start in the background while the C tests run.
svc_jobs=()
for svc in tests/services/*.sh; do
  [ -e "$svc" ] || continue
  name=$(basename "$svc" .sh)
  mkdir -p "$SERVICES/$name"
  ( bash "$svc" start "$SERVICES/$name" >"$SERVICES/$name.log" 2>&1; echo $? >"$SERVICES/$name.rc" ) &
  svc_jobs+=($!)
done

# C tests: each tests/c/*.c is built against libdrover.a and prints TAP lines.
for src in tests/c/*.c; do
  [ -e "$src" ] || continue
  bin=$BUILD/tests/$(basename "$src" .c)
  mkdir -p "$BUILD/tests"
  if ! make -s BUILD="$BUILD" "$bin" >"$log" 2>&1; then
    cat "$log"; echo "not ok - build $src"; failed=$((failed+1)); continue
  fi
  "$bin" >"$log" 2>&1; rc=$?
  cat "$log"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  passed=$((passed+p)); failed=$((failed+f))
done

for j in "${svc_jobs[@]}"; do wait "$j"; done
conformance_lines=()
for svc in tests/services/*.sh; do
  [ -e "$svc" ] || continue
  name=$(basename "$svc" .sh)
  if [ "$(cat "$SERVICES/$name.rc" 2>/dev/null)" = 0 ]; then
    echo "ok - service $name starts"; passed=$((passed+1))
    [ -f "$SERVICES/$name/env" ] && . "$SERVICES/$name/env"
    [ -f "$SERVICES/$name/conformance" ] && while IFS= read -r line; do
      [ -n "$line" ] && conformance_lines+=("$line")
    done <"$SERVICES/$name/conformance"
  else
    tail -n 40 "$SERVICES/$name.log"; echo "not ok - service $name starts"; failed=$((failed+1))
  fi
done

# busted specs, one process per file so one crash cannot hide the others.
for spec in tests/*_spec.lua; do
  [ -e "$spec" ] || continue
  echo "# $spec"
  busted --lua="$LUA" -o TAP "$spec" >"$log" 2>&1; rc=$?
  cat "$log"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1   # crashed before reporting
  passed=$((passed+p)); failed=$((failed+f))
done
# The specs of what the store carries, again on PostgreSQL: each home a
# spec makes (H.tempdir) gets a new database of the suite's server in its
# store.conf.  store_spec and two_servers_spec cover both databases already.
PG_SPECS="tests/daemon_spec.lua tests/reliability_spec.lua tests/worker_protocol_spec.lua tests/hardening_spec.lua"
for spec in $PG_SPECS; do
  echo "# $spec (on PostgreSQL)"
  if [ -z "${DROVER_PG_URL:-}" ]; then
    echo "not ok - $spec on PostgreSQL: the postgres service did not start"; failed=$((failed+1)); continue
  fi
  DROVER_TEST_STORE=postgresql busted --lua="$LUA" -o TAP "$spec" >"$log" 2>&1; rc=$?
  sed 's/^\(\(not \)\?ok [0-9]* - \)/\1[postgresql] /' "$log"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  passed=$((passed+p)); failed=$((failed+f))
done

# luacheck over the whole tree (.luacheckrc): clean, or the warnings shown.
echo "# luacheck"
if luacheck --no-color --quiet . >"$log" 2>&1; then
  echo "ok - luacheck finds nothing in the tree"; passed=$((passed+1))
else
  cat "$log"; echo "not ok - luacheck finds nothing in the tree"; failed=$((failed+1))
fi

# valgrind over the engine: every primitive, work left pending at close.
if [[ $BUILD != build-asan ]] && command -v valgrind >/dev/null; then
  echo "# valgrind: tests/valgrind/engine.lua"
  if valgrind -q --leak-check=full --errors-for-leak-kinds=definite --error-exitcode=9 \
       "$ROOT/$BUILD/drover" tests/valgrind/engine.lua >"$log" 2>&1; then
    echo "ok - valgrind finds no leak or memory error in the engine"; passed=$((passed+1))
  else
    cat "$log"; echo "not ok - valgrind finds no leak or memory error in the engine"; failed=$((failed+1))
  fi
fi

# libFuzzer over the parsers (tests/fuzz: JSON, fs.untar, cron, the
# daemon's request routing), each harness 30 s from its seed corpus, two
# at a time; one TAP line per harness.  Long campaigns: bench/fuzz.sh.
# The fuzz build is instrumented already: the sanitizer run skips it.
if [[ $BUILD != build-asan ]]; then
  echo "# fuzz: tests/fuzz/run.sh 30"
  bash tests/fuzz/run.sh -j 2 30 >"$log" 2>&1; rc=$?
  cat "$log"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  passed=$((passed+p)); failed=$((failed+f))
fi

# The conformance kit, once per backend the suite can start here.
# Lines are "BACKEND [CONFIG.json] [K=V ...]": local, then what the services
# wrote; DROVER_CONFORMANCE_BACKENDS (space-separated names) overrides.
if [ -n "${DROVER_CONFORMANCE_BACKENDS:-}" ]; then
  conformance_lines=($DROVER_CONFORMANCE_BACKENDS)
else
  conformance_lines=(local "local DROVER_TEST_STORE=postgresql" "${conformance_lines[@]}")
fi
for line in "${conformance_lines[@]}"; do
  read -r -a words <<<"$line"
  backend=${words[0]} config= envs=()
  for w in "${words[@]:1}"; do
    if [[ $w == *=* ]]; then envs+=("$w"); else config=$w; fi
  done
  echo "# conformance: $line"
  conf_home=$(mktemp -d /tmp/drover-conf.XXXXXX)
  # "DROVER_TEST_STORE=postgresql": the kit's store is a new database
  if [[ " ${envs[*]-} " == *" DROVER_TEST_STORE=postgresql "* ]]; then
    "$LUA" -e 'print(require("helper").pg_database())' >"$conf_home/store.conf" 2>"$log" || cat "$log"
  fi
  env ${envs[@]+"${envs[@]}"} BUSTED_OUTPUT=TAP BUSTED_LUA=$LUA DROVER_HOME=$conf_home \
    bash tests/conformance/run.sh "$backend" $config >"$log" 2>&1; rc=$?
  cat "$log"
  remove_home "$conf_home"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  passed=$((passed+p)); failed=$((failed+f))
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
