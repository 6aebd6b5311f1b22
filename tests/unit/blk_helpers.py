"""Shared helpers for the virtio-blk tests: images with guard regions, a device+driver pair,
feature sets, and raw (unchecked) requests built straight on a driver's queue."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvirtio.device.blk import BlkDevice
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.spec import blk as B
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

SECTOR = 512
TAIL_GUARD = 300  # bytes after the last whole sector: outside the capacity


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class GuardedImage:
    """A raw image of ``sectors`` sectors, followed in the same file by TAIL_GUARD bytes
    that are not part of the capacity, with a separate guard file next to it."""

    path: Path
    guard_path: Path
    sectors: int
    content: bytearray = field(default_factory=bytearray)  # the model of the capacity
    tail: bytes = b""
    guard: bytes = b""

    @classmethod
    def create(cls, directory: Path, sectors: int = 2048, seed: int = 1,
               fill: bytes | None = None) -> GuardedImage:
        rnd = _rng(seed)
        content = bytearray(fill * (sectors * SECTOR // len(fill)) if fill else
                            rnd.randbytes(sectors * SECTOR))
        img = cls(directory / "disk.img", directory / "guard.bin", sectors, content,
                  rnd.randbytes(TAIL_GUARD), rnd.randbytes(64 << 10))
        with open(img.path, "wb") as f:
            f.write(content)
            f.write(img.tail)
            f.flush()
            os.fsync(f.fileno())
        img.guard_path.write_bytes(img.guard)
        return img

    @property
    def file_size(self) -> int:
        return self.sectors * SECTOR + TAIL_GUARD

    def read(self) -> bytes:
        """The capacity part of the file as it is now."""
        with open(self.path, "rb") as f:
            return f.read(self.sectors * SECTOR)

    def blocks(self) -> int:
        return os.stat(self.path).st_blocks

    def assert_outside_untouched(self) -> None:
        """Nothing outside the capacity changed: file size, tail bytes, guard file."""
        assert os.path.getsize(self.path) == self.file_size, "the image file changed size"
        with open(self.path, "rb") as f:
            f.seek(self.sectors * SECTOR)
            assert f.read() == self.tail, "bytes after the capacity changed"
        assert self.guard_path.read_bytes() == self.guard, "the guard file changed"

    def assert_matches_model(self) -> None:
        """The capacity holds exactly what the model says, and nothing outside changed."""
        assert sha(self.read()) == sha(bytes(self.content))
        self.assert_outside_untouched()


def _rng(seed: int) -> Any:
    import random

    return random.Random(seed)


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
