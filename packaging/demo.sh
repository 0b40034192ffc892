#!/usr/bin/env bash
# Builds qcow2fuse and shows it at work on IMAGE, or on a small demo image
# (an ext4 file system in a compressed qcow2 over a backing file) made when
# no IMAGE is given. Run as root on Debian 12:
#
#   packaging/demo.sh [--keep] [IMAGE]
#
# The view is unmounted at the end unless --keep is given.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
keep=0
if [[ "${1:-}" == "--keep" ]]; then keep=1; shift; fi
image=${1:-}

"$root/packaging/install-deps.sh"
"$root/packaging/build.sh" -DBUILD_TESTING=OFF
bin="$root/build/fuse/qcow2fuse"

work=$(mktemp -d /tmp/qcow2fuse-demo.XXXXXX)
view="$work/disk.raw"
loopdev=""
cleanup() {
  [[ -n "$loopdev" ]] && { umount "$work/fs" 2>/dev/null || true; losetup -d "$loopdev" 2>/dev/null || true; }
  if (( ! keep )); then
    "$bin" -u "$view" 2>/dev/null || true
    rm -rf "$work"
  fi
}
trap cleanup EXIT

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

if [[ -z "$image" ]]; then
  echo "== making a demo image in $work"
  mkdir -p "$work/files"
  echo "Hello from inside a qcow2 image." > "$work/files/hello.txt"
  head -c 3M /dev/urandom > "$work/files/random.bin"
  truncate -s 64M "$work/base.raw"
  mkfs.ext4 -q -F -d "$work/files" "$work/base.raw"
  qemu-img convert -q -c -O qcow2 -o compression_type=zstd "$work/base.raw" "$work/base.qcow2"
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$work/demo.qcow2"
  image="$work/demo.qcow2"
  rm "$work/base.raw"
fi

step qemu-img info --backing-chain "$image"
step "$bin" -o ro "$image" "$view"
step ls -ls "$view"
echo; echo "== the view reads exactly as QEMU reads the image"
step sha256sum "$view"
qemu-img convert -O raw "$image" "$work/reference.raw"
step sha256sum "$work/reference.raw"
cmp "$view" "$work/reference.raw" && echo "identical"
rm "$work/reference.raw"
step cp --sparse=always "$view" "$work/copy.raw"
step du -h --apparent-size "$work/copy.raw"
step du -h "$work/copy.raw"
rm "$work/copy.raw"

if blkid -p "$view" 2>/dev/null | grep -q 'TYPE="ext[234]"'; then
  echo; echo "== the guest file system, through a read-only loop device"
  loopdev=$(losetup -r --direct-io=on -f --show "$view")
  mkdir -p "$work/fs"
  step mount -o ro,noload "$loopdev" "$work/fs"
  step ls -l "$work/fs"
  [[ -f "$work/fs/hello.txt" ]] && step cat "$work/fs/hello.txt"
  umount "$work/fs"; losetup -d "$loopdev"; loopdev=""
fi

if (( keep )); then
  echo; echo "The view stays mounted at $view; unmount it with: $bin -u $view"
else
  # Returns once the daemon has exited: the image is free for qemu-img.
  step "$bin" -u "$view"
fi
