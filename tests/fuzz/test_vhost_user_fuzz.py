"""Stateful fuzzing of the vhost-user back-end: a hypothesis state machine is a hostile
front-end talking to a real :class:`VhostUserServer` (its :class:`BackendProtocol` behind it)
over a unix socket.

Every step sends one message (or one short valid sequence) with valid or invalid payloads
and fds: memfds of several sizes, eventfds, pipes, sockets, /dev/null, directories, too few
or too many. The rules interleave with a real driver queue the machine keeps in its own
memfd, so kicks, used buffers and broken rings happen between the abuse.

What must hold, at every step and for every connection:

* every reply is the reply to the request just sent (a NEED_REPLY request or one whose reply
  has a value gets exactly one; nothing else gets any), or the server closed the connection
  for a reason it logged; no internal error is ever logged (``log.exception`` of the
  server's catch-all counts as an uncaught exception);
* the server thread keeps running;
* after each connection closes, the process's fd count (/proc/self/fd, the front-end's and
  the server's fds together) is back to its baseline.

CI runs at least :data:`CI_MESSAGES` messages; ``PYVIRTIO_SOAK=1`` (or a seed) runs
:data:`SOAK_MESSAGES`. The last test has the same server, after all that, feed a real QEMU
guest's /dev/hwrng.
"""

from __future__ import annotations

import gc
import logging
import mmap
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from helpers.vhost_user import ConfigRngDevice, RawFrontend, memfd
from peers import require_guest
from pyvirtio.errors import PeerError
from pyvirtio.guest import QemuGuest
from pyvirtio.guest.qemu import qemu_args
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.memory import GuestMemory, buffer_region, sigbus
from pyvirtio.ring import DriverQueue, RingError
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.testing.guests import HWRNG_BYTES, hwrng_script
from pyvirtio.testing.server import ServerThread
from pyvirtio.transport.vhost_user import codec as C

PHASES = [Phase.generate] if os.environ.get("PYVIRTIO_FUZZ_NOSHRINK") else list(Phase)
CI_MESSAGES = int(os.environ.get("PYVIRTIO_FUZZ_MESSAGES", 50_000))
SOAK_MESSAGES = 1_000_000

MEM = 64 << 10  # the machine's own guest memory (one memfd, mapped on both sides)
UOFF = 0x7000_0000_0000
QSIZE = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # ring areas in that memory
BUFS = 0x4000  # buffers from here on


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_table() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


class ErrorRecords(logging.Handler):
    """Every ERROR (or worse) record of pyvirtio's loggers: the server's catch-all logs an
    unexpected exception with log.exception."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Fuzzed:
    """The server under test and what the machines report back to the test."""

    def __init__(self, path: Path) -> None:
        self.server = VhostUserServer(path, ConfigRngDevice, max_mem_slots=4)
        self.thread = ServerThread(self.server)
        self.errors = ErrorRecords()
        self.messages = 0
        self.history: list[str] = []  # the current connection's messages, for failures
        self.connections = 0
        self.closed_by_server = 0
        self.gc_rescues: list[str] = []  # connections whose fds only the collector freed
        self.baseline = fd_count()
        self.baseline_fds = fd_table()

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Until the server has closed every connection (it notices the hang-up)."""
        deadline = time.monotonic() + timeout
        while self.server.connections or self.server.accepted < self.connections:
            if time.monotonic() > deadline:
                raise AssertionError(f"server still has {len(self.server.connections)} "
                                     "connection(s) open")
            time.sleep(0.001)

    def check_fds(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while fd_count() != self.baseline:
            if time.monotonic() > deadline:
                gc.collect()
                if fd_count() == self.baseline:
                    # Held by a reference cycle (views of an mmap in a traceback...), freed
                    # by the collector: counted and reported, not a leak.
                    self.gc_rescues.append("\n  ".join(self.history[-40:]))
                    return
                leaked = set(fd_table().items()) - set(self.baseline_fds.items())
                # Close them, so that the next example starts clean and hypothesis can
                # shrink to the sequence that leaks.
                for fd, _ in leaked:
                    os.close(fd)
                steps = "\n  ".join(self.history[-40:])
                raise AssertionError(f"{len(leaked)} fds leaked by a connection: {leaked}\n"
                                     f"its last messages:\n  {steps}")
            time.sleep(0.002)

    def check_alive(self) -> None:
        assert self.thread.thread.is_alive(), self.thread.error
        assert not self.errors.records, [r.getMessage() for r in self.errors.records]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    path = tmp_path_factory.mktemp("vu-fuzz") / "vu.sock"
    pv = logging.getLogger("pyvirtio")
    level = pv.level
    # Refusals are WARNINGs: tens of thousands of them would only slow the fuzzing down.
    pv.setLevel(logging.ERROR)
    f = Fuzzed(path)
    pv.addHandler(f.errors)
    try:
        yield f
    finally:
        pv.removeHandler(f.errors)
        pv.setLevel(level)
        f.thread.stop()


# ---- strategies --------------------------------------------------------------------------

FD_KINDS = ["eventfd", "memfd0", "memfd4k", "memfd64k", "memfd1m", "pipe", "socket",
            "devnull", "directory"]
fd_kinds = st.lists(st.sampled_from(FD_KINDS), max_size=3) | st.lists(
    st.sampled_from(FD_KINDS), min_size=4, max_size=12)

u64s = st.sampled_from([0, 1, 2, 0xFF, 0x100, 0x1FF, 1 << 32, 1 << 63, (1 << 64) - 1]) | \
    st.integers(0, (1 << 64) - 1)
u32s = st.sampled_from([0, 1, 2, 3, 255, 256, 0xFFFF, 0x10000, 0xFFFF_FFFF]) | \
    st.integers(0, 0xFFFF_FFFF)
indexes = st.sampled_from([0, 0, 0, 1, 2, 255]) | st.integers(0, 0xFFFF_FFFF)
sizes = st.sampled_from([0, 1, 0x1000, 0x10000, MEM, 0x100000, 1 << 63, (1 << 64) - 0x1000])
addrs = st.sampled_from([0, 0x1000, 0x8000, 0x10000, UOFF, UOFF + 0x1000, (1 << 64) - 0x1000])
regions = st.builds(C.MemoryRegionDesc, addrs, sizes, addrs,
                    st.sampled_from([0, 0x800, 0x1000, 0x10000, 1 << 40]))
#: the requests the spec defines, and some it does not
requests = st.sampled_from(list(R)) | st.integers(0, 60) | st.integers(0, 0xFFFF_FFFF)
flag_values = st.sampled_from([V.VERSION, V.VERSION | V.NEED_REPLY_FLAG,
                               V.VERSION | V.REPLY_FLAG | V.NEED_REPLY_FLAG,
                               V.VERSION | 0x100 | V.NEED_REPLY_FLAG])


def _payload_for(req: int, draw: st.DrawFn) -> bytes:
    """A payload shaped for ``req``, with hostile field values."""
    if req in (R.SET_VRING_NUM, R.SET_VRING_BASE, R.GET_VRING_BASE, R.SET_VRING_ENABLE,
               R.SET_VRING_ENDIAN, R.VRING_KICK):
        return C.vring_state(draw(indexes), draw(u32s))
    if req == R.SET_VRING_ADDR:
        return C.vring_addr(draw(indexes), draw(addrs), draw(addrs), draw(addrs), draw(u64s),
                            draw(u32s))
    if req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
        return C.u64(draw(st.sampled_from([0, 1, 2, 255, 0x100, 0x101, 0x200]) | u64s))
    if req == R.SET_MEM_TABLE:
        return C.memory_table(draw(st.lists(regions, max_size=9)))
    if req in (R.ADD_MEM_REG, R.REM_MEM_REG):
        return C.mem_reg(draw(regions))
    if req in (R.GET_CONFIG, R.SET_CONFIG):
        size = draw(st.integers(0, 16) | st.just(300))
        return V.CONFIG_HEADER.pack(draw(st.integers(0, 12) | u32s), size,
                                    draw(st.sampled_from([0, 1, 2]))) + draw(
            st.binary(min_size=max(0, size - 2), max_size=size + 2))
    if req in (R.SET_FEATURES, R.SET_PROTOCOL_FEATURES, R.SET_STATUS, R.SEND_RARP,
               R.NET_SET_MTU, R.CLOSE_CRYPTO_SESSION):
        return C.u64(draw(u64s))
    return draw(st.binary(max_size=64))


@st.composite
def messages(draw: st.DrawFn) -> tuple[int, int, bytes, list[str]]:
    req = draw(requests)
    payload = draw(st.binary(max_size=300)) if draw(st.integers(0, 9)) == 0 else \
        _payload_for(req, draw)
    return req, draw(flag_values), payload, draw(fd_kinds)


# ---- the machine -------------------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection."""


class BackendFuzz(RuleBasedStateMachine):
    fuzzed: Fuzzed  # set by the test before running

    def __init__(self) -> None:
        super().__init__()
        self.f = self.fuzzed
        self.fe: RawFrontend | None = None
        self.keep: list[int] = []  # fds the front-end keeps (kick fds, memory)
        self.mem_fd: int | None = None
        self.map: mmap.mmap | None = None
        self.memory: GuestMemory | None = None
        self.queue: DriverQueue | None = None
        self.kick_fd: int | None = None
        self.tokens = 0
        self.connect()

    # ---- connection --------------------------------------------------------------------

    def connect(self) -> None:
        self.fe = RawFrontend(self.f.server.path)
        self.f.connections += 1

    def _drop_local(self) -> None:
        self.queue = None  # first: its views of the memory must go before the unmap
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.map is not None:
            self.map.close()
            self.map = None
        self.kick_fd = self.mem_fd = None
        for fd in self.keep:
            os.close(fd)
        self.keep.clear()

    def disconnect(self) -> None:
        """Hang up (or notice the server did): the fd count must come back to baseline."""
        if self.fe is not None:
            self.fe.close()
            self.fe = None
        self._drop_local()
        self.f.wait_idle()
        self.f.check_fds()
        self.f.history.clear()

    def teardown(self) -> None:
        self.disconnect()
        self.f.check_alive()

    def _make_fd(self, kind: str) -> int:
        if kind == "eventfd":
            return os.eventfd(0, os.EFD_NONBLOCK)
        if kind.startswith("memfd"):
            size = {"memfd0": 0, "memfd4k": 4096, "memfd64k": MEM, "memfd1m": 1 << 20}[kind]
            return memfd(size, "fuzz")
        if kind == "pipe":
            r, w = os.pipe()
            os.close(w)
            return r
        if kind == "socket":
            a, b = socket.socketpair()
            b.close()
            return a.detach()
        if kind == "devnull":
            return os.open(os.devnull, os.O_RDWR)
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY)

    def exchange(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *,
                 flags: int = V.VERSION | V.NEED_REPLY_FLAG) -> C.Message | None:
        """Send one message (its fds are closed here once sent) and read the reply it
        must get. Raises :class:`Closed` if the server hung up instead."""
        assert self.fe is not None
        fds = fds or []
        self.f.messages += 1
        self.f.history.append(f"{V.request_name(req)} flags=0x{flags:x} {payload.hex()} "
                              f"fds={[os.readlink(f'/proc/self/fd/{fd}') for fd in fds]}")
        try:
            try:
                self.fe.send(req, payload, fds, flags=flags)
            finally:
                for fd in fds:
                    os.close(fd)
            rule = C.REQUEST_RULES.get(req)
            valued = rule is not None and rule.reply is not C.ReplyKind.NONE
            if not (flags & V.NEED_REPLY_FLAG or valued):
                return None
            reply = self.fe.recv(10.0)
        except (PeerError, ConnectionError, BrokenPipeError) as exc:
            self.f.closed_by_server += 1
            raise Closed(str(exc)) from exc
        try:
            assert reply.request == req, (reply, req)
            assert reply.flags == V.VERSION | V.REPLY_FLAG, reply
        finally:
            reply.close_fds()
        return reply

    def run(self, req: int, payload: bytes = b"", fds: list[int] | None = None, *,
            flags: int = V.VERSION | V.NEED_REPLY_FLAG) -> C.Message | None:
        """:meth:`exchange`, reconnecting (after the fd check) if the server hung up."""
        try:
            return self.exchange(req, payload, fds, flags=flags)
        except Closed:
            self.disconnect()
            self.connect()
            return None

    # ---- rules: anything at all --------------------------------------------------------

    @rule(m=messages())
    def any_message(self, m: tuple[int, int, bytes, list[str]]) -> None:
        req, flags, payload, kinds = m
        self.run(req, payload, [self._make_fd(k) for k in kinds], flags=flags)

    @rule(how=st.sampled_from(["hang up", "garbage", "mid-message"]), m=messages(),
          data=st.binary(min_size=1, max_size=40))
    def end_connection(self, how: str, m: tuple[int, int, bytes, list[str]],
                       data: bytes) -> None:
        """Hang up: cleanly, after raw garbage (mostly a header the server cannot trust),
        or in the middle of a message (its fds sent with its first bytes)."""
        assert self.fe is not None
        fds: list[int] = []
        if how == "mid-message":
            req, flags, payload, kinds = m
            data = V.HEADER.pack(req, flags, len(payload) + 8) + payload
            fds = [self._make_fd(k) for k in kinds]
        if how != "hang up":
            self.f.messages += 1
            try:
                self.fe.send_raw(data, fds)
            except OSError:
                pass  # the server hung up first
            for fd in fds:
                os.close(fd)
        self.disconnect()
        self.connect()

    # ---- rules: a mostly valid front-end -----------------------------------------------

    @rule(protocol=st.sampled_from([None, 0, 1 << 3]) | u64s)
    def handshake(self, protocol: int | None) -> None:
        self.run(R.SET_OWNER)
        got = self.run(R.GET_FEATURES, flags=V.VERSION)
        if got is None:
            return
        offered = C.parse_u64(got.payload)
        self.run(R.SET_FEATURES, C.u64(offered if protocol is None else protocol & offered))
        got = self.run(R.GET_PROTOCOL_FEATURES, flags=V.VERSION)
        if got is not None:
            value = C.parse_u64(got.payload)
            self.run(R.SET_PROTOCOL_FEATURES, C.u64(value if protocol is None else protocol))

    @rule(with_call=st.booleans(), enable=st.booleans(), event_idx=st.booleans())
    def start_ring(self, with_call: bool, enable: bool, event_idx: bool) -> None:
        """A valid memory table and vring 0 in it, as QEMU would set them up."""
        self._drop_local()
        features = F.bit(F.VERSION_1) | F.bit(V.VHOST_USER_F_PROTOCOL_FEATURES)
        if event_idx:
            features |= F.bit(F.EVENT_IDX)
        self.run(R.SET_FEATURES, C.u64(features))
        fd = memfd(MEM, "fuzz-ring")
        self.mem_fd = fd
        self.keep.append(fd)
        self.map = mmap.mmap(fd, MEM)
        self.memory = GuestMemory([buffer_region(memoryview(self.map), 0)])
        self.queue = DriverQueue(self.memory, QSIZE, DESC, AVAIL, USED,
                                 event_idx=event_idx)
        table = C.memory_table([C.MemoryRegionDesc(0, MEM, UOFF, 0)])
        self.run(R.SET_MEM_TABLE, table, [os.dup(fd)])
        self.run(R.SET_VRING_NUM, C.vring_state(0, QSIZE))
        self.run(R.SET_VRING_ADDR, C.vring_addr(0, UOFF + DESC, UOFF + USED, UOFF + AVAIL))
        self.run(R.SET_VRING_BASE, C.vring_state(0, 0))
        if with_call:
            self.run(R.SET_VRING_CALL, C.vring_fd(0), [os.eventfd(0, os.EFD_NONBLOCK)])
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.kick_fd = kick
        self.keep.append(kick)
        self.run(R.SET_VRING_KICK, C.vring_fd(0), [os.dup(kick)])
        if enable:
            self.run(R.SET_VRING_ENABLE, C.vring_state(0, 1))

    @rule(n=st.integers(1, 3), size=st.sampled_from([1, 64, 512]))
    def post_buffers_and_kick(self, n: int, size: int) -> None:
        q = self.queue
        if q is None or self.kick_fd is None:
            return
        for _ in range(n):
            if q.num_free < 1:
                break
            self.tokens += 1
            q.add_buf([], [(BUFS + (self.tokens % 16) * 512, size)], token=self.tokens)
        q.kick_prepare()
        os.eventfd_write(self.kick_fd, 1)
        # A round trip: the kick was handled by the time a reply comes back.
        self.run(R.GET_FEATURES, flags=V.VERSION)
        try:
            while q.get_buf() is not None:
                pass
        except RingError:
            self.queue = None  # our own scribbling confused our driver side: stop using it

    @rule(offset=st.integers(0, 0x3000 - 1), data=st.binary(min_size=1, max_size=32))
    def scribble_on_the_ring(self, offset: int, data: bytes) -> None:
        """A hostile driver writes anything into its ring areas, then kicks."""
        if self.map is None or self.kick_fd is None:
            return
        data = data[: 0x3000 - offset]
        self.map[offset : offset + len(data)] = data
        os.eventfd_write(self.kick_fd, 1)
        self.run(R.GET_FEATURES, flags=V.VERSION)

    @rule(size=st.sampled_from([0, 0x1000, 0x2800]))
    def shrink_the_memory_file(self, size: int) -> None:
        """The front-end truncates its (unsealable) memory file under the server's mapping,
        then kicks: the server's ring access faults (SIGBUS) and must survive it."""
        if self.mem_fd is None or self.kick_fd is None:
            return
        self.queue = None  # our own mapping would fault too: drop it first
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self.map is not None:
            self.map.close()
            self.map = None
        os.ftruncate(self.mem_fd, size)
        os.eventfd_write(self.kick_fd, 1)
        self.run(R.GET_FEATURES, flags=V.VERSION)

    @rule(index=st.sampled_from([0, 0, 1, 255]))
    def stop_ring(self, index: int) -> None:
        self.run(R.GET_VRING_BASE, C.vring_state(index, 0))

    @rule(status=st.sampled_from([0, 1, 3, 0xB, 0xF, 0x40, 0x80, 0x1FF]))
    def set_status(self, status: int) -> None:
        self.run(R.SET_STATUS, C.u64(status))

    @invariant()
    def server_alive(self) -> None:
        self.f.check_alive()


def fuzz(f: Fuzzed, target: int, progress: bool = False) -> float:
    """Run machines until ``target`` messages were sent; returns the seconds it took."""
    BackendFuzz.fuzzed = f
    start = time.monotonic()
    while f.messages < target:
        if progress:
            print(f"{f.messages} messages, {f.connections} connections, "
                  f"{len(f.gc_rescues)} gc rescues, {time.monotonic() - start:.0f} s",
                  flush=True)
        run_state_machine_as_test(
            BackendFuzz,
            settings=settings(max_examples=50, stateful_step_count=100, deadline=None,
                              database=None, suppress_health_check=list(HealthCheck),
                              phases=PHASES))
    return time.monotonic() - start


@pytest.mark.timeout(280)
def test_fuzzed_back_end_survives_and_leaks_nothing(fuzzed: Fuzzed) -> None:
    took = fuzz(fuzzed, fuzzed.messages + CI_MESSAGES)
    print(f"{fuzzed.messages} messages, {fuzzed.connections} connections "
          f"({fuzzed.closed_by_server} closed by the server), {sigbus.faults} SIGBUS "
          f"survived, {len(fuzzed.gc_rescues)} released only by gc, in {took:.1f} s")
    fuzzed.check_alive()
    assert fuzzed.closed_by_server > 0  # the hostile half did reach the closing paths
    assert fuzzed.server.kicks > 0  # and the valid half reached the device
    assert sigbus.faults > 0  # and shrunk memory files made the server's accesses fault


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
@pytest.mark.skipif(not os.environ.get("PYVIRTIO_SOAK"),
                    reason="soak test: set PYVIRTIO_SOAK=1 to run")
def test_fuzz_soak_million_messages(fuzzed: Fuzzed) -> None:
    took = fuzz(fuzzed, fuzzed.messages + SOAK_MESSAGES, progress=True)
    print(f"soak: {fuzzed.messages} messages, {fuzzed.connections} connections "
          f"({fuzzed.closed_by_server} closed by the server), {sigbus.faults} SIGBUS "
          f"survived, {len(fuzzed.gc_rescues)} released only by gc, in {took:.1f} s")
    fuzzed.check_alive()


@pytest.mark.integration
@pytest.mark.timeout(150)
def test_after_the_fuzzing_the_same_server_feeds_a_real_guest(fuzzed: Fuzzed) -> None:
    """Runs after the fuzzing (same module-scoped server, same thread, same process): QEMU
    7.2's vhost-user-rng-pci guest reads 64 KiB from /dev/hwrng through it."""
    require_guest("qemu")
    fuzzed.wait_idle()
    script = f"result current $(cat /sys/class/misc/hw_random/rng_current)\n" \
             f"{hwrng_script(HWRNG_BYTES)}"
    before = fuzzed.server.accepted
    result = QemuGuest(script, extra_args=qemu_args(fuzzed.server.path, ids.RNG),
                       timeout=90).run()
    assert result.ok, result.describe()
    assert result.results["current"] == "virtio_rng.0"
    assert result.results["hwrng_bytes"] == str(HWRNG_BYTES)
    assert fuzzed.server.accepted == before + 1
    fuzzed.connections = fuzzed.server.accepted
    fuzzed.wait_idle()
    fuzzed.check_fds()
    fuzzed.check_alive()
