"""The event-loop interface devices may use, defined here so devices never import the loop.

:mod:`pyvirtio.io` implements it; a device with an I/O back-end (a console port on a socket,
a tap, a rate-limited entropy source) registers readers and timers through it. Sans-I/O
devices never need it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Reactor(Protocol):
    def add_reader(self, fd: int, callback: Callable[[], None], *,
                   allow_files: bool = False) -> None:
        """Call ``callback`` whenever ``fd`` is readable. ``allow_files``: ``fd`` is the
        host's own and may be a regular file or /dev/null, which never block: they count as
        always readable (without it such an fd is refused)."""

    def remove_reader(self, fd: int) -> None:
        """Stop watching ``fd`` (no error if it was not watched)."""

    def add_writer(self, fd: int, callback: Callable[[], None], *,
                   allow_files: bool = False) -> None:
        """Call ``callback`` whenever ``fd`` is writable (``allow_files``: as for readers)."""

    def remove_writer(self, fd: int) -> None:
        """Stop watching ``fd`` for writability."""

    def call_later(self, delay: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` once after ``delay`` seconds."""

    def call_every(self, interval: float, callback: Callable[[], None]) -> TimerHandle:
        """Call ``callback`` every ``interval`` seconds until the handle is cancelled. For
        watchdogs: unlike a re-armed :meth:`call_later`, it costs a busy loop nothing
        between the calls."""

    def time(self) -> float:
        """The loop's monotonic clock."""


class Poller(Protocol):
    """Something a :class:`PollingReactor` looks at, without a system call, before it
    sleeps: a device queue whose ring it watches for a short window after a completion
    instead of waiting for the driver's kick (adaptive polling)."""

    def ready(self) -> bool:
        """Whether work has arrived (cheap: a look at shared memory)."""

    def serve(self) -> None:
        """Work arrived while armed: the poller is disarmed; serve it (it may re-arm)."""

    def expire(self) -> None:
        """The window passed without work: the poller is disarmed; arrange to be woken the
        ordinary way (e.g. turn the driver's kicks back on)."""


class PollingReactor(Reactor, Protocol):
    def arm_poller(self, poller: Poller, window: float) -> None:
        """Look at ``poller`` for up to ``window`` seconds before sleeping next."""
