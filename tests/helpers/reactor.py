"""A reactor whose timers run only when a test fires them (sans-I/O tests of timed logic)."""

from __future__ import annotations

from collections.abc import Callable


class Timer:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualReactor:
    """Timers that run only when the test fires them."""

    def __init__(self) -> None:
        self.timers: list[Timer] = []

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(callback)
        self.timers.append(timer)
        return timer

    def call_every(self, interval: float, callback: Callable[[], None]) -> Timer:
        """A periodic timer: armed again each time it fires, until cancelled."""
        timer = Timer(callback)

        def again() -> None:
            self.timers.append(timer)
            callback()

        timer.callback = again
        self.timers.append(timer)
        return timer

    def time(self) -> float:
        return 0.0

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        raise AssertionError("not used")

    def remove_reader(self, fd: int) -> None:
        raise AssertionError("not used")

    def add_writer(self, fd: int, callback: Callable[[], None]) -> None:
        raise AssertionError("not used")

    def remove_writer(self, fd: int) -> None:
        raise AssertionError("not used")

    def armed(self) -> int:
        return sum(not t.cancelled for t in self.timers)

    def fire(self) -> None:
        """Run the armed timers (those they arm run at the next fire)."""
        due, self.timers = [t for t in self.timers if not t.cancelled], []
        for t in due:
            t.callback()
