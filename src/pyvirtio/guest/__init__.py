"""Build tiny Linux guests and boot them, for integration tests and demos.

* :mod:`~pyvirtio.guest.image`: a busybox initramfs (pure-Python cpio) with the virtio
  modules, a generated ``/init`` and the caller's script; cached by content hash.
* :mod:`~pyvirtio.guest.uml`: User-Mode Linux, any virtio device over vhost-user
  (``virtio_uml``), ~1.5 s per boot, native speed, host files through hostfs.
* :mod:`~pyvirtio.guest.qemu`: QEMU TCG with the Debian cloud kernel, virtio PCI,
  vhost-user blk/net/rng.
* :mod:`~pyvirtio.guest.qtest`: QEMU under qtest (no guest kernel) so our drivers can drive
  QEMU's own device models.
* :mod:`~pyvirtio.guest.base`: what both share: :class:`GuestResult`, console capture,
  ``PYVIRTIO-*`` markers, timeouts, cleanup of every process.

Example::

    from pyvirtio.guest import UmlGuest, VhostUserDevice
    r = UmlGuest("result size $(cat /sys/block/vda/size)",
                 devices=[VhostUserDevice("/tmp/blk.sock", 2)]).run().check()

Only the standard library is used; a missing host package raises
:class:`MissingDependencyError` naming the Debian package to install.
"""

from pyvirtio.guest.base import Guest, GuestResult, session_processes
from pyvirtio.guest.check import check_can_boot
from pyvirtio.guest.errors import (
    GuestError,
    GuestTimeoutError,
    ImageError,
    MissingDependencyError,
)
from pyvirtio.guest.image import (
    DEFAULT_MODULES,
    ExtraFiles,
    GuestKind,
    Initramfs,
    KernelTree,
    build_initramfs,
    default_cache_dir,
    find_busybox,
    find_qemu_kernel,
    find_uml_kernel,
    host_program,
)
from pyvirtio.guest.qemu import (
    QemuDevice,
    QemuGuest,
    VhostUserBlk,
    VhostUserNet,
    VhostUserRng,
    find_qemu_binary,
    qemu_args,
    qemu_memory_args,
)
from pyvirtio.guest.qtest import QtestMachine
from pyvirtio.guest.uml import UmlGuest, VhostUserDevice, find_uml_binary, uml_args

__all__ = [
    "DEFAULT_MODULES",
    "ExtraFiles",
    "Guest",
    "GuestError",
    "GuestKind",
    "GuestResult",
    "GuestTimeoutError",
    "ImageError",
    "Initramfs",
    "KernelTree",
    "MissingDependencyError",
    "QemuDevice",
    "QemuGuest",
    "QtestMachine",
    "UmlGuest",
    "VhostUserBlk",
    "VhostUserDevice",
    "VhostUserNet",
    "VhostUserRng",
    "build_initramfs",
    "check_can_boot",
    "default_cache_dir",
    "find_busybox",
    "find_qemu_binary",
    "find_qemu_kernel",
    "find_uml_binary",
    "find_uml_kernel",
    "host_program",
    "qemu_args",
    "qemu_memory_args",
    "session_processes",
    "uml_args",
]
