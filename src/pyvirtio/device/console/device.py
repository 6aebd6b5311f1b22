"""The console device (virtio-console, VIRTIO 1.x §5.3): ports carrying byte streams between
guest and host, plus a control channel (MULTIPORT) that announces named ports.

Queues (:mod:`pyvirtio.spec.console`): port 0 uses 0 (receiveq: device fills) and 1
(transmitq: driver fills); with MULTIPORT the control queues follow (2: device -> driver,
3: driver -> device) and port N >= 1 uses 2N+2 and 2N+3. Without MULTIPORT (or when the
driver does not ack it) there is only port 0, a console.

Data path. Host input from a port's back-end is appended to the port's backlog and copied
into receive buffers as the guest posts them, so nothing is lost while the guest has no
buffers; when the backlog reaches ``backlog_limit`` the device stops reading the back-end
(its fd is no longer watched, so the kernel pushes back on the host writer) and resumes
below half that. Guest output goes to the back-end; when the host peer is slow and the
back-end holds more than ``output_limit`` bytes, transmit buffers of ordinary ports are kept
(not returned) until it drains, so guest writers wait instead of host memory growing. Guest
output while no host peer is connected, and console-port output beyond ``output_limit``, is
dropped and counted in :attr:`Port.dropped`, as on a serial line nobody reads (QEMU does the
same): Linux's console (hvc) path spins with a spinlock held until each transmit buffer
comes back, so holding one would stall the whole guest kernel; and Linux lets no process
write a named port whose host side is closed, so in practice only console output drops.

What a Linux guest expects (drivers/char/virtio_console.c), and so what this device does:

* the driver posts control buffers and sends DEVICE_READY; the device answers DEVICE_ADD for
  each port; the driver answers PORT_READY(id, 1) per port, and the device then sends
  CONSOLE_PORT (the port becomes /dev/hvcN), PORT_NAME (name bytes after the header: the
  port is /dev/vportNpM with /sys/class/virtio-ports/vportNpM/name) and PORT_OPEN(1) if a
  host peer is connected (Linux reads return EOF and writes block while it is not);
* the guest sends PORT_OPEN(id, 1/0) when a process opens/closes the port (and for a
  console port once hvc owns it). Linux *discards* input arriving for a port nobody has
  open, so host input for a MULTIPORT port waits in the backlog until PORT_OPEN(1);
* console size: without MULTIPORT through the config cols/rows and the config interrupt
  (Linux reads them only on a config change, so its hvc0 is 0x0 until the first
  :meth:`ConsoleDevice.resize`); with MULTIPORT through RESIZE messages, one of which follows
  CONSOLE_PORT. The spec lays RESIZE out as cols, rows; Linux read rows first from 2010
  until the 2025 fix ("virtio_console: fix order of fields cols and rows", backported to
  stable: Debian's UML 6.1.176 reads the spec order), so ``resize_rows_first`` sends the
  order older guests understand.

A misbehaving driver (truncated or unknown control messages, messages for ports that do not
exist, buffers on queues of absent ports) is reported in :attr:`VirtioDevice.problems` and
otherwise ignored; a malformed ring puts the device in DEVICE_NEEDS_RESET as usual.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from pyvirtio.core.reactor import Reactor
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.console.ports import (
    MemoryPort,
    PortBackend,
    PtyPort,
    StdioPort,
    UnixSocketPort,
)
from pyvirtio.device.engine import HOLD
from pyvirtio.errors import LocalError
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError
from pyvirtio.spec import console as C
from pyvirtio.spec import ids
from pyvirtio.spec.features import bit, names_in

EVENT_NAMES = {
    C.VIRTIO_CONSOLE_DEVICE_READY: "DEVICE_READY",
    C.VIRTIO_CONSOLE_DEVICE_ADD: "DEVICE_ADD",
    C.VIRTIO_CONSOLE_DEVICE_REMOVE: "DEVICE_REMOVE",
    C.VIRTIO_CONSOLE_PORT_READY: "PORT_READY",
    C.VIRTIO_CONSOLE_CONSOLE_PORT: "CONSOLE_PORT",
    C.VIRTIO_CONSOLE_RESIZE: "RESIZE",
    C.VIRTIO_CONSOLE_PORT_OPEN: "PORT_OPEN",
    C.VIRTIO_CONSOLE_PORT_NAME: "PORT_NAME",
}

#: Linux refuses more ports than this (VIRTCONS_MAX_PORTS)
MAX_PORTS = 0x8000
DEFAULT_BACKLOG_LIMIT = 256 * 1024
DEFAULT_OUTPUT_LIMIT = 256 * 1024


class Port:
    """One console port: its host back-end, its optional name, and what the device knows
    of the guest side. The device assigns :attr:`id` (the position in its port list)."""

    def __init__(self, backend: PortBackend | None = None, name: str | None = None) -> None:
        self.backend = backend if backend is not None else MemoryPort()
        self.name = name
        self.id = -1
        self.console = False
        self.guest_ready = False  # the driver sent PORT_READY(1)
        self.guest_open = False  # the driver sent PORT_OPEN(1): a guest process has it open
        self.backlog = bytearray()  # host input not yet in a receive buffer
        self.peak_backlog = 0
        self.to_guest = 0  # bytes copied into receive buffers
        self.from_guest = 0  # bytes handed to the back-end
        self.dropped = 0  # guest output dropped because no host peer was connected
        self.held: deque[DescriptorChain] = deque()  # transmit buffers kept for backpressure

    @classmethod
    def parse(cls, spec: str, *, what: str | None = None, announce: bool = True) -> Port:
        """A port from text (command lines, JSON kwargs): ``KIND[:ARG][,name=NAME]`` with
        KIND ``stdio``, ``pty``, ``unix:PATH`` (listening socket) or ``memory``; e.g.
        ``unix:/run/agent.sock,name=org.qemu.guest_agent.0``. ``what`` names the spec's
        origin in errors; ``announce``: a pty prints its path on start."""
        what = what or f"console port {spec!r}"
        where, _, option = spec.partition(",")
        name = None
        if option:
            key, _, name = option.partition("=")
            if key != "name" or not name:
                raise LocalError(f"{what}: expected ',name=NAME' after the kind")
        kind, _, arg = where.partition(":")
        backend: PortBackend
        if kind == "unix" and arg:
            backend = UnixSocketPort(arg)
        elif kind == "pty" and not arg:
            backend = PtyPort(announce=announce)
        elif kind == "stdio" and not arg:
            backend = StdioPort()
        elif kind == "memory" and not arg:
            backend = MemoryPort()
        else:
            raise LocalError(f"{what}: {where!r} is not stdio, pty or unix:PATH (nor memory)")
        return cls(backend, name)

    def __repr__(self) -> str:
        kind = "console" if self.console else repr(self.name) if self.name else "unnamed"
        return f"<console port {self.id} {kind} {self.backend!r}>"


class _PortLink:
    """The :class:`~pyvirtio.device.console.ports.PortEvents` of one port."""

    __slots__ = ("device", "port")

    def __init__(self, device: ConsoleDevice, port: Port) -> None:
        self.device, self.port = device, port

    def data_received(self, data: bytes) -> None:
        self.device._host_input(self.port, data)

    def connection_changed(self, connected: bool) -> None:
        self.device._host_connection(self.port, connected)

    def output_drained(self) -> None:
        self.device._release_held(self.port)


class ConsoleDevice(VirtioDevice):
    """virtio-console with ``ports`` (default: one in-memory console port); a port may be
    given as text for :meth:`Port.parse` (``"pty"``, ``"unix:PATH,name=NAME"``...).

    ``console_port`` is the port id hooked to the guest's hvc console (None: no console
    port under MULTIPORT). ``cols``/``rows`` (None: no VIRTIO_CONSOLE_F_SIZE) is the console
    size; :meth:`resize` changes it. ``max_nr_ports`` (default: the number of ports) leaves
    room for :meth:`add_port` while the guest runs.

    Back-ends that need an event loop start when :attr:`reactor` is set (transports set it);
    in-memory back-ends start at once, so the device also runs without any loop.
    """

    device_id = ids.CONSOLE
    feature_names = names_in(vars(C), "VIRTIO_CONSOLE_F_", strip="VIRTIO_")

    def __init__(
        self,
        ports: Sequence[Port | str] | None = None,
        *,
        cols: int | None = 80,
        rows: int | None = 25,
        multiport: bool = True,
        max_nr_ports: int | None = None,
        console_port: int | None = 0,
        emerg_write: bool = True,
        backlog_limit: int = DEFAULT_BACKLOG_LIMIT,
        output_limit: int = DEFAULT_OUTPUT_LIMIT,
        resize_rows_first: bool = False,
        **kwargs: object,
    ) -> None:
        given = ports if ports is not None else [Port()]
        port_list = [p if isinstance(p, Port) else Port.parse(p) for p in given]
        count = len(port_list)
        nr = max_nr_ports if max_nr_ports is not None else max(count, 1)
        if multiport and not (1 <= count <= nr <= MAX_PORTS):
            raise LocalError(f"{count} ports with max_nr_ports {nr}: need "
                             f"1 <= ports <= max_nr_ports <= {MAX_PORTS}")
        if not multiport and (count != 1 or nr != 1):
            raise LocalError("without MULTIPORT a console device has exactly one port")
        if console_port is not None and not 0 <= console_port < count:
            raise LocalError(f"console_port {console_port} is not one of the {count} ports")
        has_size = cols is not None and rows is not None
        features = (
            (bit(C.VIRTIO_CONSOLE_F_SIZE) if has_size else 0)
            | (bit(C.VIRTIO_CONSOLE_F_MULTIPORT) if multiport else 0)
            | (bit(C.VIRTIO_CONSOLE_F_EMERG_WRITE) if emerg_write else 0)
        )
        self.ports: list[Port] = []
        self._reactor: Reactor | None = None
        super().__init__(C.num_queues(nr, multiport), features, config_size=C.CONFIG_SIZE,
                         **kwargs)  # type: ignore[arg-type]
        self.max_nr_ports = nr
        self.console_port = console_port if multiport else 0
        self.cols, self.rows = (cols or 0), (rows or 0)
        self.backlog_limit = backlog_limit
        self.output_limit = output_limit
        self.resize_rows_first = resize_rows_first
        self._control = C.control_struct(self.endian)
        self._ctrl_out: deque[bytes] = deque()  # control messages waiting for a buffer
        self._driver_ready = False  # DEVICE_READY(1) seen
        C.config_struct(self.endian).pack_into(
            self.config, 0, self.cols, self.rows, nr if multiport else 0, 0
        )
        for port in port_list:
            self.add_port(port)

    # ---- ports and back-ends ------------------------------------------------------------

    @property
    def reactor(self) -> Reactor | None:
        """The event loop back-ends use; setting it starts back-ends that wait for one."""
        return self._reactor

    @reactor.setter
    def reactor(self, value: Reactor | None) -> None:
        self._reactor = value
        for port in self.ports:
            self._start_backend(port)

    def _start_backend(self, port: Port) -> None:
        backend = port.backend
        if backend.events is None and (self._reactor is not None or not backend.needs_reactor):
            backend.start(_PortLink(self, port), self._reactor)
            what = " (console)" if port.console else f" {port.name!r}" if port.name else ""
            self.log.info("%s: port %d%s on %s", self.name, port.id, what, backend.label)

    def add_port(self, port: Port) -> int:
        """Add a port (also while the guest runs, up to ``max_nr_ports``); returns its id."""
        pid = len(self.ports)
        if pid >= self.max_nr_ports:
            raise LocalError(f"{self.name}: all {self.max_nr_ports} port slots are taken")
        port.id = pid
        port.console = pid == self.console_port
        self.ports.append(port)
        self._start_backend(port)
        if self._driver_ready:
            self._send_control(pid, C.VIRTIO_CONSOLE_DEVICE_ADD, 1)
        return pid

    def port(self, key: int | str) -> Port:
        """A port by id or name."""
        for port in self.ports:
            if key in (port.id, port.name):
                return port
        raise LocalError(f"{self.name}: no port {key!r}")

    def close(self) -> None:
        """Close every back-end (sockets, ptys, terminal modes)."""
        for port in self.ports:
            port.backend.close()

    @property
    def multiport_on(self) -> bool:
        return self.has_feature(C.VIRTIO_CONSOLE_F_MULTIPORT)

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size: update the config (config interrupt) and, under
        MULTIPORT, send RESIZE for the console port."""
        if not self.offered_features & bit(C.VIRTIO_CONSOLE_F_SIZE):
            raise LocalError(f"{self.name}: created without a size (cols/rows None)")
        self.cols, self.rows = cols, rows
        self.update_config(C.CFG_COLS, struct.pack("<HH", cols, rows))
        if self.console_port is not None and self.multiport_on:
            port = self.ports[self.console_port]
            if port.guest_ready:
                self._send_resize(port)

    def _send_resize(self, port: Port) -> None:
        if self.has_feature(C.VIRTIO_CONSOLE_F_SIZE):
            size = (self.rows, self.cols) if self.resize_rows_first else (self.cols, self.rows)
            self._send_control(port.id, C.VIRTIO_CONSOLE_RESIZE, 0, C.RESIZE.pack(*size))

    # ---- queues -------------------------------------------------------------------------

    def _port_of_queue(self, queue: int) -> tuple[Port | None, bool]:
        """(port, is its receiveq) for a data queue; port None if no port owns it."""
        if queue < 2:
            pid = 0
        elif self.multiport_on and queue >= 4:
            pid = (queue - 2) // 2
        else:
            return None, False
        return (self.ports[pid] if pid < len(self.ports) else None), queue % 2 == 0

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        if self.multiport_on and queue == C.CONTROL_TRANSMITQ:
            self._control_from_driver(chain)
            return 0
        if self.multiport_on and queue == C.CONTROL_RECEIVEQ:
            return HOLD  # filled in process_queue / when a message is due
        port, receive = self._port_of_queue(queue)
        if port is None:
            self._peer_problem(f"{self.name}: buffer (chain {chain.head}) on queue {queue}, "
                               "which belongs to no port; returned unused")
            return 0
        if not receive:
            return self._guest_output(port, chain)
        if not chain.writable_len:
            # Still held in order (returned empty in its turn), so that the unused
            # buffers are always the newest pops and can be given back when the queue stops.
            self._peer_problem(f"{self.name}: receive buffer (chain {chain.head}) on queue "
                               f"{queue} has no device-writable bytes; it will come back empty")
        return HOLD

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        super().process_queue(index, ring)
        if self.queues[index].ring is not ring:
            return
        if self.multiport_on and index == C.CONTROL_RECEIVEQ:
            self._flush_control()
            return
        port, receive = self._port_of_queue(index)
        if port is not None and receive:
            self._deliver(port)

    def on_queue_stopped(self, index: int, ring: DeviceRing) -> None:
        # Transmit buffers kept for backpressure go back (the engine gives back the
        # receive buffers it held).
        port, receive = self._port_of_queue(index)
        if port is not None and not receive and port.held:
            held, port.held = port.held, deque()
            try:
                ring.push_many((chain, 0) for chain in held)
            except RingError as exc:
                self._peer_problem(str(exc))

    def on_driver_ok(self) -> None:
        # Linux reads a single-port console's cols/rows only on a config change interrupt,
        # so without one its hvc0 would stay 0x0 until the first resize. (With MULTIPORT the
        # size travels in the RESIZE message that follows CONSOLE_PORT.)
        if not self.multiport_on and self.has_feature(C.VIRTIO_CONSOLE_F_SIZE):
            self.resize(self.cols, self.rows)

    def on_reset(self) -> None:
        self._ctrl_out.clear()
        self._driver_ready = False
        for port in self.ports:
            port.held.clear()
            port.guest_ready = port.guest_open = False

    def on_config_write(self, offset: int, data: bytes) -> None:
        # emerg_wr works even before features are negotiated (§5.3.4).
        if (offset == C.CFG_EMERG_WR and 1 <= len(data) <= 4
                and self.offered_features & bit(C.VIRTIO_CONSOLE_F_EMERG_WRITE)):
            port = self.ports[self.console_port or 0]
            if port.backend.connected:
                port.backend.write(data[:1])
                port.from_guest += 1
            else:
                port.dropped += 1
            return
        super().on_config_write(offset, data)

    # ---- guest -> host ------------------------------------------------------------------

    def _is_console(self, port: Port) -> bool:
        return port.console if self.multiport_on else port.id == 0

    def _guest_output(self, port: Port, chain: DescriptorChain) -> int | None:
        data = chain.read()
        backend = port.backend
        console = self._is_console(port)
        if not backend.connected or (console and backend.output_pending > self.output_limit):
            # Linux's hvc spins, holding a spinlock, until its buffer comes back: a console
            # buffer is never held, its excess is dropped instead (QEMU does the same).
            port.dropped += len(data)
            return 0
        port.from_guest += len(data)
        backend.write(data)
        if not console and backend.connected and backend.output_pending > self.output_limit:
            port.held.append(chain)  # returned when the back-end drains
            return None
        return 0

    def _release_held(self, port: Port) -> None:
        held, port.held = port.held, deque()
        self.complete_many(C.port_transmitq(port.id), [(chain, 0) for chain in held])

    # ---- host -> guest ------------------------------------------------------------------

    def _host_input(self, port: Port, data: bytes) -> None:
        port.backlog += data
        port.peak_backlog = max(port.peak_backlog, len(port.backlog))
        if len(port.backlog) >= self.backlog_limit and not port.backend.paused:
            port.backend.pause_reading()
        self._deliver(port)

    def _may_deliver(self, port: Port) -> bool:
        if self.multiport_on:
            return port.guest_open  # Linux discards input for ports nobody has open
        return port.id == 0

    def _deliver(self, port: Port) -> None:
        """Copy the port's backlog into the receive buffers the guest has posted."""
        done: list[tuple[DescriptorChain, int]] = []
        engine = self.engine(C.port_receiveq(port.id))
        if engine is not None and self._may_deliver(port):
            backlog = port.backlog
            while backlog and engine.held:
                chain = engine.held.popleft()
                with memoryview(backlog) as view:
                    n = chain.write(view)
                del backlog[:n]
                port.to_guest += n
                done.append((chain, n))
        self.complete_many(C.port_receiveq(port.id), done)
        if port.backend.paused and len(port.backlog) <= self.backlog_limit // 2:
            port.backend.resume_reading()

    def _host_connection(self, port: Port, connected: bool) -> None:
        if not connected:
            self._release_held(port)  # nobody will take more: let the guest's writers go
        if port.guest_ready:
            self._send_control(port.id, C.VIRTIO_CONSOLE_PORT_OPEN, int(connected))

    # ---- control channel ----------------------------------------------------------------

    def _control_from_driver(self, chain: DescriptorChain) -> None:
        msg = chain.read(C.CONTROL_SIZE)
        if len(msg) < C.CONTROL_SIZE:
            self._peer_problem(
                f"{self.name}: control message in chain {chain.head} has {len(msg)} bytes, "
                f"less than the {C.CONTROL_SIZE}-byte header; ignored")
            return
        pid, event, value = self._control.unpack(msg)
        name = EVENT_NAMES.get(event, f"unknown event {event}")
        if event == C.VIRTIO_CONSOLE_DEVICE_READY:
            if not value:
                self.log.warning("%s: the driver failed to initialise", self.name)
                return
            self._driver_ready = True
            for port in self.ports:
                self._send_control(port.id, C.VIRTIO_CONSOLE_DEVICE_ADD, 1)
            return
        if event not in (C.VIRTIO_CONSOLE_PORT_READY, C.VIRTIO_CONSOLE_PORT_OPEN):
            self._peer_problem(f"{self.name}: control message {name} (port {pid}, value "
                               f"{value}) is not one a driver sends; ignored")
            return
        if pid >= len(self.ports):
            self._peer_problem(f"{self.name}: control message {name} for port {pid}, which "
                               f"does not exist ({len(self.ports)} ports); ignored")
            return
        port = self.ports[pid]
        if event == C.VIRTIO_CONSOLE_PORT_OPEN:
            port.guest_open = bool(value)
            self._deliver(port)
        elif not value:
            self.log.warning("%s: the driver failed to add port %d", self.name, pid)
        else:
            self._port_ready(port)

    def _port_ready(self, port: Port) -> None:
        port.guest_ready = True
        if port.console:
            self._send_control(port.id, C.VIRTIO_CONSOLE_CONSOLE_PORT, 1)
            self._send_resize(port)
        if port.name is not None:
            self._send_control(port.id, C.VIRTIO_CONSOLE_PORT_NAME, 1, port.name.encode())
        if port.backend.connected:
            self._send_control(port.id, C.VIRTIO_CONSOLE_PORT_OPEN, 1)

    def _send_control(self, pid: int, event: int, value: int, payload: bytes = b"") -> None:
        if self.multiport_on:
            self._ctrl_out.append(self._control.pack(pid, event, value) + payload)
            self._flush_control()

    def _flush_control(self) -> None:
        engine = self.engine(C.CONTROL_RECEIVEQ)
        if engine is None:
            return
        done: list[tuple[DescriptorChain, int]] = []
        while self._ctrl_out and engine.held:
            chain = engine.held.popleft()
            msg = self._ctrl_out.popleft()
            if chain.writable_len < len(msg):
                # Dropped rather than retried: a driver that re-posts the same small buffer
                # would otherwise keep us both busy forever.
                self._peer_problem(
                    f"{self.name}: control receive buffer (chain {chain.head}) holds "
                    f"{chain.writable_len} bytes, the message needs {len(msg)}; buffer "
                    "returned empty, message dropped")
                done.append((chain, 0))
                continue
            done.append((chain, chain.write(msg)))
        self.complete_many(C.CONTROL_RECEIVEQ, done)
