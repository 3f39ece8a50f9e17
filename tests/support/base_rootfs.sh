#!/usr/bin/env bash
# The root filesystem of the drover-base image, as a tar: the drover binary
# BIN, the libraries it and a few tools load (from ldd), a shell and those
# tools, and the CA certificates.  No registry and no debootstrap: the
# container engines import it (tests/services/docker.sh, podman.sh).
#
#   base_rootfs.sh BIN OUT.tar
set -euo pipefail
bin=${1:?usage: base_rootfs.sh BIN OUT.tar}
out=${2:?usage: base_rootfs.sh BIN OUT.tar}
rootfs=$(mktemp -d /tmp/drover-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
mkdir -p "$rootfs"/{bin,tmp,etc,lib64,usr/lib/x86_64-linux-gnu,opt/drover/bin,proc,sys,dev}
chmod 1777 "$rootfs/tmp"
tools=(/bin/dash /usr/bin/sleep /usr/bin/cat /usr/bin/env /usr/bin/true /usr/bin/false /usr/bin/ls
             /usr/bin/echo /usr/bin/kill)
libs=()
for b in "$bin" "${tools[@]}" /usr/lib/x86_64-linux-gnu/libcurl.so.4 /usr/lib/x86_64-linux-gnu/libcrypto.so.3; do
  [ -e "$b" ] || continue
  # every "=> /path" and the loader line of ldd's output
  while read -r lib; do libs+=("$lib"); done < <(ldd "$b" 2>/dev/null | grep -oE '/[^ ]+\.so[^ ]*' | sort -u)
done
for lib in /usr/lib/x86_64-linux-gnu/libcurl.so.4 /usr/lib/x86_64-linux-gnu/libcrypto.so.3 "${libs[@]}"; do
  [ -e "$lib" ] || continue
  case $lib in
    */ld-linux-x86-64.so.2) cp -L "$lib" "$rootfs/lib64/ld-linux-x86-64.so.2" ;;
    *) cp -L "$lib" "$rootfs/usr/lib/x86_64-linux-gnu/$(basename "$lib")" ;;
  esac
done
ln -s usr/lib "$rootfs/lib"
cp -L /bin/dash "$rootfs/bin/sh"
for t in "${tools[@]:1}"; do cp -L "$t" "$rootfs/bin/$(basename "$t")"; done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
[ -d /etc/ssl/certs ] && mkdir -p "$rootfs/etc/ssl" && cp -rL /etc/ssl/certs "$rootfs/etc/ssl/" 2>/dev/null || true
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 -cf "$out" .
