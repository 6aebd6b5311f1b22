"""A hostile vhost-user front-end against pyvirtio's back-end server.

One server child process (an entropy device with a small config space, 4 memory slots) takes
every abuse below. Each case asserts what the server said about it (the WARNING naming the
request and the problem) and what the front-end got back (a NACK, an empty reply, or a
closed connection); then a good front-end (our client and RngDriver) must still get entropy
from the same, still running, server process.
"""

from __future__ import annotations

import os
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from guest_helpers import HWRNG_BYTES, HWRNG_SCRIPT, WAIT, RingFeatures, check_hwrng

from peers import require_guest
from pyvirtio.guest import QemuGuest
from pyvirtio.guest.qemu import qemu_args
from pyvirtio.memory import GuestMemory, region_from_fd
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import split as SP
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.testing.server import ServerProcess
from pyvirtio.transport.vhost_user import codec as C
from vhost_user_helpers import TESTS_DIR, RawFrontend, memfd, read_entropy

pytestmark = pytest.mark.timeout(60)

MEM = 1 << 20
UOFF = 0x6000_0000_0000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("vhost-user-hostile")
    proc = ServerProcess(workdir / "vu.sock", "vhost_user_helpers:ConfigRngDevice",
                         pythonpath=[str(TESTS_DIR)], log_path=workdir / "server.log",
                         server_options={"max_mem_slots": 4})
    yield proc
    proc.stop()


@pytest.fixture
def path(server: ServerProcess) -> str:
    return server.path


class Log:
    """The server's log from the start of one test."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.start = len(server.log_text())

    def expect(self, pattern: str) -> str:
        m = self.server.wait_for_log(pattern, timeout=5, start=self.start)
        line_start = self.server.log_text().rfind("\n", 0, m.start()) + 1
        line_end = self.server.log_text().find("\n", m.end())
        return self.server.log_text()[line_start:line_end]


@pytest.fixture
def log(server: ServerProcess) -> Log:
    return Log(server)


@pytest.fixture(autouse=True)
def good_front_end_still_served(server: ServerProcess) -> Iterator[None]:
    """After every case: the same server process is alive and serves a good front-end."""
    yield
    assert server.alive(), server.log_text()[-3000:]
    data = read_entropy(server.path, 256)
    assert len(data) == 256 and data != bytes(256)
    assert server.alive()


def _ready(fe: RawFrontend) -> None:
    fe.handshake()


def _mem_table(fe: RawFrontend, size: int = MEM) -> int:
    fd = memfd(size)
    assert fe.ack(R.SET_MEM_TABLE, C.memory_table([C.MemoryRegionDesc(0, size, UOFF, 0)]),
                  [fd]) == 0
    return fd


def _warned(log: Log, request: str, problem: str) -> str:
    line = log.expect(rf"{request} refused: {problem}")
    assert "WARNING" in line
    return line


# ---- framing ----------------------------------------------------------------------------


def test_truncated_header(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send_raw(b"\x01\x00\x00\x00\x01")
    assert "WARNING" in log.expect(r"hung up mid-message \(5 of 12 header bytes\)")


def test_connection_closed_mid_payload(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send_raw(V.HEADER.pack(R.SET_MEM_TABLE, V.VERSION, 40) + b"\0" * 8)
    log.expect(r"hung up mid-message \(SET_MEM_TABLE with 8 of 40 payload bytes\)")


def test_payload_size_over_the_maximum(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send_raw(V.HEADER.pack(R.SET_CONFIG, V.VERSION, 1 << 20))
        assert fe.closed_by_peer()
    log.expect(r"SET_CONFIG: payload size 1048576 exceeds the maximum 268")


def test_wrong_version_bits(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send_raw(V.HEADER.pack(R.GET_FEATURES, 2, 0))
        assert fe.closed_by_peer()
    log.expect(r"GET_FEATURES: header flags 0x2 carry protocol version 2, not 1")


def test_garbage_bytes(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send_raw(b"\xde\xad\xbe\xef" * 64)
        assert fe.closed_by_peer()
    log.expect(r"unusable message stream: request 4022250974: header flags 0xefbeadde")


def test_reply_flag_set_by_the_front_end(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send(R.SET_OWNER, flags=V.VERSION | V.REPLY_FLAG | V.NEED_REPLY_FLAG)
        assert C.parse_u64(fe.recv().payload) == 1
    _warned(log, "SET_OWNER", r"the front-end set the REPLY flag on a request \(NACKed\)")


# ---- unknown and unsupported requests ------------------------------------------------------


def test_unknown_request_with_need_reply_is_nacked(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        assert fe.ack(99, b"\1" * 24) == 1
    _warned(log, "request 99", r"unknown request number 99 \(NACKed\)")


def test_unknown_request_without_need_reply_is_skipped_and_the_stream_stays_in_sync(
        path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.send(1234, b"\xff" * 100)
        reply = fe.call(R.GET_FEATURES, need_reply=False)
        assert reply.request == R.GET_FEATURES
    _warned(log, "request 1234", r"unknown request number 1234 \(ignored")


def test_request_of_a_protocol_feature_never_negotiated(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        reply = fe.call(R.GET_CONFIG, C.config(0, size=4), need_reply=False)
        assert reply.payload == b""  # GET_CONFIG's error form
    _warned(log, "GET_CONFIG", r"needs protocol feature CONFIG, which was not negotiated")


def test_supported_by_spec_but_not_by_this_back_end(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        assert fe.ack(R.SET_LOG_FD, fds=[os.eventfd(0)]) == 1
    _warned(log, "SET_LOG_FD", r"not supported by this back-end")


# ---- fds ---------------------------------------------------------------------------------------


def test_too_many_fds(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_CALL, C.vring_fd(0), [os.eventfd(0), os.eventfd(0)]) == 1
    _warned(log, "SET_VRING_CALL", r"carries 2 file descriptors, at most 1 allowed")


def test_more_fds_than_any_message_may_carry(path: str, log: Log) -> None:
    fds = [os.eventfd(0) for _ in range(20)]
    with RawFrontend(path) as fe:
        assert fe.ack(R.SET_OWNER, fds=fds) == 1
    for fd in fds:
        os.close(fd)
    _warned(log, "SET_OWNER", r"carries more file descriptors than the 8 a message may have")


def test_missing_fd(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0)) == 1
    _warned(log, "SET_VRING_KICK", r"carries 0 file descriptors, needs 1")


def test_fd_for_a_vring_message_with_the_no_fd_bit(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_CALL, C.vring_fd(0, nofd=True), [os.eventfd(0)]) == 1
    _warned(log, "SET_VRING_CALL", r"carries 1 file descriptors, at most 0 allowed")


# ---- memory table ------------------------------------------------------------------------------


def test_overlapping_memory_regions(path: str, log: Log) -> None:
    regions = [C.MemoryRegionDesc(0, 0x10000, UOFF, 0),
               C.MemoryRegionDesc(0x8000, 0x10000, UOFF + 0x100000, 0)]
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table(regions), [memfd(), memfd()]) == 1
    _warned(log, "SET_MEM_TABLE",
            r"region 0 \(gpa 0x0 \+0x10000\) overlaps region 1 \(gpa 0x8000 \+0x10000\)")


def test_overlapping_user_addresses(path: str, log: Log) -> None:
    regions = [C.MemoryRegionDesc(0, 0x10000, UOFF, 0),
               C.MemoryRegionDesc(0x100000, 0x10000, UOFF + 0x1000, 0)]
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table(regions), [memfd(), memfd()]) == 1
    _warned(log, "SET_MEM_TABLE", r"region 0 \(user 0x600000000000 \+0x10000\) overlaps "
                                  r"region 1 .* in the front-end's address space")


def test_zero_size_memory_region(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([C.MemoryRegionDesc(0, 0, UOFF, 0)]),
                      [memfd()]) == 1
    _warned(log, "SET_MEM_TABLE", r"region 0 \(gpa 0x0 size 0x0 .*\) has size 0")


def test_region_overflowing_64_bits(path: str, log: Log) -> None:
    region = C.MemoryRegionDesc((1 << 64) - 0x1000, 0x2000, UOFF, 0)
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([region]), [memfd()]) == 1
    _warned(log, "SET_MEM_TABLE", r"region 0: guest address 0xfffffffffffff000 \+ size "
                                  r"0x2000 overflows 64 bits")


def test_more_regions_than_a_table_holds(path: str, log: Log) -> None:
    regions = [C.MemoryRegionDesc(i << 20, 0x1000, UOFF + (i << 20), 0) for i in range(9)]
    payload = C.memory_table(regions)[: V.MEMORY_HEADER.size + 8 * 32]  # fits the maximum
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_MEM_TABLE, payload, [memfd(4096) for _ in range(8)]) == 1
    _warned(log, "SET_MEM_TABLE", r"memory table has 9 regions, more than the 8 allowed")


def test_more_regions_than_memory_slots(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        for i in range(4):
            desc = C.MemoryRegionDesc(i << 20, 0x1000, UOFF + (i << 20), 0)
            assert fe.ack(R.ADD_MEM_REG, C.mem_reg(desc), [memfd(4096)]) == 0
        desc = C.MemoryRegionDesc(4 << 20, 0x1000, UOFF + (4 << 20), 0)
        assert fe.ack(R.ADD_MEM_REG, C.mem_reg(desc), [memfd(4096)]) == 1
    _warned(log, "ADD_MEM_REG", r"all 4 memory slots are in use")


def test_mmap_offset_beyond_the_fd_size(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        region = C.MemoryRegionDesc(0, 0x1000, UOFF, 0x10000)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([region]), [memfd(4096)]) == 1
    _warned(log, "SET_MEM_TABLE", r"region 0: mmap offset 0x10000 \+ size 0x1000 runs past "
                                  r"the end of its 4096-byte file")


@pytest.mark.parametrize("kind", ["pipe", "socket", "eventfd", "directory"])
def test_memory_fd_that_is_not_mappable_memory(path: str, log: Log, kind: str) -> None:
    keep: list[object] = []
    if kind == "pipe":
        fd, w = os.pipe()
        keep.append(w)
    elif kind == "socket":
        a, b = socket.socketpair()
        fd = a.detach()
        keep.append(b)
    elif kind == "eventfd":
        fd = os.eventfd(0)
    else:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    with RawFrontend(path) as fe:
        _ready(fe)
        region = C.MemoryRegionDesc(0, 0x1000, UOFF, 0)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([region]), [fd]) == 1
    os.close(fd)
    expected = {"pipe": "pipe", "socket": "socket", "eventfd": "special file",
                "directory": "directory"}[kind]
    _warned(log, "SET_MEM_TABLE", rf"region 0: its fd is a {expected}.*not a mappable memory")


def test_remove_unknown_memory_region(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        desc = C.MemoryRegionDesc(0x4000_0000, 0x1000, UOFF, 0)
        assert fe.ack(R.REM_MEM_REG, C.mem_reg(desc)) == 1
    _warned(log, "REM_MEM_REG", r"no memory region matches gpa 0x40000000 size 0x1000")


# ---- vrings ------------------------------------------------------------------------------------

VRING_MESSAGES = {
    "SET_VRING_NUM": (R.SET_VRING_NUM, C.vring_state(5, 8), 0),
    "SET_VRING_ADDR": (R.SET_VRING_ADDR, C.vring_addr(5, UOFF, UOFF + 0x2000, UOFF + 0x1000), 0),
    "SET_VRING_BASE": (R.SET_VRING_BASE, C.vring_state(5, 0), 0),
    "SET_VRING_KICK": (R.SET_VRING_KICK, C.vring_fd(5), 1),
    "SET_VRING_CALL": (R.SET_VRING_CALL, C.vring_fd(5), 1),
    "SET_VRING_ERR": (R.SET_VRING_ERR, C.vring_fd(5), 1),
    "SET_VRING_ENABLE": (R.SET_VRING_ENABLE, C.vring_state(5, 1), 0),
}


@pytest.mark.parametrize("name", list(VRING_MESSAGES))
def test_vring_index_out_of_range(path: str, log: Log, name: str) -> None:
    req, payload, nfds = VRING_MESSAGES[name]
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        assert fe.ack(req, payload, [os.eventfd(0) for _ in range(nfds)]) == 1
    _warned(log, name, r"vring 5 does not exist \(the device has 1 queue\)")


def test_get_vring_base_of_a_missing_vring_closes_the_connection(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        fe.send(R.GET_VRING_BASE, C.vring_state(9, 0))
        assert fe.closed_by_peer()
    line = _warned(log, "GET_VRING_BASE", r"vring 9 does not exist")
    assert "closing the connection" in line


def test_ring_addresses_outside_memory(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        outside = UOFF + MEM - 0x10  # the descriptor table would run past the end
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, outside, UOFF + 0x2000,
                                                     UOFF + 0x1000)) == 1
    _warned(log, "SET_VRING_ADDR", r"vring 0 descriptor table at user address "
                                   r"0x6000000ffff0 \+128 is outside guest memory")


def test_ring_addresses_before_any_memory_table(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000)) == 1
    _warned(log, "SET_VRING_ADDR", r"vring 0 addresses sent before any memory table")


def test_kick_before_memory_table(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [os.eventfd(0)]) == 1
    _warned(log, "SET_VRING_KICK", r"vring 0 kicked before any memory table")


@pytest.mark.parametrize(("num", "problem"), [
    (100, r"size 100 is not a power of two in 1..32768"),
    (0, r"size 0 is not a power of two"),
    (65536, r"size 65536 is not a power of two"),
    (512, r"size 512 exceeds the device's maximum 256"),
])
def test_bad_queue_sizes(path: str, log: Log, num: int, problem: str) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, num)) == 1
    _warned(log, "SET_VRING_NUM", rf"vring 0 {problem}")


def test_vring_base_beyond_16_bits(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_BASE, C.vring_state(0, 65536)) == 1
    _warned(log, "SET_VRING_BASE", r"vring 0 base 65536 does not fit the 16-bit avail index")


def test_vring_enable_with_a_value_other_than_0_or_1(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_ENABLE, C.vring_state(0, 7)) == 1
    _warned(log, "SET_VRING_ENABLE", r"vring 0 enable value 7 is neither 0 nor 1")


def test_vring_fd_payload_with_reserved_bits(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_CALL, C.u64(0x200), [os.eventfd(0)]) == 1
    _warned(log, "SET_VRING_CALL", r"payload 0x200 sets reserved bits")


def test_payload_of_the_wrong_size_for_its_request(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_VRING_NUM, b"\0" * 4) == 1
    _warned(log, "SET_VRING_NUM", r"payload is 4 bytes, expected 8")


def test_kick_fd_that_cannot_be_polled(path: str, log: Log, tmp_path: Path) -> None:
    regular = tmp_path / "file"
    regular.write_bytes(b"x" * 8)
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000)) == 0
        fd = os.open(regular, os.O_RDONLY)
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [fd]) == 1
        os.close(fd)
    _warned(log, "SET_VRING_KICK", r"vring 0 kick fd cannot be watched")


def test_kick_fd_that_hangs_up(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000)) == 0
        r, w = os.pipe()
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [r]) == 0
        os.close(r)
        os.close(w)  # the server now reads end-of-file from its kick fd
        log.expect(r"vring 0 kick fd reached end of file; no longer watched")
        assert fe.call(R.GET_FEATURES, need_reply=False).request == R.GET_FEATURES


def test_hostile_descriptor_breaks_the_ring_and_signals_the_err_fd(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        fd = _mem_table(fe)
        memory = GuestMemory([region_from_fd(os.dup(fd), 0, MEM, 0)])
        alloc = Allocator(0, MEM)
        q = DriverQueue(memory, 8, alloc.alloc(SP.desc_table_size(8), 16),
                        alloc.alloc(SP.avail_size(8), 2), alloc.alloc(SP.used_size(8), 4))
        features = C.parse_u64(fe.call(R.GET_FEATURES, need_reply=False).payload)
        assert fe.ack(R.SET_FEATURES, C.u64(features & (F.bit(F.VERSION_1) | F.bit(30)))) == 0
        kick, err = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, q.desc_addr + UOFF, q.used_addr + UOFF,
                                                     q.avail_addr + UOFF)) == 0
        assert fe.ack(R.SET_VRING_ERR, C.vring_fd(0), [err]) == 0
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [kick]) == 0
        assert fe.ack(R.SET_VRING_ENABLE, C.vring_state(0, 1)) == 0
        q.add_buf([], [(0xDEAD_0000, 4096)], token=1)  # far outside the 1 MiB of memory
        q.kick_prepare()
        os.eventfd_write(kick, 1)
        ready, _, _ = select.select([err], [], [], 5)
        assert ready and os.eventfd_read(err) == 1
        assert q.get_buf() is None
        memory.close()
    line = log.expect(r"vring 0 broken: .*0xdead0000")
    assert "WARNING" in line


# ---- config space ------------------------------------------------------------------------------


def test_get_config_beyond_the_config_size(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.call(R.GET_CONFIG, C.config(4, size=8), need_reply=False).payload == b""
        good = fe.call(R.GET_CONFIG, C.config(0, size=8), need_reply=False)
        assert C.parse_config(good.payload).data[:4] == b"PVIO"
    _warned(log, "GET_CONFIG", r"rng: config read at offset 4 \+8 is outside the 8-byte "
                               r"config space \(answered with an empty config payload\)")


def test_set_config_of_a_read_only_field(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_CONFIG, C.config(0, b"EVIL")) == 1
        assert fe.ack(R.SET_CONFIG, C.config(4, b"ok")) == 0  # the writable field is
        reply = fe.call(R.GET_CONFIG, C.config(0, size=8), need_reply=False)
        assert C.parse_config(reply.payload).data == b"PVIOokok"
    _warned(log, "SET_CONFIG", r"rng: config offset 0 \(\+4\) is read-only")


def test_config_payload_shorter_than_announced(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_CONFIG, V.CONFIG_HEADER.pack(4, 2, 0) + b"x") == 1
    _warned(log, "SET_CONFIG", r"payload is 13 bytes, a 2-byte config access needs 14")


def test_features_that_were_never_offered(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(R.SET_FEATURES, C.u64(F.bit(F.VERSION_1) | F.bit(3))) == 1
    _warned(log, "SET_FEATURES", r"acks feature bits that were not offered: bit 3")


def test_front_end_that_never_reads_its_replies(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fe.sock.setblocking(False)
        request = C.request(R.GET_FEATURES).encode() * 256
        sent = 0
        try:
            while sent < 64 << 20:
                sent += fe.sock.send(request)
        except BlockingIOError:
            pass  # the server stopped reading: backpressure, not unbounded buffering
        assert sent < 64 << 20
    log.expect(r"connection closed")


def test_log_lines_name_the_request_and_the_problem(path: str, log: Log,
                                                    server: ServerProcess) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        assert fe.ack(77) == 1
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(3, 8)) == 1
        assert fe.ack(R.SET_VRING_BASE, b"\0") == 1
    log.expect(r"SET_VRING_BASE refused")
    refusals = [line for line in server.log_text()[log.start:].splitlines()
                if " refused: " in line and "pyvirtio.vhost_user.backend" in line]
    assert len(refusals) == 3
    for line in refusals:
        assert re.search(r"WARNING pyvirtio\.vhost_user\.backend: vhost-user\[\d+\] rng: "
                         r"([A-Z_]+|request \d+) refused: \S.* \(NACKed\)$", line), line


# ---- and then a real guest ---------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("ring_on", [True, False], ids=["ring-features-on", "ring-features-off"])
def test_after_the_abuse_the_same_server_process_feeds_a_real_qemu_guest(
        server: ServerProcess, ring_on: bool) -> None:
    """Runs last: the server process that took every case above serves QEMU 7.2's
    vhost-user-rng-pci, and the guest's kernel reads 64 KiB from /dev/hwrng."""
    require_guest("qemu")
    # The previous check's front-end may still be logging its goodbye: let it finish, so
    # that every line from here on is about the guest.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = server.log_text()
        if text.count("front-end connected") == text.count("connection closed"):
            break
        time.sleep(0.02)
    log = Log(server)
    ring = RingFeatures(ring_on)  # the server offers both; QEMU is told to turn them off
    pid = server.pid
    args = qemu_args(server.path, ids.RNG, extra=ring.qemu_device_props)
    result = QemuGuest(HWRNG_SCRIPT, extra_args=args, timeout=WAIT).run()
    assert result.ok, result.describe()
    check_hwrng(result.results, ring)
    assert result.results["hwrng_bytes"] == str(HWRNG_BYTES)
    assert server.alive() and server.pid == pid
    features = re.search(r"rng: features (\S+)", log.expect(r"rng: features \S+"))
    assert features is not None
    names = set(features.group(1).split("|"))
    assert "VERSION_1" in names
    assert ("EVENT_IDX" in names) == ring_on and ("INDIRECT_DESC" in names) == ring_on
    stopped = re.search(r"last_avail_idx (\d+)", log.expect(r"vring 0 stopped at last_avail_idx"))
    assert stopped is not None
    # Every buffer virtio_rng posts is 64 bytes: the guest's 64 KiB took at least 1024.
    assert int(stopped.group(1)) >= HWRNG_BYTES // 64
    log.expect(r"connection closed: front-end disconnected")
