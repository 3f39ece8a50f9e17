#!/usr/bin/env bash
# Run the libFuzzer harnesses (tests/fuzz/NAME.lua, built by `make fuzz`):
#
#   tests/fuzz/run.sh [-j JOBS] SECONDS [NAME...]
#
# Each harness runs for SECONDS, starting from its seed corpus
# (tests/fuzz/corpus/NAME, read only: what the run adds goes to a scratch
# directory), and prints one TAP line with its executions per second, or
# the failed property and where the crashing input was saved
# (build-fuzz/crashes/NAME-SHA1).  JOBS harnesses run at once (default 1).
# Exit status 0 when no harness found anything.  DROVER_FUZZ_WORK=DIR keeps
# what each run adds in DIR/NAME, so that campaigns build on each other
# (bench/fuzz.sh); otherwise it goes with the run.
#
# A crash found is fixed with a regression test in the relevant spec, and
# its input joins the seed corpus (tests/fuzz/corpus/NAME/regression-WHAT),
# so every later run replays it first.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
jobs=1
if [ "${1:-}" = -j ]; then jobs=$2; shift 2; fi
secs=${1:?usage: tests/fuzz/run.sh [-j JOBS] SECONDS [NAME...]}
shift
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for f in tests/fuzz/*.lua; do names+=("$(basename "$f" .lua)"); done
fi

if ! command -v clang >/dev/null; then
  echo "not ok - fuzz: clang is not installed (make deps installs it)"
  exit 1
fi
log=$(mktemp -d /tmp/drover-fuzz-run.XXXXXX)
trap 'rm -rf "$log"' EXIT
if ! make -s fuzz >"$log/build" 2>&1; then
  tail -n 40 "$log/build"
  echo "not ok - fuzz: make fuzz"
  exit 1
fi
mkdir -p build-fuzz/crashes

# Longest input per harness: cron has to reach both sides of its 1 KiB
# limit; the others take libFuzzer's default (from the corpus, at least 4 KiB).
declare -A max_len=([cron]=2048)

# Leak checks after every input would cost 100x the speed (the engine's
# Lua heap grows and shrinks between inputs); leaks are valgrind's job
# (tests/run.sh).  -timeout: one input taking longer is a finding (the
# cron harness's instruction budget does not see time in string patterns).
work=${DROVER_FUZZ_WORK:-$log/work}
run_one() {
  local name=$1 dir=$log/$1
  mkdir -p "$dir" "$work/$name"
  local args=(-max_total_time="$secs" -timeout=10 -detect_leaks=0 -print_final_stats=1
              -artifact_prefix="$dir/" -close_fd_mask=1)
  [ -n "${max_len[$name]:-}" ] && args+=(-max_len="${max_len[$name]}")
  "build-fuzz/fuzz/$name" "${args[@]}" "$work/$name" "tests/fuzz/corpus/$name" >"$dir/out" 2>&1
  echo $? >"$dir/rc"
}

report() {
  local name=$1 dir=$log/$1 rc execs rate cov
  rc=$(cat "$dir/rc")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/out")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$dir/out")
  # coverage at the end: libFuzzer's "cov: N ft: N corp: N/SIZE"
  cov=$(grep -a -o 'cov: [0-9]* ft: [0-9]* corp: [0-9]*' "$dir/out" | tail -n 1)
  local crash
  crash=$(ls "$dir"/crash-* "$dir"/timeout-* "$dir"/leak-* "$dir"/oom-* 2>/dev/null | head -n 1)
  if [ "$rc" = 0 ] && [ -z "$crash" ]; then
    echo "ok - fuzz $name: ${execs:-?} inputs in ${secs} s (${rate:-?} execs/s; ${cov:-no coverage line}), nothing found"
    return 0
  fi
  grep -a -E '^fuzz |ERROR: |SUMMARY: |^==[0-9]+==' "$dir/out" | head -n 20 | cut -c1-300 | sed 's/^/# /'
  if [ -n "$crash" ]; then
    local keep=build-fuzz/crashes/$name-$(sha1sum "$crash" | cut -c1-12)
    cp "$crash" "$keep"
    echo "# replay: build-fuzz/fuzz/$name -detect_leaks=0 $keep"
  else
    tail -n 20 "$dir/out" | cut -c1-300 | sed 's/^/# /'
  fi
  echo "not ok - fuzz $name: a property failed or the harness crashed (exit $rc)"
  return 1
}

failed=0
i=0
while [ $i -lt ${#names[@]} ]; do
  batch=("${names[@]:i:jobs}")
  pids=()
  for n in "${batch[@]}"; do
    if [ ! -f "tests/fuzz/$n.lua" ]; then echo "not ok - fuzz $n: no harness tests/fuzz/$n.lua"; failed=1; continue; fi
    run_one "$n" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  for n in "${batch[@]}"; do
    [ -f "$log/$n/rc" ] && { report "$n" || failed=1; }
  done
  i=$((i + jobs))
done
exit $failed
