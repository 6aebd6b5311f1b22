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
from pyvirtio.device.blk.file import FileBackend
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
    packed_queue_region_size,
    queue_region_size,
    region_size,
)

QSIZE = 16


def region(qsize: int = QSIZE) -> QueueInflight:
    return QueueInflight(memoryview(bytearray(queue_region_size(qsize))), qsize)


def test_region_sizes_follow_the_documented_layouts() -> None:
    # Split: 16-byte header + 16 bytes per descriptor; packed: 32-byte header + 32 bytes
    # per descriptor; each queue's part 64-byte aligned.
    assert queue_region_size(128) == 16 + 16 * 128 + 48
    assert queue_region_size(1) == 64
    assert packed_queue_region_size(128) == 32 + 32 * 128 + 32
    assert packed_queue_region_size(1) == 64
    # A new region has room for either (the front-end asks before it sets the features).
    assert region_size(2, 256) == 2 * (32 + 32 * 256 + 32)


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


# ---- packed rings: the packed layout, a crash mid-batch, a hostile region -------------------


class HoldingBackend(BlkBackend):
    """An asynchronous file back-end that runs requests only when told (:meth:`finish`):
    whatever it still holds when its device is dropped died with the process."""

    asynchronous = True

    def __init__(self, path: Path) -> None:
        self.inner = FileBackend(path)
        self.held: list[tuple[BlkRequest, Completion]] = []

    @property
    def size(self) -> int:
        return self.inner.size

    def submit(self, req: BlkRequest, done: Completion) -> None:
        self.held.append((req, done))

    def finish(self, *positions: int) -> None:
        for pos in positions:
            req, done = self.held[pos]
            done(req, self.inner.execute(req))

    def close(self) -> None:
        self.inner.close()


class PackedDisk:
    """Guest memory with our packed driver queue of blk requests, and the devices that
    serve it one after the other over the same inflight region (QEMU keeps the region and
    hands it to every back-end it reconnects to)."""

    def __init__(self, tmp_path: Path, indirect: bool) -> None:
        from pyvirtio.memory.alloc import Allocator
        from pyvirtio.ring import PackedDriverQueue

        self.image = tmp_path / "disk.img"
        self.image.write_bytes(bytes(64 << 10))
        self.memory = GuestMemory.anonymous(1 << 20)
        self.alloc = Allocator(0, 1 << 20)
        self.rings = (self.alloc.alloc(16 * QSIZE, 16), self.alloc.alloc(4, 4),
                      self.alloc.alloc(4, 4))
        self.driver = PackedDriverQueue(self.memory, QSIZE, *self.rings, indirect=indirect,
                                        event_idx=True, allocator=self.alloc)
        self.status: dict[int, int] = {}  # token -> guest address of its status byte
        self.data: dict[int, bytes] = {}  # token -> what it writes (at 4 KiB * token)
        self.fd = -1

    def write(self, token: int) -> None:
        hdr, buf = self.alloc.alloc(32, 16), self.alloc.alloc(4096, 4096)
        data = os.urandom(4096)
        self.memory.write(hdr, B.outhdr_struct().pack(B.VIRTIO_BLK_T_OUT, 0, 8 * token))
        self.memory.write(buf, data)
        self.memory.write(hdr + 16, b"\xff")
        self.driver.add_buf([(hdr, 16), (buf, 4096)], [(hdr + 16, 1)], token)
        self.status[token], self.data[token] = hdr + 16, data

    def device(self, backend: BlkBackend | Path) -> tuple[BlkDevice, InflightExtension]:
        """A back-end (re)connects: SET_INFLIGHT_FD with the region (GET_INFLIGHT_FD the
        first time), features with RING_PACKED, and the ring started where QEMU 7.2 starts
        it after a reconnection: as a fresh ring (SET_VRING_BASE 0x80008000)."""
        device = BlkDevice(backend, queue_size=QSIZE)
        ext = InflightExtension(device, allocate_region)
        attach(ext)
        payload = V.INFLIGHT.pack(region_size(1, QSIZE), 0, 1, QSIZE)
        if self.fd < 0:
            reply = ext._get_inflight_fd(C.request(R.GET_INFLIGHT_FD,
                                                   V.INFLIGHT.pack(0, 0, 1, QSIZE)))
            assert reply.payload == payload
            self.fd = reply.fds[0]
        ext._set_inflight_fd(C.request(R.SET_INFLIGHT_FD, payload, fds=[os.dup(self.fd)]))
        device.memory = self.memory
        device.set_driver_features((device.offered_features & ~F.bit(B.VIRTIO_BLK_F_MQ)
                                    & ~F.bit(F.IN_ORDER)) | F.bit(F.RING_PACKED))
        device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)
        ring = device.start_queue(0, QSIZE, *self.rings)
        ext.on_ring_started(0, ring)
        return device, ext

    def completions(self) -> list[tuple[object, int]]:
        got = []
        while (item := self.driver.get_buf()) is not None:
            got.append(item)
        return got

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.memory.close()


@pytest.mark.parametrize("indirect", [False, True], ids=["chains", "indirect"])
def test_a_packed_ring_survives_a_back_end_that_dies_with_requests_in_flight(
        tmp_path: Path, indirect: bool) -> None:
    disk = PackedDisk(tmp_path, indirect)
    try:
        for token in range(5):
            disk.write(token)
        disk.driver.kick_prepare()
        held = HoldingBackend(disk.image)
        first, ext = disk.device(held)
        first.kick(0)
        assert len(held.held) == 5  # all popped, recorded in the region
        held.finish(3, 1)  # two complete (out of order) and reach the driver...
        assert sorted(disk.completions()) == [(1, 1), (3, 1)]  # type: ignore[type-var]
        # ... the others die with the back-end. The driver goes on making buffers available
        # meanwhile, in ring slots the dead back-end's used descriptors freed.
        ext.close()
        held.close()
        for token in (5, 6):
            disk.write(token)
        disk.driver.kick_prepare()

        second, ext2 = disk.device(disk.image)
        ring = second.ring(0)
        # Exactly the unfinished requests, in pop order (their buffer ids are the driver's).
        assert ext2.resubmitted == [(0, [0, 2, 4])]
        assert ext2.problems == []
        # The positions come from the region, not from the fresh base QEMU sent: 2 buffers
        # used, 5 popped (3 ring descriptors each without indirect tables).
        per = 1 if indirect else 3
        assert ring.used_idx == 0x8000 | 2 * per
        assert ring.last_avail_idx == 0x8000 | 5 * per
        second.kick(0)
        got = disk.completions()
        assert sorted(got) == [(t, 1) for t in (0, 2, 4, 5, 6)]  # type: ignore[type-var]
        assert disk.completions() == []  # each once
        image = disk.image.read_bytes()
        for token, data in disk.data.items():
            assert disk.memory.read(disk.status[token], 1) == b"\x00"
            assert image[4096 * token : 4096 * (token + 1)] == data
        assert ext2.queues[0].in_flight() == []  # type: ignore[union-attr]
        ext2.close()
        second.close()
    finally:
        disk.close()


def packed_pair(qsize: int = QSIZE) -> tuple[GuestMemory, object, object, object]:
    """Guest memory, a packed driver queue, its device queue and a packed region."""
    from pyvirtio.memory.alloc import Allocator
    from pyvirtio.ring import PackedDeviceQueue, PackedDriverQueue
    from pyvirtio.transport.vhost_user.inflight import PackedQueueInflight

    memory = GuestMemory.anonymous(1 << 16)
    alloc = Allocator(0, 1 << 16)
    rings = alloc.alloc(16 * qsize, 16), alloc.alloc(4, 4), alloc.alloc(4, 4)
    driver = PackedDriverQueue(memory, qsize, *rings, allocator=alloc)
    device = PackedDeviceQueue(memory, qsize, *rings)
    region = memoryview(bytearray(packed_queue_region_size(qsize)))
    tracker = PackedQueueInflight(region, qsize, device)
    tracker.recover()
    return memory, driver, device, tracker


def successor(memory: GuestMemory, tracker: object, qsize: int = QSIZE) -> tuple[object, object]:
    """The back-end after a crash: a new device queue on the same memory, started fresh
    (as QEMU 7.2 starts it), and a tracker on the same region."""
    from pyvirtio.ring import PackedDeviceQueue
    from pyvirtio.transport.vhost_user.inflight import PackedQueueInflight

    old = tracker.ring  # type: ignore[attr-defined]
    device = PackedDeviceQueue(memory, qsize, old.desc_addr, old.avail_addr, old.used_addr)
    return device, PackedQueueInflight(tracker.view, qsize, device)  # type: ignore[attr-defined]


def pop_all(device: object, tracker: object, n: int) -> list[int]:
    ids = []
    for _ in range(n):
        chain = device.pop()  # type: ignore[attr-defined]
        tracker.popped(chain.head)  # type: ignore[attr-defined]
        ids.append(chain.head)
    return ids


def test_the_packed_region_copies_each_popped_descriptor_as_documented() -> None:
    memory, driver, device, tracker = packed_pair()
    driver.add_buf([(0x8000, 16), (0x9000, 512)], [(0x9400, 1)], "a")  # type: ignore[attr-defined]
    pop_all(device, tracker, 1)
    view = tracker.view  # type: ignore[attr-defined]
    # header: version 1, desc_num, free_head = old_free_head = 3 (three states taken)
    assert (view[8], view[10], view[12], view[14]) == (1, QSIZE, 3, 3)
    # state 0 is the head: inflight, next 1, last 2, num 3, counter 0, then descriptor 0
    assert view[32] == 1
    assert [int.from_bytes(view[32 + o : 34 + o], "little") for o in (2, 4, 6)] == [1, 2, 3]
    # each state holds its ring descriptor: id, flags, len, addr
    third = 32 + 2 * 32 + 16
    assert int.from_bytes(view[third + 4 : third + 8], "little") == 1  # len
    assert int.from_bytes(view[third + 8 : third + 16], "little") == 0x9400  # addr
    memory.close()


def test_a_death_before_the_batch_is_published_resubmits_it() -> None:
    memory, driver, device, tracker = packed_pair()
    for t in range(3):
        driver.add_buf([(0x8000 + 64 * t, 16)], [(0x9000 + 64 * t, 8)], t)  # type: ignore[attr-defined]
    ids = pop_all(device, tracker, 3)
    tracker.completing(ids[:2])  # type: ignore[attr-defined]
    # dies before pushing: nothing reached the driver
    _, tracker2 = successor(memory, tracker)
    used, buffers = tracker2.recover()  # type: ignore[attr-defined]
    assert used == 0x8000 and [b for b, _ in buffers] == ids
    memory.close()


def test_a_death_after_the_batch_is_published_does_not_resubmit_it() -> None:
    memory, driver, device, tracker = packed_pair()
    for t in range(3):
        driver.add_buf([(0x8000 + 64 * t, 16)], [(0x9000 + 64 * t, 8)], t)  # type: ignore[attr-defined]
    ids = pop_all(device, tracker, 3)
    tracker.completing(ids[:2])  # type: ignore[attr-defined]
    device.push_many([(ids[0], 8), (ids[1], 8)])  # type: ignore[attr-defined]
    # dies before completed(): the region still has the old used position committed
    device2, tracker2 = successor(memory, tracker)
    used, buffers = tracker2.recover()  # type: ignore[attr-defined]
    assert used == 0x8004 and [b for b, _ in buffers] == ids[2:]  # 2 descriptors each
    device2.restore(used, buffers)  # type: ignore[attr-defined]
    chain = device2.resume(ids[2])  # type: ignore[attr-defined]
    assert chain.writable_len == 8
    device2.push(chain, 8)  # type: ignore[attr-defined]
    assert [driver.get_buf() for _ in range(4)] == [(0, 8), (1, 8), (2, 8), None]  # type: ignore[attr-defined]
    memory.close()


def hostile(tracker: object, offset: int, value: int, size: int = 2) -> object:
    view = tracker.view  # type: ignore[attr-defined]
    view[offset : offset + size] = value.to_bytes(size, "little")
    return tracker


@pytest.mark.parametrize(("offset", "value", "size", "culprit"), [
    (12, 0xFFFF, 2, "free_head 65535 is beyond 16"),
    (18, 40, 2, "old_used_idx 40 is beyond 15"),
    (21, 7, 1, "old_used_wrap_counter 7 is beyond 1"),
    (32 + 6, 200, 2, "state 0 is in flight with 200 descriptors"),
    (64 + 16, 99, 2, "state 0 holds buffer id 99, beyond the queue size"),  # the last's id
    (32 + 2, 9, 2, "state 0's descriptor list of 2 ends at state 9, but its last is 1"),
])
def test_a_hostile_packed_region_is_refused_naming_the_culprit(
        offset: int, value: int, size: int, culprit: str) -> None:
    memory, driver, device, tracker = packed_pair()
    driver.add_buf([(0x8000, 16)], [(0x9000, 8)], "x")  # type: ignore[attr-defined]
    pop_all(device, tracker, 1)
    hostile(tracker, offset, value, size)
    _, tracker2 = successor(memory, tracker)
    used, buffers = tracker2.recover()  # type: ignore[attr-defined]
    assert (used, buffers) == (0x8000, [])  # started afresh at the front-end's position
    assert any(culprit in p for p in tracker2.problems), tracker2.problems  # type: ignore[attr-defined]
    memory.close()


def test_a_region_changed_under_a_running_queue_fails_the_queue_naming_it(
        tmp_path: Path) -> None:
    """The front-end scribbles on the region while requests are in flight: completing them
    fails the queue (DEVICE_NEEDS_RESET) with a reason, nothing raises out of the device."""
    disk = PackedDisk(tmp_path, indirect=False)
    try:
        disk.write(0)
        disk.driver.kick_prepare()
        held = HoldingBackend(disk.image)
        device, ext = disk.device(held)
        device.kick(0)
        view = ext.queues[0].view  # type: ignore[union-attr]
        view[32 + 4 : 32 + 6] = (0xFFFF).to_bytes(2, "little")  # state 0's last
        held.finish(0)
        assert device.status & S.DEVICE_NEEDS_RESET
        assert any("inflight state 0 says its last state is 65535" in p
                   for p in device.problems), device.problems
        ext.close()
        held.close()
        device.close()
    finally:
        disk.close()


def test_random_packed_regions_never_escape_the_region_or_guest_memory() -> None:
    """Regions recorded by a real back-end, then scribbled on (ids, counters, lengths,
    links, addresses, flags: random bytes anywhere): recovery never raises, and what it
    resubmits is either served or breaks the queue with a reason; guest memory is only
    reached through its bounds-checked views."""
    import random

    from pyvirtio.ring import RingError

    rng = random.Random(11)
    memory, driver, device, tracker = packed_pair()
    for t in range(5):
        driver.add_buf([(0x8000 + 64 * t, 16), (0xA000, 100)],  # type: ignore[attr-defined]
                       [(0x9000 + 64 * t, 8)], t)
    pop_all(device, tracker, 5)
    view = tracker.view  # type: ignore[attr-defined]
    recorded = bytes(view)
    resumed = broken = afresh = 0
    for _ in range(3000):
        view[:] = recorded
        for _ in range(rng.randrange(1, 4)):
            view[rng.randrange(len(view))] = rng.randrange(256)
        device2, tracker2 = successor(memory, tracker)
        used, buffers = tracker2.recover()  # type: ignore[attr-defined]
        afresh += not buffers
        assert sum(len(d) for _, d in buffers) <= QSIZE
        try:
            device2.restore(used, buffers)  # type: ignore[attr-defined]
            for buf_id, _ in buffers:
                device2.resume(buf_id)  # type: ignore[attr-defined]
            resumed += 1
        except RingError as exc:
            assert "resubmitted" in str(exc), exc
            broken += 1
    assert resumed and broken and afresh  # every outcome was exercised
    memory.close()
