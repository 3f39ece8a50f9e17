#!/usr/bin/env bash
# The main job: build drover, then package, deploy and run the example ETL
# workflow (examples/etl) on the local backend, printing the run's id and
# URL, then follow it to the end.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
make -s deps
make -s BUILD="$BUILD" >/dev/null
drover=$BUILD/drover
read -r pkg _ < <($drover package --module pipeline --class Pipeline --entrypoint run --path examples/etl)
$drover deploy etl-demo --package "$pkg" --replace shards=4 >/dev/null
read -r id url < <($drover run etl-demo)
echo "run id: $id"
echo "url:    $url"
$drover logs -f "$id"
$drover status "$id"
