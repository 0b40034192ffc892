#!/usr/bin/env bash
# Installs what qcow2fuse needs to build, test and package on Debian 12 (as
# root). The package and its test need dpkg-dev (dpkg-shlibdeps), lintian,
# man-db (man's own checks) and systemd (systemd-analyze and the fstab
# generator; no running systemd is needed). fdisk (sfdisk, fdisk) and
# util-linux (partx) make and read the partition tables of the partition
# table tests and fuzz seeds; fuse2fs reads a partition file in the
# directory-mode tests; libnbd-bin (nbdinfo) reads the dirty bitmaps QEMU
# exports, the oracle of the bitmap tests. qemu-system-common brings
# qemu-storage-daemon, which holds an image the way a running VM does in the
# lock tests.
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git
  libfuse3-dev fuse3 zlib1g-dev libzstd-dev libdeflate-dev liburing-dev libabsl-dev libgtest-dev
  qemu-utils qemu-system-common libnbd-bin e2fsprogs fuse2fs util-linux fdisk mount coreutils fio libaio-dev
  clang libclang-rt-14-dev
  dpkg-dev lintian man-db systemd
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi
