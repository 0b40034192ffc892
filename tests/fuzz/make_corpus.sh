#!/usr/bin/env bash
# Makes the seed corpus of the fuzz targets from images QEMU writes: every
# cluster size from 512 bytes to 2 MiB, version 2 and 3, extended L2,
# every refcount width, deflate and zstd compressed clusters, snapshots,
# persistent bitmaps, dirty images (a writer killed with lazy refcounts,
# and a dirty bit set by hand), an external data file, a backing file
# name, preallocated metadata and a grown L1 table; and for the partition
# table decoder, raw disks that sfdisk and fdisk partitioned (GPT, GPT of
# 4096-byte sectors, MBR with logical partitions, hybrid MBR), some of
# them damaged. Nothing binary is kept in the repository: the corpus is
# made again for each run.
#
#   tests/fuzz/make_corpus.sh OUT_DIR FUZZ_PACK
#
# FUZZ_PACK is the fuzz_pack tool of a build (tests/fuzz/fuzz_pack). Seeds
# go to OUT_DIR/<target>/; write_fuzzer's seeds are each image with a few
# request sequences in its tail (format in write_fuzzer.cc).
set -euo pipefail
if (($# != 2)); then
  echo "usage: $0 OUT_DIR FUZZ_PACK" >&2
  exit 2
fi
out=$1
pack=$2
targets=(header_fuzzer l2_entry_fuzzer read_fuzzer write_fuzzer partition_table_fuzzer)
for t in "${targets[@]}"; do mkdir -p "$out/$t"; done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One request of write_fuzzer: kind offset length fill.
op() { printf '%02x%08x%08x%02x' "$@"; }
# kind: 0 write, 1 zero, 2 zero+unmap, 3 discard, 4 preallocate, 5 truncate,
# 6 flush, 7 read; +8 sectors instead of bytes; truncate +16 grow, +32 shrink.
tails=(
  # Allocating writes, an unaligned one, a rewrite in place, reading back.
  "$(op 0 0 65536 17)$(op 0 4097 9000 34)$(op 8 3000 8 51)$(op 6 0 0 0)$(op 0 0 4096 68)$(op 7 0 1048576 0)"
  # Discard, zeroing with and without unmap, preallocation, partial pieces.
  "$(op 0 0 131072 5)$(op 3 512 70000 0)$(op 1 65536 131072 0)$(op 2 4096 4048 0)$(op 4 1048576 1048576 0)$(op 6 0 0 0)$(op 7 0 262144 0)"
  # Resizes: grow, write at the new end, a refused shrink, a shrink that loses nothing.
  "$(op 21 0 1048576 0)$(op 0 4294967295 4096 9)$(op 37 0 1048576 0)$(op 3 0 4294967295 0)$(op 37 0 1048576 0)$(op 5 16384 0 0)$(op 0 0 512 1)$(op 7 0 1048576 0)"
  # Zeros written as data, over compressed and snapshot-shared clusters.
  "$(op 8 0 256 0)$(op 8 64 64 0)$(op 11 128 128 0)$(op 6 0 0 0)$(op 7 0 1048576 0)"
)

# seed NAME IMAGE [DATA_FILE]: every target's seeds from one image.
seed() {
  local name=$1 image=$2 data=${3:-}
  local data_args=()
  [[ -n "$data" ]] && data_args=(-d "$data")
  "$pack" -o "$out/read_fuzzer/$name" "${data_args[@]}" "$image"
  "$pack" -H -o "$out/header_fuzzer/$name" "$image"
  "$pack" -L -o "$out/l2_entry_fuzzer/$name" "$image"
  local i
  for i in "${!tails[@]}"; do
    "$pack" -o "$out/write_fuzzer/$name-ops$i" -x "${tails[$i]}" "${data_args[@]}" "$image"
  done
}

# image NAME CREATE_OPTIONS SIZE [QEMU_IO_COMMAND...]: a new image, written to.
image() {
  local name=$1 options=$2 size=$3
  shift 3
  local path=$work/$name.qcow2
  qemu-img create -q -f qcow2 -o "$options" "$path" "$size"
  local args=()
  for c in "$@"; do args+=(-c "$c"); done
  if ((${#args[@]})); then qemu-io -f qcow2 "${args[@]}" "$path" >/dev/null; fi
  echo "$path"
}

# The usual mix for a cluster size: data, an unaligned write, a zero
# cluster, a discarded cluster, a compressed cluster.
mix() {
  local cs=$1
  echo "write -P 0x5a 0 4k"
  echo "write -P 0xa5 $((cs * 3 + 512)) 1536"
  echo "write -z $((cs * 5)) $cs"
  echo "write -P 0x77 $((cs * 6)) $cs"
  echo "discard $((cs * 6)) $cs"
  echo "write -c -P 0x33 $((cs * 8)) $cs"
}

for bits in $(seq 9 21); do
  cs=$((1 << bits))
  size=$((cs * 16 > 4 << 20 ? cs * 16 : 4 << 20))
  mapfile -t cmds < <(mix $cs)
  seed "v3-c$cs" "$(image "v3-c$cs" "cluster_size=$cs" $size "${cmds[@]}")"
  if ((bits >= 14)); then
    seed "l2ext-c$cs" "$(image "l2ext-c$cs" "cluster_size=$cs,extended_l2=on" $size \
      "${cmds[@]}" "write -P 0x44 $((cs / 32 * 3)) $((cs / 32))" "write -z $((cs / 32 * 7)) $((cs / 16))")"
  fi
done
for cs in 512 65536; do
  seed "v2-c$cs" "$(image "v2-c$cs" "compat=0.10,cluster_size=$cs" 4M "write -P 1 0 4k" "write -P 2 1M 8k" \
    "write -c -P 3 2M $cs")"
done
for rb in 1 2 4 8 16 32 64; do
  seed "refcount$rb" "$(image "refcount$rb" "refcount_bits=$rb,cluster_size=4096" 8M \
    "write -P 1 0 8k" "write -c -P 2 1M 4k" "write -P 3 7M 4k")"
done
for ct in zlib zstd; do
  seed "compressed-$ct" "$(image "compressed-$ct" "compression_type=$ct" 4M \
    "write -c -P 0x11 0 64k" "write -c -P 0x22 64k 64k" "write -c -P 0x33 1M 64k")"
done

# Internal snapshots: shared clusters, then copy-on-write after the snapshot.
snap=$(image snapshots "cluster_size=4096" 4M "write -P 1 0 16k" "write -c -P 2 1M 4k")
qemu-img snapshot -c s1 "$snap"
qemu-io -f qcow2 -c "write -P 3 0 8k" "$snap" >/dev/null
qemu-img snapshot -c s2 "$snap"
qemu-io -f qcow2 -c "write -P 4 4k 4k" "$snap" >/dev/null
seed snapshots "$snap"

# Persistent dirty bitmaps.
bm=$(image bitmaps "cluster_size=65536" 4M "write -P 1 0 4k")
qemu-img bitmap --add "$bm" b0
qemu-img bitmap --add -g 512 "$bm" b1
qemu-io -f qcow2 -c "write -P 2 1M 4k" "$bm" >/dev/null
seed bitmaps "$bm"

# Dirty images: a writer with lazy refcounts killed before it closed, and a
# clean image with the dirty bit (incompatible bit 0, byte 79) set by hand.
dirty=$(image dirty-killed "lazy_refcounts=on,cluster_size=4096" 4M "write -P 1 0 8k")
(qemu-io -f qcow2 -c "write -P 2 1M 8k" -c "sigraise 9" "$dirty" >/dev/null 2>&1 || true) 2>/dev/null
seed dirty-killed "$dirty"
hand=$(image dirty-bit "lazy_refcounts=on,cluster_size=65536" 4M "write -P 1 0 4k")
printf '\x01' | dd of="$hand" bs=1 seek=79 conv=notrunc status=none
seed dirty-bit "$hand"

# External data file, with and without data_file_raw.
for raw in off on; do
  data=$work/data-$raw.raw
  ext=$(image "data-file-raw-$raw" "data_file=$data,data_file_raw=$raw,cluster_size=4096" 4M \
    "write -P 1 0 8k" "write -z 1M 64k" "write -P 2 2M 4k")
  seed "data-file-raw-$raw" "$ext" "$data"
done

# A backing file name and format (never opened by the targets).
base=$(image base "cluster_size=65536" 4M "write -P 1 0 1M")
over=$work/overlay.qcow2
qemu-img create -q -f qcow2 -b "$base" -F qcow2 "$over"
qemu-io -f qcow2 -c "write -P 2 4k 4k" -c "discard 512k 64k" -c "write -z 768k 64k" "$over" >/dev/null
seed overlay "$over"

# Preallocated metadata (zero clusters with host clusters), and an L1
# table grown by a resize.
seed prealloc "$(image prealloc "preallocation=metadata,cluster_size=4096" 1M "write -P 1 8k 4k")"
grown=$(image grown "cluster_size=512" 1M "write -P 1 0 4k")
qemu-img resize -q "$grown" 64M
qemu-io -f qcow2 -c "write -P 2 60M 4k" "$grown" >/dev/null
seed grown "$grown"

# Partition tables. partitioned NAME SIZE < SFDISK_SCRIPT: a raw disk.
partitioned() {
  local path=$work/$1.raw
  truncate -s "$2" "$path"
  sfdisk -q "$path" >/dev/null
  echo "$path"
}
# poke FILE OFFSET BYTES: writes the printf-escaped BYTES at OFFSET.
poke() { printf "$3" | dd of="$1" bs=1 seek="$2" conv=notrunc status=none; }
# disk_seed NAME DISK [TAIL_HEX]: a partition_table_fuzzer seed.
disk_seed() { "$pack" -o "$out/partition_table_fuzzer/$1" ${3:+-x "$3"} "$2"; }

truncate -s 1M "$work/none.raw"
disk_seed none "$work/none.raw"
gpt=$(partitioned gpt 64M <<'EOF'
label: gpt
size=8M, type=L, name="root fs"
size=4M, type=S
size=10M, type=L, name="data"
size=3M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name="efi"
type=L
EOF
)
disk_seed gpt "$gpt"
disk_seed gpt-third-read-fails "$gpt" 03
# Tail 0001: the fuzz target fixes the GPT CRCs after each mutation.
disk_seed gpt-crcs-fixed "$gpt" 0001
cp "$gpt" "$work/gpt-deleted.raw"
sfdisk -q --delete "$work/gpt-deleted.raw" 2
disk_seed gpt-deleted "$work/gpt-deleted.raw"
# A byte of the primary header's DiskGUID (HeaderCRC32 fails), of the
# primary entry array (PartitionEntryArrayCRC32 fails), then of both headers.
cp "$gpt" "$work/gpt-header.raw"
poke "$work/gpt-header.raw" $((512 + 56)) '\x5a'
disk_seed gpt-primary-header-damaged "$work/gpt-header.raw"
cp "$gpt" "$work/gpt-entries.raw"
poke "$work/gpt-entries.raw" $((1024 + 32)) '\x5a'
disk_seed gpt-primary-entries-damaged "$work/gpt-entries.raw"
poke "$work/gpt-header.raw" $((64 * 1024 * 1024 - 512 + 56)) '\x5a'
disk_seed gpt-both-damaged "$work/gpt-header.raw"
# A hybrid MBR: partition 1 also in MBR entry 2, active.
cp "$gpt" "$work/hybrid.raw"
poke "$work/hybrid.raw" $((446 + 16)) '\x80\x00\x00\x00\x83\x00\x00\x00\x00\x08\x00\x00\x00\x40\x00\x00'
disk_seed hybrid "$work/hybrid.raw"
# Many partitions; a disk shrunk under its table.
many=$(for i in $(seq 40); do echo "size=1M, type=L, name=\"p$i\""; done | { echo 'label: gpt'; cat; } |
  partitioned gpt-many 64M)
disk_seed gpt-many "$many"
disk_seed gpt-many-crcs-fixed "$many" 0001
cp "$gpt" "$work/gpt-shrunk.raw"
truncate -s 20M "$work/gpt-shrunk.raw"
disk_seed gpt-shrunk "$work/gpt-shrunk.raw"
# 4096-byte sectors: the header at byte 4096.
truncate -s 16M "$work/gpt-4k.raw"
printf 'g\nn\n\n\n+2M\nn\n\n\n+3M\nw\n' | fdisk -b 4096 "$work/gpt-4k.raw" >/dev/null
disk_seed gpt-4k "$work/gpt-4k.raw"
disk_seed gpt-4k-crcs-fixed "$work/gpt-4k.raw" 0001
# MBR: primaries, an extended partition of each type, logical partitions.
for ext in 5 f 85; do
  mbr=$(partitioned "mbr-$ext" 64M <<EOF
label: dos
start=2048, size=8M, type=83, bootable
size=40M, type=$ext
size=4M, type=82
size=2M, type=83
size=6M, type=83
size=5M, type=8e
size=7M, type=c
EOF
)
  disk_seed "mbr-logical-$ext" "$mbr"
done
only=$(partitioned mbr-only-logical 32M <<'EOF'
label: dos
mbr-only-logical.raw2 : start=2048, size=40960, type=5
mbr-only-logical.raw5 : start=4096, size=8192, type=83
mbr-only-logical.raw6 : start=14336, size=8192, type=83
EOF
)
disk_seed mbr-only-logical "$only"
cp "$work/mbr-5.raw" "$work/mbr-shrunk.raw"
truncate -s 20M "$work/mbr-shrunk.raw"
disk_seed mbr-shrunk "$work/mbr-shrunk.raw"

for t in "${targets[@]}"; do
  echo "$t: $(ls "$out/$t" | wc -l) seeds, $(du -sh "$out/$t" | cut -f1)"
done
