#!/usr/bin/env bash
# Install the Debian packages drover needs to build and test, if missing.
# Safe to run again; waits for other apt users instead of failing.
set -euo pipefail
pkgs=(build-essential pkg-config lua5.4 liblua5.4-dev libuv1-dev libcurl4-openssl-dev
      libssl-dev lua-cjson-dev lua-busted libsqlite3-dev sqlite3 libh2o-dev curl ca-certificates
      python3 procps valgrind luarocks openssl clang lua-check strace)
pkgs+=("$@")
# the packages of the services the tests start (tests/services/NAME.sh packages)
for svc in "$(dirname "$0")"/../services/*.sh; do
  [ -e "$svc" ] && pkgs+=($(bash "$svc" packages))
done
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -q "${missing[@]}" >/dev/null
fi
