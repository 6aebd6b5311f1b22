"""The console driver: byte streams over virtio-console ports, with the MULTIPORT control
handshake a Linux guest performs (drivers/char/virtio_console.c).

Under MULTIPORT the driver posts control buffers and sends DEVICE_READY; for every
DEVICE_ADD it posts receive buffers for the port and answers PORT_READY(1); it learns the
console port (CONSOLE_PORT, which it opens at once, as hvc does), names (PORT_NAME), sizes
(RESIZE) and whether a host peer is connected (PORT_OPEN). :meth:`ConsoleDriver.open`
sends PORT_OPEN(1), as a guest process opening /dev/vportNpM does. Without MULTIPORT there
is one console port 0, always open.

Receive buffers are refilled as soon as they come back, and their bytes gathered per port
(:attr:`ConsolePort.inbuf`); :meth:`ConsoleDriver.read` and
:meth:`ConsoleDriver.read_available` take from there. Buffers use two descriptors each, so
the device's scatter-gather (and INDIRECT tables when negotiated) is exercised.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pyvirtio.driver.base import Callback, Driver, Virtqueue, register_driver
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.ring import QueueFullError
from pyvirtio.spec import console as C
from pyvirtio.spec import ids
from pyvirtio.spec.features import bit


@dataclass(eq=False)
class ConsolePort:
    """The driver's view of one port."""

    id: int
    name: str | None = None
    console: bool = False
    host_connected: bool = False  # the device said PORT_OPEN(1)
    open: bool = False  # we sent PORT_OPEN(1)
    size: tuple[int, int] | None = None  # (cols, rows) from RESIZE
    inbuf: bytearray = field(default_factory=bytearray)


@register_driver
class ConsoleDriver(Driver):
    """virtio-console driver. Class attributes size the buffers; subclass to change them
    (e.g. ``rx_buffers = 0`` for a guest that posts receive buffers only when asked)."""

    device_ids = (ids.CONSOLE,)
    features = bit(C.VIRTIO_CONSOLE_F_SIZE) | bit(C.VIRTIO_CONSOLE_F_MULTIPORT)
    #: receive buffers posted per port when it is added
    rx_buffers: ClassVar[int] = 16
    #: bytes per receive buffer
    buffer_size: ClassVar[int] = 4096
    #: bytes per transmit buffer (Linux sends at most 32 KiB per write())
    tx_chunk: ClassVar[int] = 32768
    control_buffers: ClassVar[int] = 16
    #: re-post receive buffers as soon as they are used (False: a guest that reads only
    #: when the test calls :meth:`fill_receive`)
    refill: ClassVar[bool] = True
    #: ring size for every queue (None: the device's maximum)
    queue_size: ClassVar[int | None] = None

    def probe(self) -> None:
        dev = self.device
        self.multiport = dev.has_feature(C.VIRTIO_CONSOLE_F_MULTIPORT)
        self.ports: dict[int, ConsolePort] = {}
        self.problems: list[str] = []  # device misbehaviour seen, newest last
        self._control = C.control_struct()
        self.max_nr_ports = 1
        if self.multiport:
            (n,) = struct.unpack("<I", dev.read_config(C.CFG_MAX_NR_PORTS, 4))
            if not 1 <= n <= 0x8000:
                raise PeerError(f"console device reports max_nr_ports {n}, not 1..32768")
            self.max_nr_ports = n
        count = C.num_queues(self.max_nr_ports, self.multiport)
        callbacks: list[Callback | None] = [None] * count
        for pid in range(self.max_nr_ports):
            callbacks[C.port_receiveq(pid)] = self._receive_interrupt
        if self.multiport:
            callbacks[C.CONTROL_RECEIVEQ] = self._control_interrupt
        self.vqs = dev.find_vqs(count, callbacks, size=self.queue_size)
        dev.ready()  # as Linux does: the handshake below notifies the device
        if self.multiport:
            cvq = self.vqs[C.CONTROL_RECEIVEQ]
            for _ in range(self.control_buffers):
                if not self._post_receive(cvq):
                    break
            cvq.kick()
            self._send_control(C.VIRTIO_CONSOLE_BAD_ID, C.VIRTIO_CONSOLE_DEVICE_READY, 1)
        else:
            port = self._add_port(0)
            port.console = port.open = port.host_connected = True

    # ---- ports --------------------------------------------------------------------------

    def port(self, key: int | str) -> ConsolePort:
        """A port by id or by name."""
        for port in self.ports.values():
            if key in (port.id, port.name):
                return port
        raise LocalError(f"no console port {key!r} (have {sorted(self.ports)})")

    def _add_port(self, pid: int) -> ConsolePort:
        port = self.ports[pid] = ConsolePort(pid)
        self.fill_receive(pid, self.rx_buffers)
        return port

    def fill_receive(self, key: int | str, count: int) -> None:
        """Post up to ``count`` more receive buffers for a port (as many as fit)."""
        vq = self.vqs[C.port_receiveq(self.port(key).id)]
        posted = 0
        while posted < count and self._post_receive(vq):
            posted += 1
        if posted:
            vq.kick()

    def open(self, key: int | str) -> None:
        """Open the port, as a guest process opening /dev/vportNpM (PORT_OPEN 1)."""
        port = self.port(key)
        port.open = True
        self._send_control(port.id, C.VIRTIO_CONSOLE_PORT_OPEN, 1)

    def close(self, key: int | str) -> None:
        port = self.port(key)
        port.open = False
        self._send_control(port.id, C.VIRTIO_CONSOLE_PORT_OPEN, 0)

    def read_size(self) -> tuple[int, int]:
        """(cols, rows) from config space (VIRTIO_CONSOLE_F_SIZE without MULTIPORT)."""
        cols, rows = struct.unpack("<HH", self.device.read_config(C.CFG_COLS, 4))
        return cols, rows

    # ---- data ---------------------------------------------------------------------------

    def send(self, key: int | str, data: bytes | bytearray | memoryview) -> int:
        """Queue as much of ``data`` as the transmit queue takes now; returns that count."""
        port = self.port(key)
        vq = self.vqs[C.port_transmitq(port.id)]
        self._reclaim(vq)
        view = memoryview(data).cast("B")
        alloc = self.device.allocator
        sent = 0
        while sent < len(view):
            chunk = view[sent : sent + self.tx_chunk]
            addr = alloc.alloc(len(chunk), 64)
            self.device.memory.write(addr, chunk)
            try:
                vq.add_buf(_two_halves(addr, len(chunk)), [], addr)
            except QueueFullError:
                alloc.free(addr)
                break
            sent += len(chunk)
        if sent:
            vq.kick()
        return sent

    def write(self, key: int | str, data: bytes | bytearray | memoryview,
              timeout: float = 5.0) -> None:
        """Send all of ``data``, waiting for the device to consume buffers as needed."""
        view = memoryview(data).cast("B")
        deadline = time.monotonic() + timeout
        sent = self.send(key, view)
        while sent < len(view):
            self._wait(deadline, f"port {key!r}: {sent} of {len(view)} bytes sent")
            sent += self.send(key, view[sent:])

    def read_available(self, key: int | str) -> bytes:
        """Everything received on the port so far (and forget it)."""
        self.poll()
        port = self.port(key)
        out = bytes(port.inbuf)
        port.inbuf.clear()
        return out

    def read(self, key: int | str, n: int, timeout: float = 5.0) -> bytes:
        """Exactly ``n`` received bytes, waiting up to ``timeout`` seconds for them."""
        port = self.port(key)
        deadline = time.monotonic() + timeout
        self.poll()
        while len(port.inbuf) < n:
            self._wait(deadline, f"port {key!r}: {len(port.inbuf)} of {n} bytes received")
            self.poll()
        out = bytes(port.inbuf[:n])
        del port.inbuf[:n]
        return out

    def poll(self) -> None:
        """Collect used buffers on every queue without waiting for interrupts."""
        for pid in self.ports:
            vq = self.vqs[C.port_receiveq(pid)]
            if vq.ring.has_used():
                self._receive_interrupt(vq)
        if self.multiport and self.vqs[C.CONTROL_RECEIVEQ].ring.has_used():
            self._control_interrupt(self.vqs[C.CONTROL_RECEIVEQ])

    def _wait(self, deadline: float, progress: str) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"console: {progress} before the timeout")
        self.device.check_needs_reset()
        if not self.device.transport.wait(min(remaining, 0.5)):
            time.sleep(0.001)  # a synchronous transport returns at once: do not spin hot

    # ---- buffers ------------------------------------------------------------------------

    def _post_receive(self, vq: Virtqueue) -> bool:
        """Post one receive buffer; False if the ring is full."""
        addr = self.device.allocator.alloc(self.buffer_size, 64)
        try:
            vq.add_buf([], _two_halves(addr, self.buffer_size), addr)
        except QueueFullError:
            self.device.allocator.free(addr)
            return False
        return True

    def _reclaim(self, vq: Virtqueue) -> None:
        """Free transmit buffers the device is done with."""
        while (got := vq.get_buf()) is not None:
            self.device.allocator.free(got[0])  # type: ignore[arg-type]

    @staticmethod
    def _drain(vq: Virtqueue) -> list[tuple[int, int]]:
        """Every used buffer, closing the enable-callback race (the paper's §3.1)."""
        used: list[tuple[int, int]] = []
        while True:
            vq.disable_cb()
            while (got := vq.get_buf()) is not None:
                used.append(got)  # type: ignore[arg-type]
            if vq.enable_cb():
                return used

    def _receive_interrupt(self, vq: Virtqueue) -> None:
        pid = 0 if vq.index == 0 else (vq.index - 2) // 2
        port = self.ports.get(pid)
        memory = self.device.memory
        used = self._drain(vq)
        for addr, n in used:
            if port is not None:
                port.inbuf += memory.read(addr, n)
            else:
                self.problems.append(f"device filled {n} bytes on queue {vq.index} of port "
                                     f"{pid}, which was never added")
            if self.refill:
                vq.add_buf([], _two_halves(addr, self.buffer_size), addr)
            else:
                self.device.allocator.free(addr)
        if used and self.refill:
            vq.kick()

    # ---- control channel ----------------------------------------------------------------

    def _control_interrupt(self, vq: Virtqueue) -> None:
        used = self._drain(vq)
        for addr, n in used:
            msg = self.device.memory.read(addr, n)
            vq.add_buf([], _two_halves(addr, self.buffer_size), addr)
            self._handle_control(msg)
        if used:
            vq.kick()

    def _handle_control(self, msg: bytes) -> None:
        if len(msg) < C.CONTROL_SIZE:
            self.problems.append(f"control message of {len(msg)} bytes, shorter than a header")
            return
        pid, event, value = self._control.unpack_from(msg)
        if event == C.VIRTIO_CONSOLE_DEVICE_ADD:
            if pid >= self.max_nr_ports:
                self.problems.append(f"DEVICE_ADD for port {pid} >= max_nr_ports "
                                     f"{self.max_nr_ports}")
                return
            if pid not in self.ports:
                self._add_port(pid)
            self._send_control(pid, C.VIRTIO_CONSOLE_PORT_READY, 1)
            return
        port = self.ports.get(pid)
        if port is None:
            self.problems.append(f"control event {event} for port {pid}, never added")
        elif event == C.VIRTIO_CONSOLE_DEVICE_REMOVE:
            del self.ports[pid]
        elif event == C.VIRTIO_CONSOLE_CONSOLE_PORT:
            if value and not port.console:
                port.console = True
                self.open(pid)  # hvc owns a console port from now on
        elif event == C.VIRTIO_CONSOLE_RESIZE:
            if len(msg) >= C.CONTROL_SIZE + C.RESIZE.size:
                port.size = C.RESIZE.unpack_from(msg, C.CONTROL_SIZE)
            else:
                self.problems.append(f"RESIZE for port {pid} without a size")
        elif event == C.VIRTIO_CONSOLE_PORT_OPEN:
            port.host_connected = bool(value)
        elif event == C.VIRTIO_CONSOLE_PORT_NAME:
            port.name = msg[C.CONTROL_SIZE :].split(b"\0", 1)[0].decode("utf-8", "replace")
        else:
            self.problems.append(f"unknown control event {event} for port {pid}")

    def _send_control(self, pid: int, event: int, value: int) -> None:
        if not self.multiport:
            return
        vq = self.vqs[C.CONTROL_TRANSMITQ]
        self._reclaim(vq)
        addr = self.device.allocator.alloc(C.CONTROL_SIZE, 8)
        self.device.memory.write(addr, self._control.pack(pid, event, value))
        vq.add_buf([(addr, C.CONTROL_SIZE)], [], addr)
        vq.kick()


def _two_halves(addr: int, length: int) -> Sequence[tuple[int, int]]:
    """One buffer as two descriptors (one if it is a single byte)."""
    if length < 2:
        return [(addr, length)]
    half = length // 2
    return [(addr, half), (addr + half, length - half)]
