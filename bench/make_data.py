#!/usr/bin/env python3
"""Writes SIZE bytes of compressible but non-trivial disk data to OUT.

Usage: make_data.py SIZE_BYTES OUT
       make_data.py --list LIMIT_BYTES


The data is the content of system files (/usr/lib, /usr/share: binaries,
libraries, text), read in a fixed order and repeated if needed, with one
64 KiB chunk in eight replaced by pseudo-random bytes. That compresses
roughly like a real system disk (qcow2 compresses every cluster on its own,
so repeating the corpus does not make it compress better). No 4 KiB block
is left all-zero: `qemu-img convert` would turn it into a hole and the
"fully allocated" images would not be. The output is deterministic for a
given machine (fixed seed, sorted file walk).

--list prints a NUL-separated list of system files (paths relative to /)
of at most LIMIT_BYTES in all, for the file-system benchmarks: the regular
files of /usr/share, then /usr/lib (small text and data files first, then
binaries), in sorted order, cut before the first file that would go past
the limit; the count and size go to stderr.
"""
import os
import random
import sys

CHUNK = 64 * 1024
BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
ROOTS = ("/usr/lib", "/usr/share")
TREE_ROOTS = ("/usr/share", "/usr/lib")


def corpus_files(roots=ROOTS):
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if os.path.isfile(path) and not os.path.islink(path):
                    yield path


def corpus_chunks():
    """Endless stream of CHUNK-sized pieces of the corpus."""
    while True:
        pending = bytearray()
        any_file = False
        for path in corpus_files():
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                continue
            any_file = any_file or bool(data)
            pending += data
            while len(pending) >= CHUNK:
                yield bytes(pending[:CHUNK])
                del pending[:CHUNK]
        if not any_file:
            raise SystemExit("make_data.py: no readable corpus files under " + ", ".join(ROOTS))


def list_files(limit):
    total, count = 0, 0
    for path in corpus_files(TREE_ROOTS):
        size = os.path.getsize(path)
        if total + size > limit:
            break
        sys.stdout.buffer.write(os.fsencode(path[1:]) + b"\0")
        total, count = total + size, count + 1
    print("%d files, %.1f MiB" % (count, total / 2**20), file=sys.stderr)


def main():
    if sys.argv[1] == "--list":
        list_files(int(sys.argv[2]))
        return
    size = int(sys.argv[1])
    out = sys.argv[2]
    rng = random.Random(20240601)
    chunks = corpus_chunks()
    with open(out, "wb") as f:
        written = 0
        index = 0
        while written < size:
            if index % 8 == 7:
                chunk = rng.randbytes(CHUNK)
            else:
                chunk = bytearray(next(chunks))
                for off in range(0, CHUNK, BLOCK):
                    if chunk[off:off + BLOCK] == ZERO_BLOCK:
                        chunk[off:off + BLOCK] = rng.randbytes(BLOCK)
                chunk = bytes(chunk)
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
            index += 1


if __name__ == "__main__":
    main()
