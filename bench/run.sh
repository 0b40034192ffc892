#!/usr/bin/env bash
# Benchmarks qcow2fuse against qemu-storage-daemon's FUSE export ("qsd") and
# against a raw copy of the same disk read directly ("raw"), and prints a
# Markdown table of medians and ratios. See bench/README.md.
#
#   bench/run.sh [--rounds N] [--quick] [--only REGEX] [--runtime S] [--out FILE] [--list]
#
# Run as root: it drops the page cache and mounts FUSE file systems. Every
# mount it makes is unmounted again, also on error or Ctrl-C, and it only
# ever signals processes it started itself (by PID).
set -uo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
bench_dir=$root/bench
SYSTEMS=(raw qcow2fuse qsd)

usage() {
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
  cat <<'EOF'

Options:
  --rounds N     rounds per workload (default 3; 1 with --quick)
  --quick        small images and short runs, 1 round (a few minutes)
  --only REGEX   run only the workloads whose name matches (grep -E)
  --runtime S    seconds per time-based fio run (default 6; 2 with --quick)
  --out FILE     also write the Markdown report to FILE
  --list         list the workloads and exit
  --io-uring on|off
                 turn the kernel's FUSE over io_uring on or off for the run
                 (/sys/module/fuse/parameters/enable_uring, Linux 6.14+; put
                 back afterwards). qcow2fuse uses it where it is on; without
                 this option the setting stays as found. qsd does not use it
Environment:
  QCOW2FUSE      qcow2fuse binary to use (default: build-bench/fuse/qcow2fuse, an optimised build made first)
  BENCH_DIR      directory in which the temporary work directory is made (default /var/tmp);
                 its file system is the one being measured
EOF
}

# ---------------------------------------------------------------- options

rounds=""
quick=0
only=""
runtime=""
out_file=""
list_only=0
io_uring=""
while (($#)); do
  case $1 in
    --rounds) rounds=${2:?--rounds needs a number}; shift 2 ;;
    --quick) quick=1; shift ;;
    --only) only=${2:?--only needs a regular expression}; shift 2 ;;
    --runtime) runtime=${2:?--runtime needs seconds}; shift 2 ;;
    --out) out_file=${2:?--out needs a file name}; shift 2 ;;
    --list) list_only=1; shift ;;
    --io-uring) io_uring=${2:?--io-uring needs on or off}; shift 2
      [[ $io_uring == on || $io_uring == off ]] || { echo "run.sh: --io-uring takes on or off" >&2; exit 2; } ;;
    -h|--help) usage; exit 0 ;;
    *) echo "run.sh: unknown argument $1" >&2; usage >&2; exit 2 ;;
  esac
done

# Sizes. The defaults keep three rounds of everything under 25 minutes on
# two cores, setup and clean-up included; --quick shrinks every image and
# run to finish in 3 to 4 minutes.
if ((quick)); then
  rounds=${rounds:-1}
  runtime=${runtime:-2}
  DATA_SIZE=$((128 << 20))     # the data image: sequential/random reads, overwrites, compression
  ALLOC_IOS=1024               # 4 KiB allocating writes per run (fresh image)
  META_SIZE=64G                # the image with every L2 table present
  ARCHIVE_MIB=100              # the tar archive unpacked onto a fresh ext4
  TREE_MIB=200                 # the files on the ext4 disk that is read
else
  rounds=${rounds:-3}
  runtime=${runtime:-6}
  DATA_SIZE=$((1 << 30))
  ALLOC_IOS=2048
  META_SIZE=1T
  ARCHIVE_MIB=400
  TREE_MIB=1024
fi
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --rounds wants a positive number" >&2; exit 2; }
[[ $runtime =~ ^[1-9][0-9]*$ ]] || { echo "run.sh: --runtime wants whole seconds" >&2; exit 2; }
# Allocating writes land on an empty disk this large: 64 KiB clusters and
# ALLOC_IOS random 4 KiB writes, so almost every write allocates a new cluster.
ALLOC_VSIZE=64G
# The sparse-copy image: a 64 GiB disk with 800 x 256 KiB = 200 MiB of data.
SPARSE_VSIZE=64G
SPARSE_WRITES=800
SPARSE_WRITE_SIZE=$((256 << 10))
# Write-then-read pairs: a 4 KiB write and a read of the same block, on a
# small and a large image with every L2 table (128 GiB at 64 KiB clusters:
# 16 MiB of L2 tables). The sizes stay the same with --quick: the large one
# is the point.
WR_PAIRS=200
WR_SIZES=(1G 128G)
# ext4 on a loop device over the view. Unpacking: a fresh, empty 4 GiB disk
# (64 KiB clusters; a sparse raw file for raw). Reading: a disk twice the
# size of its tree, made once. Both file systems are made with
# EXT4_MKFS_OPTS: no discard of the whole device, and the inode tables and
# the journal written out by mkfs.ext4 itself, so that no ext4lazyinit
# thread writes them while the measurement runs.
UNPACK_VSIZE=4G
TREE_VSIZE=$((TREE_MIB * 2 << 20))
EXT4_MKFS_OPTS=(-q -E "nodiscard,lazy_itable_init=0,lazy_journal_init=0")

# ---------------------------------------------------------------- workloads
#
# Each workload is a function wl_NAME taking the system (raw, qcow2fuse,
# qsd); it reports one or more table rows with `put ROW VALUE NOTE`.
# add_workload NAME FUNCTION "ROW:UNIT ..." DESCRIPTION; units s, ms, MiB
# and ratio are lower-is-better, the others higher-is-better.

WORKLOADS=()
declare -A WL_FUNC WL_ROWS WL_DESC
add_workload() {
  WORKLOADS+=("$1")
  WL_FUNC[$1]=$2
  WL_ROWS[$1]=$3
  WL_DESC[$1]=$4
}
add_workload seq-read-1M-cold        wl_seq_read_cold         "seq-read-1M-cold:MiB/s" \
  "sequential 1 MiB reads of the whole $((DATA_SIZE >> 20)) MiB data disk, buffered, page cache dropped"
add_workload seq-write-1M-fsync      wl_seq_write             "seq-write-1M-fsync:MiB/s" \
  "sequential 1 MiB writes onto an empty $((DATA_SIZE >> 20)) MiB disk, buffered, fsync at the end (included)"
add_workload rand-read-4k-psync4-cold "wl_rand_read psync4 cold" "rand-read-4k-psync4-cold:IOPS" \
  "4 KiB random reads for ${runtime} s, 4 psync jobs, O_DIRECT on the file/view, page cache dropped"
add_workload rand-read-4k-qd32-cold  "wl_rand_read qd32 cold"   "rand-read-4k-qd32-cold:IOPS" \
  "4 KiB random reads for ${runtime} s, libaio iodepth 32, O_DIRECT on the file/view, page cache dropped"
add_workload rand-read-4k-psync4-hot "wl_rand_read psync4 hot"  "rand-read-4k-psync4-hot:IOPS" \
  "4 KiB random reads for ${runtime} s, 4 psync jobs, O_DIRECT on the view, the image file already in the host page cache (raw: buffered reads of the cached file)"
add_workload rand-read-4k-qd32-hot   "wl_rand_read qd32 hot"    "rand-read-4k-qd32-hot:IOPS" \
  "4 KiB random reads for ${runtime} s, libaio iodepth 32, O_DIRECT on the view, the image file already in the host page cache (raw: buffered reads of the cached file)"
add_workload rand-write-alloc-4k-psync4 "wl_rand_write_alloc psync4" "rand-write-alloc-4k-psync4:IOPS" \
  "$ALLOC_IOS 4 KiB random writes onto an empty 64 GiB disk (nearly each allocates a cluster), 4 psync jobs, O_DIRECT, fsync at the end"
add_workload rand-write-alloc-4k-qd32 "wl_rand_write_alloc qd32" "rand-write-alloc-4k-qd32:IOPS" \
  "$ALLOC_IOS 4 KiB random writes onto an empty 64 GiB disk (nearly each allocates a cluster), libaio iodepth 32, O_DIRECT, fsync at the end"
add_workload rand-write-over-4k-psync4 "wl_rand_write_over psync4" "rand-write-over-4k-psync4:IOPS" \
  "4 KiB random overwrites for ${runtime} s of a fully allocated copy of the data disk, 4 psync jobs, O_DIRECT, fsync at the end"
add_workload rand-write-over-4k-qd32 "wl_rand_write_over qd32" "rand-write-over-4k-qd32:IOPS" \
  "4 KiB random overwrites for ${runtime} s of a fully allocated copy of the data disk, libaio iodepth 32, O_DIRECT, fsync at the end"
add_workload cp-sparse-64G           wl_cp_sparse             "cp-sparse-64G-200M:s" \
  "cp --sparse=always of a 64 GiB view holding 200 MiB (raw column: qemu-img convert -O raw), cold"
add_workload read-zstd-1M-cold       "wl_read_compressed zstd" "read-zstd-1M-cold:MiB/s" \
  "sequential 1 MiB reads of a zstd-compressed image, buffered, cold (raw: the uncompressed data)"
add_workload read-zlib-1M-cold       "wl_read_compressed zlib" "read-zlib-1M-cold:MiB/s" \
  "sequential 1 MiB reads of a zlib-compressed image, buffered, cold (raw: the uncompressed data)"
add_workload "meta-$META_SIZE"         wl_meta                   "mount-first-read-$META_SIZE:s rss-peak-$META_SIZE:MiB rand-read-4k-qd32-$META_SIZE:IOPS" \
  "$META_SIZE image with every L2 table (preallocation=metadata), cold: start to first 4 KiB read, peak RSS (VmHWM) after random reads, and their IOPS (libaio QD32, O_DIRECT)"
add_workload write-read-4k           wl_write_read             "write-read-4k-${WR_SIZES[0]}:ms write-read-4k-${WR_SIZES[1]}:ms write-read-4k-${WR_SIZES[1]}-vs-${WR_SIZES[0]}:ratio" \
  "$WR_PAIRS pairs of a 4 KiB pwrite and a 4 KiB pread of the same block at random offsets, buffered, read-write, on a ${WR_SIZES[0]} and a ${WR_SIZES[1]} image with every L2 table (preallocation=metadata): median ms per pair, and the ratio ${WR_SIZES[1]}/${WR_SIZES[0]} (1 is ideal)"
add_workload ext4-unpack             wl_ext4_unpack            "ext4-unpack-${ARCHIVE_MIB}M:s" \
  "tar -xf of a ${ARCHIVE_MIB} MiB archive of system files (in the host page cache) onto a fresh ext4 on a loop device over an empty $UNPACK_VSIZE view, then sync -f, umount, losetup -d, view unmounted and its daemon gone, fsync of the image file: all timed"
add_workload ext4-read-tree          wl_ext4_read_tree         "ext4-read-tree-${TREE_MIB}M:s" \
  "tar -cf - | cat >/dev/null of every file of a ${TREE_MIB} MiB tree of system files on ext4 (mount -o ro,noload) on a read-only loop device over a read-only view, page cache dropped after mounting"
add_workload ext4-unpack-dio         "wl_ext4_unpack dio"      "ext4-unpack-${ARCHIVE_MIB}M-dio:s" \
  "ext4-unpack with the loop device doing direct I/O on the view or raw file (losetup --direct-io=on)"
add_workload ext4-read-tree-dio      "wl_ext4_read_tree dio"   "ext4-read-tree-${TREE_MIB}M-dio:s" \
  "ext4-read-tree with the loop device doing direct I/O on the view or raw file (losetup --direct-io=on)"

if ((list_only)); then
  for w in "${WORKLOADS[@]}"; do printf '%-28s %s\n' "$w" "${WL_DESC[$w]}"; done
  exit 0
fi
selected=()
for w in "${WORKLOADS[@]}"; do
  if [[ -z $only ]] || grep -qE -- "$only" <<<"$w"; then selected+=("$w"); fi
done
((${#selected[@]})) || { echo "run.sh: --only '$only' matches no workload (see --list)" >&2; exit 2; }

# ---------------------------------------------------------------- prerequisites

log() { echo "[$(date +%H:%M:%S)] $*" >&2; }
die() { echo "run.sh: $*" >&2; exit 1; }

((EUID == 0)) || die "run as root (dropping the page cache and mounting FUSE need it)"

# Installs the tools, only those that are missing.
declare -A TOOL_PACKAGE=(
  [fio]=fio [qemu-storage-daemon]=qemu-system-common [qemu-img]=qemu-utils [qemu-io]=qemu-utils
  [fusermount3]=fuse3 [python3]=python3 [timeout]=coreutils
  [losetup]=mount [mount]=mount [umount]=mount [mkfs.ext4]=e2fsprogs [tar]=tar
  [findmnt]=util-linux [pgrep]=procps
)
missing_packages=()
for tool in "${!TOOL_PACKAGE[@]}"; do
  command -v "$tool" >/dev/null || missing_packages+=("${TOOL_PACKAGE[$tool]}")
done
if ((${#missing_packages[@]})); then
  mapfile -t missing_packages < <(printf '%s\n' "${missing_packages[@]}" | sort -u)
  log "installing ${missing_packages[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! { apt-get update -qq && apt-get install -y -qq "${missing_packages[@]}"; } >&2; then
    die "could not install ${missing_packages[*]}"
  fi
fi

if [[ -n ${QCOW2FUSE:-} ]]; then
  [[ -x $QCOW2FUSE ]] || die "QCOW2FUSE=$QCOW2FUSE is not an executable"
else
  # A build of its own, without the tests, (re)built every time so that the
  # binary measured is the source checked out.
  QCOW2FUSE=$root/build-bench/fuse/qcow2fuse
  log "building qcow2fuse (RelWithDebInfo) into $root/build-bench"
  { "$root/packaging/install-deps.sh" &&
      BUILD_DIR=$root/build-bench "$root/packaging/build.sh" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBUILD_TESTING=OFF; } >&2 ||
    die "building qcow2fuse failed"
fi

# ---------------------------------------------------------------- helpers

# Whether the file system of the work directory discards freed blocks at
# once (mount option "discard"): deleting fragmented files is slow there.
has_discard() {
  findmnt -n -o OPTIONS --target "$work" 2>/dev/null | tr , '\n' | grep -qx discard
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
now_ns() { date +%s%N; }
is_mounted() { [[ -e $1 && $(stat -c %d "$1" 2>/dev/null) != "$work_dev" ]]; }
# Also true for a FUSE mount whose daemon is gone (killed after a hang, see
# unstick): stat fails there (ENOTCONN), so is_mounted says no.
is_mount_point() { is_mounted "$1" || findmnt -n --mountpoint "$1" >/dev/null 2>&1; }

# Polls (every 10 ms) until PID has exited, at most $2 seconds. (Our
# qcow2fuse daemons are not our children, so `wait` cannot be used for
# them.) A zombie has exited: an orphan stays one until init reaps it,
# which some inits (in containers, VMs) do only about once a second, and
# that must not count towards a timed unmount.
wait_pid_gone() {
  local pid=$1 limit=$2 i stat
  for ((i = 0; i < limit * 100; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 0
    stat=${stat##*) }  # the fields after the command name
    [[ ${stat%% *} == Z ]] && return 0
    sleep 0.01
  done
  return 1
}

# Mounts IMAGE (read-only or read-write) with qcow2fuse; sets ACTIVE_*.
mount_qcow2fuse() {
  local image=$1 access=$2 view=$work/view-qcow2fuse.raw pidfile=$work/qcow2fuse.pid
  local opts=()
  [[ $access == ro ]] && opts=(-o ro)
  rm -f "$pidfile"
  # The command returns once the view answers (the daemon stays behind).
  local err rc
  err=$("$QCOW2FUSE" "${opts[@]}" --pidfile "$pidfile" "$image" "$view" 2>&1)
  rc=$?
  if ((rc != 0)); then
    FAIL_REASON="qcow2fuse mount failed (exit $rc)${err:+: ${err%%$'\n'*}}"
    return 1
  fi
  ACTIVE_SYSTEM=qcow2fuse ACTIVE_VIEW=$view ACTIVE_PID=$(<"$pidfile")
}

# Starts qemu-storage-daemon exporting IMAGE on a fresh mountpoint file and
# waits until the export is mounted there; sets ACTIVE_*.
mount_qsd() {
  local image=$1 access=$2 view=$work/view-qsd.raw i
  local writable=on
  [[ $access == ro ]] && writable=off
  : >"$view"
  qemu-storage-daemon \
    --blockdev "driver=file,node-name=file,filename=$image" \
    --blockdev driver=qcow2,node-name=fmt,file=file \
    --export "type=fuse,id=exp,node-name=fmt,mountpoint=$view,writable=$writable" \
    </dev/null >>"$daemon_log" 2>&1 &
  ACTIVE_SYSTEM=qsd ACTIVE_VIEW=$view ACTIVE_PID=$!
  # The mountpoint's device number changes when the export is mounted on it.
  for ((i = 0; i < 6000; i++)); do
    is_mounted "$view" && return 0
    if ! kill -0 "$ACTIVE_PID" 2>/dev/null; then
      FAIL_REASON="qemu-storage-daemon exited: $(tail -n 1 "$daemon_log")"
      close_target
      return 1
    fi
    sleep 0.005
  done
  FAIL_REASON="qemu-storage-daemon export not mounted after 30 s"
  close_target
  return 1
}

# Sets TARGET to what the workload opens: the raw file itself for raw,
# otherwise a fresh view of IMAGE served by SYSTEM.
open_target() {
  local system=$1 image=$2 raw=$3 access=$4
  case $system in
    raw) TARGET=$raw ;;
    qcow2fuse) mount_qcow2fuse "$image" "$access" && TARGET=$ACTIVE_VIEW ;;
    qsd) mount_qsd "$image" "$access" && TARGET=$ACTIVE_VIEW ;;
  esac
}

# Unmounts the active view, if any, and waits until its daemon is gone.
# qcow2fuse: fusermount3 -u ends the daemon (after it flushed the image).
# qsd: a FUSE unmount does not end it, so SIGTERM to our PID does (it
# unmounts the export itself), then we reap it.
close_target() {
  local pid=$ACTIVE_PID view=$ACTIVE_VIEW
  case $ACTIVE_SYSTEM in
    qcow2fuse)
      if is_mount_point "$view"; then
        fusermount3 -u "$view" 2>>"$daemon_log" ||
          { sleep 1; fusermount3 -u "$view" 2>>"$daemon_log"; } ||
          fusermount3 -u -z "$view" 2>>"$daemon_log"
      fi
      if [[ -n $pid ]] && ! wait_pid_gone "$pid" 300; then
        log "qcow2fuse (pid $pid) still running 300 s after unmount; sending SIGTERM"
        kill -TERM "$pid" 2>/dev/null
        wait_pid_gone "$pid" 30 || { kill -KILL "$pid" 2>/dev/null; wait_pid_gone "$pid" 10; }
      fi
      ;;
    qsd)
      if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null
        wait_pid_gone "$pid" 300 || { kill -KILL "$pid" 2>/dev/null; }
        wait "$pid" 2>/dev/null
      fi
      is_mount_point "$view" && { fusermount3 -u "$view" 2>/dev/null || fusermount3 -u -z "$view"; }
      rm -f "$view"
      ;;
  esac
  ACTIVE_SYSTEM="" ACTIVE_VIEW="" ACTIVE_PID=""
}

# Runs fio with JSON output into $work/fio.json; fails on a non-zero exit
# or an error reported by any job. Bounded by a timeout so that a hung
# view cannot hang the whole benchmark.
run_fio() {
  local json=$work/fio.json
  rm -f "$json"
  if ! timeout -k 10 $((runtime * 4 + 600)) fio --output-format=json --output="$json" \
      --fallocate=none "$@" 2>"$work/fio.err"; then
    FAIL_REASON="fio: $(grep -v '^$' "$work/fio.err" | tail -n 1)"
    return 1
  fi
  python3 - "$json" <<'EOF' || { FAIL_REASON="fio: a job reported an error"; return 1; }
import json, sys
jobs = json.load(open(sys.argv[1]))["jobs"]
sys.exit(1 if any(j.get("error", 0) for j in jobs) else 0)
EOF
}

# Prints a value from $work/fio.json: DDIR (read|write) and METRIC
# (iops|mibs), summed over the jobs (group_reporting makes that one job).
fio_value() {
  python3 - "$work/fio.json" "$1" "$2" <<'EOF'
import json, sys
path, ddir, metric = sys.argv[1:]
jobs = json.load(open(path))["jobs"]
if metric == "iops":
    print("%.0f" % sum(j[ddir]["iops"] for j in jobs))
else:
    print("%.1f" % (sum(j[ddir]["bw_bytes"] for j in jobs) / 2**20))
EOF
}

# Sets PATTERN to the fio arguments of one access pattern.
set_pattern() {
  case $1 in
    psync4) PATTERN=(--ioengine=psync --numjobs=4 --group_reporting) ;;
    qd32) PATTERN=(--ioengine=libaio --iodepth=32) ;;
    seq) PATTERN=(--ioengine=psync) ;;
  esac
}

# Gets rid of scratch images. Freeing many small extents is slow on a file
# system mounted with -o discard (each freed extent is discarded: seconds
# for a few thousand), and the discards would run into the next
# measurement; so fragmented images (those of allocating writes) are only
# moved aside here and deleted at the very end.
retire() {
  local how=$1 f
  shift
  for f in "$@"; do
    [[ -e $f ]] || continue
    if [[ $how == later ]]; then
      mkdir -p "$work/trash" && mv "$f" "$(mktemp -u "$work/trash/XXXXXX")"
    else
      rm -f "$f"
    fi
  done
}

# One fio measurement on SYSTEM, with the preparation the workload asks for.
#   measure_fio SYSTEM IMAGE RAW ACCESS CACHE FRESH IO DDIR METRIC ROW -- FIO-ARGS...
# ACCESS ro|rw.  CACHE cold (page cache dropped after mounting) or hot (the
# image file read into the page cache before mounting, nothing dropped).
# FRESH: 0, or SIZE[:later]: IMAGE/RAW are made anew, empty, before the run
# and retired after it (":later": deleted only at the end, see retire).
# IO direct: try O_DIRECT on the file/view first and fall back to buffered
# I/O (noted in the cell); buffered: buffered only. A hot raw file is always
# read buffered, by design: O_DIRECT would go around the page cache.
measure_fio() {
  local system=$1 image=$2 raw=$3 access=$4 cache=$5 fresh=$6 io=$7 ddir=$8 metric=$9 row=${10}
  shift 11
  local directs="0" d value note disposal=now
  [[ $io == direct ]] && directs="1 0"
  [[ $system == raw && $cache == hot ]] && directs="0"
  [[ $fresh == *:later ]] && disposal=later
  for d in $directs; do
    if [[ $fresh != 0 ]]; then
      retire "$disposal" "$image" "$raw"
      if [[ $system == raw ]]; then truncate -s "${fresh%:*}" "$raw"
      else qemu-img create -q -f qcow2 "$image" "${fresh%:*}" || { FAIL_REASON="qemu-img create failed"; return 1; }
      fi
    fi
    if [[ $cache == hot ]]; then
      sync
      if [[ $system == raw ]]; then cat "$raw" >/dev/null; else cat "$image" >/dev/null; fi
    fi
    open_target "$system" "$image" "$raw" "$access" || return 1
    # Cold: drop after mounting, so the daemon's start-up reads do not count
    # and the data comes from disk. Hot: fio must not drop it either
    # (invalidate=0); a view's own page cache starts empty with every mount.
    local invalidate=1
    if [[ $cache == cold ]]; then drop_caches; else invalidate=0; fi
    if run_fio --name="$row" --filename="$TARGET" --direct="$d" --invalidate=$invalidate "$@"; then
      value=$(fio_value "$ddir" "$metric")
      close_target
      note=""
      [[ $d == 0 && $directs == "1 0" ]] && note="buffered"
      [[ $fresh != 0 ]] && retire "$disposal" "$image" "$raw"
      put "$row" "$value" "$note"
      return 0
    fi
    close_target
    [[ $d == 1 ]] && log "  O_DIRECT run failed on $system ($FAIL_REASON); retrying buffered"
  done
  [[ $fresh != 0 ]] && retire "$disposal" "$image" "$raw"
  return 1
}

# ---------------------------------------------------------------- ext4 on a loop device over the view

# The loop device the script attached last (losetup --find --show), and
# the command bounded() runs; empty when there is none.
LOOP_DEV=""
JOB_PID=""

# Runs COMMAND... with a time limit, under timeout(1): that puts it in a
# process group of its own (so Ctrl-C does not reach it; cleanup ends it),
# sends SIGTERM to the group after LIMIT seconds and SIGKILL 10 s later.
# In the background, so that an interrupt does not wait for it. On failure
# sets FAIL_REASON from WHAT and the command's last line of error output.
#   bounded LIMIT WHAT COMMAND...
bounded() {
  local limit=$1 what=$2 rc pgid
  shift 2
  timeout -k 10 "$limit" "$@" </dev/null >"$work/job.err" 2>&1 &
  JOB_PID=$!
  pgid=$JOB_PID
  wait "$JOB_PID"
  rc=$?
  JOB_PID=""
  case $rc in
    0) return 0 ;;
    124|137) FAIL_REASON="$what timed out after $limit s"; unstick "$pgid" ;;
    *) FAIL_REASON="$what failed (exit $rc)$(tail -n 1 "$work/job.err" | sed 's/^/: /')" ;;
  esac
  return 1
}

# Ends the command bounded() runs, if any (Ctrl-C): SIGTERM to timeout(1),
# which passes it on to its group (and SIGKILL 10 s later).
stop_job() {
  local pgid=$JOB_PID
  [[ -n $pgid ]] || return 0
  kill -TERM "$pgid" 2>/dev/null
  wait "$pgid" 2>/dev/null
  JOB_PID=""
  unstick "$pgid"
}

# After a command of bounded() was killed: a process of its group that is
# still there 5 s later is stuck in the kernel on a view whose daemon no
# longer answers (sync, umount, I/O through the loop device), where even
# SIGKILL does not reach it. Then the daemon (a PID we started) is killed:
# that aborts its FUSE connection and fails the waiting requests.
unstick() {
  local pgid=$1 i
  for ((i = 0; i < 50; i++)); do
    pgrep -g "$pgid" >/dev/null || return 0
    sleep 0.1
  done
  if [[ -n $ACTIVE_PID ]]; then
    log "  $(pgrep -l -g "$pgid" | head -n 1) hangs on the view; killing its daemon (pid $ACTIVE_PID)"
    kill -KILL "$ACTIVE_PID" 2>/dev/null
    for ((i = 0; i < 300; i++)); do
      pgrep -g "$pgid" >/dev/null || return 0
      sleep 0.1
    done
  fi
  log "  $(pgrep -l -g "$pgid" | head -n 1) is stuck in the kernel"
}

# The file a loop device reads and writes (empty once it is detached).
loop_backing() { cat "/sys/block/${1#/dev/}/loop/backing_file" 2>/dev/null; }

# Whether loop device DEV is one of ours: its file is in the work directory
# (only this script makes loop devices over those).
is_our_loop() { [[ $(loop_backing "$1") == "$work_real"/* ]]; }

# Attaches FILE to a free loop device, read-only (ro) or read-write (rw),
# doing buffered I/O on FILE, or direct I/O with a third argument "dio"
# (losetup --direct-io=on); sets LOOP_DEV.
loop_attach() {
  local file=$1 access=$2 io=${3:-buffered} opts=() dev
  [[ $access == ro ]] && opts=(-r)
  [[ $io == dio ]] && opts+=(--direct-io=on)
  if ! dev=$(timeout -k 10 120 losetup "${opts[@]}" --find --show "$file" 2>&1) || [[ $dev != /dev/* ]]; then
    FAIL_REASON="losetup failed: ${dev##*$'\n'}"
    return 1
  fi
  LOOP_DEV=$dev
}

# Detaches loop device DEV if it is ours, and waits (at most 60 s) until it
# has let go of its file: the kernel defers a detach while anyone (udev,
# blkid) still has the device open.
loop_detach() {
  local dev=$1 file i
  is_our_loop "$dev" || return 0
  file=$(loop_backing "$dev")
  losetup -d "$dev" 2>>"$daemon_log"
  for ((i = 0; i < 1200; i++)); do
    [[ $(loop_backing "$dev") == "$file" ]] || return 0
    sleep 0.05
  done
  FAIL_REASON="loop device $dev still attached 60 s after losetup -d"
  return 1
}

# Mounts the ext4 on LOOP_DEV on a fresh directory, read-write (rw) or
# read-only without journal replay (ro: -o ro,noload).
ext4_mount() {
  local access=$1 opts=()
  [[ $access == ro ]] && opts=(-o "ro,noload")
  rmdir "$ext4_mnt" 2>/dev/null
  mkdir "$ext4_mnt" || { FAIL_REASON="cannot make $ext4_mnt"; return 1; }
  bounded 300 "mount of the ext4" mount -t ext4 "${opts[@]}" "$LOOP_DEV" "$ext4_mnt"
}

# Unmounts the ext4 and detaches LOOP_DEV; fails (FAIL_REASON) if either
# does not work out.
ext4_unmount() {
  local try
  # Up to three tries: something passing by (du, a file manager) may keep
  # the file system busy for a moment.
  for ((try = 1; try <= 3; try++)); do
    is_mounted "$ext4_mnt" || break
    bounded 600 "umount of the ext4" umount "$ext4_mnt" && break
    if ((try == 3)) || ! grep -q busy "$work/job.err"; then return 1; fi
    log "  $FAIL_REASON; trying again"
    sleep 1
  done
  rmdir "$ext4_mnt" 2>/dev/null
  if [[ -n $LOOP_DEV ]]; then
    loop_detach "$LOOP_DEV" || return 1
    LOOP_DEV=""
  fi
}

# Clean-up after a failed or interrupted ext4 workload, whatever state it
# got to: ends the running command, unmounts the ext4 (lazily if it stays
# busy), and detaches every loop device over a file of the work directory:
# LOOP_DEV, or one attached just as Ctrl-C came, before LOOP_DEV was set.
# The view itself is left to close_target, which must come after this.
# Keeps FAIL_REASON (the workload's); logs its own trouble.
ext4_teardown() {
  local reason=$FAIL_REASON f dev
  stop_job
  if is_mount_point "$ext4_mnt"; then
    bounded 120 "umount of the ext4" umount "$ext4_mnt" ||
      { log "  $FAIL_REASON; unmounting it lazily"; umount -l "$ext4_mnt" 2>>"$daemon_log"; }
  fi
  rmdir "$ext4_mnt" 2>/dev/null
  for f in /sys/block/loop*/loop/backing_file; do  # the attached loop devices
    [[ -e $f ]] || continue
    dev=${f#/sys/block/}
    dev=/dev/${dev%%/*}
    is_our_loop "$dev" && { loop_detach "$dev" || log "  $FAIL_REASON"; }
  done
  LOOP_DEV=""
  FAIL_REASON=$reason
}

# ---------------------------------------------------------------- images (made once, when first needed)

# The data disk: DATA_SIZE of system files mixed with random bytes, as raw
# and as an (uncompressed, fully allocated) qcow2.
need_data() {
  [[ -f $work/data.qcow2 ]] && return 0
  log "making the $((DATA_SIZE >> 20)) MiB data image"
  python3 "$bench_dir/make_data.py" "$DATA_SIZE" "$work/data.raw" &&
    qemu-img convert -O qcow2 "$work/data.raw" "$work/data.qcow2.tmp" &&
    mv "$work/data.qcow2.tmp" "$work/data.qcow2"
}

# Overwrite targets: fully allocated copies of the data disk (the raw one
# really written, not reflinked, so it has no unwritten extents either).
need_overwrite() {
  [[ -f $work/ow.qcow2 ]] && return 0
  need_data || return 1
  log "making the overwrite images"
  cp --reflink=never --sparse=never "$work/data.raw" "$work/ow.raw" &&
    cp --reflink=never "$work/data.qcow2" "$work/ow.qcow2"
}

need_compressed() {
  local algo=$1
  [[ -f $work/$algo.qcow2 ]] && return 0
  need_data || return 1
  log "making the $algo-compressed image"
  qemu-img convert -c -O qcow2 -o "compression_type=$algo" "$work/data.raw" "$work/$algo.qcow2.tmp" &&
    mv "$work/$algo.qcow2.tmp" "$work/$algo.qcow2"
}

# A 64 GiB disk with 200 MiB written by qemu-io in 256 KiB pieces at
# distinct random places (fixed seed).
need_sparse() {
  [[ -f $work/sparse.qcow2 ]] && return 0
  log "making the sparse $SPARSE_VSIZE image"
  local cmds=() offsets
  qemu-img create -q -f qcow2 "$work/sparse.qcow2.tmp" "$SPARSE_VSIZE" || return 1
  offsets=$(python3 - "$(numfmt --from=iec "$SPARSE_VSIZE")" "$SPARSE_WRITES" "$SPARSE_WRITE_SIZE" <<'EOF'
import random, sys
size, count, piece = map(int, sys.argv[1:])
for slot in sorted(random.Random(7).sample(range(size // piece), count)):
    print(slot * piece)
EOF
  ) || return 1
  local off i=0
  for off in $offsets; do
    cmds+=(-c "write -q -P $((i % 255 + 1)) $off $SPARSE_WRITE_SIZE")
    i=$((i + 1))
  done
  # writeback: qemu-io defaults to writethrough, a flush after every write.
  qemu-io -f qcow2 -t writeback "${cmds[@]}" "$work/sparse.qcow2.tmp" >/dev/null &&
    mv "$work/sparse.qcow2.tmp" "$work/sparse.qcow2"
}

# META_SIZE disk with every L2 table allocated (and every data cluster
# mapped to a hole of the image file), and a sparse raw file of that size.
need_meta() {
  [[ -f $work/meta.qcow2 ]] && return 0
  log "making the $META_SIZE preallocation=metadata image"
  local t0
  t0=$(now_ns)
  qemu-img create -q -f qcow2 -o preallocation=metadata "$work/meta.qcow2.tmp" "$META_SIZE" &&
    mv "$work/meta.qcow2.tmp" "$work/meta.qcow2" && truncate -s "$META_SIZE" "$work/meta.raw" || return 1
  log "  took $(( ($(now_ns) - t0) / 1000000 )) ms"
}

# A SIZE disk with every L2 table (preallocation=metadata, 64 KiB clusters)
# for the write-then-read pairs, and a sparse raw file of that size. The
# pairs write in place (every cluster is already allocated), so one image
# serves every round and system.
need_wr() {
  local size=$1
  [[ -f $work/wr-$size.qcow2 ]] && return 0
  log "making the $size preallocation=metadata image for write-read pairs"
  qemu-img create -q -f qcow2 -o preallocation=metadata,cluster_size=64k "$work/wr-$size.qcow2.tmp" "$size" &&
    mv "$work/wr-$size.qcow2.tmp" "$work/wr-$size.qcow2" && truncate -s "$size" "$work/wr-$size.raw"
}

# A NUL-separated list of system files of at most LIMIT bytes, the same on
# every run on one machine: see `make_data.py --list`.
list_system_files() { python3 "$root/bench/make_data.py" --list "$1"; }

# The archive that ext4-unpack unpacks: an uncompressed tar of
# ARCHIVE_MIB MiB of system files.
need_archive() {
  [[ -f $work/unpack.tar ]] && return 0
  log "making the ${ARCHIVE_MIB} MiB archive of system files"
  local summary
  summary=$(list_system_files $((ARCHIVE_MIB << 20)) 2>&1 >"$work/unpack.list") ||
    { FAIL_REASON="listing the files failed: $summary"; return 1; }
  log "  $summary"
  bounded 1800 "tar -c" tar -C / --null -T "$work/unpack.list" -cf "$work/unpack.tar.tmp" &&
    mv "$work/unpack.tar.tmp" "$work/unpack.tar"
}

# The disk that ext4-read-tree reads: an ext4 (EXT4_MKFS_OPTS) of
# TREE_VSIZE holding TREE_MIB MiB of system files, made on a raw file over
# a loop device and filled with tar, then converted to a qcow2 image with
# 64 KiB clusters (its free space stays unallocated).
# shellcheck disable=SC2016  # $1 and $2 are bash -c's arguments
need_tree() {
  [[ -f $work/tree.qcow2 ]] && return 0
  log "making the ext4 disk with a ${TREE_MIB} MiB tree of system files"
  local raw=$work/tree.raw summary
  rm -f "$raw"
  summary=$(list_system_files $((TREE_MIB << 20)) 2>&1 >"$work/tree.list") ||
    { FAIL_REASON="listing the files failed: $summary"; return 1; }
  log "  $summary"
  if ! { truncate -s "$TREE_VSIZE" "$raw" && loop_attach "$raw" rw &&
      bounded 600 mkfs.ext4 mkfs.ext4 "${EXT4_MKFS_OPTS[@]}" "$LOOP_DEV" && ext4_mount rw &&
      bounded 1800 "copying the tree" bash -c 'set -o pipefail; tar -C / --null -T "$1" -cf - | tar -xf - -C "$2"' \
        copy "$work/tree.list" "$ext4_mnt" &&
      ext4_unmount; }; then
    ext4_teardown
    rm -f "$raw"
    return 1
  fi
  qemu-img convert -O qcow2 -o cluster_size=65536 "$raw" "$work/tree.qcow2.tmp" &&
    mv "$work/tree.qcow2.tmp" "$work/tree.qcow2"
}

# ---------------------------------------------------------------- the workloads

wl_seq_read_cold() {
  need_data || { FAIL_REASON="image setup failed"; return 1; }
  set_pattern seq
  measure_fio "$1" "$work/data.qcow2" "$work/data.raw" ro cold 0 buffered read mibs seq-read-1M-cold -- \
    --rw=read --bs=1M "${PATTERN[@]}"
}

# Onto an empty disk: the qcow2 views allocate as they go. Buffered, as cp
# or dd would write; the final fsync is part of the time.
wl_seq_write() {
  set_pattern seq
  measure_fio "$1" "$work/seqw.qcow2" "$work/seqw.raw" rw cold "$DATA_SIZE" buffered write mibs seq-write-1M-fsync -- \
    --rw=write --bs=1M --end_fsync=1 "${PATTERN[@]}"
}

wl_rand_read() {
  local pattern=$1 cache=$2 system=$3
  need_data || { FAIL_REASON="image setup failed"; return 1; }
  set_pattern "$pattern"
  measure_fio "$system" "$work/data.qcow2" "$work/data.raw" ro "$cache" 0 direct read iops \
    "rand-read-4k-$pattern-$cache" -- \
    --rw=randread --bs=4k --time_based --runtime="$runtime" "${PATTERN[@]}"
}

# A fixed number of writes (not time-based): fio's random map never hits a
# 4 KiB block twice, and ALLOC_IOS writes over a 64 GiB disk rarely share a
# 64 KiB cluster, so nearly every write allocates one. The count is small
# because deleting the fragmented images afterwards is what costs time.
wl_rand_write_alloc() {
  local pattern=$1 system=$2 jobs=1
  [[ $pattern == psync4 ]] && jobs=4
  set_pattern "$pattern"
  measure_fio "$system" "$work/alloc.qcow2" "$work/alloc.raw" rw cold "$ALLOC_VSIZE:later" direct write iops \
    "rand-write-alloc-4k-$pattern" -- \
    --rw=randwrite --bs=4k --number_ios=$((ALLOC_IOS / jobs)) --end_fsync=1 "${PATTERN[@]}"
}

# In place: every cluster of these images is allocated (and not shared).
wl_rand_write_over() {
  local pattern=$1 system=$2
  need_overwrite || { FAIL_REASON="image setup failed"; return 1; }
  set_pattern "$pattern"
  measure_fio "$system" "$work/ow.qcow2" "$work/ow.raw" rw cold 0 direct write iops \
    "rand-write-over-4k-$pattern" -- \
    --rw=randwrite --bs=4k --time_based --runtime="$runtime" --end_fsync=1 "${PATTERN[@]}"
}

# cp --sparse=always from the view (it finds the data with SEEK_DATA/
# SEEK_HOLE); the raw column is qemu-img convert -O raw of the same image,
# what one would use without a FUSE view. The copy is checked for size and
# sparseness, since a copy that read 64 GiB of zeros is a result too.
wl_cp_sparse() {
  local system=$1 copy=$work/copy.raw t0 t1 rc note=""
  need_sparse || { FAIL_REASON="image setup failed"; return 1; }
  rm -f "$copy"
  if [[ $system == raw ]]; then
    drop_caches
    t0=$(now_ns)
    timeout -k 10 1800 qemu-img convert -O raw "$work/sparse.qcow2" "$copy" 2>>"$daemon_log"
    rc=$?
    t1=$(now_ns)
  else
    open_target "$system" "$work/sparse.qcow2" "" ro || return 1
    drop_caches
    t0=$(now_ns)
    timeout -k 10 1800 cp --sparse=always "$TARGET" "$copy" 2>>"$daemon_log"
    rc=$?
    t1=$(now_ns)
    close_target
  fi
  if ((rc != 0)); then
    FAIL_REASON="copy failed (exit $rc)"
    rm -f "$copy"
    return 1
  fi
  local size alloc
  size=$(stat -c %s "$copy")
  alloc=$(($(stat -c %b "$copy") * 512))
  rm -f "$copy"
  if ((size != $(numfmt --from=iec "$SPARSE_VSIZE"))); then
    FAIL_REASON="copy has size $size"
    return 1
  fi
  ((alloc > 4 * SPARSE_WRITES * SPARSE_WRITE_SIZE)) && note="copy not sparse"
  put cp-sparse-64G-200M "$(awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.2f", ns / 1e9}')" "$note"
}

wl_read_compressed() {
  local algo=$1 system=$2
  need_compressed "$algo" || { FAIL_REASON="image setup failed"; return 1; }
  set_pattern seq
  measure_fio "$system" "$work/$algo.qcow2" "$work/data.raw" ro cold 0 buffered read mibs "read-$algo-1M-cold" -- \
    --rw=read --bs=1M "${PATTERN[@]}"
}

# Mount time to the first read, then random reads all over the disk, then
# the daemon's peak resident set (VmHWM): the L2 tables it had to load.
wl_meta() {
  local system=$1 t0 t1 rss
  need_meta || { FAIL_REASON="image setup failed"; return 1; }
  set_pattern qd32
  if [[ $system == raw ]]; then
    put "mount-first-read-$META_SIZE" n/a ""
    put "rss-peak-$META_SIZE" n/a ""
    measure_fio raw "" "$work/meta.raw" ro cold 0 direct read iops "rand-read-4k-qd32-$META_SIZE" -- \
      --rw=randread --bs=4k --time_based --runtime="$runtime" "${PATTERN[@]}"
    return
  fi
  drop_caches
  t0=$(now_ns)
  open_target "$system" "$work/meta.qcow2" "" ro || return 1
  if ! timeout -k 5 120 dd if="$TARGET" of=/dev/null bs=4k count=1 status=none 2>>"$daemon_log"; then
    FAIL_REASON="first read failed"
    close_target
    return 1
  fi
  t1=$(now_ns)
  put "mount-first-read-$META_SIZE" "$(awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.3f", ns / 1e9}')" ""
  local d note=""
  for d in 1 0; do
    if run_fio --name=meta --filename="$TARGET" --direct=$d --rw=randread --bs=4k \
        --time_based --runtime="$runtime" "${PATTERN[@]}"; then
      [[ $d == 0 ]] && note="buffered"
      put "rand-read-4k-qd32-$META_SIZE" "$(fio_value read iops)" "$note"
      break
    fi
  done
  rss=$(awk '/^VmHWM:/ {printf "%.1f", $2 / 1024}' "/proc/$ACTIVE_PID/status" 2>/dev/null)
  [[ -n $rss ]] && put "rss-peak-$META_SIZE" "$rss" ""
  close_target
}

# WR_PAIRS times: pwrite 4 KiB at a random 4 KiB-aligned offset, then
# pread the same 4 KiB, buffered (no O_DIRECT), from page-aligned buffers
# (from an unaligned one, such as a Python bytes object, the kernel sends a
# 4 KiB write to a FUSE file as two WRITE requests).
# The write invalidates the view's attributes in the kernel, so the read
# first asks the daemon for them (GETATTR: st_size, st_blocks), as in any
# read-after-write through a FUSE file; that must not cost more on a
# larger disk. Prints the median and mean ms per pair.
WR_PAIRS_PY=$(cat <<'EOF'
import mmap, os, random, statistics, sys, time
path, pairs = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
blocks = os.fstat(fd).st_size // 4096
out, back = mmap.mmap(-1, 4096), mmap.mmap(-1, 4096)
out.write(os.urandom(4096))
rng = random.Random(1)
times = []
for i in range(pairs):
    offset = rng.randrange(blocks) * 4096
    out[:8] = i.to_bytes(8, "little")
    t0 = time.perf_counter_ns()
    if os.pwrite(fd, out, offset) != 4096 or os.preadv(fd, [back], offset) != 4096:
        sys.exit("short write or read at %d" % offset)
    times.append(time.perf_counter_ns() - t0)
    if back[:] != out[:]:
        sys.exit("read back other bytes than written at %d" % offset)
os.close(fd)
print("%.4f %.4f" % (statistics.median(times) / 1e6, statistics.mean(times) / 1e6))
EOF
)

# Write-then-read pairs on the small and the large image, each on a fresh
# read-write view (the raw files directly for raw), then their ratio.
wl_write_read() {
  local system=$1 size out median mean
  local -A per_size=()
  for size in "${WR_SIZES[@]}"; do
    need_wr "$size" || { FAIL_REASON="image setup failed"; return 1; }
    open_target "$system" "$work/wr-$size.qcow2" "$work/wr-$size.raw" rw || return 1
    if ! out=$(timeout -k 10 600 python3 -c "$WR_PAIRS_PY" "$TARGET" "$WR_PAIRS" 2>"$work/pairs.err"); then
      FAIL_REASON="write-read pairs on $size: $(tail -n 1 "$work/pairs.err")"
      close_target
      return 1
    fi
    close_target
    read -r median mean <<<"$out"
    log "  ($size: mean $mean ms per pair)"
    per_size[$size]=$median
    put "write-read-4k-$size" "$median" ""
  done
  put "write-read-4k-${WR_SIZES[1]}-vs-${WR_SIZES[0]}" \
    "$(awk -v a="${per_size[${WR_SIZES[1]}]}" -v b="${per_size[${WR_SIZES[0]}]}" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')" ""
}

# Unpacking onto a fresh ext4, up to the data being on the host's disk.
# Untimed: a new empty disk, the view mounted read-write, a loop device over
# it, mkfs.ext4, the ext4 mounted, caches dropped, then the archive read
# into the host page cache (so every system reads it from memory). Timed:
# tar -xf; sync -f (syncfs of the ext4: its data and journal, and a flush
# of the loop device, which fsyncs the view or raw file); umount; losetup
# -d; the view unmounted and its daemon gone (close_target waits for it);
# then fsync of the image (or raw) file, so that on every system the time
# ends with everything on the host's disk. The images are fragmented (ext4
# spreads its files over the disk), so they are deleted only at the end.
# With a first argument "dio", the loop device does direct I/O.
wl_ext4_unpack() {
  local io=buffered row_suffix=""
  [[ $1 == dio ]] && { io=dio; row_suffix=-dio; shift; }
  local system=$1 image=$work/unpack.qcow2 raw=$work/unpack.raw file t0 t1 ok=0 steps=()
  need_archive || { FAIL_REASON="archive setup: ${FAIL_REASON:-failed}"; return 1; }
  retire later "$image" "$raw"
  if [[ $system == raw ]]; then
    file=$raw
    truncate -s "$UNPACK_VSIZE" "$raw" || { FAIL_REASON="truncate failed"; return 1; }
  else
    file=$image
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$image" "$UNPACK_VSIZE" ||
      { FAIL_REASON="qemu-img create failed"; return 1; }
  fi
  if open_target "$system" "$image" "$raw" rw && loop_attach "$TARGET" rw "$io" &&
      bounded 600 mkfs.ext4 mkfs.ext4 "${EXT4_MKFS_OPTS[@]}" "$LOOP_DEV" && ext4_mount rw; then
    drop_caches
    cat "$work/unpack.tar" >/dev/null
    t0=$(now_ns)
    if bounded 1800 "tar -x" tar -xf "$work/unpack.tar" -C "$ext4_mnt" && steps+=("$(now_ns)") &&
        bounded 1800 "sync -f" sync -f "$ext4_mnt" && steps+=("$(now_ns)") &&
        ext4_unmount && steps+=("$(now_ns)"); then
      close_target
      steps+=("$(now_ns)")
      if bounded 600 "fsync of the image file" sync "$file"; then
        t1=$(now_ns)
        ok=1
      fi
    fi
  fi
  ext4_teardown
  close_target
  retire later "$image" "$raw"
  ((ok)) || return 1
  # Where the time went, for the progress log.
  log "  (tar $(awk -v a="$t0" -v b="${steps[0]}" -v c="${steps[1]}" -v d="${steps[2]}" -v e="${steps[3]}" -v f="$t1" \
    'BEGIN {printf "%.2f s, sync -f %.2f s, umount and losetup -d %.2f s, view closed %.2f s, fsync %.2f s", (b - a) / 1e9, (c - b) / 1e9, (d - c) / 1e9, (e - d) / 1e9, (f - e) / 1e9}'))"
  put "ext4-unpack-${ARCHIVE_MIB}M$row_suffix" "$(awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.2f", ns / 1e9}')" ""
}

# Reading every file of the tree: a read-only view (qcow2fuse -o ro, qsd
# writable=off; raw: the raw file), a read-only loop device over it, the
# ext4 mounted ro,noload (no journal replay), caches dropped after
# mounting. Timed: tar -cf - | cat >/dev/null (GNU tar does not read the
# files when its archive is /dev/null itself).
# With a first argument "dio", the loop device does direct I/O.
wl_ext4_read_tree() {
  local io=buffered row_suffix=""
  [[ $1 == dio ]] && { io=dio; row_suffix=-dio; shift; }
  local system=$1 t0 t1 ok=0
  need_tree || { FAIL_REASON="tree setup: ${FAIL_REASON:-failed}"; return 1; }
  open_target "$system" "$work/tree.qcow2" "$work/tree.raw" ro || return 1
  if loop_attach "$TARGET" ro "$io" && ext4_mount ro; then
    drop_caches
    t0=$(now_ns)
    # shellcheck disable=SC2016  # $1 is bash -c's argument
    if bounded 1800 "reading the tree" bash -c 'set -o pipefail; tar -cf - -C "$1" . | cat >/dev/null' \
        read "$ext4_mnt"; then
      t1=$(now_ns)
      ok=1
    fi
  fi
  ((ok)) && { ext4_unmount || ok=0; }
  ext4_teardown
  close_target
  ((ok)) || return 1
  put "ext4-read-tree-${TREE_MIB}M$row_suffix" "$(awk -v ns=$((t1 - t0)) 'BEGIN {printf "%.2f", ns / 1e9}')" ""
}

# ---------------------------------------------------------------- work directory and cleanup

parent=${BENCH_DIR:-/var/tmp}
mkdir -p "$parent" || die "cannot create $parent"
start_ns=$(date +%s%N)
work=$(mktemp -d "$parent/qcow2fuse-bench.XXXXXX") || die "cannot make a directory in $parent"
work_dev=$(stat -c %d "$work")
work_real=$(realpath "$work")  # as the kernel names the files of loop devices
ext4_mnt=$work/ext4            # where the ext4 workloads mount the guest file system
results=$work/results.tsv
: >"$results"
daemon_log=$work/daemons.log

# The one view mounted at a time: which system serves it, its path, and the
# PID of the daemon we started (qcow2fuse: from its --pidfile; qsd: $!).
ACTIVE_SYSTEM=""
ACTIVE_VIEW=""
ACTIVE_PID=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  ext4_teardown  # the ext4 and the loop device first: they keep the view busy
  close_target
  if [[ -n $uring_was ]]; then echo "$uring_was" >"$URING_PARAMETER"; fi
  if [[ -d $work/trash ]]; then
    log "deleting the images of the allocating writes and ext4 unpacking$(has_discard && echo " (slow: the file system is mounted with -o discard)")"
  fi
  rm -rf -- "$work"
  log "done after $(( ($(now_ns) - start_ns) / 1000000000 )) s"
  exit "$rc"
}
trap cleanup EXIT
# --io-uring: the kernel's setting for the run, the one found put back by
# cleanup.
URING_PARAMETER=/sys/module/fuse/parameters/enable_uring
uring_was=""
if [[ -n $io_uring ]]; then
  [[ -w $URING_PARAMETER ]] || { log "--io-uring: $URING_PARAMETER is missing or not writable (Linux 6.14+, root)"; exit 2; }
  uring_was=$(cat "$URING_PARAMETER")
  if [[ $io_uring == on ]]; then echo Y >"$URING_PARAMETER"; else echo N >"$URING_PARAMETER"; fi
fi
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Refuse to start when the images would not fit (the biggest runs need
# about 8 GiB at once in the default sizes: data images, copies and a
# 64 GiB disk with up to 2 GiB of freshly allocated clusters). The ext4
# workloads add their archive, the tree disk (raw and qcow2) and the disks
# of every unpacking run, which are kept until the end (about 600 MiB each
# for a 400 MiB archive: over 5 GiB in all with 3 rounds).
need_kib=$((quick ? 3 << 20 : 9 << 20))
if printf '%s\n' "${selected[@]}" | grep -q '^ext4-'; then
  need_kib=$((need_kib + ((ARCHIVE_MIB + TREE_MIB * 3 + rounds * 3 * (ARCHIVE_MIB * 3 / 2 + 160)) << 10)))
fi
avail_kib=$(df -Pk "$work" | awk 'NR == 2 {print $4}')
((avail_kib >= need_kib)) || die "$work has $((avail_kib >> 20)) GiB free, needs $((need_kib >> 20)) GiB"

# ---------------------------------------------------------------- the run

ROUND=0
SYSTEM=""
FAIL_REASON=""
declare -A PUT_DONE

# Records one value for the current round and system.
put() {
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$SYSTEM" "$ROUND" "$2" "$3" >>"$results"
  PUT_DONE[$1]=1
  log "  $1 $SYSTEM: $2${3:+ ($3)}"
}

log "work directory $work; $rounds round(s); ${#selected[@]} workload(s); fio runtime ${runtime}s"
for ((ROUND = 1; ROUND <= rounds; ROUND++)); do
  # Rotate the order of the systems every round, so that none always runs
  # first (or right after a given other one).
  order=()
  for ((i = 0; i < ${#SYSTEMS[@]}; i++)); do
    order+=("${SYSTEMS[(i + ROUND - 1) % ${#SYSTEMS[@]}]}")
  done
  for w in "${selected[@]}"; do
    log "round $ROUND/$rounds: $w"
    for SYSTEM in "${order[@]}"; do
      PUT_DONE=()
      FAIL_REASON=""
      # shellcheck disable=SC2086  # WL_FUNC holds a function and its arguments
      ${WL_FUNC[$w]} "$SYSTEM"
      ext4_teardown  # in case the workload failed with an ext4 or a loop device left
      close_target   # or a view mounted
      for spec in ${WL_ROWS[$w]}; do
        row=${spec%%:*}
        [[ -n ${PUT_DONE[$row]:-} ]] || put "$row" failed "${FAIL_REASON:-unknown error}"
      done
    done
  done
done
elapsed=$(( ($(now_ns) - start_ns) / 1000000000 ))

# ---------------------------------------------------------------- the report

# Row descriptions for the report: ROW, UNIT, DESCRIPTION per line.
rows_file=$work/rows.tsv
: >"$rows_file"
for w in "${selected[@]}"; do
  for spec in ${WL_ROWS[$w]}; do
    printf '%s\t%s\t%s\n' "${spec%%:*}" "${spec#*:}" "${WL_DESC[$w]}" >>"$rows_file"
  done
done

{
  echo "## qcow2fuse benchmark"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(uname -r), $(nproc) CPUs," \
    "$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo) RAM;" \
    "images on $(df -PT "$work" | awk 'NR == 2 {print $2 " (" $1 ")"}')."
  echo "qcow2fuse $(git -C "$root" describe --always --dirty 2>/dev/null || echo '?') ($QCOW2FUSE)," \
    "$(qemu-storage-daemon --version | head -n 1), $(fio --version)."
  echo "FUSE over io_uring (enable_uring): $(cat "$URING_PARAMETER" 2>/dev/null || echo 'not in this kernel')."
  echo "$rounds round(s), $( ((quick)) && echo "--quick, " )data disk $((DATA_SIZE >> 20)) MiB," \
    "fio runtime ${runtime} s, $ALLOC_IOS allocating writes per run;" \
    "setup and measurements took $((elapsed / 60)) min $((elapsed % 60)) s."
  echo
  python3 "$bench_dir/report.py" "$rows_file" "$results"
} >"$work/report.md"
cat "$work/report.md"
if [[ -n $out_file ]]; then cp "$work/report.md" "$out_file" && log "report written to $out_file"; fi
