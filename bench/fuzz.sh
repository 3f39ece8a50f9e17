#!/usr/bin/env bash
# bench/fuzz.sh -- long fuzzing campaigns (not a test; `make test` runs each
# harness for 30 s).
#
#   bash bench/fuzz.sh [SECONDS] [NAME...]      default 60 s (bench/run.sh runs it
#                                               so); a campaign: 3600 or more
#
# Runs each libFuzzer harness of tests/fuzz (JSON decoder, fs.untar, cron
# parser, the daemon's request routing) for SECONDS, one after another,
# building on the corpus earlier campaigns left in bench/out/fuzz/NAME, and
# prints per harness the inputs run, execs/s, libFuzzer's coverage (cov:
# instrumented C edges plus Lua line pairs, ft: features, corp: corpus
# entries) and whether anything was found.  A crash's input is kept in
# build-fuzz/crashes/ (see tests/fuzz/run.sh for what to do with it).
# JOBS=2 runs two harnesses at once.
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
shift || true
mkdir -p bench/out/fuzz
export DROVER_FUZZ_WORK=$PWD/bench/out/fuzz
out=$(bash tests/fuzz/run.sh -j "${JOBS:-1}" "$secs" "$@"); rc=$?
printf '%s\n' "$out" | grep -v '^ok ' || true
echo
printf '%-8s %12s %10s  %s\n' harness inputs execs/s "coverage at the end"
printf '%s\n' "$out" | sed -n 's/^ok - fuzz \([a-z_]*\): \([0-9]*\) inputs in [0-9]* s (\([0-9]*\) execs\/s; \(.*\)), nothing found$/\1 \2 \3 \4/p' |
  while read -r name inputs rate cov; do printf '%-8s %12s %10s  %s\n' "$name" "$inputs" "$rate" "$cov"; done
printf '%s\n' "$out" | grep '^not ok ' || echo "nothing found in ${secs} s per harness"
exit $rc
