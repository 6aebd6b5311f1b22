"""The console device against pyvirtio's console driver, in memory (DevicePair)."""

from __future__ import annotations

import contextlib
import hashlib
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from helpers.console import ShyDriver
from pyvirtio.device.console import ConsoleDevice, MemoryPort, Port
from pyvirtio.device.console.ports import UnixSocketPort
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.errors import LocalError
from pyvirtio.ring import fresh_base
from pyvirtio.spec import console as C
from pyvirtio.spec import features as F
from pyvirtio.spec import status as S
from pyvirtio.testing.pair import DevicePair

MULTI = F.bit(C.VIRTIO_CONSOLE_F_SIZE) | F.bit(C.VIRTIO_CONSOLE_F_MULTIPORT)
TRANSPORTS = {
    "event_idx+indirect": F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC),
    "event_idx": F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX),
    "indirect": F.bit(F.VERSION_1) | F.bit(F.INDIRECT_DESC),
    "neither": F.bit(F.VERSION_1),
}
MiB = 1 << 20


@pytest.fixture(params=list(TRANSPORTS), ids=list(TRANSPORTS))
def transport_features(request: pytest.FixtureRequest) -> int:
    return TRANSPORTS[request.param]


class Setup(NamedTuple):
    pair: DevicePair
    device: ConsoleDevice
    driver: ConsoleDriver


@contextlib.contextmanager
def console_pair(*ports: Port, driver: type[ConsoleDriver] = ConsoleDriver,
                 features: int | None = None, **kwargs: Any) -> Iterator[Setup]:
    """A ConsoleDevice with ``ports`` (keyword arguments go to it), probed by ``driver``."""
    device = ConsoleDevice(list(ports), **kwargs)
    with DevicePair(device, memory_size=32 * MiB) as pair:
        drv = pair.probe(driver, features)
        assert isinstance(drv, driver)
        yield Setup(pair, device, drv)


def payload(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def raw_control(driver: ConsoleDriver, raw: bytes) -> None:
    """Send raw bytes on the control transmitq, as a buggy or hostile driver would."""
    vq = driver.vqs[C.CONTROL_TRANSMITQ]
    addr = driver.device.allocator.alloc(max(len(raw), 1), 8)
    driver.device.memory.write(addr, raw)
    vq.add_buf([(addr, len(raw))], [], addr)
    vq.kick()


def assert_port0_works(driver: ConsoleDriver, console: MemoryPort) -> None:
    driver.write(0, b"still alive\n")
    assert console.take_output() == b"still alive\n"
    console.feed(b"ok\n")
    assert driver.read(0, 3) == b"ok\n"


# ---- data both ways ---------------------------------------------------------------------

def test_port0_text_travels_both_ways_byte_exact(transport_features: int) -> None:
    console = MemoryPort()
    text = "héllo, wörld\r\n\tlogin: ".encode() + bytes(range(256))
    with console_pair(Port(console), features=MULTI | transport_features) as t:
        assert t.driver.port(0).console and t.driver.port(0).host_connected
        t.driver.write(0, text)
        assert console.take_output() == text
        console.feed(text[::-1])
        assert t.driver.read(0, len(text)) == text[::-1]
        assert t.device.problems == [] and t.driver.problems == []


def test_without_multiport_port0_uses_queues_0_and_1(transport_features: int) -> None:
    console = MemoryPort()
    features = F.bit(C.VIRTIO_CONSOLE_F_SIZE) | transport_features
    with console_pair(Port(console), multiport=False, features=features) as t:
        assert not t.driver.multiport and t.device.num_queues == 2
        t.driver.write(0, b"no control queues here\n")
        assert console.take_output() == b"no control queues here\n"
        console.feed(b"\x00\xff binary too")
        assert t.driver.read(0, 13) == b"\x00\xff binary too"
        assert t.device.problems == []


def test_multiport_device_driven_without_multiport_serves_only_port0() -> None:
    console, other = MemoryPort(), MemoryPort()
    ports = Port(console), Port(other, name="ignored")
    with console_pair(*ports, features=TRANSPORTS["neither"]) as t:
        assert sorted(t.driver.ports) == [0]
        assert t.device.queues[C.CONTROL_RECEIVEQ].ring is None
        assert_port0_works(t.driver, console)


def test_named_port_carries_1mib_each_way(transport_features: int) -> None:
    named = MemoryPort()
    to_host, to_guest = payload(MiB, seed=2), payload(MiB, seed=3)
    ports = Port(MemoryPort()), Port(named, name="org.pyvirtio.bulk")
    with console_pair(*ports, features=MULTI | transport_features) as t:
        pid = t.driver.port("org.pyvirtio.bulk").id
        t.driver.open(pid)
        t.driver.write(pid, to_host)
        named.feed(to_guest)
        received = t.driver.read(pid, MiB)
        assert sha(named.take_output()) == sha(to_host)
        assert sha(received) == sha(to_guest)
        port = t.device.port(pid)
        assert (port.from_guest, port.to_guest, port.dropped) == (MiB, MiB, 0)


# ---- the control handshake --------------------------------------------------------------

def test_guest_learns_console_names_and_host_state() -> None:
    ports = (Port(MemoryPort()), Port(MemoryPort(), name="org.pyvirtio.bulk"),
             Port(MemoryPort(connected=False), name="org.pyvirtio.log"))
    with console_pair(*ports) as t:
        seen = {p.id: (p.name, p.console, p.host_connected) for p in t.driver.ports.values()}
        assert seen == {
            0: (None, True, True),
            1: ("org.pyvirtio.bulk", False, True),
            2: ("org.pyvirtio.log", False, False),
        }
        assert [p.guest_ready for p in t.device.ports] == [True, True, True]
        # The console is opened by the guest as soon as it is one (hvc); others on open().
        assert [p.guest_open for p in t.device.ports] == [True, False, False]
        t.driver.open(2)
        assert t.device.port("org.pyvirtio.log").guest_open
        t.driver.close(2)
        assert not t.device.port(2).guest_open


def test_host_peer_coming_and_going_reaches_the_guest() -> None:
    named = MemoryPort(connected=False)
    with console_pair(Port(MemoryPort()), Port(named, name="org.pyvirtio.peer")) as t:
        assert not t.driver.port(1).host_connected
        named.connect()
        assert t.driver.port(1).host_connected
        named.disconnect()
        assert not t.driver.port(1).host_connected


def test_port_added_while_the_guest_runs_appears_with_its_name() -> None:
    late = MemoryPort()
    with console_pair(Port(MemoryPort()), max_nr_ports=4) as t:
        assert sorted(t.driver.ports) == [0]
        pid = t.device.add_port(Port(late, name="org.pyvirtio.late"))
        assert t.driver.port("org.pyvirtio.late").id == pid == 1
        t.driver.open(pid)
        late.feed(b"hot-plugged\n")
        assert t.driver.read(pid, 12) == b"hot-plugged\n"


# ---- console size -----------------------------------------------------------------------

def test_console_port_gets_its_size_and_resize_messages() -> None:
    with console_pair(Port(MemoryPort()), cols=100, rows=30) as t:
        assert t.driver.port(0).size == (100, 30)
        before = t.pair.transport.config_interrupts
        t.device.resize(132, 43)
        assert t.driver.port(0).size == (132, 43)
        assert t.driver.read_size() == (132, 43)
        assert t.pair.transport.config_interrupts == before + 1


def test_resize_rows_first_sends_the_layout_older_linux_reads() -> None:
    with console_pair(Port(MemoryPort()), resize_rows_first=True) as t:
        t.device.resize(132, 43)
        assert t.driver.port(0).size == (43, 132)  # our driver reads the spec layout


def test_resize_without_multiport_updates_config_and_raises_config_interrupt() -> None:
    with console_pair(Port(), multiport=False, cols=80, rows=25) as t:
        assert t.driver.read_size() == (80, 25)
        before = t.pair.transport.config_interrupts
        t.device.resize(200, 60)
        assert t.driver.read_size() == (200, 60)
        assert t.pair.transport.config_interrupts == before + 1


def test_device_without_size_does_not_offer_f_size() -> None:
    device = ConsoleDevice([Port()], cols=None, rows=None)
    assert not device.get_features() & F.bit(C.VIRTIO_CONSOLE_F_SIZE)
    with pytest.raises(LocalError):
        device.resize(80, 25)


# ---- flow control -----------------------------------------------------------------------

def test_host_input_larger_than_guest_buffers_is_delivered_completely() -> None:
    named = MemoryPort(chunk=4096)
    data = payload(MiB, seed=4)
    limit = 64 * 1024
    ports = Port(MemoryPort()), Port(named, name="bulk")
    with console_pair(*ports, driver=ShyDriver, backlog_limit=limit) as t:
        t.driver.open(1)
        named.feed(data)
        assert named.paused and named.unread > 0  # the device stopped reading: backpressure
        got = bytearray()
        for _ in range(10_000):
            if len(got) == len(data):
                break
            t.driver.fill_receive(1, 3)  # 12 KiB of guest buffers at a time
            got += t.driver.read_available(1)
        assert sha(got) == sha(data)
        assert t.device.port(1).peak_backlog <= limit + named.chunk
        assert named.pauses >= 1 and not named.paused and named.unread == 0


def test_host_data_waits_for_a_guest_that_posts_no_receive_buffers() -> None:
    console = MemoryPort()
    data = payload(10_000, seed=5)
    with console_pair(Port(console), driver=ShyDriver) as t:
        console.feed(data)
        assert t.driver.read_available(0) == b""
        assert len(t.device.port(0).backlog) == len(data)
        t.driver.fill_receive(0, 3)  # 3 x 4 KiB: room for all of it
        assert t.driver.read_available(0) == data
        assert t.device.port(0).backlog == b""


def test_host_data_fed_before_the_guest_boots_arrives_once_it_is_ready() -> None:
    console = MemoryPort()
    device = ConsoleDevice([Port(console)])
    console.feed(b"typed ahead\n")
    assert device.port(0).backlog == b"typed ahead\n"
    with DevicePair(device) as pair:
        driver = pair.probe()
        assert isinstance(driver, ConsoleDriver)
        assert driver.read(0, 12) == b"typed ahead\n"


def test_named_port_input_waits_until_a_guest_process_opens_it() -> None:
    named = MemoryPort()
    with console_pair(Port(MemoryPort()), Port(named, name="org.pyvirtio.late-reader")) as t:
        named.feed(b"kept for the reader\n")
        assert t.driver.read_available(1) == b""  # Linux would discard it: it is held
        t.driver.open(1)
        assert t.driver.read_available(1) == b"kept for the reader\n"


def test_slow_host_reader_holds_guest_buffers_until_it_drains() -> None:
    class SmallQueues(ConsoleDriver):
        queue_size = 8

    named = MemoryPort(stalled=True)
    data = payload(MiB, seed=6)
    ports = Port(MemoryPort()), Port(named, name="slow")
    with console_pair(*ports, driver=SmallQueues, features=MULTI | TRANSPORTS["neither"],
                      output_limit=64 * 1024) as t:
        t.driver.open(1)
        sent = t.driver.send(1, data)
        assert sent < len(data)  # the guest's writer has to wait: its buffers are held
        port = t.device.port(1)
        assert port.held and named.output_pending >= 64 * 1024
        named.drain()
        assert not port.held
        t.driver.write(1, memoryview(data)[sent:])
        assert named.take_output() == data


def test_console_output_beyond_the_limit_is_dropped_not_held() -> None:
    console = MemoryPort(stalled=True)
    data = payload(256 * 1024, seed=9)
    with console_pair(Port(console), output_limit=64 * 1024) as t:
        t.driver.write(0, data)  # returns: Linux's hvc would spin on a held buffer
        port = t.device.port(0)
        assert not port.held and port.dropped > 0
        assert port.from_guest + port.dropped == len(data)
        console.drain()
        assert console.take_output() == data[: port.from_guest]


def test_guest_output_without_a_host_peer_is_dropped_and_counted() -> None:
    console = MemoryPort(connected=False)
    with console_pair(Port(console)) as t:
        boot_log = b"[    0.000000] Linux version 6.1\n"
        t.driver.write(0, boot_log)
        port = t.device.port(0)
        assert (port.dropped, port.from_guest, console.output) == (len(boot_log), 0, b"")
        console.connect()
        t.driver.write(0, b"login: ")
        assert console.take_output() == b"login: "


def test_host_disconnect_releases_held_guest_buffers() -> None:
    named = MemoryPort(stalled=True)
    with console_pair(Port(MemoryPort()), Port(named, name="gone"), output_limit=1024) as t:
        t.driver.open(1)
        t.driver.send(1, bytes(64 * 1024))
        assert t.device.port(1).held
        named.disconnect()
        assert not t.device.port(1).held
        txq = t.device.ring(C.port_transmitq(1))
        assert txq is not None and not txq.in_flight()  # every transmit buffer returned
        assert not t.driver.port(1).host_connected


def test_stopping_a_receive_queue_gives_back_the_buffers_it_did_not_fill() -> None:
    console = MemoryPort()
    with console_pair(Port(console), driver=ShyDriver) as t:
        t.driver.fill_receive(0, 5)
        console.feed(b"one buffer's worth")
        # five popped, one used, four rewound (one single-descriptor buffer consumed)
        assert t.device.stop_queue(0) == fresh_base(t.device.driver_features) + 1


def test_emergency_write_reaches_the_console_backend() -> None:
    console = MemoryPort()
    with console_pair(Port(console)) as t:
        t.pair.transport.write_config(C.CFG_EMERG_WR, struct.pack("<I", ord("!")))
        assert console.take_output() == b"!"


# ---- a driver that misbehaves -----------------------------------------------------------

@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b"\x00\x00\x00\x00\x03\x00", "has 6 bytes, less than the 8-byte header"),
        (struct.pack("<IHH", 7, C.VIRTIO_CONSOLE_PORT_OPEN, 1), "port 7, which does not exist"),
        (struct.pack("<IHH", 0, 99, 0), "unknown event 99"),
        (struct.pack("<IHH", 0, C.VIRTIO_CONSOLE_DEVICE_ADD, 1), "not one a driver sends"),
    ],
    ids=["truncated", "unknown-port", "unknown-event", "device-only-event"],
)
def test_bad_control_messages_are_reported_and_ignored(raw: bytes, complaint: str) -> None:
    console = MemoryPort()
    with console_pair(Port(console), Port(MemoryPort(), name="x")) as t:
        raw_control(t.driver, raw)
        assert complaint in t.device.problems[-1]
        assert not t.device.status & S.DEVICE_NEEDS_RESET
        assert_port0_works(t.driver, console)


def test_buffers_on_queues_of_absent_ports_are_reported_and_returned() -> None:
    console = MemoryPort()
    with console_pair(Port(console), max_nr_ports=3) as t:
        vq = t.driver.vqs[C.port_transmitq(2)]
        addr = t.driver.device.allocator.alloc(16)
        vq.add_buf([(addr, 16)], [], addr)
        vq.kick()
        assert "queue 7, which belongs to no port" in t.device.problems[-1]
        assert vq.get_buf() == (addr, 0)
        assert_port0_works(t.driver, console)


def test_receive_buffer_without_writable_bytes_comes_back_empty_in_its_turn() -> None:
    console = MemoryPort()
    with console_pair(Port(console), driver=ShyDriver) as t:
        vq = t.driver.vqs[0]
        addr = t.driver.device.allocator.alloc(64)
        vq.add_buf([(addr, 64)], [], addr)  # device-readable only: useless for receiving
        vq.kick()
        assert "has no device-writable bytes" in t.device.problems[-1]
        t.driver.fill_receive(0, 1)
        console.feed(b"after the bad one")
        assert t.driver.read_available(0) == b"after the bad one"
        assert vq.ring.in_flight == 0  # both buffers came back
        assert not t.device.status & S.DEVICE_NEEDS_RESET


def test_control_receive_buffer_too_small_for_a_message_is_reported() -> None:
    class TinyBuffers(ConsoleDriver):
        control_buffers = 1
        buffer_size = 4

    with console_pair(Port(MemoryPort()), driver=TinyBuffers) as t:
        assert "holds 4 bytes, the message needs 8" in t.device.problems[0]
        assert t.driver.ports == {}  # the DEVICE_ADD that did not fit was dropped
        assert "0 bytes" in t.driver.problems[0]  # the buffer came back empty
        assert not t.device.status & S.DEVICE_NEEDS_RESET


# ---- construction -----------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs",
    [
        {"ports": [Port(), Port()], "multiport": False},
        {"ports": [Port(), Port()], "max_nr_ports": 1},
        {"ports": [], "multiport": True},
        {"ports": [Port()], "console_port": 3},
    ],
    ids=["two-ports-no-multiport", "max-below-ports", "no-ports", "console-out-of-range"],
)
def test_impossible_configurations_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(LocalError):
        ConsoleDevice(**kwargs)


def test_add_port_beyond_max_nr_ports_is_refused() -> None:
    device = ConsoleDevice([Port()], max_nr_ports=1)
    with pytest.raises(LocalError):
        device.add_port(Port())


def test_ports_can_be_given_as_text(tmp_path: Path) -> None:
    path = str(tmp_path / "agent.sock")
    device = ConsoleDevice(["memory", f"unix:{path},name=org.pyvirtio.agent"])
    try:
        assert isinstance(device.port(0).backend, MemoryPort)
        agent = device.port("org.pyvirtio.agent")
        assert isinstance(agent.backend, UnixSocketPort) and agent.backend.path == path
    finally:
        device.close()
    for bad in ("tcp:1234", "unix:", "pty,label=x"):
        with pytest.raises(LocalError):
            Port.parse(bad)
