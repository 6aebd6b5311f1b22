"""Can a guest of a given kind boot on this machine? One answer for tests and the demo."""

from __future__ import annotations

from pyvirtio.guest.image import (
    GuestKind,
    default_cache_dir,
    find_busybox,
    find_qemu_kernel,
    find_uml_kernel,
)
from pyvirtio.guest.qemu import find_qemu_binary
from pyvirtio.guest.uml import find_uml_binary
from pyvirtio.guest.uml_xstate import needs_xstate_shim, xstate_shim


def check_can_boot(kind: GuestKind) -> None:
    """Raise :class:`~pyvirtio.guest.errors.MissingDependencyError`, naming the Debian
    package, unless a ``kind`` ("uml" or "qemu") guest can boot: busybox, the kernel and its
    modules, the binary, and for UML on hosts that need it the compiled ptrace shim."""
    find_busybox()
    if kind == "uml":
        find_uml_binary()
        find_uml_kernel()
        if needs_xstate_shim():
            xstate_shim(default_cache_dir())
    else:
        find_qemu_binary()
        find_qemu_kernel()
