"""Drive QEMU's own device models through its qtest line protocol.

QEMU started with ``-qtest unix:PATH`` connects to PATH and then obeys one-line commands
(``outl 0xcf8 0x80001000``, ``inl 0xcfc``, ``readl ADDR``, ``writeq ADDR VALUE``...), each
answered by one line: ``OK``, ``OK <value>`` or ``FAIL <reason>``. After
``irq_intercept_in DEVICE`` it also sends unsolicited ``IRQ raise N`` / ``IRQ lower N`` lines
whenever input N of DEVICE changes level; those can arrive before any answer or on their own
while we wait.

Debian's QEMU has no qtest *accelerator*, so the machine runs TCG. Not with ``-S`` though:
a stopped VM is not what device models expect (virtio-rng leaves its queue alone unless the
VM is running; virtio-blk happens to work). Instead the "BIOS" is
:data:`pyvirtio.guest.qtest.HALT_BIOS`, 64 KiB of HLT: the vCPU halts at the reset vector with
interrupts off, so the VM is *running* while no firmware touches the hardware (see
:mod:`pyvirtio.transport.pci_bus` for doing the firmware's job ourselves). The main loop runs
device back-ends, timers and DMA. Guest RAM is a shared ``memory-backend-file`` in /dev/shm
that we map ourselves, so rings and buffers are plain memory writes instead of protocol
traffic. ``-qtest-log /dev/null`` matters: without it QEMU logs every command and answer to
stderr.

:class:`QtestClient` speaks the protocol over a connected socket. It is the *host bus* of
:mod:`pyvirtio.transport.pci_bus` (port I/O, MMIO) and its INTx line source (IRQ levels).
Launching QEMU under qtest (process, socket, RAM file) is
:class:`pyvirtio.guest.qtest.QtestMachine`.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from collections.abc import Callable, Collection

from pyvirtio.errors import LocalError, PeerError

log = logging.getLogger("pyvirtio.qtest")

#: default seconds to wait for any single answer from QEMU
DEFAULT_TIMEOUT = 10.0

_SIZE_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}


class QtestError(PeerError):
    """QEMU answered FAIL, went away, or sent something outside the protocol."""


class QtestTimeoutError(QtestError, TimeoutError):
    """QEMU did not answer in time. The stream is out of step afterwards: the client is
    closed, since a late answer would be taken for the next command's."""


class QtestClient:
    """A synchronous client of the qtest protocol over a connected stream socket.

    Every read has a timeout (``timeout`` seconds unless a call says otherwise). IRQ lines
    that arrive interleaved with answers update :meth:`irq_level` and are counted in
    :attr:`irq_events`. ``describe_peer`` is called for error messages (the machine uses it
    to add QEMU's exit status and stderr).
    """

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT,
                 describe_peer: Callable[[], str] | None = None) -> None:
        self._sock: socket.socket | None = sock
        self._buf = bytearray()
        self.timeout = timeout
        self._describe_peer = describe_peer
        self._levels: dict[int, bool] = {}
        self.irq_events = 0
        #: commands answered, and seconds spent waiting for their answers (latency figures)
        self.commands = 0
        self.command_seconds = 0.0
        self.broken: str | None = None

    # ---- the line protocol --------------------------------------------------------------

    def _fail(self, message: str, exc: type[QtestError] = QtestError) -> QtestError:
        extra = self._describe_peer() if self._describe_peer is not None else ""
        if extra:
            message = f"{message}; {extra}"
        if self.broken is None:
            self.broken = message
        self._close_socket()
        return exc(message)

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the connection (QEMU keeps running; the machine stops it)."""
        if self.broken is None:
            self.broken = "qtest connection closed"
        self._close_socket()

    def _sock_or_raise(self) -> socket.socket:
        if self._sock is None:
            raise QtestError(self.broken or "qtest connection closed")
        return self._sock

    def _fill(self, deadline: float) -> bool:
        """Read whatever QEMU sent, waiting until ``deadline``. False on timeout."""
        sock = self._sock_or_raise()
        remaining = deadline - time.monotonic()
        # A socket timeout is Python's poll-then-recv; 0 makes it a non-blocking peek.
        sock.settimeout(remaining if remaining > 0 else 0.0)
        try:
            data = sock.recv(65536)
        except (BlockingIOError, TimeoutError):
            return False
        except OSError as exc:
            raise self._fail(f"qtest connection failed: {exc}") from exc
        if not data:
            raise self._fail("QEMU closed the qtest connection")
        self._buf += data
        return True

    def _next_line(self, deadline: float) -> str | None:
        """The next complete line, or None when ``deadline`` passes first."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = self._buf[:nl].decode("ascii", "replace")
                del self._buf[: nl + 1]
                return line
            if not self._fill(deadline):
                return None

    def _take_irq(self, line: str) -> bool:
        """Record an ``IRQ raise N`` / ``IRQ lower N`` line; False if ``line`` is not one."""
        if not line.startswith("IRQ "):
            return False
        parts = line.split()
        if len(parts) != 3 or parts[1] not in ("raise", "lower") or not parts[2].isdigit():
            raise self._fail(f"malformed IRQ line from QEMU: {line!r}")
        self._levels[int(parts[2])] = parts[1] == "raise"
        self.irq_events += 1
        return True

    def command(self, line: str, timeout: float | None = None) -> str:
        """Send one command and return the text after ``OK`` (may be empty).

        Raises :class:`QtestError` on ``FAIL`` (the connection stays usable) and
        :class:`QtestTimeoutError` when no answer comes within ``timeout``.
        """
        if "\n" in line:
            raise LocalError(f"qtest command contains a newline: {line!r}")
        sock = self._sock_or_raise()
        start = time.monotonic()
        deadline = start + (self.timeout if timeout is None else timeout)
        sock.settimeout(max(0.001, deadline - start))
        try:
            sock.sendall(line.encode("ascii") + b"\n")
        except TimeoutError:
            raise self._fail(f"QEMU did not take {line[:60]!r} within "
                             f"{deadline - start:.1f} s", QtestTimeoutError) from None
        except OSError as exc:
            raise self._fail(f"sending {line[:60]!r} to QEMU failed: {exc}") from exc
        while True:
            answer = self._next_line(deadline)
            if answer is None:
                raise self._fail(
                    f"no answer from QEMU to {line[:60]!r} within "
                    f"{deadline - start:.1f} s", QtestTimeoutError)
            if self._take_irq(answer):
                continue
            self.commands += 1
            self.command_seconds += time.monotonic() - start
            if answer == "OK":
                return ""
            if answer.startswith("OK "):
                return answer[3:]
            if answer.startswith("FAIL"):
                raise QtestError(f"QEMU refused {line[:60]!r}: {answer}")
            raise self._fail(f"unexpected answer from QEMU to {line[:60]!r}: {answer!r}")

    def _value(self, line: str) -> int:
        text = self.command(line)
        try:
            return int(text, 16)
        except ValueError:
            raise self._fail(f"QEMU answered {line!r} with {text!r}, not a number") from None

    # ---- port I/O -----------------------------------------------------------------------

    def outb(self, port: int, value: int) -> None:
        self.command(f"outb 0x{port:x} 0x{value:x}")

    def outw(self, port: int, value: int) -> None:
        self.command(f"outw 0x{port:x} 0x{value:x}")

    def outl(self, port: int, value: int) -> None:
        self.command(f"outl 0x{port:x} 0x{value:x}")

    def inb(self, port: int) -> int:
        return self._value(f"inb 0x{port:x}")

    def inw(self, port: int) -> int:
        return self._value(f"inw 0x{port:x}")

    def inl(self, port: int) -> int:
        return self._value(f"inl 0x{port:x}")

    # ---- memory (MMIO or RAM, through QEMU's address space) -----------------------------

    def readb(self, addr: int) -> int:
        return self._value(f"readb 0x{addr:x}")

    def readw(self, addr: int) -> int:
        return self._value(f"readw 0x{addr:x}")

    def readl(self, addr: int) -> int:
        return self._value(f"readl 0x{addr:x}")

    def readq(self, addr: int) -> int:
        return self._value(f"readq 0x{addr:x}")

    def writeb(self, addr: int, value: int) -> None:
        self.command(f"writeb 0x{addr:x} 0x{value:x}")

    def writew(self, addr: int, value: int) -> None:
        self.command(f"writew 0x{addr:x} 0x{value:x}")

    def writel(self, addr: int, value: int) -> None:
        self.command(f"writel 0x{addr:x} 0x{value:x}")

    def writeq(self, addr: int, value: int) -> None:
        self.command(f"writeq 0x{addr:x} 0x{value:x}")

    def read(self, addr: int, length: int) -> bytes:
        """``length`` bytes at ``addr`` as QEMU's memory core sees them."""
        if length <= 0:
            return b""
        text = self.command(f"b64read 0x{addr:x} 0x{length:x}")
        try:
            data = base64.b64decode(text, validate=True)
        except ValueError:
            raise self._fail(f"QEMU sent invalid base64 for b64read 0x{addr:x}") from None
        if len(data) != length:
            raise self._fail(f"b64read 0x{addr:x} +{length} returned {len(data)} bytes")
        return data

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``addr`` through QEMU's memory core."""
        if len(data):
            encoded = base64.b64encode(bytes(data)).decode("ascii")
            self.command(f"b64write 0x{addr:x} 0x{len(data):x} {encoded}")

    def memset(self, addr: int, length: int, byte: int) -> None:
        if length > 0:
            self.command(f"memset 0x{addr:x} 0x{length:x} 0x{byte:x}")

    # ---- the host bus interface of pyvirtio.transport.pci_bus -------------------------------

    def io_read(self, port: int, size: int) -> int:
        if size == 1:
            return self.inb(port)
        if size == 2:
            return self.inw(port)
        if size == 4:
            return self.inl(port)
        raise LocalError(f"port reads are 1, 2 or 4 bytes, not {size}")

    def io_write(self, port: int, size: int, value: int) -> None:
        if size == 1:
            self.outb(port, value)
        elif size == 2:
            self.outw(port, value)
        elif size == 4:
            self.outl(port, value)
        else:
            raise LocalError(f"port writes are 1, 2 or 4 bytes, not {size}")

    def mmio_read(self, addr: int, size: int) -> int:
        suffix = _SIZE_SUFFIX.get(size)
        if suffix is None:
            raise LocalError(f"MMIO reads are 1, 2, 4 or 8 bytes, not {size}")
        return self._value(f"read{suffix} 0x{addr:x}")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        suffix = _SIZE_SUFFIX.get(size)
        if suffix is None:
            raise LocalError(f"MMIO writes are 1, 2, 4 or 8 bytes, not {size}")
        self.command(f"write{suffix} 0x{addr:x} 0x{value:x}")

    # ---- interrupts ---------------------------------------------------------------------

    def irq_intercept_in(self, qom_path: str) -> None:
        """Report level changes of ``qom_path``'s (unnamed) GPIO inputs as IRQ lines; on
        ``-M pc`` ``ioapic`` turns every GSI into ``IRQ raise/lower GSI``."""
        self.command(f"irq_intercept_in {qom_path}")

    def irq_intercept_out(self, qom_path: str) -> None:
        self.command(f"irq_intercept_out {qom_path}")

    def irq_level(self, line: int) -> bool:
        """The last level QEMU reported for intercepted input ``line`` (low until raised)."""
        return self._levels.get(line, False)

    def poll_irqs(self) -> None:
        """Take in IRQ lines QEMU has already sent, without waiting."""
        self.wait_irq((), 0.0)

    def wait_irq(self, lines: Collection[int], timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until one of ``lines`` is high; True if one is.

        A line that is already high counts at once (INTx is level-triggered: it stays
        high until the device is acknowledged). Only IRQ lines may arrive while no command
        is outstanding; anything else breaks the connection.
        """
        deadline = time.monotonic() + timeout
        while True:
            for line in lines:
                if self._levels.get(line, False):
                    return True
            text = self._next_line(deadline)
            if text is None:
                return False
            if not self._take_irq(text):
                raise self._fail(f"QEMU sent {text!r} while no command was outstanding")


__all__ = [
    "QtestClient",
    "QtestError",
    "QtestTimeoutError",
]
