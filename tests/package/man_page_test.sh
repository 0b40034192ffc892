#!/usr/bin/env bash
# Tests the man page docs/qcow2fuse.1 against the binary: man(1) formats it
# without a warning (lintian's groff-message check runs the same command),
# and every option that `qcow2fuse --help` lists is described in it.
#
#   tests/package/man_page_test.sh BINARY docs/qcow2fuse.1
set -uo pipefail
binary=$1
page=$2
failures=0

warnings=$(LC_ALL=C.UTF-8 MANROFFSEQ='' MANWIDTH=80 man --warnings -E UTF-8 -l -Tutf8 -Z "$page" 2>&1 >/dev/null)
if [[ -n $warnings ]]; then
  echo "FAIL: man reports on $page:"
  echo "$warnings"
  failures=$((failures + 1))
fi

help=$("$binary" --help) || { echo "FAIL: $binary --help failed"; exit 1; }
# The page as a reader sees it, in ASCII (so \- is '-'), with nothing
# hyphenated at a line end.
text=$(MANWIDTH=200 man -E ascii -l --no-hyphenation --no-justification "$page" 2>/dev/null | col -bx)
[[ -n $text ]] || { echo "FAIL: man cannot format $page"; exit 1; }

# The options of the help text: "-f", "--pidfile", and the word after "-o "
# up to its '=' ("ro", "threads=").
options=$(grep -oE '(^|[ ,])--?[A-Za-z][A-Za-z-]*' <<<"$help" | sed 's/^[ ,]//'
          grep -oE -- '-o [a-z0-9_]+=?' <<<"$help" | sed 's/^-o //')
[[ -n $options ]] || { echo "FAIL: no options found in $binary --help"; exit 1; }
checked=0
for option in $(sort -u <<<"$options"); do
  checked=$((checked + 1))
  # Described: the word stands alone (in a list, as a tag), not inside
  # another word; "threads=" is followed by its value's name.
  after='([^A-Za-z0-9_]|$)'
  [[ $option == *= ]] && after=
  if ! grep -qE -- "(^|[^A-Za-z0-9_-])$option$after" <<<"$text"; then
    echo "FAIL: '$option' of '$binary --help' is not in $page"
    failures=$((failures + 1))
  fi
done

if ((failures)); then
  echo "$failures man page checks failed"
  exit 1
fi
echo "all $checked options of --help are in the man page, which man formats without a warning"
