#!/usr/bin/env bash
# Tests the Debian package from a copy of the source to a purged machine:
# packaging/build-deb.sh builds it (lintian must pass), its file list is
# what `cmake --install` installs, it installs with apt, and the installed
# qcow2fuse works as mount(8), an fstab file, systemd's fstab generator
# and the qcow2fuse@.service template run it. The package is purged, and
# every view unmounted, on every way out. Run as root:
#
#   tests/package/package_test.sh SOURCE_DIR
#
# Exits 77 (skipped) where it cannot run: not root, no /dev/fuse, not a
# git checkout, or qcow2fuse already installed (the test would remove it).
set -uo pipefail
src=$(cd "$1" && pwd)

skip() { echo "SKIP: $*"; exit 77; }
((EUID == 0)) || skip "needs root (it installs the package and mounts)"
[[ -c /dev/fuse ]] || skip "no /dev/fuse"
git -C "$src" rev-parse --git-dir >/dev/null 2>&1 || skip "$src is not a git checkout"
if dpkg-query -W -f='${Status}' qcow2fuse qcow2fuse-dbgsym 2>/dev/null | grep -q installed; then
  skip "qcow2fuse is installed on this machine; this test would replace it and then purge it"
fi

work=$(mktemp -d /tmp/qcow2fuse-package.XXXXXX)
installed=0
instance_run_dir=""

# The mount points under $work, from the mount table (no stat of a view).
mounts_under_work() {
  awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo
}

# Waits until no process has FILE open: the daemon that served it has
# flushed the image and exited (umount returns before that).
wait_released() {
  local file=$1 i
  for ((i = 0; i < 300; i++)); do
    [[ -z $(find /proc/[0-9]*/fd -lname "$file" 2>/dev/null | head -n 1) ]] && return 0
    sleep 0.1
  done
  echo "FAIL: $file is still open 30 s after the unmount" >&2
  return 1
}

cleanup() {
  local mp
  for mp in $(mounts_under_work); do
    umount "$mp" 2>/dev/null || umount -l "$mp" 2>/dev/null
  done
  for mp in "$work"/*.qcow2; do [[ -e $mp ]] && wait_released "$mp"; done
  if ((installed)); then
    DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq qcow2fuse qcow2fuse-dbgsym >/dev/null 2>&1 ||
      dpkg --purge qcow2fuse qcow2fuse-dbgsym >/dev/null 2>&1
  fi
  [[ -n $instance_run_dir ]] && rm -rf "$instance_run_dir" && rmdir /run/qcow2fuse 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

failures=0
fail() {
  echo "FAIL: $*"
  failures=$((failures + 1))
  return 1
}
ok() { echo "ok: $*"; }

# The mount table line of the view at PATH, if it is mounted.
mount_line() { awk -v p="$1" '$5 == p' /proc/self/mountinfo; }

# Checks that VIEW is a mounted qcow2fuse view with the mount options OPTS...
expect_mounted() {
  local view=$1 line o; shift
  line=$(mount_line "$view")
  [[ -n $line ]] || { fail "$view is not mounted"; return 1; }
  [[ $line == *" - fuse.qcow2fuse "* ]] || { fail "$view is not a fuse.qcow2fuse mount: $line"; return 1; }
  local options=,$(awk '{ print $6 }' <<<"$line"),
  for o in "$@"; do
    [[ $options == *,$o,* ]] || { fail "$view is mounted without $o: $line"; return 1; }
  done
}

# Makes IMAGE (64 MiB qcow2 with data at a few places) and its raw twin.
make_image() {
  local image=$1
  qemu-img create -q -f qcow2 "$image" 64M &&
    qemu-io -f qcow2 -c 'write -q -P 0x5a 0 1M' -c 'write -q -P 0xa5 10M 64k' -c 'write -q -z 20M 1M' "$image" \
      >/dev/null &&
    qemu-img convert -O raw "$image" "${image%.qcow2}.twin"
}

# Writes the same bytes at a few offsets through VIEW and into TWIN.
write_both() {
  local view=$1 twin=$2 offset
  for offset in 0 7 4096 12345678 67108000; do
    printf 'qcow2fuse package test at %d' "$offset" >"$work/chunk"
    dd if="$work/chunk" of="$view" bs=1 seek="$offset" conv=notrunc status=none || return 1
    dd if="$work/chunk" of="$twin" bs=1 seek="$offset" conv=notrunc status=none || return 1
  done
  # close() of a descriptor opened for writing made it durable; fsync too.
  sync "$view"
}

# After VIEW's daemon released IMAGE: the image is clean and equals TWIN.
expect_image() {
  local image=$1 twin=$2 out
  out=$(qemu-img check "$image" 2>&1) || { fail "qemu-img check $image: $out"; return 1; }
  out=$(qemu-img compare -f qcow2 -F raw "$image" "$twin" 2>&1) || { fail "$image differs from its twin: $out"; return 1; }
}

# ---------------------------------------------------------------------------
echo "== build the package from a copy of the source"
# Tracked files as they are in the working tree, and new files not yet
# added; no build directories (.gitignore).
mkdir "$work/src"
(cd "$src" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do [[ -e $f || -L $f ]] && printf '%s\0' "$f"; done |
  tar --null -T - -cf -) | tar -x -C "$work/src" || { echo "FAIL: cannot copy the source"; exit 1; }
start=$SECONDS
if ! "$work/src/packaging/build-deb.sh" >"$work/build.log" 2>&1; then
  tail -n 60 "$work/build.log"
  echo "FAIL: packaging/build-deb.sh failed (its output above)"
  exit 1
fi
echo "build-deb.sh took $((SECONDS - start)) s"
deb=$(tail -n 1 "$work/build.log")
if [[ $deb != "$work/src/build-deb/"*.deb || ! -f $deb ]]; then
  tail -n 20 "$work/build.log"
  echo "FAIL: the last line of build-deb.sh is not the path of a .deb: '$deb'"
  exit 1
fi
ok "build-deb.sh printed $deb last"
version=$(dpkg-deb -f "$deb" Version)
arch=$(dpkg-deb -f "$deb" Architecture)
dbgsym="$(dirname "$deb")/qcow2fuse-dbgsym_${version}_${arch}.deb"
[[ -f $dbgsym ]] || fail "no $dbgsym beside the package"
# build-deb.sh fails on them itself; this catches a gate that was lost.
if grep -E '^[EW]: ' "$work/build.log"; then fail "lintian printed errors or warnings"; fi

echo "== contents"
files_in_deb() { dpkg-deb -c "$1" | awk '$1 !~ /^d/ { sub(/^\.\//, "", $6); print $6 }' | LC_ALL=C sort; }
files_in_deb "$deb" >"$work/deb.files"
for f in usr/bin/qcow2fuse usr/share/man/man1/qcow2fuse.1.gz usr/share/doc/qcow2fuse/copyright \
  usr/share/doc/qcow2fuse/changelog.gz usr/share/bash-completion/completions/qcow2fuse \
  usr/lib/systemd/system/qcow2fuse@.service usr/share/doc/qcow2fuse/examples/fstab; do
  grep -qxF "$f" "$work/deb.files" || fail "the package lacks /$f"
done
depends=$(dpkg-deb -f "$deb" Depends)
for d in fuse3 libfuse3-3 libc6; do
  [[ ", $depends," == *", $d"[\ ,]* ]] || fail "Depends lacks $d: $depends"
done
# Abseil is linked in (CMakeLists.txt says why).
[[ $depends != *libabsl* ]] || fail "Depends names Abseil's shared objects: $depends"
[[ -n $(files_in_deb "$dbgsym" | grep '^usr/lib/debug/\.build-id/.*\.debug$') ]] || fail "$dbgsym holds no debug file"
ok "file list and dependencies"

# cmake --install of the same build installs the same files.
DESTDIR="$work/destdir" cmake --install "$work/src/build-deb" >/dev/null || fail "cmake --install failed"
(cd "$work/destdir" && find . ! -type d -printf '%P\n' | LC_ALL=C sort) >"$work/install.files"
if diff -u "$work/install.files" "$work/deb.files"; then
  ok "cmake --install installs the package's files"
else
  fail "cmake --install (-) and the package (+) install different files"
fi
# Elsewhere than /usr, the unit runs the binary of that prefix.
cmake -S "$work/src" -B "$work/src/build-deb" -DCMAKE_INSTALL_PREFIX=/usr/local >/dev/null &&
  DESTDIR="$work/destdir-local" cmake --install "$work/src/build-deb" >/dev/null || fail "cmake --install to /usr/local failed"
grep -q '^ExecStart=/usr/local/bin/qcow2fuse ' "$work/destdir-local/usr/local/lib/systemd/system/qcow2fuse@.service" ||
  fail "the unit installed under /usr/local does not run /usr/local/bin/qcow2fuse"

echo "== install"
installed=1
if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$deb" "$dbgsym" >"$work/apt.log" 2>&1; then
  cat "$work/apt.log"
  echo "FAIL: apt-get install failed"
  exit 1
fi
[[ $(command -v qcow2fuse) == /usr/bin/qcow2fuse ]] || fail "qcow2fuse is not /usr/bin/qcow2fuse"
out=$(qcow2fuse --version 2>&1)
[[ $out == "qcow2fuse $version "* ]] || fail "qcow2fuse --version says '$out', the package is $version"
[[ $(man -w qcow2fuse 2>&1) == /usr/share/man/man1/qcow2fuse.1.gz ]] || fail "man -w qcow2fuse: $(man -w qcow2fuse 2>&1)"
build_id=$(readelf -n /usr/bin/qcow2fuse | sed -n 's/^ *Build ID: *//p')
[[ -f /usr/lib/debug/.build-id/${build_id:0:2}/${build_id:2}.debug ]] || fail "no debug file for build id $build_id"
# The copyright file carries the license of the LICENSE file, word for word.
# The text is the paragraph after the last "License: Expat" line.
awk '/^License: Expat$/ { text = ""; next } { text = text $0 "\n" } END { printf "%s", text }' \
  /usr/share/doc/qcow2fuse/copyright | sed -e 's/^ //' -e 's/^\.$//' >"$work/copyright.license"
sed -n '/^Permission/,$p' "$src/LICENSE" | diff -u - "$work/copyright.license" >/dev/null ||
  fail "the license in /usr/share/doc/qcow2fuse/copyright is not the text of LICENSE"
grep -qF "$(sed -n 's/^Copyright (c) //p' "$src/LICENSE")" /usr/share/doc/qcow2fuse/copyright ||
  fail "copyright does not name LICENSE's holder"
[[ $(bash -c 'source /usr/share/bash-completion/completions/qcow2fuse && complete -p qcow2fuse') == *_qcow2fuse* ]] ||
  fail "the installed completion does not register for qcow2fuse"
ok "installed: $(qcow2fuse --version)"

# ---------------------------------------------------------------------------
echo "== mount -t fuse.qcow2fuse"
image=$work/ro.qcow2
view=$work/ro.raw
make_image "$image" || fail "cannot make $image"
if out=$(timeout 60 mount -t fuse.qcow2fuse -o ro "$image" "$view" 2>&1); then
  expect_mounted "$view" ro &&
    { cmp "$view" "${image%.qcow2}.twin" || fail "$view does not read as qemu-img convert reads $image"; }
  umount "$view" || fail "umount $view"
  wait_released "$image" || failures=$((failures + 1))
  [[ ! -e $view ]] || fail "the view $view, created by the mount, is still there after the unmount"
  [[ -z $(mount_line "$view") ]] && ok "mount -t fuse.qcow2fuse -o ro, read, umount"
else
  fail "mount -t fuse.qcow2fuse -o ro $image $view: $out"
fi

echo "== mount -t fuse qcow2fuse#IMAGE"
if out=$(timeout 60 mount -t fuse -o ro "qcow2fuse#$image" "$view" 2>&1); then
  expect_mounted "$view" ro && { cmp "$view" "${image%.qcow2}.twin" || fail "$view reads wrong"; }
  umount "$view" || fail "umount $view"
  wait_released "$image" && ok "mount -t fuse qcow2fuse#IMAGE"
else
  fail "mount -t fuse -o ro qcow2fuse#$image $view: $out"
fi

echo "== an fstab file"
{
  echo "$work/a.qcow2 $work/a.raw fuse.qcow2fuse defaults 0 0"
  echo "$work/b.qcow2 $work/b.raw fuse.qcow2fuse ro,nofail,x-systemd.automount,noatime 0 0"
  echo "$work/c.qcow2 $work/c.raw fuse.qcow2fuse rw,nodev,nosuid,noexec,relatime,threads=4 0 0"
} >"$work/fstab"
for name in a b c; do
  image=$work/$name.qcow2
  view=$work/$name.raw
  twin=$work/$name.twin
  make_image "$image" || fail "cannot make $image"
  line=$(grep " $view " "$work/fstab")
  if ! out=$(timeout 60 mount --fstab "$work/fstab" "$view" 2>&1); then
    fail "mount --fstab for '$line': $out"
    continue
  fi
  case $name in
  a) expect_mounted "$view" rw && write_both "$view" "$twin" ;;
  b) expect_mounted "$view" ro noatime && { cmp "$view" "$twin" || fail "$view reads wrong"; } ;;
  c) expect_mounted "$view" rw nodev nosuid noexec && write_both "$view" "$twin" ;;
  esac || fail "mounting, reading or writing '$line'"
  umount "$view" || fail "umount $view"
  wait_released "$image" && expect_image "$image" "$twin" && ok "fstab: $line"
done

echo "== systemd: the fstab generator's mount unit"
image=$work/s.qcow2
view=$work/s.raw
make_image "$image" || fail "cannot make $image"
# systemd would make a missing mount point a directory: the view must exist.
touch "$view"
echo "$image $view fuse.qcow2fuse rw,nofail,noatime,flush_interval=1 0 0" >"$work/fstab.systemd"
mkdir "$work/generated"
SYSTEMD_FSTAB=$work/fstab.systemd /usr/lib/systemd/system-generators/systemd-fstab-generator \
  "$work/generated" "$work/generated" "$work/generated" || fail "systemd-fstab-generator failed"
unit=$work/generated/$(systemd-escape -p --suffix=mount "$view")
if [[ -f $unit ]]; then
  systemd-analyze verify --man=no "$unit" || fail "systemd-analyze verify $unit"
  what=$(sed -n 's/^What=//p' "$unit")
  where=$(sed -n 's/^Where=//p' "$unit")
  type=$(sed -n 's/^Type=//p' "$unit")
  options=$(sed -n 's/^Options=//p' "$unit")
  # As systemd runs it (systemd.mount(5)).
  if out=$(timeout 60 mount "$what" "$where" -t "$type" -o "$options" 2>&1); then
    expect_mounted "$view" rw noatime && write_both "$view" "${image%.qcow2}.twin"
    umount "$where" || fail "umount $where"
    wait_released "$image" && expect_image "$image" "${image%.qcow2}.twin" &&
      { [[ -f $view ]] || fail "the view file that existed before the mount is gone"; } &&
      ok "systemd mount unit: mount $what $where -t $type -o $options"
  else
    fail "mount $what $where -t $type -o $options: $out"
  fi
else
  fail "systemd-fstab-generator made no $unit"
fi

echo "== systemd: qcow2fuse@.service"
image=$work/t.qcow2
view=$work/t.raw
make_image "$image" || fail "cannot make $image"
instance=$(systemd-escape -p "$view")
mkdir "$work/units"
unit="$work/units/qcow2fuse@$instance.service"
cp /usr/lib/systemd/system/qcow2fuse@.service "$unit"
systemd-analyze verify --man=yes "$unit" || fail "systemd-analyze verify $unit"
# %i and %f as systemd expands them (systemd.unit(5)), then the settings.
expand() { local s=${1//%i/$instance}; s=${s//%f/$view}; printf '%s' "${s//%%/%}"; }
setting() { expand "$(sed -n "s/^$1=//p" "$unit")"; }
env_file=$(setting EnvironmentFile)
[[ $env_file == "/etc/qcow2fuse/$instance.conf" ]] || fail "EnvironmentFile is $env_file"
# What /etc/qcow2fuse/INSTANCE.conf would say (the test writes nothing to
# /etc): IMAGE only, so OPTIONS keeps the unit's default.
declare -A env=()
for assignment in $(setting Environment); do env[${assignment%%=*}]=${assignment#*=}; done
env[IMAGE]=$image
# Environment variables in a command as systemd substitutes them: ${X} is
# one argument, $X is split at blanks.
command_of() {
  local word
  cmd=()
  for word in $(setting "$1"); do
    if [[ $word =~ ^\$\{([A-Za-z_]+)\}$ ]]; then
      cmd+=("${env[${BASH_REMATCH[1]}]-}")
    elif [[ $word =~ ^\$([A-Za-z_]+)$ ]]; then
      cmd+=(${env[${BASH_REMATCH[1]}]-})
    else
      cmd+=("$word")
    fi
  done
}
instance_run_dir=/run/$(setting RuntimeDirectory)
pid_file=$(setting PIDFile)
mkdir -p "$instance_run_dir"
command_of ExecStart
start_command=("${cmd[@]}")
command_of ExecStop
stop_command=("${cmd[@]}")
if out=$(timeout 60 "${start_command[@]}" 2>&1); then
  # Type=forking: the pid file names the daemon once the command returned.
  pid=$(cat "$pid_file" 2>/dev/null)
  [[ -n $pid && -n $(find "/proc/$pid/fd" -lname "$image" 2>/dev/null) ]] ||
    fail "PIDFile $pid_file does not name the daemon serving $image (pid '$pid')"
  expect_mounted "$view" rw && write_both "$view" "${image%.qcow2}.twin"
  if out=$(timeout 300 "${stop_command[@]}" 2>&1); then
    # ExecStop returns once the daemon is gone.
    [[ -z $(mount_line "$view") ]] || fail "$view is still mounted after ExecStop"
    # Exited: gone, or a zombie until its new parent reaps it; either way
    # its files are closed and the image's locks released.
    [[ -n $pid && (! -e /proc/$pid || $(ps -o stat= -p "$pid") == Z*) ]] || fail "the daemon (pid $pid) outlived ExecStop"
    [[ -z $(find /proc/[0-9]*/fd -lname "$image" 2>/dev/null) ]] || fail "$image is still open after ExecStop"
    expect_image "$image" "${image%.qcow2}.twin" && ok "qcow2fuse@.service: ${start_command[*]}; ${stop_command[*]}"
  else
    fail "ExecStop ${stop_command[*]}: $out"
  fi
else
  fail "ExecStart ${start_command[*]}: $out"
fi

# ---------------------------------------------------------------------------
echo "== purge"
if DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq qcow2fuse qcow2fuse-dbgsym >/dev/null 2>&1; then
  installed=0
  [[ -z $(command -v qcow2fuse) && ! -e /usr/share/man/man1/qcow2fuse.1.gz && ! -e /usr/share/doc/qcow2fuse ]] ||
    fail "files of qcow2fuse are left after the purge"
  ok "purged"
else
  fail "apt-get purge qcow2fuse qcow2fuse-dbgsym"
fi

if ((failures)); then
  echo "$failures package checks failed"
  exit 1
fi
echo "all package checks passed"
