"""The I/O side of vhost-user inflight tracking: the shared memory file behind a region.

:mod:`pyvirtio.transport.vhost_user.inflight` holds the layout and the logic; this module
makes the memfd a front-end's ``GET_INFLIGHT_FD`` gets, and :func:`inflight_extensions` is
the ``extensions=`` factory to give a :class:`~pyvirtio.io.vhost_user_server.VhostUserServer`
(it adds INFLIGHT_SHMFD for devices that can track their requests, nothing for others)::

    server = VhostUserServer(path, lambda: device, loop, extensions=inflight_extensions)
"""

from __future__ import annotations

import fcntl
import os

from pyvirtio.device.base import VirtioDevice
from pyvirtio.transport.vhost_user.extension import BackendExtension
from pyvirtio.transport.vhost_user.inflight import InflightExtension


def allocate_region(size: int) -> int:
    """A zero-filled memfd of ``size`` bytes that can neither shrink nor grow (so that a
    peer mapping it never faults on a truncated page); returns the fd (close-on-exec)."""
    fd = os.memfd_create("pyvirtio-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                    fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


def inflight_extensions(device: VirtioDevice) -> list[BackendExtension]:
    """INFLIGHT_SHMFD for ``device`` (every device's engine reports its requests)."""
    return [InflightExtension(device, allocate_region)]
