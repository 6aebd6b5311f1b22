"""The fd side of vhost-user memory: examining, sealing and mapping a memory file a peer sent.

The back-end protocol (:class:`~pyvirtio.transport.vhost_user.backend.BackendProtocol`) does
no syscalls; its host (:mod:`pyvirtio.io.vhost_user_server`) maps regions with
:func:`map_memory_fd` and closes fds with :func:`close_fd`.
"""

from __future__ import annotations

import fcntl
import os
import stat

from pyvirtio.memory import GuestMemoryError, Region, region_from_fd


def map_memory_fd(fd: int, gpa: int, size: int, fd_offset: int,
                  user_addr: int | None = None) -> Region:
    """Map ``size`` bytes of the memory file ``fd`` from ``fd_offset``; on success the region
    owns ``fd``, on failure the caller still does. Raises :class:`GuestMemoryError` saying
    what is wrong with the fd (not a regular file, shorter than asked, unmappable)."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise GuestMemoryError(f"cannot stat its fd: {exc}", gpa, size) from exc
    if not stat.S_ISREG(st.st_mode):
        raise GuestMemoryError(f"its fd is a {file_kind(st.st_mode)}, not a mappable memory "
                               "file (memfd, shm or hugetlbfs file)", gpa, size)
    if fd_offset + size > st.st_size:
        raise GuestMemoryError(f"mmap offset 0x{fd_offset:x} + size 0x{size:x} runs past the "
                               f"end of its {st.st_size}-byte file", gpa, size)
    # A peer that shrank the file later would make our accesses fault (SIGBUS): seal it
    # against shrinking when the memfd allows it (QEMU seals its own memfds).
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        pass
    return region_from_fd(fd, gpa, size, fd_offset, user_addr, owned=True)


def close_fd(fd: int) -> None:
    """Close ``fd``, ignoring an fd that is already gone."""
    try:
        os.close(fd)
    except OSError:
        pass


def file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "pipe"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file (eventfd, epoll or similar)"
