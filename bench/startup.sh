#!/usr/bin/env bash
# bench/startup.sh -- cold start: `drover empty.lua` (an empty script) and
# `drover -e ''` versus `lua5.4 -e ''`, with hyperfine.  Not a test.
# Target: drover under 2x lua5.4.
#
# Also timed, to show where the time goes: `drover --version`, which exits
# before the engine is created, so it costs exec + dynamic linking only
# (the libraries drover links, libcurl's dependency tree above all).
#
#   DROVER_BUILD=build-x bash bench/startup.sh      (RUNS=30)
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${DROVER_BUILD:-build}
RUNS=${RUNS:-30}
DROVER=$PWD/$BUILD/drover
[ -x "$DROVER" ] || make -s BUILD="$BUILD" "$BUILD/drover"
if ! command -v hyperfine >/dev/null; then
  apt-get -o DPkg::Lock::Timeout=600 install -y -q hyperfine >/dev/null 2>&1 || true
fi
command -v hyperfine >/dev/null || { echo "bench/startup: hyperfine is missing" >&2; exit 1; }

work=$(mktemp -d /tmp/drover-bench-startup.XXXXXX)
trap 'rm -rf "$work"' EXIT
: >"$work/empty.lua"
# nothing in a plain script touches the store, but keep any home out of the way
export DROVER_HOME=$work/home

hyperfine -N --warmup 5 --runs "$RUNS" --export-json "$work/h.json" \
  -n lua "lua5.4 -e ''" \
  -n drover-script "$DROVER $work/empty.lua" \
  -n drover-e "$DROVER -e ''" \
  -n drover-version "$DROVER --version" >&2

lua5.4 - "$work/h.json" <<'LUA'
local cjson = require "cjson"
local f = assert(io.open(arg[1])); local h = cjson.decode(f:read("a")); f:close()
local r = {}
for _, x in ipairs(h.results) do r[x.command] = x end
local function ms(x) return (x.median or x.mean) * 1000 end
local function cpu(x) return (x.user + x.system) * 1000 end
local lua = r.lua
print("cold start (median wall, mean user+sys cpu):")
for _, k in ipairs { "lua", "drover-script", "drover-e", "drover-version" } do
  local x = r[k]
  print(string.format("  %-15s %7.2f ms wall  %7.2f ms cpu   ratio to lua5.4: %.2fx wall, %.2fx cpu",
    k, ms(x), cpu(x), ms(x) / ms(lua), cpu(x) / cpu(lua)))
end
local ratio = ms(r["drover-script"]) / ms(lua)
print(string.format("  engine + Lua library setup (script - --version): %.2f ms",
  ms(r["drover-script"]) - ms(r["drover-version"])))
print(string.format("RESULT startup ratio=%.2f target=2 %s", ratio, ratio < 2 and "OK" or "MISSED"))
LUA
