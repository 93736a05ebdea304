"""The page cache around a merge's big sequential files: write-behind for outputs, drop-behind for inputs.

A merge reads the base once and writes the output once, front to back; nobody reads either back soon. Left to
the kernel, both fill the page cache: on a base larger than a third of memory the cache turns over the whole
file while the merge runs, and page reclaim competes with the merge for the CPU and the disk. Measured on this
project's 2-core VM (bench/results/flux-scale-2026-12-05.txt, 12B Flux single file, --no-manifest): a merge
that writes through O_DIRECT and reads through the cache ran 51.6 s; writing with write-behind and dropping
each read span once consumed, 39.2 s (a plain copy of the file: 48 s). A pipe test of the two I/O patterns
alone (16 MiB blocks, 8 GiB) moved 0.53–0.68 GB/s each way through the cache, 0.52–0.54 with O_DIRECT writes,
and 1.07–1.14 with write-behind writes and drop-behind reads.

* write-behind: after each write the kernel is asked to start writing that range out (`sync_file_range`,
  asynchronous); once more than WINDOW bytes are in flight, the oldest half is waited for and dropped from the
  cache. Unlike O_DIRECT, the disk sees deep queues of the kernel's own writeback, and no alignment is needed.
* drop-behind: a span of an input that has been read (and hashed) is dropped from the cache
  (`POSIX_FADV_DONTNEED`: clean pages go at once). Only for an input too big to stay cached anyway
  (`worth_dropping`): a smaller base stays cached for the next merge of a batch.

Linux has `sync_file_range` (reached through libc: Python does not wrap it); elsewhere `write_behind()` is False
and the writer falls back to O_DIRECT or the plain page cache.
"""

from __future__ import annotations

import ctypes
import errno
import os

WINDOW = 64 << 20  # bytes of an output's write-behind in flight before the oldest half is waited for
# Ranges dropped from the cache start and end on multiples of this: the page cache holds a file in folios of up to
# 2 MiB (PMD size on x86-64), and POSIX_FADV_DONTNEED leaves a folio that the range covers only in part (measured
# here: dropping 1 MiB ranges behind 1 MiB writes dropped nothing)
FOLIO = 2 << 20
_START = 2  # SYNC_FILE_RANGE_WRITE
_FLUSH = 7  # SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
DROP_FRACTION = 3  # an input larger than 1/DROP_FRACTION of physical memory is dropped behind the reader

_LIBC: list = []


def _sync_file_range():
    """libc's sync_file_range, or None where there is none (not Linux)."""
    if not _LIBC:
        fn = None
        try:
            lib = ctypes.CDLL(None, use_errno=True)  # the process's own symbols: libc's on Linux
            fn = lib.sync_file_range
            fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _LIBC.append(fn)
    return _LIBC[0]


def write_behind() -> bool:
    """Can this system do write-behind (sync_file_range and posix_fadvise)?"""
    return hasattr(os, "posix_fadvise") and _sync_file_range() is not None


def _range(fd: int, off: int, n: int, flags: int) -> None:
    if _sync_file_range()(fd, off, n, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# what a failed writeback says about the data (raised); any other errno means the file system does not do
# sync_file_range (FUSE, some network file systems): that file is written without write-behind
_WRITE_ERRORS = (errno.EIO, errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class WriteBehind:
    """Write-behind for one output file written front to back (`wrote` after each write). Errors of the writeback
    itself surface here or at the writer's final fsync."""

    def __init__(self, fd: int, window: int | None = None):
        self.fd, self.window, self.dropped = fd, window or WINDOW, 0
        self.off = False  # the file system refused sync_file_range

    def wrote(self, off: int, n: int) -> None:
        if self.off:
            return
        try:
            self._wrote(off, n)
        except OSError as e:
            if e.errno in _WRITE_ERRORS:
                raise
            self.off = True

    def _wrote(self, off: int, n: int) -> None:
        _range(self.fd, off, n, _START)
        end = off + n
        if end - self.dropped > self.window:
            upto = (end - self.window // 2) // FOLIO * FOLIO
            if upto > self.dropped:
                _range(self.fd, self.dropped, upto - self.dropped, _FLUSH)
                os.posix_fadvise(self.fd, self.dropped, upto - self.dropped, os.POSIX_FADV_DONTNEED)
                self.dropped = upto


class DropBehind:
    """Drop-behind for inputs read front to back: `consumed(fd, end)` once nothing before byte `end` of the file
    is needed any more drops what lies before it (from where the last drop ended, in whole folios)."""

    def __init__(self, fds):
        self.marks = {fd: 0 for fd in fds}

    def consumed(self, fd: int, end: int) -> None:
        mark = self.marks.get(fd)
        upto = end // FOLIO * FOLIO
        if mark is None or upto <= mark:
            return
        try:
            os.posix_fadvise(fd, mark, upto - mark, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        self.marks[fd] = upto


def worth_dropping(nbytes: int) -> bool:
    """Is an input of this size better dropped behind the reader than kept cached?"""
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return False
    return nbytes * DROP_FRACTION > mem
