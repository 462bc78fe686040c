"""Reading a file a user names (a spec, a gold set) without trusting it: a regular file, at most a cap.

A size check on the path is not enough: /dev/zero reports size 0 and never ends, and opening a FIFO
for reading waits for a writer forever. So the file is opened non-blocking, fstat'ed on the open
descriptor (no race with a swapped path), refused unless it is a regular file, and read to the cap.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileRefused(ValueError):
    """The path is not a regular file of at most the cap; the message says what it is instead."""


def read_capped(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, which must hold at most `limit` bytes.

    Raises FileNotFoundError / PermissionError / OSError as open() does, FileRefused for anything else
    (a device, a FIFO, a socket, a directory, a file over the cap, or one that grows past it while read)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
            raise FileRefused(f"is {kind}, not a regular file")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileRefused(f"holds more than {limit:,} bytes (the limit)")
        return b"".join(chunks)
    finally:
        os.close(fd)
