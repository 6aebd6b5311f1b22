"""Boot QEMU (TCG) guests with the Debian cloud kernel and a busybox initramfs.

Why QEMU as well as UML: QEMU is the reference virtio PCI transport and vhost-user
front-end (real PCI config space, MSI-X, vhost-user-blk/-net/-rng devices). Without KVM it
emulates the CPU (TCG): a boot to poweroff takes about 2 s here, I/O is slow (~3.5k IOPS),
so use it for correctness and UML for speed.

Command line (see :attr:`QemuGuest.command_line` for the exact one)::

    qemu-system-x86_64 -accel tcg -M q35,memory-backend=mem \\
        -object memory-backend-memfd,id=mem,size=512M,share=on -m 512 \\
        -nographic -nodefaults -serial stdio -no-reboot \\
        -kernel /boot/vmlinuz-VER-cloud-amd64 -initrd IMAGE \\
        -append 'console=ttyS0 panic=-1 quiet' DEVICE ARGS... EXTRA ARGS...

* vhost-user needs guest RAM the back-end can map: a shared memfd memory backend.
* ``-nodefaults -serial stdio``: no NIC (and its iPXE option ROM), no VGA, no monitor
  multiplexed on the console, so bytes written to the console (even Ctrl-A) reach the guest.
* ``-no-reboot`` with ``panic=-1``: a guest kernel panic makes QEMU exit at once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from pyvirtio.errors import LocalError
from pyvirtio.guest.base import Guest
from pyvirtio.guest.errors import MissingDependencyError
from pyvirtio.guest.image import ExtraFiles, GuestKind, Initramfs
from pyvirtio.spec import ids

__all__ = [
    "QemuDevice",
    "QemuGuest",
    "VhostUserBlk",
    "VhostUserNet",
    "VhostUserRng",
    "find_qemu_binary",
    "qemu_args",
    "qemu_memory_args",
]


def _opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for a QEMU ``-opt key=value,...`` list (a comma is written twice)."""
    return os.fspath(value).replace(",", ",,")


class QemuDevice(Protocol):
    """Anything that can put itself on a QEMU command line.

    ``index`` is the device's position in :attr:`QemuGuest.devices`, used to make unique
    ids (``c0``, ``n0``...).
    """

    def qemu_args(self, index: int) -> list[str]:
        """The QEMU arguments that create this device."""
        ...


def _chardev(index: int, socket: str | os.PathLike[str], reconnect: int) -> list[str]:
    spec = f"socket,id=c{index},path={_opt(socket)}"
    if reconnect:
        spec += f",reconnect={int(reconnect)}"
    return ["-chardev", spec]


@dataclass(frozen=True)
class VhostUserBlk:
    """A vhost-user-blk-pci disk backed by the back-end listening on ``socket``.

    ``reconnect``: seconds between QEMU's reconnection attempts if the back-end goes away
    (0: no reconnection). ``packed``: ``packed=on``, the guest runs packed rings if the
    back-end offers them.
    """

    socket: str | os.PathLike[str]
    num_queues: int | None = None
    reconnect: int = 0
    packed: bool = False

    def qemu_args(self, index: int) -> list[str]:
        """``-chardev socket,... -device vhost-user-blk-pci,...``."""
        device = f"vhost-user-blk-pci,chardev=c{index},id=blk{index}"
        if self.num_queues is not None:
            device += f",num-queues={self.num_queues}"
        if self.packed:
            device += ",packed=on"
        return [*_chardev(index, self.socket, self.reconnect), "-device", device]


@dataclass(frozen=True)
class VhostUserNet:
    """A virtio-net-pci NIC whose data path is the vhost-user back-end on ``socket``.

    ``msix`` is off by default: QEMU 7.2 (Debian, TCG) segfaults in ``vhost_net_start`` ->
    ``msix_set_vector_notifiers`` when a guest starts a vhost-user virtio-net-pci that uses
    MSI-X, whatever the back-end offers (docs/peers.md); with ``vectors=0`` (legacy INTx
    interrupts) the same guest runs fine.
    """

    socket: str | os.PathLike[str]
    mac: str | None = None
    reconnect: int = 0
    msix: bool = False

    def qemu_args(self, index: int) -> list[str]:
        """``-chardev ... -netdev vhost-user,... -device virtio-net-pci,...``."""
        device = f"virtio-net-pci,netdev=n{index},id=net{index}"
        if self.mac is not None:
            device += f",mac={self.mac}"
        if not self.msix:
            device += ",vectors=0"
        return [
            *_chardev(index, self.socket, self.reconnect),
            "-netdev",
            f"vhost-user,id=n{index},chardev=c{index}",
            "-device",
            device,
        ]


@dataclass(frozen=True)
class VhostUserRng:
    """A vhost-user-rng-pci entropy device served by the back-end on ``socket``."""

    socket: str | os.PathLike[str]
    reconnect: int = 0

    def qemu_args(self, index: int) -> list[str]:
        """``-chardev socket,... -device vhost-user-rng-pci,...``."""
        return [
            *_chardev(index, self.socket, self.reconnect),
            "-device",
            f"vhost-user-rng-pci,chardev=c{index},id=rng{index}",
        ]


#: QEMU 7.2 ``-device`` names of the vhost-user devices, by virtio device id
QEMU_DEVICES = {
    ids.BLOCK: "vhost-user-blk-pci",
    ids.RNG: "vhost-user-rng-pci",
    ids.SCSI: "vhost-user-scsi-pci",
    ids.INPUT: "vhost-user-input-pci",
    ids.VSOCK: "vhost-user-vsock-pci",
    ids.FS: "vhost-user-fs-pci",
    ids.GPU: "vhost-user-gpu-pci",
    ids.I2C_ADAPTER: "vhost-user-i2c-pci",
    ids.GPIO: "vhost-user-gpio-pci",
}


def qemu_args(path: str, device_id: int, *, chardev_id: str = "vu0",
              extra: str = "") -> list[str]:
    """The QEMU 7.2 arguments that attach a vhost-user back-end listening on ``path``.

    Guest RAM must be shareable too: add :func:`qemu_memory_args`. ``extra`` is appended to
    the ``-device`` (e.g. ``",num-queues=2"``). Network devices go through ``-netdev``.
    """
    chardev = ["-chardev", f"socket,id={chardev_id},path={path}"]
    if device_id == ids.NET:
        return [*chardev, "-netdev", f"vhost-user,id={chardev_id}-net,chardev={chardev_id}",
                "-device", f"virtio-net-pci,netdev={chardev_id}-net{extra}"]
    name = QEMU_DEVICES.get(device_id)
    if name is None:
        raise LocalError(f"QEMU 7.2 has no vhost-user front-end for {ids.name(device_id)} "
                         "devices; use UML (pyvirtio.guest.uml.uml_args) instead")
    return [*chardev, "-device", f"{name},chardev={chardev_id}{extra}"]


def qemu_memory_args(size_mb: int = 512, machine: str = "q35") -> list[str]:
    """Guest RAM in a shared memfd, which vhost-user needs (the back-end maps it)."""
    return ["-machine", f"{machine},memory-backend=mem", "-object",
            f"memory-backend-memfd,id=mem,size={size_mb}M,share=on", "-m", f"{size_mb}M"]


def find_qemu_binary(name: str = "qemu-system-x86_64") -> str:
    """Path of the QEMU system emulator (Debian package ``qemu-system-x86``)."""
    exe = shutil.which(name)
    if exe is None:
        raise MissingDependencyError(name, "qemu-system-x86")
    return exe


class QemuGuest(Guest):
    """A QEMU TCG guest (q35, shared memfd RAM) running ``script``.

    ``devices`` are :class:`QemuDevice` specs (vhost-user blk/net/rng); ``extra_args`` are
    raw QEMU arguments appended at the end (e.g. ``["-device", "virtio-rng-pci"]``).
    ``mem_mib`` is the guest RAM, ``smp`` the vCPU count, ``kernel_args`` are appended to
    ``-append``. Other arguments: see :class:`~pyvirtio.guest.base.Guest`.
    """

    kind: ClassVar[GuestKind] = "qemu"

    def __init__(
        self,
        script: str = "",
        *,
        devices: Sequence[QemuDevice] = (),
        extra_args: Sequence[str] = (),
        mem_mib: int = 512,
        smp: int = 1,
        kernel_args: Sequence[str] = (),
        extra_files: ExtraFiles | None = None,
        timeout: float = 120.0,
        modules: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        image: Initramfs | None = None,
        env: Mapping[str, str] | None = None,
        qemu: str = "qemu-system-x86_64",
    ) -> None:
        super().__init__(
            script,
            extra_files=extra_files,
            kernel_args=kernel_args,
            timeout=timeout,
            modules=modules,
            cache_dir=cache_dir,
            image=image,
            env=env,
        )
        if mem_mib < 64:
            raise LocalError(f"mem_mib={mem_mib} is too small to boot the cloud kernel")
        self.devices = list(devices)
        self.extra_args = list(extra_args)
        self.mem_mib = mem_mib
        self.smp = smp
        self.qemu = qemu

    def _command(self, image: Initramfs, workdir: Path) -> tuple[list[str], dict[str, str]]:
        append = " ".join(["console=ttyS0", "panic=-1", "quiet", *self.kernel_args])
        argv = [
            find_qemu_binary(self.qemu),
            "-accel",
            "tcg",
            "-M",
            "q35,memory-backend=mem",
            "-object",
            f"memory-backend-memfd,id=mem,size={self.mem_mib}M,share=on",
            "-m",
            str(self.mem_mib),
            "-smp",
            str(self.smp),
            "-nographic",
            "-nodefaults",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(image.kernel.binary),
            "-initrd",
            str(image.path),
            "-append",
            append,
        ]
        for index, device in enumerate(self.devices):
            argv += device.qemu_args(index)
        argv += self.extra_args
        return argv, {}
