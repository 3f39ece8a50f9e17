#!/usr/bin/env bash
# Run the conformance kit on one backend:
#   tests/conformance/run.sh BACKEND [CONFIG.json]
# Uses the build in $DROVER_BUILD (default build/); DROVER_PATH may name
# directories holding your own backends.
set -uo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUILD=${DROVER_BUILD:-build}
export DROVER_ROOT=$ROOT DROVER_BUILD=$BUILD DROVER_BIN=${DROVER_BIN:-$ROOT/$BUILD/drover}
export DROVER_BACKEND=${1:-local}
[ $# -ge 2 ] && export DROVER_BACKEND_CONFIG=$2
export LUA_PATH="$ROOT/lua/?.lua;$ROOT/lua/?/init.lua;$ROOT/tests/?.lua;;"
export LUA_CPATH="$ROOT/$BUILD/lua/?.so;;"
export DROVER_HOME=${DROVER_HOME:-$(mktemp -d /tmp/drover-conformance.XXXXXX)}
busted --lua=${BUSTED_LUA:-lua5.4} -o ${BUSTED_OUTPUT:-utfTerminal} tests/conformance/contract_spec.lua
