"""QEMU under qtest: the process, its qtest socket and its shared RAM file.

:class:`QtestMachine` starts QEMU with a "BIOS" that only halts (:data:`HALT_BIOS`), waits
for its qtest connection, maps its RAM, and on :meth:`QtestMachine.close` (also on any failure
while starting) stops QEMU and removes every file it made. The line protocol itself is
:class:`pyvirtio.io.qtest.QtestClient`.
"""

from __future__ import annotations

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
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from pyvirtio.errors import LocalError
from pyvirtio.io.qtest import DEFAULT_TIMEOUT, QtestClient, QtestError, QtestTimeoutError
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator

if TYPE_CHECKING:
    from pyvirtio.transport.pci_bus import HostBus
    from pyvirtio.transport.virtio_mmio import VirtioMmio
    from pyvirtio.transport.virtio_pci import VirtioPciTransport

log = logging.getLogger("pyvirtio.qtest")

MiB = 1 << 20
#: the most RAM a QtestMachine maps (all of it below the PCI hole, gpa == file offset)
MAX_MEMORY = 2048 * MiB

#: A 64 KiB "BIOS" of nothing but HLT: the CPU halts at the reset vector (interrupts are off
#: after reset, so it stays halted, using no CPU time).
HALT_BIOS = b"\xf4" * 0x10000

#: QEMU's ``microvm`` machine as a qtest host of virtio-mmio devices. ``acpi=off`` keeps the
#: layout of QEMU 7.2's hw/i386/microvm.c without a second I/O APIC: 8 virtio-mmio slots of
#: 0x200 bytes from :data:`MICROVM_MMIO_BASE`, slot ``i`` wired to GSI
#: ``MICROVM_IRQ_BASE + i`` of ``ioapic`` (with ACPI on, 24 slots sit on an I/O APIC that
#: qtest cannot intercept by name). No option ROMs, RTC, PIT, PIC or serial port: nothing but
#: the virtio devices on the bus. ``-device virtio-*-device`` fills the slots from the top;
#: ``-global virtio-mmio.force-legacy=off`` turns the version 1 (legacy) register layout
#: QEMU defaults to into version 2.
MICROVM = "microvm,x-option-roms=off,rtc=off,pit=off,pic=off,isa-serial=off,acpi=off"
MICROVM_MMIO_BASE = 0xFEB0_0000
MICROVM_MMIO_SLOTS = 8
MICROVM_MMIO_STRIDE = 0x200
MICROVM_IRQ_BASE = 5


def _fmt_size(size: int) -> str:
    return f"{size // MiB}M" if size % MiB == 0 else str(size)


class QtestMachine:
    """A QEMU process under qtest, its socket and its shared RAM file.

    ``device_args`` are extra QEMU arguments (``-device virtio-rng-pci,...``, ``-object``,
    ``-drive``...); ``wrapper`` a command that execs QEMU (``ip netns exec NS`` to give it a
    network namespace). The machine is ``-M pc`` with ``memory_size`` bytes of RAM in a
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
        wrapper: Sequence[str] = (),
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
        #: a command QEMU runs under, which must exec it (``ip netns exec NS``): QEMU then
        #: keeps the started process's pid, its parent-death signal and its session
        self.wrapper = list(wrapper)
        self.process: subprocess.Popen[bytes] | None = None
        self.client: QtestClient | None = None
        self.memory: GuestMemory | None = None
        self.allocator: Allocator | None = None
        self.transports: list[VirtioPciTransport | VirtioMmio] = []
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
            *self.wrapper,
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

    def virtio_transports(self, prefer_modern: bool = True, use_interrupts: bool = True,
                          wrap: Callable[[QtestClient], HostBus] | None = None,
                          ) -> list[VirtioPciTransport]:
        """Act as firmware for bus 0 (assign BARs, route INTx), find every virtio function
        and return one transport per device, sharing this machine's RAM and allocator.

        With ``use_interrupts`` the ioapic inputs are intercepted and transports wait for
        their INTx line; otherwise they poll the ISR register. ``wrap`` makes the host bus
        the transports use from the qtest client (a recorder, for instance). Call once per
        machine.
        """
        from pyvirtio.transport.virtio_pci import discover

        client = self.qtest
        assert self.memory is not None and self.allocator is not None
        if self.transports:
            raise LocalError("this machine's PCI bus is already set up: use .transports")
        if use_interrupts:
            client.irq_intercept_in("ioapic")
        host: HostBus = wrap(client) if wrap is not None else client
        found = discover(host, self.memory, self.allocator,
                         lines=client if use_interrupts else None,
                         prefer_modern=prefer_modern)
        self.transports.extend(found)
        return found

    def virtio_mmio_transports(self, use_interrupts: bool = True,
                               wrap: Callable[[QtestClient], HostBus] | None = None,
                               ) -> list[VirtioMmio]:
        """On :data:`MICROVM`: one driver transport per occupied virtio-mmio slot, in slot
        order, sharing this machine's RAM and allocator (an empty slot answers device id 0).

        With ``use_interrupts`` the ioapic inputs are intercepted and transports wait for
        their slot's line; otherwise they poll InterruptStatus. ``wrap`` as for
        :meth:`virtio_transports`. Call once per machine.
        """
        from pyvirtio.spec import mmio as M
        from pyvirtio.transport.virtio_mmio import VirtioMmio
        from pyvirtio.transport.virtio_pci import InterruptRouter

        client = self.qtest
        assert self.memory is not None and self.allocator is not None
        if self.transports:
            raise LocalError("this machine's devices are already set up: use .transports")
        if use_interrupts:
            client.irq_intercept_in("ioapic")
        router = InterruptRouter(client if use_interrupts else None)
        host: HostBus = wrap(client) if wrap is not None else client
        found: list[VirtioMmio] = []
        for slot in range(MICROVM_MMIO_SLOTS):
            base = MICROVM_MMIO_BASE + slot * MICROVM_MMIO_STRIDE
            if client.readl(base + M.VIRTIO_MMIO_MAGIC_VALUE) != M.VIRTIO_MMIO_MAGIC:
                continue
            if client.readl(base + M.VIRTIO_MMIO_DEVICE_ID) == 0:
                continue
            found.append(VirtioMmio(host, base, self.memory, self.allocator, router,
                                    MICROVM_IRQ_BASE + slot))
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
    "HALT_BIOS",
    "MAX_MEMORY",
    "MICROVM",
    "MICROVM_IRQ_BASE",
    "MICROVM_MMIO_BASE",
    "MICROVM_MMIO_SLOTS",
    "MICROVM_MMIO_STRIDE",
    "QtestMachine",
]
