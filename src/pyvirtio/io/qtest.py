"""Drive QEMU's own device models through its qtest line protocol.

QEMU started with ``-qtest unix:PATH`` connects to PATH and then obeys one-line commands
(``outl 0xcf8 0x80001000``, ``inl 0xcfc``, ``readl ADDR``, ``writeq ADDR VALUE``...), each
answered by one line: ``OK``, ``OK <value>`` or ``FAIL <reason>``. After
``irq_intercept_in DEVICE`` it also sends unsolicited ``IRQ raise N`` / ``IRQ lower N`` lines
whenever input N of DEVICE changes level; those can arrive before any answer or on their own
while we wait.

Debian's QEMU has no qtest *accelerator*, so the machine runs TCG. Not with ``-S`` though:
a stopped VM is not what device models expect (virtio-rng leaves its queue alone unless the
VM is running; virtio-blk happens to work). Instead the "BIOS" is :data:`HALT_BIOS`, 64 KiB
of HLT: the vCPU halts at the reset vector with interrupts off, so the VM is *running* while
no firmware touches the hardware (see :mod:`pyvirtio.transport.pci_bus` for doing the firmware's
job ourselves). The main loop runs device back-ends, timers and DMA. Guest RAM is a shared
``memory-backend-file`` in /dev/shm that we map ourselves, so rings and buffers are plain
memory writes instead of protocol traffic. ``-qtest-log /dev/null`` matters: without it QEMU
logs every command and answer to stderr.

Two classes:

* :class:`QtestClient` speaks the protocol over a connected socket. It is the *host bus* of
  :mod:`pyvirtio.transport.pci_bus` (port I/O, MMIO) and its INTx line source (IRQ levels).
* :class:`QtestMachine` owns the QEMU process, the socket and the RAM file: it starts QEMU,
  waits for its connection, maps RAM, and on :meth:`QtestMachine.close` (also on any failure
  while starting) stops QEMU and removes every file it made.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from pyvirtio.errors import LocalError, PeerError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator

if TYPE_CHECKING:
    from pyvirtio.transport.virtio_pci import VirtioPciTransport

log = logging.getLogger("pyvirtio.qtest")

MiB = 1 << 20
#: the most RAM a QtestMachine maps (all of it below the PCI hole, gpa == file offset)
MAX_MEMORY = 2048 * MiB

#: default seconds to wait for any single answer from QEMU
DEFAULT_TIMEOUT = 10.0

#: A 64 KiB "BIOS" of nothing but HLT: the CPU halts at the reset vector (interrupts are off
#: after reset, so it stays halted, using no CPU time).
HALT_BIOS = b"\xf4" * 0x10000

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


def _fmt_size(size: int) -> str:
    return f"{size // MiB}M" if size % MiB == 0 else str(size)


class QtestMachine:
    """A QEMU process under qtest, its socket and its shared RAM file.

    ``device_args`` are extra QEMU arguments (``-device virtio-rng-pci,...``, ``-object``,
    ``-drive``...). The machine is ``-M pc`` with ``memory_size`` bytes of RAM in a
    memory-backend-file under ``shm_dir`` that is mapped here as :attr:`memory`; guest
    physical address == file offset for RAM below the PCI hole. The vCPU runs a "BIOS" that
    only halts (:data:`HALT_BIOS`): the machine is *running*, as device models expect, but
    nothing but us touches the hardware.

    Nothing is left on disk: the socket, RAM file, ROM and stderr file live only until QEMU
    has them open (stderr stays readable through our open file). :meth:`close` stops QEMU
    (SIGTERM, then SIGKILL); it also runs when :meth:`start` fails and, as a last resort,
    when the object is garbage collected. QEMU gets a parent-death signal, so a SIGKILL of
    this process stops it too (losing its qtest connection alone would not). The signal
    follows the *thread* that started QEMU: start machines from a thread that outlives them.
    """

    #: guest-physical memory below this is left to the legacy PC holes (VGA, option ROMs)
    LOW_RESERVED = 1 * MiB

    def __init__(
        self,
        device_args: Sequence[str] = (),
        *,
        memory_size: int = 64 * MiB,
        machine: str = "pc",
        qemu: str = "qemu-system-x86_64",
        timeout: float = DEFAULT_TIMEOUT,
        start_timeout: float = 30.0,
        shm_dir: str = "/dev/shm",
        qtest_log: str | None = None,
    ) -> None:
        if not 4 * MiB <= memory_size <= MAX_MEMORY or memory_size % 4096:
            # Above 2 GiB the pc machine may split RAM around the PCI hole, and guest
            # physical addresses would no longer equal file offsets.
            raise LocalError(f"memory_size must be a multiple of 4096 from 4 MiB to "
                             f"{MAX_MEMORY // MiB} MiB, not {memory_size}")
        self.device_args = list(device_args)
        self.memory_size = memory_size
        self.machine = machine
        self.qemu = qemu
        self.timeout = timeout
        self.start_timeout = start_timeout
        self.shm_dir = shm_dir
        self.qtest_log = qtest_log
        self.process: subprocess.Popen[bytes] | None = None
        self.client: QtestClient | None = None
        self.memory: GuestMemory | None = None
        self.allocator: Allocator | None = None
        self.transports: list[VirtioPciTransport] = []
        #: the temporary directory and RAM file used while starting (gone once started)
        self.workdir: str | None = None
        self.ram_path: str | None = None
        self._stderr: BinaryIO | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def command_line(self, socket_path: str, shm_path: str, bios_path: str) -> list[str]:
        """The exact QEMU command line."""
        size = _fmt_size(self.memory_size)
        return [
            self.qemu,
            "-M", f"{self.machine},memory-backend=mem",
            "-accel", "tcg",
            "-bios", bios_path,
            "-display", "none",
            "-nodefaults",
            "-no-user-config",
            "-qtest", f"unix:{socket_path}",
            "-qtest-log", self.qtest_log or "/dev/null",
            "-object",
            f"memory-backend-file,id=mem,size={size},mem-path={shm_path},share=on",
            "-m", size,
            *self.device_args,
        ]

    def start(self) -> QtestMachine:
        """Start QEMU and wait until it is connected and answering. Idempotent."""
        if self.client is not None:
            return self
        if shutil.which(self.qemu) is None:
            raise LocalError(f"{self.qemu} not found on PATH")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.workdir = workdir = tempfile.mkdtemp(prefix="pyvirtio-qtest-")
        sock_path = os.path.join(workdir, "qtest.sock")
        bios_path = os.path.join(workdir, "halt.rom")
        with open(bios_path, "wb") as rom:
            rom.write(HALT_BIOS)
        self._stderr = open(os.path.join(workdir, "qemu.stderr"), "w+b")
        fd, self.ram_path = tempfile.mkstemp(prefix="pyvirtio-qtest-", dir=self.shm_dir)
        try:
            os.ftruncate(fd, self.memory_size)
        finally:
            os.close(fd)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(sock_path)
            listener.listen(1)
            self.process = subprocess.Popen(
                self.command_line(sock_path, self.ram_path, bios_path),
                stdin=subprocess.DEVNULL, stdout=self._stderr, stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C to the tests is ours to handle
                preexec_fn=_die_with_parent,
            )
            self._finalizer = weakref.finalize(
                self, _reap, self.process, workdir, self.ram_path, self._stderr)
            conn = self._accept(listener)
        finally:
            listener.close()
        self.client = QtestClient(conn, self.timeout, self._describe_process)
        # The first answer means QEMU has created the machine: RAM file mapped, ROM loaded.
        self.client.command("endianness", timeout=self.start_timeout)
        self.memory = GuestMemory.from_file(self.ram_path, self.memory_size)
        _remove_files(workdir, self.ram_path)
        self.allocator = Allocator(self.LOW_RESERVED, self.memory_size - self.LOW_RESERVED)
        log.info("qtest QEMU pid %d started: %s", self.pid, " ".join(self.device_args))

    def _accept(self, listener: socket.socket) -> socket.socket:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        listener.settimeout(0.05)
        while True:
            try:
                conn, _ = listener.accept()
                return conn
            except TimeoutError:
                pass
            if self.process.poll() is not None:
                raise QtestError(f"QEMU exited before connecting; {self._describe_process()}")
            if time.monotonic() > deadline:
                raise QtestTimeoutError(
                    f"QEMU did not connect to the qtest socket within {self.start_timeout} s;"
                    f" {self._describe_process()}")

    def stderr_text(self, limit: int = 4000) -> str:
        """The last ``limit`` bytes QEMU printed."""
        if self._stderr is None or self._stderr.closed:
            return ""
        try:
            size = os.fstat(self._stderr.fileno()).st_size
            data = os.pread(self._stderr.fileno(), limit, max(0, size - limit))
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def _describe_process(self) -> str:
        if self.process is None:
            return "QEMU not started"
        try:
            # Errors often mean QEMU is on its way out: give it a moment to say why.
            code: int | None = self.process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            code = None
        state = "running" if code is None else f"exited with status {code}"
        err = self.stderr_text(2000).strip()
        if err:
            return f"QEMU pid {self.process.pid} {state}, stderr: {err}"
        return f"QEMU pid {self.process.pid} {state}"

    def close(self) -> None:
        """Stop QEMU (SIGTERM, then SIGKILL) and remove anything still on disk."""
        for transport in self.transports:
            transport.detach()
        self.transports.clear()
        if self.client is not None:
            self.client.close()
        if self.memory is not None:
            self.memory.close()
        self.client = None
        self.memory = None
        self.allocator = None
        if self._finalizer is not None:
            self._finalizer()  # stops the process, removes files, closes stderr; runs once
        else:
            _reap(None, self.workdir, self.ram_path, self._stderr)

    def __enter__(self) -> QtestMachine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- conveniences -------------------------------------------------------------------

    @property
    def qtest(self) -> QtestClient:
        """The protocol client (raises unless started)."""
        if self.client is None:
            raise LocalError("the qtest machine is not started")
        return self.client

    def virtio_transports(self, prefer_modern: bool = True,
                          use_interrupts: bool = True) -> list[VirtioPciTransport]:
        """Act as firmware for bus 0 (assign BARs, route INTx), find every virtio function
        and return one transport per device, sharing this machine's RAM and allocator.

        With ``use_interrupts`` the ioapic inputs are intercepted and transports wait for
        their INTx line; otherwise they poll the ISR register. Call once per machine.
        """
        from pyvirtio.transport.virtio_pci import discover

        client = self.qtest
        assert self.memory is not None and self.allocator is not None
        if self.transports:
            raise LocalError("this machine's PCI bus is already set up: use .transports")
        if use_interrupts:
            client.irq_intercept_in("ioapic")
        found = discover(client, self.memory, self.allocator,
                         lines=client if use_interrupts else None,
                         prefer_modern=prefer_modern)
        self.transports.extend(found)
        return found


def _die_with_parent() -> None:
    """In the child before exec: ask Linux to SIGKILL us when the parent thread dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


_PR_SET_PDEATHSIG = 1


def _remove_files(workdir: str | None, ram_path: str | None) -> None:
    if ram_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ram_path)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)


def _reap(process: subprocess.Popen[bytes] | None, workdir: str | None,
          ram_path: str | None, stderr: BinaryIO | None) -> None:
    """Stop ``process`` and remove the files; safe to call on a half-started machine."""
    if process is not None and process.poll() is None:
        try:
            # Its own session: signal the group so helpers QEMU may fork go too.
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)
    _remove_files(workdir, ram_path)
    if stderr is not None:
        stderr.close()


__all__ = [
    "QtestClient",
    "QtestError",
    "QtestMachine",
    "QtestTimeoutError",
]
