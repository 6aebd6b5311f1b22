"""Host-side helpers for the memory behind guests and images: Linux ``fallocate(2)`` with a
mode (punch a hole, zero a range; Python's ``os`` has only ``posix_fallocate``, so libc is
called through ctypes) and the address of a buffer (for O_DIRECT alignment). Used by the
balloon (giving guest pages back) and the blk file back-end (discard, write-zeroes)."""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_fallocate_fn: Callable[..., int] | None = None
_fallocate_loaded = False


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """Linux ``fallocate(2)`` with a mode. Raises ``OSError`` (EOPNOTSUPP if libc lacks it)."""
    global _fallocate_fn, _fallocate_loaded
    if not _fallocate_loaded:
        _fallocate_loaded = True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "fallocate64", None) or libc.fallocate
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _fallocate_fn = fn
        except (OSError, AttributeError):
            _fallocate_fn = None
    if _fallocate_fn is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available")
    if _fallocate_fn(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"fallocate(mode=0x{mode:x}, {offset}, {length}): "
                           f"{os.strerror(err)}")


def buffer_address(view: memoryview) -> int:
    """The address of a writable buffer's first byte (for O_DIRECT alignment checks);
    -1 if it cannot be known (a read-only or empty buffer)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return -1
