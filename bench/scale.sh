#!/usr/bin/env bash
# bench/scale.sh -- drover's cost as its store grows (issue 13).  Not a test.
#
# Builds a year of a busy team's runs with bench/scale_fixture.lua (N flow
# runs, 20 task runs and 20 log lines each, plus one run of BIG task runs),
# then prints each figure of the issue against its target:
#   CLI        drover ls / status RUN / logs RUN    (hyperfine, median)
#   /metrics   time per scrape (curl, sequential), and how long a tiny
#              request waits when it arrives during a scrape (the loop is
#              blocked while a request computes)
#   run page   /api/runs/BIG: bytes and time
#   /api/runs  wrk -c CONNS --latency: p50, p99, req/s; peer in the same
#              run: H2O (Debian's h2o, one thread, like drover's one loop)
#              serving the same bytes as a static file; ROUNDS rounds
#              in turns, medians, and the load average around them
#   prune      drover prune --older-than 30d: time, batches, the longest
#              batch (write lock held), store size before and after
#
#   DROVER_BUILD=build-x bash bench/scale.sh   (N=100000 BIG=20000 DURATION=10s CONNS=64 ROUNDS=3)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
N=${N:-100000}
BIG=${BIG:-20000}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
SCRAPES=${SCRAPES:-5}
ROUNDS=${ROUNDS:-3}
DROVER=$ROOT/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
for tool in wrk hyperfine h2o jq; do
  if ! command -v $tool >/dev/null; then
    apt-get -o DPkg::Lock::Timeout=600 install -y -q $tool >/dev/null 2>&1 || true
  fi
  command -v $tool >/dev/null || { echo "bench/scale: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/drover-bench-scale.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
export DROVER_HOME=$work/home DROVER_DAEMON=0
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
disk() { du -cb "$DROVER_HOME"/drover.db* | tail -1 | cut -f1; }
ms() { awk -v s="$1" 'BEGIN { printf "%.1f ms", s * 1000 }'; }
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

echo "bench/scale: building the fixture ($N runs, 20 task runs and 20 log lines each, one run of $BIG task runs)" >&2
fixture=$("$DROVER" bench/scale_fixture.lua "$DROVER_HOME" "$N" "$BIG")
big=$(jq -r .big_run <<<"$fixture")
size0=$(disk)
printf 'fixture: %s flow runs, %s task runs, %s log lines, %s states, %s calls; %s; made in %.1f s\n' \
  "$(jq .runs <<<"$fixture")" "$(jq .task_runs <<<"$fixture")" "$(jq .logs <<<"$fixture")" \
  "$(jq .states <<<"$fixture")" "$(jq .calls <<<"$fixture")" "$(mb "$size0")" "$(jq .seconds <<<"$fixture")"
recent=$(sqlite3 "$DROVER_HOME/drover.db" "SELECT id FROM flow_runs WHERE state = 'COMPLETED' AND id <> '$big' ORDER BY created DESC LIMIT 1")

# ---- the command line ------------------------------------------------------------
hyperfine -N --warmup 2 --runs 20 --export-json "$work/cli.json" \
  -n ls "$DROVER ls" -n status "$DROVER status $recent" -n logs "$DROVER logs $recent" >/dev/null 2>"$work/cli.err" ||
  { echo "bench/scale: timing the command line failed:" >&2; cat "$work/cli.err" >&2; exit 1; }
echo
echo "figure                                  measured                      target"
cli() { jq -r --arg n "$1" '.results[] | select(.command == $n) | .median' "$work/cli.json"; }
for c in ls status logs; do
  printf '  drover %-32s %-29s <= 10 ms\n' "$c" "$(ms "$(cli $c)")"
done

# ---- the daemon ----------------------------------------------------------------------
"$DROVER" serve --port 0 >"$work/serve.out" 2>"$work/serve.err" &
pids+=($!)
for _ in $(seq 600); do [ -s "$DROVER_HOME/daemon.json" ] && break; sleep 0.05; done
url=$(jq -r .url "$DROVER_HOME/daemon.json")
[ -n "$url" ] || { echo "bench/scale: drover serve did not start" >&2; cat "$work/serve.err" >&2; exit 1; }

for _ in $(seq "$SCRAPES"); do curl -s -o /dev/null -w '%{time_total}\n' "$url/metrics"; done >"$work/metrics.t"
metrics=$(median <"$work/metrics.t")
printf '  %-39s %-29s <= 10 ms\n' "/metrics, per scrape (median of $SCRAPES)" "$(ms "$metrics")"
# a tiny request sent while a scrape is computing waits for it: the loop is blocked
curl -s -o /dev/null -w '%{time_total}' "$url/metrics" >"$work/scrape.t" &
scrape=$!
sleep 0.05
wait_tiny=$(curl -s -o /dev/null -w '%{time_total}' "$url/api/runs?limit=1")
wait $scrape
printf '  %-39s %-29s <= 50 ms (no request blocks the loop)\n' "/api/runs?limit=1 during a scrape" \
  "$(ms "$wait_tiny") (scrape $(ms "$(cat "$work/scrape.t")"))"

for _ in 1 2 3; do
  curl -s -o "$work/big.json" -w '%{time_total} %{size_download}\n' "$url/api/runs/$big"
done >"$work/big.t"
big_t=$(awk '{ print $1 }' "$work/big.t" | median)
big_b=$(tail -1 "$work/big.t" | awk '{ print $2 }')
printf '  %-39s %-29s summary + paged task runs\n' "/api/runs/ID, $BIG task runs" "$(mb "$big_b") in $(ms "$big_t")"
one=$(for _ in 1 2 3 4 5; do curl -s -o /dev/null -w '%{time_total}\n' "$url/api/runs"; done | median)
printf '  %-39s %-29s <= 50 ms loop time\n' "/api/runs, one request" "$(ms "$one")"

# /api/runs under load, and H2O serving the same bytes as a static file.
# Both serve at once and take turns, ROUNDS rounds of drover then H2O, so
# that a machine shared with other work slows both alike; each figure is
# the median of the rounds, the ratio the median of the rounds' ratios,
# and the load average is shown before and after.
curl -s -o "$work/static/runs.json" --create-dirs "$url/api/runs"
body=$(stat -c %s "$work/static/runs.json")
wrk_run() { # URL OUT
  wrk -t "$THREADS" -c "$CONNS" -d "$DURATION" --latency "$1" >"$2"
  if grep -q "Non-2xx\|Socket errors" "$2"; then echo "bench/scale: errors from $1:" >&2; cat "$2" >&2; fi
}
wrk_ms() { # FILE PERCENT -> ms
  awk -v p="$2%" '$1 == p { v = $2; if (v ~ /us$/) { sub(/us/, "", v); v /= 1000 } else if (v ~ /ms$/) { sub(/ms/, "", v) }
    else if (v ~ /s$/) { sub(/s/, "", v); v *= 1000 }; printf "%.2f", v }' "$1"
}
wrk_rps() { awk '/^Requests\/sec:/ { print $2 }' "$1"; }

cat >"$work/h2o.conf" <<EOF
listen:
  host: 127.0.0.1
  port: 0
num-threads: 1
hosts:
  default:
    paths:
      /:
        file.dir: $work/static
EOF
h2o_port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
sed -i "s/port: 0/port: $h2o_port/" "$work/h2o.conf"
chmod a+rx "$work" "$work/static" && chmod a+r "$work/static/runs.json" # h2o started as root serves as nobody
h2o -c "$work/h2o.conf" >"$work/h2o.log" 2>&1 &
pids+=($!)
h2o_url="http://127.0.0.1:$h2o_port/runs.json"
for _ in $(seq 200); do curl -s -o /dev/null "$h2o_url" && break; sleep 0.05; done
same=$(curl -s "$h2o_url" | cmp -s - "$work/static/runs.json" && echo yes || echo NO)
load0=$(cut -d' ' -f1-3 /proc/loadavg)
wrk -t "$THREADS" -c "$CONNS" -d 2s "$url/api/runs" >/dev/null # warm-up
wrk -t "$THREADS" -c "$CONNS" -d 2s "$h2o_url" >/dev/null
for i in $(seq "$ROUNDS"); do
  wrk_run "$url/api/runs" "$work/wrk-runs.$i"
  wrk_run "$h2o_url" "$work/wrk-h2o.$i"
  printf '%s %s %s %s %s %s\n' "$(wrk_ms "$work/wrk-runs.$i" 50)" "$(wrk_ms "$work/wrk-runs.$i" 99)" \
    "$(wrk_rps "$work/wrk-runs.$i")" "$(wrk_ms "$work/wrk-h2o.$i" 50)" "$(wrk_ms "$work/wrk-h2o.$i" 99)" \
    "$(wrk_rps "$work/wrk-h2o.$i")"
done >"$work/rounds"
load1=$(cut -d' ' -f1-3 /proc/loadavg)
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
pids=()
col() { awk -v c="$1" '{ print $c }' "$work/rounds" | median; }
d_p50=$(col 1) d_p99=$(col 2) d_rps=$(col 3) h_p50=$(col 4) h_p99=$(col 5) h_rps=$(col 6)
ratio=$(awk '{ printf "%.3f\n", $3 / $6 }' "$work/rounds" | median)
printf '  %-39s p50 %s ms, p99 %s ms, %.0f req/s   p99 <= 10 ms\n' "/api/runs, wrk -c$CONNS ($body bytes)" \
  "$d_p50" "$d_p99" "$d_rps"
printf '  %-39s p50 %s ms, p99 %s ms, %.0f req/s   (peer; same bytes: %s)\n' "H2O static file, wrk -c$CONNS" \
  "$h_p50" "$h_p99" "$h_rps" "$same"
printf '  %-39s %-29s >= 0.5 (within 2x)\n' "drover / H2O req/s" "$ratio"
printf '  %-39s %s\n' "  median of $ROUNDS rounds (drover/H2O)" \
  "$(awk '{ printf "%s%.0f/%.0f", (NR > 1 ? ", " : ""), $3, $6 }' "$work/rounds"); load $load0 -> $load1"

# ---- retention -------------------------------------------------------------------------
before=$(disk)
t0=$(date +%s.%N)
"$DROVER" prune --older-than 30d --json >"$work/prune.json"
t1=$(date +%s.%N)
after=$(disk)
p() { jq -r ".$1" "$work/prune.json"; }
printf '  %-39s %-29s\n' "prune --older-than 30d" "$(p runs) runs, $(p task_runs) task runs, $(p logs) logs"
printf '  %-39s %-29s small batches %s\n' "  time, batches, longest batch" \
  "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f s", b - a }'), $(p batches), $(ms "$(p max_batch_seconds)")" \
  "(median batch $(ms "$(p median_batch_seconds)"))"
printf '  %-39s %-29s short steps (median step %s)\n' "  of which vacuum, longest step" \
  "$(awk -v s="$(p vacuum_seconds)" 'BEGIN { printf "%.1f s", s }'), $(ms "$(p max_vacuum_step_seconds)")" \
  "$(ms "$(p median_vacuum_step_seconds)")"
printf '  %-39s %-29s smaller\n' "  store size before -> after" "$(mb "$before") -> $(mb "$after")"
ok=$(sqlite3 "$DROVER_HOME/drover.db" "PRAGMA integrity_check")
orph=$(sqlite3 "$DROVER_HOME/drover.db" "SELECT (SELECT count(*) FROM task_runs WHERE flow_run_id NOT IN (SELECT id FROM flow_runs))
  + (SELECT count(*) FROM logs WHERE flow_run_id NOT IN (SELECT id FROM flow_runs))")
printf '  %-39s %-29s ok, 0\n' "  integrity_check, orphans" "$ok, $orph"
echo "RESULT scale metrics_ms=$(awk -v s="$metrics" 'BEGIN { printf "%.1f", s * 1000 }') api_runs_p99_ms=$d_p99" \
  "drover_h2o=$ratio size_before=$before size_after=$after"
