#!/usr/bin/env bash
# Builds the Debian package of qcow2fuse into build-deb/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/packaging/install-deps.sh"
apt-get install -y -qq dpkg-dev >/dev/null 2>&1 || true
BUILD_DIR="$root/build-deb" "$root/packaging/build.sh" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_PREFIX=/usr
(cd "$root/build-deb" && cpack -G DEB)
ls "$root"/build-deb/*.deb
