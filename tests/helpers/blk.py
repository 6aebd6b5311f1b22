"""Shared helpers for the virtio-blk tests, in memory and against real peers.

* :class:`GuardedImage`: a raw image with a guard tail and a guard file, and a model of its
  capacity, so a test proves both what the disk holds and that nothing outside it changed.
* In memory: :func:`blk_pair` (a BlkDevice probed by BlkDriver), :func:`features`, and
  :class:`RawRequest` (any header, any descriptors, built straight on a driver's queue).
* :class:`BlkServer`: ``python -m pyvirtio serve blk IMAGE ...`` as a child process (the real
  command line), its banner parsed, its log in a file; SIGTERM (clean) or SIGKILL (crash),
  always stopped.
* What a real guest runs on its disk: :data:`FS_SCRIPT` (a file system written and read
  back) and :data:`FIO` (the host's fio through hostfs, crc32c-verified).
* :class:`SlowBlkDevice`: a BlkDevice whose writes take ``delay`` seconds each and say so in
  the log, so a test can SIGKILL the server while a request is certainly in flight (server
  child processes import it as ``helpers.blk:SlowBlkDevice`` with ``tests/`` on PYTHONPATH).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers.serve_process import ServeProcess
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.blk.file import FileBackend
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.spec import blk as B
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

SECTOR = 512
BLOCK = 4096
TAIL_GUARD = 300  # bytes after the last whole sector: outside the capacity


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- images ---------------------------------------------------------------------------------


class GuardedImage:
    """A raw image of ``size`` bytes (the capacity, whole sectors) followed in the same file
    by ``tail`` bytes that are not part of the capacity, and a guard file next to it.

    The capacity holds ``fill`` repeated, else random bytes from ``seed``, else zeros (a
    sparse file). :attr:`content` is the model of the capacity: tests that write through a
    driver update it and :meth:`assert_matches_model` compares; for a zero image it is built
    on first use, so a large image costs no memory unless its model is needed.
    :meth:`assert_outside_untouched` proves nothing outside the capacity was written.
    """

    def __init__(self, directory: Path, size: int, *, fill: bytes | None = None,
                 seed: int | None = None, tail: int = TAIL_GUARD) -> None:
        assert size % SECTOR == 0, "the capacity is whole sectors"
        rnd = random.Random(seed)
        self.path = directory / "disk.img"
        self.guard_path = directory / "guard.bin"
        self.size = size
        self._content: bytearray | None = None
        if fill is not None:
            self._content = bytearray(fill * (size // len(fill)))
        elif seed is not None:
            self._content = bytearray(rnd.randbytes(size))
        self.tail = rnd.randbytes(tail)
        self.guard = rnd.randbytes(64 << 10)
        with open(self.path, "wb") as f:
            if self._content is not None:
                f.write(self._content)
            else:
                f.truncate(size)
                f.seek(size)
            f.write(self.tail)
            f.flush()
            os.fsync(f.fileno())
        self.guard_path.write_bytes(self.guard)

    @property
    def sectors(self) -> int:
        return self.size // SECTOR

    @property
    def file_size(self) -> int:
        return self.size + len(self.tail)

    @property
    def content(self) -> bytearray:
        """The model of the capacity: what the disk should hold now."""
        if self._content is None:
            self._content = bytearray(self.size)
        return self._content

    def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """The capacity part of the file as it is now (from ``offset``, ``length`` bytes)."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            return f.read(self.size - offset if length is None else length)

    def blocks(self) -> int:
        """The file system's allocated blocks for the image (``st_blocks``, 512-byte units:
        holes excluded)."""
        return os.stat(self.path).st_blocks

    def assert_outside_untouched(self) -> None:
        """Nothing outside the capacity changed: file size, tail bytes, guard file."""
        assert os.path.getsize(self.path) == self.file_size, "the image file changed size"
        with open(self.path, "rb") as f:
            f.seek(self.size)
            assert f.read() == self.tail, "bytes after the disk's capacity changed"
        assert self.guard_path.read_bytes() == self.guard, "the guard file changed"

    def assert_matches_model(self) -> None:
        """The capacity holds exactly what the model says, and nothing outside changed."""
        assert sha(self.read()) == sha(bytes(self.content))
        self.assert_outside_untouched()


def block_pattern(i: int) -> bytes:
    """What the crash test's guest writes into block ``i`` (``printf '%-4096s'``)."""
    return f"pyvirtio block {i}".ljust(BLOCK).encode()


# ---- what a real guest runs on its disk ------------------------------------------------------

FS_BLOCKS = 8192  # the ext2 file system: 8192 blocks of 4 KiB (32 MiB) at the start

#: busybox makes an ext2 file system, writes files, syncs, unmounts, drops the caches,
#: mounts it again and reports the checksums before (``fs_before``) and after (``fs_after``)
FS_SCRIPT = """
mkdir -p /mnt
mke2fs -q -b 4096 {dev} {fs_blocks} || exit 1
mount -t ext2 {dev} /mnt || exit 1
mkdir -p /mnt/dir/sub
dd if=/dev/urandom of=/mnt/a bs=1k count=300 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/b bs=4k count=1000 2>/dev/null
dd if=/dev/urandom of=/mnt/dir/sub/c bs=1 count=12345 2>/dev/null
echo hello > /mnt/dir/hello.txt
sums() {{ cd /mnt && sha256sum a dir/b dir/sub/c dir/hello.txt | sha256sum | cut -d' ' -f1; cd /; }}
result fs_before $(sums)
sync
umount /mnt || exit 1
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 {dev} /mnt || exit 1
result fs_after $(sums)
result fs_hello $(cat /mnt/dir/hello.txt)
umount /mnt || exit 1
"""

# fio writes every 4 KiB block of the range once (random order, queue depth 16), then
# reads everything back checking each block's crc32c. terse v3 fields: 5 error, 6 read
# KiB, 47 write KiB.
FIO = ("host_run /usr/bin/fio --name=verify --filename={dev} --rw=randwrite --bs=4k "
       "--iodepth=16 --ioengine=libaio --direct=1 --offset={offset} --size=64M "
       "--verify=crc32c --verify_fatal=1 --output-format=terse --terse-version=3 "
       "> /tmp/fio-{name}.out 2>&1\n"
       "result fio_{name}_status $?\n"
       "result fio_{name} $(tail -1 /tmp/fio-{name}.out | cut -d';' -f5,6,47)\n")


# ---- in memory: a device probed by our driver -----------------------------------------------

def features(*, event_idx: bool = True, indirect: bool = True, mq: bool = True,
             without: Sequence[int] = ()) -> int:
    """The driver's feature set with some transport or blk bits switched off."""
    bits = BlkDriver.features | F.bit(F.VERSION_1)
    if event_idx:
        bits |= F.bit(F.EVENT_IDX)
    if indirect:
        bits |= F.bit(F.INDIRECT_DESC)
    if not mq:
        bits &= ~F.bit(B.VIRTIO_BLK_F_MQ)
    for b in without:
        bits &= ~F.bit(b)
    return bits


@contextmanager
def blk_pair(backend: Any, *, features: int | None = None, memory_size: int = 16 << 20,
             **device_kwargs: Any) -> Iterator[tuple[DevicePair, BlkDevice, BlkDriver]]:
    """A BlkDevice on ``backend`` (a path or BlkBackend) probed by BlkDriver."""
    device = BlkDevice(backend, **device_kwargs)
    try:
        with DevicePair(device, memory_size=memory_size) as pair:
            driver = pair.probe(features=features)
            assert isinstance(driver, BlkDriver)
            yield pair, device, driver
    finally:
        device.close()


def needs_reset(device: BlkDevice) -> bool:
    return bool(device.status & S.DEVICE_NEEDS_RESET)


class RawRequest:
    """A request laid out by hand on a driver's queue: any header, any descriptors.

    ``header`` is placed in guest memory and sent as the readable descriptors given by
    ``header_split`` (lengths); ``out`` data follows as one readable descriptor; ``in_lens``
    are writable descriptors (the status byte is the last byte of the last one).
    """

    def __init__(self, pair: DevicePair, driver: BlkDriver, header: bytes,
                 header_split: Sequence[int] | None = None, out: bytes = b"",
                 in_lens: Sequence[int] = (1,), queue: int = 0) -> None:
        self.pair = pair
        mem, alloc = pair.memory, pair.allocator
        self.addrs: list[int] = []
        outs: list[tuple[int, int]] = []
        if header:
            addr = self._alloc(len(header), 0xEE)
            mem.write(addr, header)
            pos = 0
            for n in header_split or [len(header)]:
                outs.append((addr + pos, n))
                pos += n
        if out:
            addr = self._alloc(len(out), 0)
            mem.write(addr, out)
            outs.append((addr, len(out)))
        self.ins: list[tuple[int, int]] = []
        for n in in_lens:
            addr = self._alloc(n, 0xEE)  # 0xEE: "not written by the device"
            self.ins.append((addr, n))
        self.alloc = alloc
        vq = driver.vqs[queue]
        self.token = object()
        vq.add_buf(outs, self.ins, self.token)
        self.vq = vq

    def _alloc(self, n: int, fill: int) -> int:
        addr = self.pair.allocator.alloc(n, 4096)
        self.pair.memory.write(addr, bytes([fill]) * n)
        self.addrs.append(addr)
        return addr

    def run(self) -> tuple[int, int]:
        """Kick and return (status byte, used length) of this request."""
        self.vq.kick()
        got = self.vq.get_buf()
        assert got is not None, "the device did not complete the request"
        token, written = got
        assert token is self.token
        return self.status, written

    @property
    def status(self) -> int:
        addr, n = self.ins[-1]
        return self.pair.memory.read(addr + n - 1, 1)[0]

    def in_data(self) -> bytes:
        """Everything the device could write, status byte excluded."""
        data = b"".join(self.pair.memory.read(a, n) for a, n in self.ins)
        return data[:-1]


def header(rtype: int, sector: int = 0) -> bytes:
    return B.outhdr_struct().pack(rtype, 0, sector)


def segments(*segs: tuple[int, int, int]) -> bytes:
    st = B.discard_write_zeroes_struct()
    return b"".join(st.pack(sector, num, flags) for sector, num, flags in segs)


# ---- the real command line ------------------------------------------------------------------


class BlkServer(ServeProcess):
    """``python -m pyvirtio [-v] serve blk TARGET --socket SOCK ARGS`` in a child process
    (inside network namespace ``netns`` if given: its socket is still a path any guest
    reaches), stderr to ``log_path``; returns once the banner is complete (the socket
    listens). :meth:`stop` is the clean shutdown, :meth:`kill` a crash, :meth:`stats` the
    counters of ``--stats-file`` now."""

    def __init__(self, image: Path | str, sock: Path, args: Sequence[str] = (), *,
                 log_path: Path, verbose: bool = True, timeout: float = 30.0,
                 netns: str | None = None) -> None:
        super().__init__("blk", [str(image), "--socket", str(sock), *args], log_path=log_path,
                         global_args=["-v"] if verbose else [], netns=netns)
        self.sock = sock
        try:
            self.wait_for(r"^pyvirtio: virtio-blk on ", timeout)
            self.wait_for(r"linux\.uml \.\.\.", timeout)  # the banner's last line
        except BaseException:
            self.close()
            raise

    def stats(self, path: Path, timeout: float = 10.0) -> dict[str, Any]:
        """Ask for the counters (SIGUSR1) and return them once ``path`` holds the new ones
        (the server must run with ``--stats-file PATH``)."""
        seq = json.loads(path.read_text())["seq"] if path.exists() else -1
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(FileNotFoundError, ValueError):
                data: dict[str, Any] = json.loads(path.read_text())
                if data["seq"] > seq:
                    return data
            if time.monotonic() > deadline:
                raise AssertionError(f"no new counters in {path} after {timeout} s")
            time.sleep(0.02)

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

