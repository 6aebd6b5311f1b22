"""eventfd(2) notifications: the kick and call doorbells of vhost-user and our process pair."""

from __future__ import annotations

import os


class EventFd:
    """A non-blocking eventfd. ``signal()`` adds 1; ``drain()`` reads and resets the count."""

    __slots__ = ("fd",)

    def __init__(self, fd: int | None = None) -> None:
        self.fd = fd if fd is not None else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self.fd

    def signal(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the reader has a wake-up pending anyway

    def drain(self) -> int:
        """Consume pending signals; 0 if there were none."""
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"EventFd({self.fd})"


def signal_fd(fd: int) -> None:
    """Write 1 to an eventfd (or the write end of a pipe) we do not own."""
    try:
        os.write(fd, (1).to_bytes(8, "little"))
    except BlockingIOError:
        pass


def drain_fd(fd: int) -> int:
    """Read one 8-byte count from an eventfd we do not own; 0 if nothing pending."""
    try:
        data = os.read(fd, 8)
    except BlockingIOError:
        return 0
    return int.from_bytes(data, "little") if len(data) == 8 else len(data)
