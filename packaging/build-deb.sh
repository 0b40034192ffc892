#!/usr/bin/env bash
# Builds the Debian package of qcow2fuse, and its -dbgsym package with the
# debug symbols, into build-deb/, checks both with lintian (any error or
# warning fails the build), and prints the path of the package on its last
# line:
#
#   apt-get install "$(packaging/build-deb.sh | tail -n 1)"
#
# It does by hand what debhelper would (the project has no debian/ source
# package): the files come from `cmake --install`, the binary is stripped
# as dh_strip does, and the dependencies are read off it by dpkg-shlibdeps.
set -euo pipefail
umask 022
root=$(cd "$(dirname "$0")/.." && pwd)
build="$root/build-deb"
"$root/packaging/install-deps.sh"

# The version and the date come from the changelog, as in any Debian
# build: the same source gives the same package (file times, gzip and ar
# headers are all clamped to SOURCE_DATE_EPOCH).
changelog="$root/packaging/changelog"
version=$(dpkg-parsechangelog -l "$changelog" -S Version)
maintainer=$(dpkg-parsechangelog -l "$changelog" -S Maintainer)
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$changelog" -S Timestamp)}
arch=$(dpkg --print-architecture)

# Debian's compiler and linker flags (hardening, and paths in the debug
# information relative to the source, not to this checkout).
export DEB_BUILD_MAINT_OPTIONS=hardening=+all
export DEB_BUILD_PATH=$root
cxxflags="$(dpkg-buildflags --get CXXFLAGS) $(dpkg-buildflags --get CPPFLAGS)"
ldflags=$(dpkg-buildflags --get LDFLAGS)
# RelWithDebInfo: -O2 and full debug information, which goes to -dbgsym.
BUILD_DIR="$build" "$root/packaging/build.sh" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF \
  -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_CXX_FLAGS="$cxxflags" -DCMAKE_EXE_LINKER_FLAGS="$ldflags"

# Staged as debhelper stages them, in debian/PACKAGE, where dpkg-shlibdeps
# expects the files.
work="$build/package"
rm -rf "$work" "$build"/*.deb
pkg="$work/debian/qcow2fuse"
dbg="$work/debian/qcow2fuse-dbgsym"
DESTDIR="$pkg" cmake --install "$build" >/dev/null
bin="$pkg/usr/bin/qcow2fuse"

# Debug symbols: the file is named by the binary's build id, where gdb
# looks for it once qcow2fuse-dbgsym is installed.
build_id=$(readelf -n "$bin" | sed -n 's/^ *Build ID: *\([0-9a-f]*\)$/\1/p')
[[ -n "$build_id" ]] || { echo "build-deb.sh: $bin has no build id" >&2; exit 1; }
debug_file="usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug"
mkdir -p "$(dirname "$dbg/$debug_file")" "$dbg/usr/share/doc"
objcopy --only-keep-debug --compress-debug-sections "$bin" "$dbg/$debug_file"
chmod 0644 "$dbg/$debug_file"
# Policy 10.1: strip --strip-unneeded and drop .comment and .note.
strip --strip-unneeded --remove-section=.comment --remove-section=.note "$bin"
objcopy --add-gnu-debuglink="$dbg/$debug_file" "$bin"
# The -dbgsym package's copyright and changelog are those of qcow2fuse,
# which it depends on.
ln -s qcow2fuse "$dbg/usr/share/doc/qcow2fuse-dbgsym"

# dpkg-shlibdeps finds the package's root by its DEBIAN directory, and
# wants a debian/control to exist, though it reads nothing from it here.
mkdir -p "$pkg/DEBIAN"
: >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O debian/qcow2fuse/usr/bin/qcow2fuse | sed -n 's/^shlibs:Depends=//p')
[[ -n "$shlibs" ]] || { echo "build-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

# control and md5sums of the package staged at $1.
write_control_files() {
  local dir=$1
  mkdir -p "$dir/DEBIAN"
  (cd "$dir" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | LC_ALL=C sort -z | xargs -0 md5sum) \
    >"$dir/DEBIAN/md5sums"
  {
    cat
    echo "Installed-Size: $(du -sk --apparent-size --exclude=DEBIAN "$dir" | cut -f1)"
  } >"$dir/DEBIAN/control"
  chmod 0644 "$dir/DEBIAN/control" "$dir/DEBIAN/md5sums"
}

write_control_files "$pkg" <<EOF
Package: qcow2fuse
Version: $version
Architecture: $arch
Maintainer: $maintainer
Depends: $shlibs, fuse3
Section: utils
Priority: optional
Description: mount a qcow2 disk image as a plain raw file through FUSE
 qcow2fuse makes a qcow2 disk image appear as one raw file, so that dd, cp,
 sha256sum and losetup work on it directly. It reads and writes images with
 backing chains, compressed clusters, external data files and subclusters,
 keeps the image valid qcow2 at every instant, and holds QEMU's image locks
 while it is mounted.
 .
 mount(8), fstab and systemd mount it as the file system type
 fuse.qcow2fuse; a template service keeps one image mounted.
EOF

write_control_files "$dbg" <<EOF
Package: qcow2fuse-dbgsym
Source: qcow2fuse
Version: $version
Auto-Built-Package: debug-symbols
Architecture: $arch
Maintainer: $maintainer
Depends: qcow2fuse (= $version)
Section: debug
Priority: optional
Description: debug symbols for qcow2fuse
Build-Ids: $build_id
EOF

deb="$build/qcow2fuse_${version}_${arch}.deb"
dbgsym="$build/qcow2fuse-dbgsym_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >/dev/null
dpkg-deb --root-owner-group -Zxz --build "$dbg" "$dbgsym" >/dev/null

# Tags of severity info and below are shown but do not fail the build.
lintian --fail-on error,warning --info "$deb" "$dbgsym" >&2 || {
  echo "build-deb.sh: lintian found errors or warnings (above)" >&2
  exit 1
}
echo "$dbgsym"
echo "$deb"
