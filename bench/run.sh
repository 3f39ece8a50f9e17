#!/usr/bin/env bash
# bench/run.sh -- every benchmark in turn, then a summary.  Not a test:
# nothing here fails on a slow figure; a benchmark fails only if it could
# not run or its sanity check did (e.g. the store lacks the task runs).
#
#   startup.sh   cold start of drover vs lua5.4
#   memory.sh    resident memory of an idle engine vs lua5.4
#   tracking.sh  per-task cost of tracking (100,000 no-op task runs)
#   dag.sh       1,000-process DAG and a 200-process chain vs make / snakemake
#   remote.sh    reporting over HTTP vs writing the store (10,000 tasks),
#                50 workers at once, `drover run` -> first task (docs/protocol.md)
#   proc.sh, http.sh, db.sh   when present (their owners' benchmarks),
#   then any other bench/*.sh
#
# Each benchmark's own summary is printed as it finishes; hyperfine's
# progress goes to bench/out/NAME.log (the whole stderr of each).
#
#   DROVER_BUILD=build-x bash bench/run.sh            all of them
#   DROVER_BUILD=build-x bash bench/run.sh dag startup   some of them
# Each script's knobs (RUNS, N, ...) pass through the environment.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
export DROVER_BUILD=$BUILD
[ -x "$BUILD/drover" ] || make -s BUILD="$BUILD" all || exit 1

all=(startup memory tracking dag remote proc http db)
# ... and any other bench/NAME.sh that appears, after those
for f in bench/*.sh; do
  n=$(basename "$f" .sh)
  case " run ${all[*]} " in *" $n "*) ;; *) all+=("$n") ;; esac
done
if [ $# -gt 0 ]; then names=("$@"); else names=("${all[@]}"); fi

out=bench/out
mkdir -p "$out"
declare -A status
for name in "${names[@]}"; do
  script=bench/$name.sh
  if [ ! -f "$script" ]; then
    status[$name]="not present"
    continue
  fi
  echo "=== $name ($(date +%H:%M:%S))"
  start=$(date +%s)
  if bash "$script" >"$out/$name.txt" 2>"$out/$name.log"; then
    status[$name]="ok ($(( $(date +%s) - start )) s)"
  else
    status[$name]="FAILED (see $out/$name.log)"
    tail -5 "$out/$name.log"
  fi
  cat "$out/$name.txt"
  echo
done

echo "=== summary (build: $BUILD, $(nproc) cpus, load average $(cut -d' ' -f1-3 /proc/loadavg))"
for name in "${names[@]}"; do
  printf '%-9s %s\n' "$name" "${status[$name]}"
  [ -f "$out/$name.txt" ] || continue
  # the scripts' one-line results, else their ratio lines, else their last lines
  if grep -q '^RESULT ' "$out/$name.txt"; then
    grep '^RESULT ' "$out/$name.txt" | sed 's/^RESULT /          /'
  elif grep -qiE 'ratio|[0-9]x( |$)' "$out/$name.txt"; then
    grep -iE 'ratio|[0-9]x( |$)' "$out/$name.txt" | sed 's/^/          /'
  else
    tail -n 2 "$out/$name.txt" | sed 's/^/          /'
  fi
done
for name in "${names[@]}"; do
  case ${status[$name]} in FAILED*) exit 1 ;; esac
done
exit 0
