"""Console port back-ends on real file descriptors (unix socket, pty, stdio pipes), served
by a real EventLoop stepped in the test's thread, with pyvirtio's console driver as guest."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from helpers.console import ShyDriver
from pyvirtio.device.console import ConsoleDevice, Port
from pyvirtio.device.console.ports import (
    READ_SIZE,
    MemoryPort,
    PtyPort,
    StdioPort,
    UnixSocketPort,
)
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.errors import LocalError
from pyvirtio.io.loop import EventLoop
from pyvirtio.testing.pair import DevicePair

MiB = 1 << 20
TIMEOUT = 10.0


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    ev = EventLoop()
    yield ev
    ev.close()


@pytest.fixture
def sock_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pvcon") as d:  # short: sun_path is 108 bytes
        yield os.path.join(d, "port.sock")


@contextlib.contextmanager
def console_guest(loop: EventLoop, *ports: Port, driver: type[ConsoleDriver] = ConsoleDriver,
                  **kwargs: object) -> Iterator[tuple[ConsoleDevice, ConsoleDriver]]:
    """A console device with ``ports`` on ``loop``, probed by ``driver``; every back-end is
    closed afterwards, also on failure."""
    device = ConsoleDevice(list(ports), **kwargs)  # type: ignore[arg-type]
    try:
        device.reactor = loop
        with DevicePair(device, memory_size=32 * MiB) as pair:
            drv = pair.probe(driver)
            assert isinstance(drv, ConsoleDriver)
            yield device, drv
    finally:
        device.close()


def run_until(loop: EventLoop, cond: Callable[[], bool], what: str) -> None:
    """Step the loop until ``cond()`` holds. ``cond`` may itself act as the guest (post
    buffers, send more), so the loop is stepped in short slices: while the device has paused
    a back-end no fd event may come to end a long wait."""
    deadline = time.monotonic() + TIMEOUT
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        loop.run_once(0.01)


def client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


class Collector:
    """Accumulates what the guest has received on one port."""

    def __init__(self, driver: ConsoleDriver, pid: int) -> None:
        self.driver, self.pid, self.data = driver, pid, bytearray()

    def has(self, n: int) -> Callable[[], bool]:
        def check() -> bool:
            self.data += self.driver.read_available(self.pid)
            return len(self.data) >= n
        return check


# ---- unix socket ------------------------------------------------------------------------

def test_unix_socket_port_carries_text_both_ways(loop: EventLoop, sock_path: str) -> None:
    backend = UnixSocketPort(sock_path)
    with console_guest(loop, Port(MemoryPort()), Port(backend, name="org.pyvirtio.sock")) as (
        device, driver
    ):
        assert not driver.port(1).host_connected
        driver.open(1)
        with client(sock_path) as c:
            run_until(loop, lambda: driver.port(1).host_connected, "PORT_OPEN(1)")
            c.sendall(b"ping from the host\n")
            got = Collector(driver, 1)
            run_until(loop, got.has(19), "host data in the guest")
            assert bytes(got.data) == b"ping from the host\n"
            driver.write(1, b"pong from the guest\n")
            assert recv_exactly(c, 20) == b"pong from the guest\n"
        run_until(loop, lambda: not driver.port(1).host_connected, "PORT_OPEN(0)")
        assert device.problems == []


def test_unix_socket_serves_one_client_at_a_time(loop: EventLoop, sock_path: str) -> None:
    backend = UnixSocketPort(sock_path)
    with console_guest(loop, Port(MemoryPort()), Port(backend, name="one")) as (_, driver):
        driver.open(1)
        got = Collector(driver, 1)
        with client(sock_path) as first, client(sock_path) as second:
            run_until(loop, lambda: backend.clients == 1, "the first client")
            second.sendall(b"second ")
            first.sendall(b"first ")
            run_until(loop, got.has(6), "the first client's bytes")
            assert bytes(got.data) == b"first "  # the second waits in the backlog
            first.close()
            run_until(loop, got.has(13), "the second client's bytes")
            assert bytes(got.data) == b"first second "
            assert backend.clients == 2 and driver.port(1).host_connected


def test_unix_socket_guest_output_does_not_block_the_loop(loop: EventLoop,
                                                          sock_path: str) -> None:
    class SmallQueues(ConsoleDriver):
        queue_size = 16

    data = random.Random(7).randbytes(MiB)
    backend = UnixSocketPort(sock_path)
    with console_guest(loop, Port(MemoryPort()), Port(backend, name="out"),
                       driver=SmallQueues, output_limit=64 * 1024) as (device, driver):
        driver.open(1)
        with client(sock_path) as c:
            run_until(loop, lambda: backend.connected, "the client")
            # Nobody reads yet: the device must neither block nor drop; it buffers up to its
            # limit and then keeps the guest's buffers.
            sent = driver.send(1, data)
            assert sent < len(data)
            port = device.port(1)
            assert port.held and backend.output_pending > 0
            received: list[bytes] = []
            reader = threading.Thread(target=lambda: received.append(recv_exactly(c, MiB)))
            reader.start()
            try:
                view = memoryview(data)

                def all_sent() -> bool:
                    nonlocal sent
                    sent += driver.send(1, view[sent:])
                    return sent == len(data) and backend.output_pending == 0

                run_until(loop, all_sent, "the guest's 1 MiB to leave")
            finally:
                reader.join(TIMEOUT)
            assert hashlib.sha256(received[0]).digest() == hashlib.sha256(data).digest()
            assert port.dropped == 0


def test_unix_socket_host_input_waits_for_a_slow_guest(loop: EventLoop, sock_path: str) -> None:
    data = random.Random(8).randbytes(MiB)
    limit = 64 * 1024
    backend = UnixSocketPort(sock_path)
    with console_guest(loop, Port(MemoryPort()), Port(backend, name="in"), driver=ShyDriver,
                       backlog_limit=limit) as (device, driver):
        driver.open(1)
        with client(sock_path) as c:
            writer = threading.Thread(target=c.sendall, args=(data,))
            writer.start()
            try:
                got = Collector(driver, 1)

                def guest_reads_some() -> bool:
                    driver.fill_receive(1, 8)
                    return got.has(MiB)()

                run_until(loop, guest_reads_some, "1 MiB in the guest")
            finally:
                writer.join(TIMEOUT)
            assert hashlib.sha256(got.data).digest() == hashlib.sha256(data).digest()
            assert backend.pauses >= 1  # the device stopped reading the socket meanwhile
            assert device.port(1).peak_backlog <= limit + READ_SIZE


def test_unix_socket_replaces_a_stale_socket_but_not_a_file(sock_path: str) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()
    UnixSocketPort(sock_path).close()
    assert not os.path.exists(sock_path)
    Path(sock_path).write_text("precious")
    with pytest.raises(LocalError):
        UnixSocketPort(sock_path)
    assert Path(sock_path).read_text() == "precious"


# ---- pty --------------------------------------------------------------------------------

def read_fd(fd: int, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        ready, _, _ = select.select([fd], [], [], TIMEOUT)
        assert ready, "timed out reading the pty"
        buf += os.read(fd, n - len(buf))
    return bytes(buf)


def test_pty_port_connects_when_its_slave_is_opened(loop: EventLoop) -> None:
    backend = PtyPort(announce=False, poll_interval=0.01)
    assert backend.path.startswith("/dev/pts/")
    with console_guest(loop, Port(MemoryPort()), Port(backend, name="org.pyvirtio.pty")) as (
        _, driver
    ):
        driver.open(1)
        assert not driver.port(1).host_connected
        fd = os.open(backend.path, os.O_RDWR | os.O_NOCTTY)
        try:
            run_until(loop, lambda: driver.port(1).host_connected, "the pty opener")
            os.write(fd, b"raw\r\nbytes\x03")
            got = Collector(driver, 1)
            run_until(loop, got.has(11), "pty input in the guest")
            assert bytes(got.data) == b"raw\r\nbytes\x03"  # raw mode: nothing translated
            driver.write(1, b"guest\nsays\r\n")
            assert read_fd(fd, 12) == b"guest\nsays\r\n"
        finally:
            os.close(fd)
        run_until(loop, lambda: not driver.port(1).host_connected, "the pty to close")


# ---- stdio ------------------------------------------------------------------------------

def test_stdio_port_on_pipes_works_and_restores_blocking_mode(loop: EventLoop) -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        backend = StdioPort(in_r, out_w)
        with console_guest(loop, Port(backend)) as (_, driver):
            assert not os.get_blocking(in_r)
            os.write(in_w, b"keyboard\n")
            got = Collector(driver, 0)
            run_until(loop, got.has(9), "stdin in the guest")
            assert bytes(got.data) == b"keyboard\n"
            os.close(in_w)
            in_w = -1
            run_until(loop, lambda: backend._input_done, "end of input")
            driver.write(0, b"output still flows\n")
            assert read_fd(out_r, 19) == b"output still flows\n"
            assert backend.connected
        assert os.get_blocking(in_r) and os.get_blocking(out_w)
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdio_port_reads_a_regular_file_to_its_end_as_input(
        loop: EventLoop, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    content = bytes(random.Random(9).randbytes(200_000))  # several reads' worth
    path = tmp_path / "input.bin"
    path.write_bytes(content)
    in_fd = os.open(path, os.O_RDONLY)
    out_r, out_w = os.pipe()
    try:
        backend = StdioPort(in_fd, out_w)
        with caplog.at_level("WARNING", logger="pyvirtio.device.console.ports"), \
                console_guest(loop, Port(backend)) as (_, driver):
            got = Collector(driver, 0)
            run_until(loop, got.has(len(content)), "the file's bytes in the guest")
            assert bytes(got.data) == content
            run_until(loop, lambda: backend._input_done, "end of the file")
            driver.write(0, b"still serving\n")
            assert read_fd(out_r, 14) == b"still serving\n"
        assert f"regular file of {len(content)} bytes" in caplog.text
    finally:
        for fd in (in_fd, out_r, out_w):
            os.close(fd)


def test_stdio_port_on_dev_null_is_a_port_without_input(
        loop: EventLoop, caplog: pytest.LogCaptureFixture) -> None:
    in_fd = os.open(os.devnull, os.O_RDONLY)
    out_r, out_w = os.pipe()
    try:
        backend = StdioPort(in_fd, out_w)
        with caplog.at_level("WARNING", logger="pyvirtio.device.console.ports"), \
                console_guest(loop, Port(backend)) as (_, driver):
            run_until(loop, lambda: backend._input_done, "end of input")
            assert backend.connected
            driver.write(0, b"guest output\n")
            assert read_fd(out_r, 13) == b"guest output\n"
        assert "/dev/null: the guest gets no input" in caplog.text
    finally:
        for fd in (in_fd, out_r, out_w):
            os.close(fd)


def test_the_event_loop_reports_host_files_epoll_refuses_as_always_ready(
        loop: EventLoop, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    fds = [os.open(path, os.O_RDONLY), os.open(os.devnull, os.O_RDWR)]
    seen: list[str] = []
    try:
        # a peer's fd (the default) that epoll refuses is refused, as epoll does
        with pytest.raises(PermissionError):
            loop.add_reader(fds[0], lambda: seen.append("refused"))
        loop.add_reader(fds[0], lambda: seen.append("file"), allow_files=True)
        loop.add_writer(fds[1], lambda: seen.append("null"), allow_files=True)
        loop.run_once(5.0)
        assert sorted(seen) == ["file", "null"]
        loop.remove_reader(fds[0])
        loop.remove_writer(fds[1])
        seen.clear()
        loop.run_once(0.01)
        assert seen == []
    finally:
        for fd in fds:
            os.close(fd)


def test_fd_backends_refuse_to_start_without_a_reactor(sock_path: str) -> None:
    backend = UnixSocketPort(sock_path)
    try:
        ConsoleDevice([Port(backend)])
        assert backend.events is None  # not started: it waits for device.reactor
        with pytest.raises(LocalError):
            backend.start(_Sink(), None)
    finally:
        backend.close()


class _Sink:
    def data_received(self, data: bytes) -> None:
        pass

    def connection_changed(self, connected: bool) -> None:
        pass

    def output_drained(self) -> None:
        pass
