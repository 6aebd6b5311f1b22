"""A minimal writer for the cpio "newc" format, the only format the Linux initramfs accepts.

Why our own: shelling out to ``cpio`` would add a host dependency and make the archive depend
on the host's file metadata. This writer produces byte-identical archives for identical input
(every mtime is 0, owners are root, inode numbers are assigned in order), which is what makes
the image cache keys meaningful.

Format (see the kernel's Documentation/driver-api/early-userspace/buffer-format.rst): each
entry is a 110-byte ASCII header (magic ``070701`` then 13 eight-digit hex fields), the NUL
terminated name padded to a multiple of 4 bytes, then the data padded to a multiple of 4.
The archive ends with an entry named ``TRAILER!!!``.
"""

from __future__ import annotations

import stat
from typing import Protocol

__all__ = ["CpioWriter", "Writable"]

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class Writable(Protocol):
    """Anything with a binary ``write``: a file, a ``gzip.GzipFile``, a ``BytesIO``."""

    def write(self, data: bytes, /) -> object: ...


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


class CpioWriter:
    """Append entries to a newc cpio stream; call :meth:`finish` once at the end.

    Paths are archive paths without a leading slash (``"bin/sh"``); a leading slash is
    stripped. Parent directories are created implicitly (once), because the kernel's
    unpacker does not create missing parents.
    """

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._next_ino = 1
        self._dirs: set[str] = {""}
        self._names: set[str] = set()
        self._finished = False

    def _header(self, name: str, mode: int, size: int, nlink: int, rdev: tuple[int, int]) -> None:
        encoded = name.encode() + b"\0"
        fields = (
            self._next_ino,  # c_ino
            mode,  # c_mode
            0,  # c_uid
            0,  # c_gid
            nlink,  # c_nlink
            0,  # c_mtime
            size,  # c_filesize
            0,  # c_devmajor
            0,  # c_devminor
            rdev[0],  # c_rdevmajor
            rdev[1],  # c_rdevminor
            len(encoded),  # c_namesize
            0,  # c_check
        )
        self._next_ino += 1
        header = _MAGIC + b"".join(b"%08X" % field for field in fields)
        self._out.write(header + encoded + _pad4(len(header) + len(encoded)))

    def _entry(
        self, path: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        if self._finished:
            raise ValueError("cpio archive already finished")
        name = path.strip("/")
        if not name or name == _TRAILER:
            raise ValueError(f"invalid cpio path {path!r}")
        if name in self._names:
            raise ValueError(f"duplicate cpio path {name!r}")
        parent = name.rpartition("/")[0]
        if parent not in self._dirs:
            self.add_dir(parent)
        self._names.add(name)
        nlink = 2 if stat.S_ISDIR(mode) else 1
        self._header(name, mode, len(data), nlink, rdev)
        if data:
            self._out.write(data)
            self._out.write(_pad4(len(data)))

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        """Add a directory (and its missing parents); adding an existing one is a no-op."""
        name = path.strip("/")
        if name in self._dirs:
            return
        self._entry(name, stat.S_IFDIR | perm)
        self._dirs.add(name)

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        """Add a regular file with the given content and permission bits."""
        self._entry(path, stat.S_IFREG | (perm & 0o7777), data)

    def add_symlink(self, path: str, target: str) -> None:
        """Add a symbolic link; ``target`` is stored verbatim (relative or absolute)."""
        self._entry(path, stat.S_IFLNK | 0o777, target.encode())

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        """Add a character device node, e.g. ``dev/console`` (5, 1)."""
        self._entry(path, stat.S_IFCHR | perm, rdev=(major, minor))

    def __contains__(self, path: str) -> bool:
        name = path.strip("/")
        return name in self._names or name in self._dirs

    def finish(self) -> None:
        """Write the trailer entry; the stream then holds a complete archive."""
        if self._finished:
            return
        self._header(_TRAILER, 0, 0, 1, (0, 0))
        self._finished = True
