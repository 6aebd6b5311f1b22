"""The blk fast path changes speed, not behaviour: for any ring contents a driver can write
(valid requests, malformed ones, hostile descriptors), a device serving through
:class:`BlkFastLane` leaves guest memory, the image, the ring, the device status, its
problem log, its counters and its interrupts exactly as the reference path (every chain
through ``handle()``) does."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyvirtio.device.blk import BlkDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import blk as B
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S

QSIZE = 8
DESC, AVAIL, USED = 0x0000, 0x1000, 0x2000
DATA = 0x4000
MEMORY = 256 << 10
DISK = 64 << 10
SECTORS = DISK // 512
NEXT, WRITE, INDIRECT = SP.VRING_DESC_F_NEXT, SP.VRING_DESC_F_WRITE, SP.VRING_DESC_F_INDIRECT
_DESC = SP.desc_struct()
_HDR = B.outhdr_struct()


class ReferenceBlkDevice(BlkDevice):
    fast_path = False


@dataclass
class Rig:
    device: BlkDevice
    memory: GuestMemory
    image: Path
    interrupts: int = 0

    def interrupt(self, index: int) -> None:
        self.interrupts += 1


def make_rig(cls: type[BlkDevice], directory: Path, content: bytes, mem: bytes,
             writeback: bool, mmap_reads: bool = False) -> Rig:
    image = directory / f"{cls.__name__}.img"
    image.write_bytes(content)
    device = cls(image, queue_size=QSIZE, max_discard_seg=2, max_write_zeroes_seg=2,
                 mmap_reads=mmap_reads)
    memory = GuestMemory.anonymous(MEMORY)
    memory.write(0, mem)
    rig = Rig(device, memory, image)
    device.memory = memory
    device.notify_queue = rig.interrupt
    # The rings below are split rings written by hand.
    features = device.offered_features & ~F.bit(B.VIRTIO_BLK_F_MQ) & ~F.bit(F.RING_PACKED)
    if not writeback:
        features &= ~F.bit(B.VIRTIO_BLK_F_CONFIG_WCE) & ~F.bit(B.VIRTIO_BLK_F_FLUSH)
    device.set_driver_features(features)
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
    device.start_queue(0, QSIZE, DESC, AVAIL, USED)
    return rig


# ---- what a driver (good or hostile) may put in memory ---------------------------------------

addresses = st.one_of(
    st.integers(DATA, MEMORY - 1),  # anywhere in the data area
    st.sampled_from([DATA, DATA + 4096, MEMORY - 16, MEMORY - 1, MEMORY, 1 << 40,
                     (1 << 64) - 8]),
)
lengths = st.sampled_from([0, 1, 15, 16, 17, 48, 511, 512, 1024, 4096, 4097])
flag_sets = st.one_of(st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT]),
                      st.integers(0, 0xFFFF))
descriptors = st.tuples(addresses, lengths, flag_sets, st.integers(0, QSIZE + 2))
headers = st.tuples(
    st.sampled_from([B.VIRTIO_BLK_T_IN, B.VIRTIO_BLK_T_OUT, B.VIRTIO_BLK_T_FLUSH,
                     B.VIRTIO_BLK_T_GET_ID, B.VIRTIO_BLK_T_DISCARD,
                     B.VIRTIO_BLK_T_WRITE_ZEROES, 99]),
    st.sampled_from([0, 8, SECTORS - 8, SECTORS - 1, SECTORS, 1 << 55, (1 << 64) - 1]),
)


@st.composite
def well_formed(draw: st.DrawFn, slot: int) -> tuple[list[tuple[int, int, int, int]], bool]:
    """A Linux-shaped request (header, data, status) with random type, sector, sizes;
    returns its descriptors (table-relative ``next``) and whether to make it indirect."""
    base = DATA + slot * 0x5000
    rtype, _ = draw(headers)
    data_len = draw(st.sampled_from([512, 1024, 4096, 4096, 8192, 100]))
    base_hdr, base_data, base_status = base, base + 0x100, base + 0x100 + data_len
    write_data = rtype != B.VIRTIO_BLK_T_OUT and draw(st.booleans())
    descs = [(base_hdr, 16, NEXT, 1),
             (base_data, data_len, NEXT | (WRITE if write_data else 0), 2),
             (base_status, 1, WRITE, 0)]
    return descs, draw(st.booleans())


@st.composite
def ring_contents(draw: st.DrawFn) -> tuple[bytes, bool]:
    mem = bytearray(draw(st.binary(min_size=64, max_size=64)) * (MEMORY // 64))
    mem[: DATA] = bytes(DATA)
    heads = []
    table_at = 0x3000  # indirect tables
    next_desc = 0
    for slot in range(draw(st.integers(1, 5))):
        if draw(st.integers(0, 3)):
            descs, indirect = draw(well_formed(slot))
            rtype, sector = draw(headers)
            _HDR.pack_into(mem, descs[0][0], rtype, 0, sector)
        else:
            descs = draw(st.lists(descriptors, min_size=1, max_size=4))
            indirect = draw(st.booleans())
        if indirect:
            addr = table_at
            table_at += 16 * len(descs)
            for i, (a, n, f, nx) in enumerate(descs):
                _DESC.pack_into(mem, addr + 16 * i, a, n, f, nx)
            if next_desc >= QSIZE:
                break
            head = next_desc
            _DESC.pack_into(mem, DESC + 16 * head, addr, 16 * len(descs), INDIRECT, 0)
            next_desc += 1
        else:
            if next_desc + len(descs) > QSIZE:
                break
            head = next_desc
            for i, (a, n, f, nx) in enumerate(descs):
                link = head + nx if nx < len(descs) and f & NEXT else nx
                _DESC.pack_into(mem, DESC + 16 * (head + i), a, n, f, link)
            next_desc += len(descs)
        heads.append(head)
    if draw(st.integers(0, 5)) == 0:
        heads.append(draw(st.integers(0, QSIZE + 3)))  # a stray or repeated head
    for i, head in enumerate(heads):
        SP.u16_struct().pack_into(mem, AVAIL + 4 + 2 * i, head)
    avail_idx = len(heads) if draw(st.integers(0, 7)) else draw(st.integers(0, 0xFFFF))
    SP.u16_struct().pack_into(mem, AVAIL + 2, avail_idx)
    return bytes(mem), draw(st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ring_contents(), st.binary(min_size=512, max_size=512), st.booleans())
def test_the_fast_path_does_exactly_what_the_reference_path_does(
        contents: tuple[bytes, bool], sector_fill: bytes, mmap_reads: bool) -> None:
    mem, writeback = contents
    directory = Path(tempfile.mkdtemp(prefix="pyvirtio-fastpath-"))
    try:
        disk = sector_fill * SECTORS + b"tail" * 10
        fast = make_rig(BlkDevice, directory, disk, mem, writeback, mmap_reads)
        ref = make_rig(ReferenceBlkDevice, directory, disk, mem, writeback)
        try:
            for rig in (fast, ref):
                rig.device.kick(0)
            assert fast.memory.read(0, MEMORY) == ref.memory.read(0, MEMORY)
            assert fast.image.read_bytes() == ref.image.read_bytes()
            fring, rring = fast.device.ring(0), ref.device.ring(0)
            assert fring is not None and rring is not None
            assert fring.broken == rring.broken
            assert (fring.last_avail_idx, fring.used_idx) == (rring.last_avail_idx,
                                                              rring.used_idx)
            assert fring.in_flight() == rring.in_flight()
            assert fast.device.status == ref.device.status
            assert fast.device.problems == ref.device.problems
            assert fast.device.stats == ref.device.stats
            assert fast.interrupts == ref.interrupts
        finally:
            for rig in (fast, ref):
                rig.device.close()
                rig.memory.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_the_fast_path_serves_linux_shaped_requests_without_the_reference_path(
        tmp_path: Path) -> None:
    """The lane really is the one serving the common case (not falling back)."""
    disk = os.urandom(DISK)
    mem = bytearray(MEMORY)
    heads = []
    for i in range(4):
        hdr, data, status, table = DATA + i * 0x2000, DATA + i * 0x2000 + 0x100, \
            DATA + i * 0x2000 + 0x1100, 0x3000 + 48 * i
        rtype = B.VIRTIO_BLK_T_IN if i % 2 == 0 else B.VIRTIO_BLK_T_OUT
        _HDR.pack_into(mem, hdr, rtype, 0, 8 * i)
        _DESC.pack_into(mem, table, hdr, 16, NEXT, 1)
        _DESC.pack_into(mem, table + 16, data, 4096,
                        NEXT | (WRITE if rtype == B.VIRTIO_BLK_T_IN else 0), 2)
        _DESC.pack_into(mem, table + 32, status, 1, WRITE, 0)
        _DESC.pack_into(mem, DESC + 16 * i, table, 48, INDIRECT, 0)
        SP.u16_struct().pack_into(mem, AVAIL + 4 + 2 * i, i)
        heads.append(i)
    SP.u16_struct().pack_into(mem, AVAIL + 2, 4)
    rig = make_rig(BlkDevice, tmp_path, disk, bytes(mem), writeback=True)
    calls: list[int] = []
    original = rig.device.handle
    rig.device.handle = lambda q, c: calls.append(c.head) or original(q, c)  # type: ignore
    try:
        rig.device.kick(0)
        assert calls == []
        assert rig.device.stats.reads == 2 and rig.device.stats.writes == 2
        ring = rig.device.ring(0)
        assert ring is not None and ring.used_idx == 4 and not ring.in_flight()
        assert rig.memory.read(DATA + 0x100, 4096) == disk[:4096]
    finally:
        rig.device.close()
        rig.memory.close()
