"""A hostile vhost-user front-end against pyvirtio's back-end server.

One server child process (an entropy device with a small config space, 4 memory slots) takes
every abuse below. Each case asserts what the server said about it (the WARNING naming the
request and the problem) and what the front-end got back (a NACK, an empty reply, or a
closed connection); then a good front-end (our client and RngDriver) must still get entropy
from the same, still running, server process.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.guests import HWRNG_BYTES, HWRNG_SCRIPT, WAIT, RingFeatures, check_hwrng
from helpers.paths import TESTS
from helpers.vhost_user import RawFrontend, memfd, read_entropy
from peers import require_guest
from pyvirtio.guest import QemuGuest
from pyvirtio.guest.qemu import qemu_args
from pyvirtio.io import unixsock
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

pytestmark = pytest.mark.timeout(60)

MEM = 1 << 20
UOFF = 0x6000_0000_0000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("vhost-user-hostile")
    proc = ServerProcess(workdir / "vu.sock", "helpers.vhost_user:ConfigRngDevice",
                         pythonpath=[TESTS], log_path=workdir / "server.log",
                         server_options={"max_mem_slots": 4, "max_connections": 2})
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


def wait_all_closed(server: ServerProcess, timeout: float = 10.0) -> None:
    """Until every connection the server accepted is closed (counted in its log)."""
    deadline = time.monotonic() + timeout
    while True:
        text = server.log_text()
        if text.count("front-end connected") == text.count("connection closed"):
            return
        assert time.monotonic() < deadline, "the server still has a connection open"
        time.sleep(0.02)


def _fd_table(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def server_fds(server: ServerProcess) -> dict[int, str]:
    """The server process's open fds once it has no connection left (the "connection
    closed" line comes first, the release right after it: wait until the table is steady)."""
    wait_all_closed(server)
    table = _fd_table(server.pid)
    while True:
        time.sleep(0.1)
        again = _fd_table(server.pid)
        if again == table:
            return table
        table = again


def server_fds_back_to(server: ServerProcess, before: dict[int, str],
                       timeout: float = 5.0) -> None:
    """Every fd a finished connection brought to the server is closed."""
    wait_all_closed(server)
    deadline = time.monotonic() + timeout
    while (after := _fd_table(server.pid)) != before:
        assert time.monotonic() < deadline, \
            f"fds left open: {set(after.items()) - set(before.items())}"
        time.sleep(0.02)


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


#: requests that take no fd: (request, a payload that is otherwise valid, what a refusal
#: looks like: "ack" a NACK, "empty" GET_CONFIG's empty reply, "close" the connection closed
#: because the reply has no error form)
NO_FD_REQUESTS = {
    "GET_FEATURES": (R.GET_FEATURES, b"", "close"),
    "SET_FEATURES": (R.SET_FEATURES, C.u64(F.bit(F.VERSION_1)), "ack"),
    "SET_OWNER": (R.SET_OWNER, b"", "ack"),
    "RESET_OWNER": (R.RESET_OWNER, b"", "ack"),
    "GET_PROTOCOL_FEATURES": (R.GET_PROTOCOL_FEATURES, b"", "close"),
    "SET_PROTOCOL_FEATURES": (R.SET_PROTOCOL_FEATURES, C.u64(0), "ack"),
    "GET_QUEUE_NUM": (R.GET_QUEUE_NUM, b"", "close"),
    "SET_VRING_NUM": (R.SET_VRING_NUM, C.vring_state(0, 8), "ack"),
    "SET_VRING_ADDR": (R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000),
                       "ack"),
    "SET_VRING_BASE": (R.SET_VRING_BASE, C.vring_state(0, 0), "ack"),
    "GET_VRING_BASE": (R.GET_VRING_BASE, C.vring_state(0, 0), "close"),
    "SET_VRING_ENABLE": (R.SET_VRING_ENABLE, C.vring_state(0, 1), "ack"),
    "GET_CONFIG": (R.GET_CONFIG, C.config(0, size=4), "empty"),
    "SET_CONFIG": (R.SET_CONFIG, C.config(4, b"ok"), "ack"),
    "RESET_DEVICE": (R.RESET_DEVICE, b"", "ack"),
    "GET_MAX_MEM_SLOTS": (R.GET_MAX_MEM_SLOTS, b"", "close"),
    "SET_STATUS": (R.SET_STATUS, C.u64(1), "ack"),
    "GET_STATUS": (R.GET_STATUS, b"", "close"),
}


@pytest.mark.parametrize("name", list(NO_FD_REQUESTS))
def test_fds_attached_to_a_request_that_takes_none(path: str, log: Log, server: ServerProcess,
                                                   name: str) -> None:
    req, payload, refusal = NO_FD_REQUESTS[name]
    before = server_fds(server)
    with RawFrontend(path) as fe:
        _ready(fe)
        fds = [os.eventfd(0), memfd(4096)]
        if refusal == "ack":
            assert fe.ack(req, payload, fds) == 1
        elif refusal == "empty":
            assert fe.call(req, payload, fds, need_reply=False).payload == b""
        else:
            fe.send(req, payload, fds)
            assert fe.closed_by_peer()
        unixsock.close_fds(fds)
    line = _warned(log, name, r"carries 2 file descriptors, at most 0 allowed")
    assert ("closing the connection" in line) == (refusal == "close")
    server_fds_back_to(server, before)  # the fds it refused were closed, not kept


#: requests that need a protocol feature: (request, payload, fds, the feature, refusal kind)
GATED_REQUESTS = {
    "ADD_MEM_REG": (R.ADD_MEM_REG, C.mem_reg(C.MemoryRegionDesc(0, 0x1000, UOFF, 0)), 1,
                    "CONFIGURE_MEM_SLOTS", "ack"),
    "GET_MAX_MEM_SLOTS": (R.GET_MAX_MEM_SLOTS, b"", 0, "CONFIGURE_MEM_SLOTS", "close"),
    "SET_STATUS": (R.SET_STATUS, C.u64(1), 0, "STATUS", "ack"),
    "SET_BACKEND_REQ_FD": (R.SET_BACKEND_REQ_FD, b"", 1, "BACKEND_REQ", "ack"),
    "RESET_DEVICE": (R.RESET_DEVICE, b"", 0, "RESET_DEVICE", "ack"),
    "VRING_KICK": (R.VRING_KICK, C.vring_state(0, 0), 0, "INBAND_NOTIFICATIONS", "ack"),
    "SET_INFLIGHT_FD": (R.SET_INFLIGHT_FD, bytes(V.INFLIGHT.size), 1, "INFLIGHT_SHMFD", "ack"),
    "GET_INFLIGHT_FD": (R.GET_INFLIGHT_FD, bytes(V.INFLIGHT.size), 0, "INFLIGHT_SHMFD",
                        "close"),
    "SET_LOG_BASE": (R.SET_LOG_BASE, bytes(V.LOG.size), 1, "LOG_SHMFD", "ack"),
}


@pytest.mark.parametrize("name", list(GATED_REQUESTS))
def test_request_whose_protocol_feature_was_not_negotiated(path: str, log: Log,
                                                          name: str) -> None:
    req, payload, nfds, feature, refusal = GATED_REQUESTS[name]
    with RawFrontend(path) as fe:
        fe.handshake(V.protocol_mask(V.ProtocolFeature.REPLY_ACK))
        fds = [memfd(4096) for _ in range(nfds)]
        if refusal == "ack":
            assert fe.ack(req, payload, fds) == 1
        else:
            fe.send(req, payload, fds)
            assert fe.closed_by_peer()
        unixsock.close_fds(fds)
    _warned(log, name, rf"needs protocol feature {feature}, which was not negotiated")


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


def test_memory_region_larger_than_its_fd(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        region = C.MemoryRegionDesc(0, 0x10000, UOFF, 0)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([region]), [memfd(4096)]) == 1
        assert fe.ack(R.ADD_MEM_REG, C.mem_reg(region), [memfd(0x8000)]) == 1
    _warned(log, "SET_MEM_TABLE", r"region 0: mmap offset 0x0 \+ size 0x10000 runs past the "
                                  r"end of its 4096-byte file")
    _warned(log, "ADD_MEM_REG", r"new region: mmap offset 0x0 \+ size 0x10000 runs past the "
                                r"end of its 32768-byte file")


def test_sealable_memory_cannot_shrink_under_the_server(path: str, log: Log) -> None:
    """A shrunk file would make the server's accesses fault (SIGBUS): a memfd that allows
    sealing is sealed against shrinking when mapped, so the front-end cannot shrink it."""
    fd = os.memfd_create("hostile-sealable", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, MEM)
    with RawFrontend(path) as fe:
        _ready(fe)
        region = C.MemoryRegionDesc(0, MEM, UOFF, 0)
        assert fe.ack(R.SET_MEM_TABLE, C.memory_table([region]), [fd]) == 0
        with pytest.raises(PermissionError):
            os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == MEM
    os.close(fd)
    log.expect(r"memory table: gpa 0x0 size 0x100000")


def test_unsealable_memory_shrunk_under_the_server(path: str, log: Log,
                                                  server: ServerProcess) -> None:
    """A file that cannot be sealed (a memfd without MFD_ALLOW_SEALING; UML's tmpfs file)
    is shrunk by the front-end after the server mapped it and started a ring in it. The
    server's next look at the ring touches pages past the end of the file: the SIGBUS that
    would kill the process is survived, the rings stop, the log says why."""
    pid = server.pid
    with RawFrontend(path) as fe:
        _ready(fe)
        fd = _mem_table(fe)  # os.memfd_create without MFD_ALLOW_SEALING
        assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
        assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000)) == 0
        kick = os.eventfd(0)
        assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [kick]) == 0
        assert fe.ack(R.SET_VRING_ENABLE, C.vring_state(0, 1)) == 0
        log.expect(r"vring 0 started")
        os.ftruncate(fd, 0)  # not refused: nothing sealed it
        os.eventfd_write(kick, 1)
        line = log.expect(r"memory region gpa 0x0 size 0x100000: its file shrank under the "
                          r"mapping \(the front-end truncated it\)")
        assert "WARNING" in line
        log.expect(r"vring 0 stopped: its guest memory was truncated")
        assert fe.call(R.GET_FEATURES, need_reply=False).request == R.GET_FEATURES
        os.close(kick)
        os.close(fd)
    assert server.alive() and server.pid == pid


def test_add_mem_reg_of_size_zero(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        desc = C.MemoryRegionDesc(0, 0, UOFF, 0)
        assert fe.ack(R.ADD_MEM_REG, C.mem_reg(desc), [memfd(4096)]) == 1
    _warned(log, "ADD_MEM_REG", r"new region \(gpa 0x0 size 0x0 .*\) has size 0")


def test_add_mem_reg_overlapping_an_existing_region(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        desc = C.MemoryRegionDesc(0x8000, 0x1000, UOFF + (16 << 20), 0)
        assert fe.ack(R.ADD_MEM_REG, C.mem_reg(desc), [memfd(4096)]) == 1
    _warned(log, "ADD_MEM_REG", r"new region \(gpa 0x8000 \+0x1000\) overlaps existing region "
                                r"at gpa 0x0")


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

def _vring_message(name: str, index: int) -> tuple[int, bytes, int]:
    """Request, payload naming vring ``index``, and the number of fds it takes."""
    return {
        "SET_VRING_NUM": (R.SET_VRING_NUM, C.vring_state(index, 8), 0),
        "SET_VRING_ADDR": (R.SET_VRING_ADDR,
                           C.vring_addr(index, UOFF, UOFF + 0x2000, UOFF + 0x1000), 0),
        "SET_VRING_BASE": (R.SET_VRING_BASE, C.vring_state(index, 0), 0),
        "SET_VRING_KICK": (R.SET_VRING_KICK, C.vring_fd(index), 1),
        "SET_VRING_CALL": (R.SET_VRING_CALL, C.vring_fd(index), 1),
        "SET_VRING_ERR": (R.SET_VRING_ERR, C.vring_fd(index), 1),
        "SET_VRING_ENABLE": (R.SET_VRING_ENABLE, C.vring_state(index, 1), 0),
    }[name]


VRING_MESSAGES = ["SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE", "SET_VRING_KICK",
                  "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_ENABLE"]
#: the index field of the three fd messages is 8 bits wide; the others have 32
FD_VRING_MESSAGES = {"SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR"}


@pytest.mark.parametrize(("name", "index"), [
    (name, index) for name in VRING_MESSAGES for index in (5, 255, 0xFFFF_FFFF)
    if name not in FD_VRING_MESSAGES or index <= V.VRING_IDX_MASK])
def test_vring_index_out_of_range(path: str, log: Log, server: ServerProcess, name: str,
                                  index: int) -> None:
    req, payload, nfds = _vring_message(name, index)
    before = server_fds(server)
    with RawFrontend(path) as fe:
        _ready(fe)
        _mem_table(fe)
        fds = [os.eventfd(0) for _ in range(nfds)]
        assert fe.ack(req, payload, fds) == 1
        unixsock.close_fds(fds)
    _warned(log, name, rf"vring {index} does not exist \(the device has 1 queue\)")
    server_fds_back_to(server, before)


@pytest.mark.parametrize("index", [1, 255, 0xFFFF_FFFF])
def test_get_vring_base_of_a_missing_vring_closes_the_connection(path: str, log: Log,
                                                                index: int) -> None:
    with RawFrontend(path) as fe:
        _ready(fe)
        fe.send(R.GET_VRING_BASE, C.vring_state(index, 0))
        assert fe.closed_by_peer()
    line = _warned(log, "GET_VRING_BASE", rf"vring {index} does not exist")
    assert "closing the connection" in line


def _running_ring(fe: RawFrontend, log: Log) -> tuple[int, int]:
    """Vring 0 started and enabled in a fresh 1 MiB memory table: (memory fd, kick fd)."""
    _ready(fe)
    fd = _mem_table(fe)
    assert fe.ack(R.SET_VRING_NUM, C.vring_state(0, 8)) == 0
    assert fe.ack(R.SET_VRING_ADDR, C.vring_addr(0, UOFF, UOFF + 0x2000, UOFF + 0x1000)) == 0
    kick = os.eventfd(0)
    assert fe.ack(R.SET_VRING_KICK, C.vring_fd(0), [kick]) == 0
    assert fe.ack(R.SET_VRING_ENABLE, C.vring_state(0, 1)) == 0
    log.expect(r"vring 0 started")
    return fd, kick


@pytest.mark.parametrize(("name", "payload", "what"), [
    ("SET_VRING_NUM", C.vring_state(0, 4), "size"),
    ("SET_VRING_ADDR", C.vring_addr(0, UOFF + 0x4000, UOFF + 0x6000, UOFF + 0x5000),
     "addresses"),
    ("SET_VRING_BASE", C.vring_state(0, 3), "base"),
])
def test_changing_a_running_ring(path: str, log: Log, name: str, payload: bytes,
                                 what: str) -> None:
    with RawFrontend(path) as fe:
        fds = _running_ring(fe, log)
        assert fe.ack(getattr(R, name), payload) == 1
        unixsock.close_fds(fds)
    _warned(log, name, rf"vring 0 is running; its {what} cannot change")


def test_memory_removed_under_a_running_ring(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        fds = _running_ring(fe, log)
        desc = C.MemoryRegionDesc(0, MEM, UOFF, 0)
        assert fe.ack(R.REM_MEM_REG, C.mem_reg(desc)) == 0  # legal, but the ring was there
        line = log.expect(r"vring 0 memory change left it outside guest memory")
        assert "WARNING" in line
        log.expect(r"vring 0 stopped at last_avail_idx 0")
        reply = fe.call(R.GET_VRING_BASE, C.vring_state(0, 0), need_reply=False)
        assert C.parse_vring_state(reply.payload) == C.VringState(0, 0)
        unixsock.close_fds(fds)


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


def test_a_front_end_that_never_reads_does_not_stall_the_others(path: str, log: Log) -> None:
    """The server stops reading a front-end whose replies pile up (backpressure) but goes on
    serving every other connection meanwhile."""
    with RawFrontend(path) as hog:
        hog.sock.setblocking(False)
        request = C.request(R.GET_FEATURES).encode() * 256
        sent = 0
        try:
            while sent < 64 << 20:
                sent += hog.sock.send(request)
        except BlockingIOError:
            pass
        assert sent < 64 << 20
        data = read_entropy(path, 256)  # while the hog is still connected, unread
        assert len(data) == 256 and data != bytes(256)
    log.expect(r"connection closed")


def _trickle(fe: RawFrontend, data: bytes, fds: list[int], fd_at: int = 0) -> None:
    """Send ``data`` one byte per send, the fds with byte ``fd_at``."""
    for i in range(len(data)):
        fe.send_raw(data[i : i + 1], fds if i == fd_at else ())


def test_messages_split_into_single_bytes(path: str, log: Log) -> None:
    with RawFrontend(path) as fe:
        _trickle(fe, C.request(R.SET_OWNER).encode(), [])
        _trickle(fe, C.request(R.GET_FEATURES).encode(), [])
        assert fe.recv().request == R.GET_FEATURES
        _trickle(fe, C.request(R.SET_PROTOCOL_FEATURES, C.u64(
            V.protocol_mask(V.ProtocolFeature.REPLY_ACK))).encode(), [])
        table = C.memory_table([C.MemoryRegionDesc(0, MEM, UOFF, 0)])
        fd = memfd(MEM)
        _trickle(fe, C.request(R.SET_MEM_TABLE, table, need_reply=True).encode(), [fd])
        assert C.parse_u64(fe.recv().payload) == 0
        os.close(fd)
        # The fd may come with any byte of its message (here the payload's last).
        call = os.eventfd(0)
        msg = C.request(R.SET_VRING_CALL, C.vring_fd(0), need_reply=True).encode()
        _trickle(fe, msg, [call], fd_at=len(msg) - 1)
        assert C.parse_u64(fe.recv().payload) == 0
        os.close(call)
    log.expect(r"memory table: gpa 0x0 size 0x100000")
    log.expect(r"<- SET_VRING_CALL flags=0x9 size=8 fds=1 vring 0")


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
    wait_all_closed(server)
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
