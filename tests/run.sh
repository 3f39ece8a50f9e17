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
trap 'rm -rf "$DROVER_HOME" "$log"' EXIT
LUA=lua5.4
if [[ $BUILD == build-asan ]]; then
  # An interpreter linked with the sanitizer runtime (tests/support/lua.c);
  # leak checking is valgrind's job (bench/ and docs say how), not this run's.
  LUA=$ROOT/$BUILD/lua5.4
  export DROVER_LUA=$LUA
  export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
fi

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

# The conformance kit, once per backend the suite can start here.
for backend in ${DROVER_CONFORMANCE_BACKENDS:-local}; do
  echo "# conformance: $backend"
  BUSTED_OUTPUT=TAP BUSTED_LUA=$LUA DROVER_HOME=$(mktemp -d /tmp/drover-conf.XXXXXX) \
    bash tests/conformance/run.sh "$backend" >"$log" 2>&1; rc=$?
  cat "$log"
  p=$(grep -c '^ok ' "$log"); f=$(grep -c '^not ok ' "$log")
  [ $rc -ne 0 ] && [ "$f" -eq 0 ] && f=1
  passed=$((passed+p)); failed=$((failed+f))
done

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
