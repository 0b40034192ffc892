#!/usr/bin/env python3
"""Writes SIZE bytes of compressible but non-trivial disk data to OUT.

Usage: make_data.py SIZE_BYTES OUT

The data is the content of system files (/usr/lib, /usr/share: binaries,
libraries, text), read in a fixed order and repeated if needed, with one
64 KiB chunk in eight replaced by pseudo-random bytes. That compresses
roughly like a real system disk (qcow2 compresses every cluster on its own,
so repeating the corpus does not make it compress better). No 4 KiB block
is left all-zero: `qemu-img convert` would turn it into a hole and the
"fully allocated" images would not be. The output is deterministic for a
given machine (fixed seed, sorted file walk).
"""
import os
import random
import sys

CHUNK = 64 * 1024
BLOCK = 4096
ZERO_BLOCK = bytes(BLOCK)
ROOTS = ("/usr/lib", "/usr/share")


def corpus_files():
    for root in ROOTS:
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


def main():
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
