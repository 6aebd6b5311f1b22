"""Helpers for the virtio-blk tests against real peers (issue 4).

* :class:`BlkServer`: ``python -m pyvirtio serve blk IMAGE ...`` as a child process (the real
  command line), its banner parsed, its log in a file; SIGTERM (clean) or SIGKILL (crash),
  always stopped.
* :class:`SlowBlkDevice`: a BlkDevice whose writes take ``delay`` seconds each and say so in
  the log, so a test can SIGKILL the server while a request is certainly in flight. Its
  ``ServerProcess`` is given the INFLIGHT_SHMFD extension factory the real server uses.
* Image helpers: a raw image with guard files and a guard tail, and the expected contents of
  the blocks the crash test writes.

The child processes import this module through PYTHONPATH (:data:`HERE`).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from serve_process import ServeProcess

from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.blk.file import FileBackend

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
SECTOR = 512
BLOCK = 4096



def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- images ---------------------------------------------------------------------------------


class GuardedImage:
    """A raw image of ``size`` bytes plus ``tail`` bytes that are not part of the disk
    (the capacity is whole sectors; the tail is a partial one), and a guard file next to
    it. :meth:`assert_outside_untouched` proves nothing outside the disk was written."""

    def __init__(self, directory: Path, size: int, *, tail: int = 300,
                 fill: bytes | None = None) -> None:
        self.path = directory / "disk.img"
        self.guard_path = directory / "guard.bin"
        self.size = size
        self.tail = os.urandom(tail)
        self.guard = os.urandom(64 << 10)
        with open(self.path, "wb") as f:
            if fill is not None:
                f.write(fill * (size // len(fill)))
            else:
                f.truncate(size)
                f.seek(size)
            f.write(self.tail)
        self.guard_path.write_bytes(self.guard)

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def allocated(self) -> int:
        """Bytes the file system allocated for the image (holes excluded)."""
        return os.stat(self.path).st_blocks * 512

    def assert_outside_untouched(self) -> None:
        assert os.path.getsize(self.path) == self.size + len(self.tail), \
            "the image file changed size"
        with open(self.path, "rb") as f:
            f.seek(self.size)
            assert f.read() == self.tail, "bytes after the disk's capacity changed"
        assert self.guard_path.read_bytes() == self.guard, "the guard file changed"


def block_pattern(i: int) -> bytes:
    """What the crash test's guest writes into block ``i`` (``printf '%-4096s'``)."""
    return f"pyvirtio block {i}".ljust(BLOCK).encode()


# ---- the real command line ------------------------------------------------------------------


class BlkServer(ServeProcess):
    """``python -m pyvirtio [-v] serve blk IMAGE --socket SOCK ARGS`` in a child process,
    stderr to ``log_path``; returns once the banner is complete (the socket listens).
    :meth:`stop` is the clean shutdown, :meth:`kill` a crash."""

    def __init__(self, image: Path, sock: Path, args: Sequence[str] = (), *,
                 log_path: Path, verbose: bool = True, timeout: float = 30.0) -> None:
        super().__init__("blk", [str(image), "--socket", str(sock), *args], log_path=log_path,
                         global_args=["-v"] if verbose else [])
        self.sock = sock
        try:
            self.wait_for(r"^pyvirtio: virtio-blk on ", timeout)
            self.wait_for(r"linux\.uml \.\.\.", timeout)  # the banner's last line
        except BaseException:
            self.close()
            raise

    def wait_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the log from character ``start``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log(), start)
            if m is not None:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server log never matched {pattern!r}:\n"
                                     f"{self.log()[-4000:]}")
            time.sleep(0.02)


# ---- a device whose writes are slow ---------------------------------------------------------


class SlowFileBackend(FileBackend):
    """A raw image whose every write takes ``delay`` seconds and is logged before it starts
    (the fast path is off: every write goes through :meth:`writev`)."""

    def __init__(self, path: str, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.fast_fd = -1

    def writev(self, offset: int, views: Sequence[memoryview], length: int) -> None:
        import logging

        logging.getLogger("pyvirtio.tests.slow").warning(
            "slow write of %d bytes at offset %d begins", length, offset)
        time.sleep(self.delay)
        super().writev(offset, views, length)


class SlowBlkDevice(BlkDevice):
    """BlkDevice on a :class:`SlowFileBackend` (JSON-friendly arguments, for
    ``ServerProcess``)."""

    def __init__(self, path: str, delay: float = 0.5, **kwargs: Any) -> None:
        super().__init__(SlowFileBackend(path, delay), **kwargs)
        self._slow_backend = self.backend

    def close(self) -> None:
        self._slow_backend.close()

