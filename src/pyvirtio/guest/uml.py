"""Boot User-Mode Linux guests: the guest kernel is an ordinary host process.

Why UML: it boots to poweroff in about 1.5 s and runs at native speed, and its
``virtio_uml`` driver attaches any virtio device id over vhost-user (UML is the front-end and
connects to the back-end's socket at boot), so every pyvirtio device can meet the real Linux
driver without QEMU.

Command line (see :attr:`UmlGuest.command_line` for the exact one)::

    TMPDIR=PRIVATE linux.uml mem=256M initrd=IMAGE uml_dir=PRIVATE \\
        virtio_uml.device=SOCKET:DEVICE_ID ... con=null con0=fd:0,fd:1 quiet

* ``TMPDIR``: UML backs guest RAM with a file there; a private directory on tmpfs
  (``/dev/shm``) is used so that it is fast and removed with the guest.
* ``uml_dir``: UML writes its pid file and management socket under ``~/.uml/<umid>``
  otherwise, and a killed guest would leave them behind.
* ``root=`` is not needed: the kernel runs ``/init`` from the initramfs.
* ``con=null con0=fd:0,fd:1``: only the first console, on our pipes.
* On hosts with Intel AMX, ``LD_PRELOAD`` carries the XSTATE shim of
  :mod:`pyvirtio.guest.uml_xstate` (without it UML dies on its first process); force it
  on or off with ``PYVIRTIO_UML_XSTATE_SHIM=1``/``0`` or ``UmlGuest(xstate_shim=...)``.

Host files: the image's helpers ``host_mount`` and ``host_run`` mount the host's ``/``
read-only at ``/host`` (hostfs) and run a host program with the host's own loader and
libraries, e.g. ``host_run /usr/bin/fio --filename=/dev/vda ...``. Device paths then are the
guest's own (``/dev/vda`` is the guest's disk). Never ``chroot /host``: inside it ``/dev`` is
the host's, and the host's own disk may well be ``/dev/vda`` too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pyvirtio.errors import LocalError
from pyvirtio.guest.base import Guest
from pyvirtio.guest.errors import MissingDependencyError
from pyvirtio.guest.image import ExtraFiles, GuestKind, Initramfs, default_cache_dir
from pyvirtio.guest.uml_xstate import needs_xstate_shim
from pyvirtio.guest.uml_xstate import xstate_shim as build_xstate_shim

__all__ = ["UmlGuest", "VhostUserDevice", "find_uml_binary", "uml_args"]

#: Common virtio device ids (virtio spec 5): net 1, blk 2, console 3, rng 4, balloon 5,
#: scsi 8, 9p 9, vsock 19, fs 26.


@dataclass(frozen=True)
class VhostUserDevice:
    """A vhost-user back-end for UML: its listening unix socket and the virtio device id.

    UML connects to ``socket`` at boot, so the back-end must already listen. The back-end
    must offer the BACKEND_REQ protocol feature (bit 5) and accept SET_BACKEND_REQ_FD.
    """

    socket: str | os.PathLike[str]
    device_id: int

    def kernel_arg(self) -> str:
        """The ``virtio_uml.device=SOCKET:ID`` argument."""
        path = os.fspath(self.socket)
        if ":" in path or " " in path:
            raise LocalError(f"UML cannot parse a socket path with ':' or ' ': {path!r}")
        if not 0 < self.device_id < 1 << 16:
            raise LocalError(f"invalid virtio device id {self.device_id}")
        return f"virtio_uml.device={path}:{self.device_id}"


def uml_args(path: str | os.PathLike[str], device_id: int) -> list[str]:
    """The User-Mode Linux kernel parameter attaching device ``device_id`` at ``path``."""
    return [VhostUserDevice(path, device_id).kernel_arg()]


def find_uml_binary() -> str:
    """Path of ``linux.uml`` (Debian package ``user-mode-linux``)."""
    exe = shutil.which("linux.uml")
    if exe is None:
        raise MissingDependencyError("linux.uml", "user-mode-linux")
    return exe


class UmlGuest(Guest):
    """A UML guest running ``script`` with vhost-user ``devices`` attached.

    ``mem`` is UML's ``mem=`` (e.g. ``"256M"``). ``kernel_args`` are appended to the
    command line. ``xstate_shim``: None decides from the host (see
    :mod:`pyvirtio.guest.uml_xstate`), True/False force it. Other arguments: see
    :class:`~pyvirtio.guest.base.Guest`.
    """

    kind: ClassVar[GuestKind] = "uml"

    def __init__(
        self,
        script: str = "",
        *,
        devices: Sequence[VhostUserDevice] = (),
        mem: str = "256M",
        kernel_args: Sequence[str] = (),
        extra_files: ExtraFiles | None = None,
        timeout: float = 60.0,
        modules: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        image: Initramfs | None = None,
        env: Mapping[str, str] | None = None,
        xstate_shim: bool | None = None,
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
        self.devices = list(devices)
        self.mem = mem
        self.xstate_shim = xstate_shim

    def _workdir_parent(self) -> str | None:
        shm = "/dev/shm"
        return shm if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK) else None

    def _command(self, image: Initramfs, workdir: Path) -> tuple[list[str], dict[str, str]]:
        exe = str(image.kernel.binary) if image.kernel.kind == "uml" else find_uml_binary()
        argv = [
            exe,
            f"mem={self.mem}",
            f"initrd={image.path}",
            f"uml_dir={workdir}",
            *(device.kernel_arg() for device in self.devices),
            "con=null",
            "con0=fd:0,fd:1",
            "quiet",
            *self.kernel_args,
        ]
        env = {"TMPDIR": str(workdir)}
        use_shim = needs_xstate_shim() if self.xstate_shim is None else self.xstate_shim
        if use_shim:
            shim = str(build_xstate_shim(self.cache_dir or default_cache_dir()))
            preload = os.environ.get("LD_PRELOAD")
            env["LD_PRELOAD"] = f"{shim}:{preload}" if preload else shim
        return argv, env
