#!/usr/bin/env bash
# Tests the bash completion of qcow2fuse (packaging/qcow2fuse.bash-completion):
# sources it, sets COMP_WORDS, COMP_CWORD, COMP_LINE and COMP_POINT as bash
# does for a command line typed up to the cursor, calls the completion
# function and compares COMPREPLY with what must be offered.
#
#   tests/package/completion_test.sh packaging/qcow2fuse.bash-completion
set -uo pipefail
completion=$(realpath "$1")

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
mkdir dir sub
touch a.qcow2 b.qcow c.img notes.txt dir/base.qcow2 dir/other

# shellcheck source=/dev/null
source "$completion"
[[ $(complete -p qcow2fuse) == "complete -F _qcow2fuse qcow2fuse" ]] || {
  echo "FAIL: sourcing does not register _qcow2fuse for qcow2fuse"; exit 1; }

# Splits LINE into words as bash does before calling a completion function:
# at blanks outside quotes, and around runs of COMP_WORDBREAKS characters,
# which become words of their own ("a=b" is "a" "=" "b").
split_like_bash() {
  local line=$1 breaks=${COMP_WORDBREAKS//[[:space:]]/} word= kind= quote= ch i
  COMP_WORDS=()
  for ((i = 0; i < ${#line}; i++)); do
    ch=${line:i:1}
    if [[ -n $quote ]]; then
      word+=$ch; [[ $ch == "$quote" ]] && quote=
      continue
    fi
    if [[ $ch == [[:space:]] ]]; then
      [[ -n $word ]] && COMP_WORDS+=("$word"); word=; kind=
      continue
    fi
    if [[ $ch == [\"\'] ]]; then
      quote=$ch
    fi
    local this=w
    [[ $breaks == *"$ch"* && -z $quote ]] && this=b
    if [[ -n $word && $this != "$kind" ]]; then COMP_WORDS+=("$word"); word=; fi
    word+=$ch; kind=$this
  done
  if [[ -n $word ]]; then COMP_WORDS+=("$word"); else COMP_WORDS+=(""); fi
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMP_LINE=$line
  COMP_POINT=${#line}
}

failures=0
# expect LINE WORD...: completing LINE offers exactly WORD... (in any order).
expect() {
  local line=$1; shift
  split_like_bash "$line"
  COMPREPLY=()
  _qcow2fuse 2>/dev/null
  local got want
  got=$(printf '%s\n' "${COMPREPLY[@]}" | LC_ALL=C sort)
  want=$( (($#)) && printf '%s\n' "$@" | LC_ALL=C sort)
  [[ $# -eq 0 ]] && got=$( ((${#COMPREPLY[@]})) && printf '%s\n' "${COMPREPLY[@]}")
  if [[ $got != "$want" ]]; then
    echo "FAIL: '$line' offered [${got//$'\n'/ }], expected [${want//$'\n'/ }]"
    failures=$((failures + 1))
  fi
}

# Options.
expect 'qcow2fuse -' -f -d -o -u --pidfile -h --help -V --version
expect 'qcow2fuse --' --pidfile --help --version
expect 'qcow2fuse a.qcow2 view -' -f -d -o -u --pidfile -h --help -V --version

# -o: option names, and the word after the last comma of a list.
expect 'qcow2fuse -o ' ro rw force_share allow_other l2_cache_size= max_metadata_memory= \
  data_file= backing= backing_format= overlay= volatile threads= drain_timeout= flush_interval= detect_zeroes= parallel_direct_writes= uncached_writes= uncached_loops= loop_direct_io= splice_reads= io_uring= park_workers= prefill_runs= readahead= image_readahead= sync_ahead= log=
expect 'qcow2fuse -o r' ro rw readahead=
expect 'qcow2fuse -o ro,im' ro,image_readahead=
expect 'qcow2fuse -o ro,th' ro,threads=
# Readline replaces only the text after the last '=' (a word break).
expect 'qcow2fuse -o ro,threads=4,f' 4,force_share 4,flush_interval=
expect 'qcow2fuse -o detect_zeroes=' off on unmap
expect 'qcow2fuse -o ro,detect_zeroes=u' unmap
expect 'qcow2fuse -o detect_zeroes=x'
expect 'qcow2fuse -o ro,parallel_direct_writes=o' on off
expect 'qcow2fuse -o uncached_writes=' on off
expect 'qcow2fuse -o ro,uncached_loops=' on off
expect 'qcow2fuse -o ro,loop_direct_io=' on off
expect 'qcow2fuse -o ro,splice_reads=' on off
expect 'qcow2fuse -o io_uring=o' on off
expect 'qcow2fuse -o ro,park_workers=' on off
expect 'qcow2fuse -o ro,prefill_runs=' on off
expect 'qcow2fuse -o data_file=dir/b' dir/base.qcow2
expect 'qcow2fuse -o ro,backing=dir/b' dir/base.qcow2
expect 'qcow2fuse -o backing_format=' qcow2 raw
expect 'qcow2fuse -o ro,log=no' notes.txt

# IMAGE: qcow2 images and directories; MOUNTPOINT: any file; then nothing.
expect 'qcow2fuse ' a.qcow2 b.qcow c.img dir sub
expect 'qcow2fuse -o ro --pidfile p -f ' a.qcow2 b.qcow c.img dir sub
expect 'qcow2fuse dir/' dir/base.qcow2
expect 'qcow2fuse a.qcow2 ' a.qcow2 b.qcow c.img notes.txt dir sub
expect 'qcow2fuse -o ro a.qcow2 n' notes.txt
expect 'qcow2fuse a.qcow2 notes.txt '
expect 'qcow2fuse --pidfile n' notes.txt

# -u: the mounted views, from the mount table.
cat >mountinfo <<'MOUNTS'
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
61 22 0:52 / /vm/disk.raw rw,nosuid,nodev,relatime shared:30 - fuse.qcow2fuse /vm/disk.qcow2 rw,user_id=0,group_id=0,default_permissions
62 22 0:53 / /vm/my\040disk.raw rw,nosuid,nodev,relatime - fuse.qcow2fuse /vm/my\040disk.qcow2 ro,user_id=0,group_id=0
63 22 0:54 / /mnt/remote rw,nosuid,nodev shared:31 master:2 - fuse.sshfs host:/ rw,user_id=0,group_id=0
MOUNTS
export _QCOW2FUSE_MOUNTINFO=$work/mountinfo
expect 'qcow2fuse -u ' /vm/disk.raw '/vm/my disk.raw'
expect 'qcow2fuse -u /vm/d' /vm/disk.raw
expect 'qcow2fuse -u /mnt/'
expect 'qcow2fuse -u /vm/disk.raw '

if ((failures)); then
  echo "$failures completion checks failed"
  exit 1
fi
echo "all completion checks passed"
