"""vhost-user inflight tracking (INFLIGHT_SHMFD), sans-I/O: the shared region's layout is
QEMU's documented one, a back-end that dies anywhere between popping a request and
finishing its completion leaves a region from which the next back-end resubmits exactly
what was not completed, and a hostile region cannot make it misbehave."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyvirtio.device.blk import BlkBackend, BlkDevice, BlkRequest, Completion
from pyvirtio.io import memfd
from pyvirtio.io.inflight import allocate_region
from pyvirtio.memory import GuestMemory
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import blk as B
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user.inflight import (
    InflightExtension,
    QueueInflight,
    queue_region_size,
    region_size,
)

QSIZE = 16


def region(qsize: int = QSIZE) -> QueueInflight:
    return QueueInflight(memoryview(bytearray(queue_region_size(qsize))), qsize)


def test_region_sizes_follow_the_documented_layout() -> None:
    # 16-byte header + 16 bytes per descriptor, each queue's part 64-byte aligned.
    assert queue_region_size(128) == 16 + 16 * 128 + 48
    assert queue_region_size(1) == 64
    assert region_size(2, 256) == 2 * (16 + 16 * 256 + 48)


def test_pop_and_completion_write_the_documented_fields() -> None:
    q = region()
    q.initialise(used_idx=7)
    view = q.view
    assert (view[8], view[10], view[14]) == (1, QSIZE, 7)  # version, desc_num, used_idx
    q.popped(3)
    q.popped(5)
    desc3 = 16 + 16 * 3
    assert view[desc3] == 1 and int.from_bytes(view[desc3 + 8 : desc3 + 16], "little") == 0
    assert int.from_bytes(view[16 + 16 * 5 + 8 : 16 + 16 * 5 + 16], "little") == 1
    q.completing([3, 5])
    assert int.from_bytes(view[12:14], "little") == 5  # last_batch_head
    assert int.from_bytes(view[16 + 16 * 5 + 6 : 16 + 16 * 5 + 8], "little") == 3  # next
    q.completed([3, 5], used_idx=9)
    assert view[desc3] == 0 and view[16 + 16 * 5] == 0
    assert q.used_idx == 9 and q.in_flight() == []


def test_a_fresh_region_is_initialised_and_nothing_is_resubmitted() -> None:
    q = region()
    assert q.recover(used_idx=42) == []
    assert (q.version, q.desc_num, q.used_idx) == (1, QSIZE, 42)


def test_requests_popped_and_never_completed_are_resubmitted_oldest_first() -> None:
    q = region()
    q.recover(used_idx=0)
    for head in (9, 2, 11):
        q.popped(head)
    q.completing([2])
    q.completed([2], used_idx=1)
    # The back-end dies here; its successor reads the region.
    successor = QueueInflight(q.view, QSIZE)
    assert successor.recover(used_idx=1) == [9, 11]
    successor.popped(4)  # the counter continues after the recovered ones
    assert successor.in_flight() == [9, 11, 4]


def test_death_after_publishing_a_batch_but_before_clearing_it_loses_nothing() -> None:
    q = region()
    q.recover(used_idx=100)
    for head in (1, 2, 3, 4):
        q.popped(head)
    q.completing([3, 1])
    # used->idx was stored (100 -> 102), then the back-end died: marks still set.
    successor = QueueInflight(q.view, QSIZE)
    assert successor.recover(used_idx=102) == [2, 4]
    assert successor.used_idx == 102


def test_death_before_publishing_resubmits_the_whole_batch() -> None:
    q = region()
    q.recover(used_idx=5)
    q.popped(6)
    q.popped(7)
    q.completing([6, 7])  # list built, used->idx not yet stored
    assert QueueInflight(q.view, QSIZE).recover(used_idx=5) == [6, 7]


def test_a_hostile_region_is_contained() -> None:
    q = region()
    q.recover(used_idx=0)
    q.popped(1)
    view = q.view
    view[12:14] = (0xFFFF).to_bytes(2, "little")  # last_batch_head beyond the queue
    successor = QueueInflight(view, QSIZE)
    assert successor.recover(used_idx=3) == [1]
    assert any("beyond the queue size" in p for p in successor.problems)
    view[10:12] = (QSIZE * 2).to_bytes(2, "little")  # a region for another ring size
    again = QueueInflight(view, QSIZE)
    assert again.recover(used_idx=3) == []
    assert again.desc_num == QSIZE and any("starting afresh" in p for p in again.problems)


# ---- the extension with a device: a back-end dies with a request popped ----------------------


class HeldBackend(BlkBackend):
    """An asynchronous back-end that never completes anything: its process 'dies' with the
    requests popped and in flight."""

    asynchronous = True

    def __init__(self, size: int) -> None:
        self._held: list[BlkRequest] = []
        self._size = size

    @property
    def size(self) -> int:
        return self._size

    def submit(self, req: BlkRequest, done: Completion) -> None:
        self._held.append(req)


def start(device: BlkDevice, memory: GuestMemory) -> None:
    device.memory = memory
    # Split rings (inflight tracking covers split rings only).
    device.set_driver_features((device.offered_features & ~F.bit(B.VIRTIO_BLK_F_MQ)
                                & ~F.bit(F.RING_PACKED))
                               | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC))
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)


def attach(ext: InflightExtension) -> None:
    host = SimpleNamespace(map_memory=memfd.map_memory_fd, close_fd=memfd.close_fd)
    ext.attach(SimpleNamespace(name="test", reply_to=C.reply,  # type: ignore[arg-type]
                               host=host))


def test_a_restarted_back_end_resubmits_what_its_predecessor_held(tmp_path: Path) -> None:
    from pyvirtio.memory.alloc import Allocator

    image = tmp_path / "disk.img"
    content = os.urandom(64 << 10)
    image.write_bytes(content)
    memory = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(0, 1 << 20)
    desc, avail, used = (alloc.alloc(SP.desc_table_size(QSIZE), 4096),
                         alloc.alloc(SP.avail_size(QSIZE), 4096),
                         alloc.alloc(SP.used_size(QSIZE), 4096))
    driver = DriverQueue(memory, QSIZE, desc, avail, used, event_idx=True, indirect=True,
                         allocator=alloc)
    reads = []
    for i in range(3):
        hdr, data = alloc.alloc(32, 16), alloc.alloc(4096, 4096)
        memory.write(hdr, B.outhdr_struct().pack(B.VIRTIO_BLK_T_IN, 0, 8 * i))
        memory.write(hdr + 16, b"\xff")
        driver.add_buf([(hdr, 16)], [(data, 4096), (hdr + 16, 1)], i)
        reads.append((hdr, data))
    driver.kick_prepare()

    # The first back-end: QEMU asks for a region (GET), hands it over (SET), the ring runs.
    first = BlkDevice(HeldBackend(64 << 10), queue_size=QSIZE)
    ext = InflightExtension(first, allocate_region)
    attach(ext)
    get = C.request(R.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 1, QSIZE))
    reply = ext._get_inflight_fd(get)
    size, offset, nq, qs = V.INFLIGHT.unpack(reply.payload)
    assert (size, offset, nq, qs) == (region_size(1, QSIZE), 0, 1, QSIZE)
    fd = reply.fds[0]
    try:
        ext._set_inflight_fd(C.request(R.SET_INFLIGHT_FD, reply.payload, fds=[os.dup(fd)]))
        start(first, memory)
        ring = first.start_queue(0, QSIZE, desc, avail, used)
        ext.on_ring_started(0, ring)
        first.kick(0)
        assert len(first.backend._held) == 3  # type: ignore[attr-defined]
        assert driver.get_buf() is None  # nothing completed: the process dies now
        ext.close()

        # The restarted back-end: QEMU resets last_avail_idx to used->idx (0) and sends
        # the same region again.
        second = BlkDevice(str(image), queue_size=QSIZE)
        ext2 = InflightExtension(second, allocate_region)
        attach(ext2)
        ext2._set_inflight_fd(C.request(R.SET_INFLIGHT_FD, reply.payload, fds=[os.dup(fd)]))
        start(second, memory)
        ring2 = second.start_queue(0, QSIZE, desc, avail, used, last_avail_idx=0)
        ext2.on_ring_started(0, ring2)
        assert ext2.resubmitted == [(0, [0, 1, 2])]  # descriptor heads, pop order
        assert ring2.last_avail_idx == 3  # the avail entries were consumed already
        second.kick(0)
        got = sorted(driver.get_buf() for _ in range(3))  # type: ignore[type-var]
        assert got == [(0, 4097), (1, 4097), (2, 4097)]
        for i, (hdr, data) in enumerate(reads):
            assert memory.read(hdr + 16, 1) == b"\x00"
            assert memory.read(data, 4096) == content[4096 * i : 4096 * (i + 1)]
        assert ext2.queues[0].in_flight() == []
        assert ext2.queues[0].used_idx == 3
        ext2.close()
        second.close()
    finally:
        os.close(fd)
        memory.close()


def test_a_region_for_more_queues_than_the_device_has_is_refused() -> None:
    device = BlkDevice(HeldBackend(4096), queue_size=QSIZE)
    ext = InflightExtension(device, allocate_region)
    attach(ext)
    with pytest.raises(C.MessageError, match="2 queues; the device has 1"):
        ext._get_inflight_fd(C.request(R.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 2, QSIZE)))
    fd = allocate_region(64)
    try:
        with pytest.raises(C.MessageError, match="too small"):
            ext._set_inflight_fd(C.request(R.SET_INFLIGHT_FD,
                                           V.INFLIGHT.pack(64, 0, 1, QSIZE), fds=[fd]))
    finally:
        os.close(fd)  # the protocol layer closes a refused message's fds; we are it here


def test_a_packed_ring_is_not_tracked_and_runs_without_resubmission(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Inflight tracking has only the split layout: a packed ring runs untracked (said in
    the log), and nothing is resubmitted from the split-layout region."""
    from pyvirtio.memory.alloc import Allocator
    from pyvirtio.ring import PackedDeviceQueue, PackedDriverQueue

    memory = GuestMemory.anonymous(1 << 20)
    alloc = Allocator(0, 1 << 20)
    desc, drv_area, dev_area = alloc.alloc(16 * QSIZE, 16), alloc.alloc(4, 4), alloc.alloc(4, 4)
    driver = PackedDriverQueue(memory, QSIZE, desc, drv_area, dev_area, allocator=alloc)
    device = BlkDevice(HeldBackend(64 << 10), queue_size=QSIZE)
    ext = InflightExtension(device, allocate_region)
    attach(ext)
    reply = ext._get_inflight_fd(C.request(R.GET_INFLIGHT_FD, V.INFLIGHT.pack(0, 0, 1, QSIZE)))
    fd = reply.fds[0]
    try:
        ext._set_inflight_fd(C.request(R.SET_INFLIGHT_FD, reply.payload, fds=[os.dup(fd)]))
        device.memory = memory
        device.set_driver_features((device.offered_features & ~F.bit(B.VIRTIO_BLK_F_MQ))
                                   | F.bit(F.RING_PACKED))
        device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        ring = device.start_queue(0, QSIZE, desc, drv_area, dev_area)
        assert isinstance(ring, PackedDeviceQueue)
        with caplog.at_level("WARNING"):
            ext.on_ring_started(0, ring)
        assert "packed ring: not tracked, so not crash-safe" in caplog.text
        assert ext.resubmitted == [] and ext.problems == []
        hdr, data = alloc.alloc(32, 16), alloc.alloc(4096, 4096)
        memory.write(hdr, B.outhdr_struct().pack(B.VIRTIO_BLK_T_IN, 0, 0))
        driver.add_buf([(hdr, 16)], [(data, 4096), (hdr + 16, 1)], "read")
        driver.kick_prepare()
        device.kick(0)
        assert len(device.backend._held) == 1  # type: ignore[attr-defined]  # served
        ext.close()
    finally:
        os.close(fd)
        device.close()
