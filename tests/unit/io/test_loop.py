"""The event loop's stop: a stop (or a signal) at any moment after it is requested ends
``run()``, including one that arrives before ``run()`` starts (issue 9: a lost SIGTERM)."""

from __future__ import annotations

import argparse
import io
import os
import signal
import threading
from collections.abc import Iterator

import pytest

from pyvirtio.cli.serve import run_servers
from pyvirtio.io.loop import EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    # A hung run() is a failed test, not a hung suite: the watchdog's reason shows instead.
    watchdog = threading.Timer(10.0, loop.stop, args=("watchdog",))
    watchdog.start()
    try:
        yield loop
    finally:
        watchdog.cancel()
        loop.close()


def test_a_stop_before_run_is_pending_and_run_returns_without_serving(
        loop: EventLoop) -> None:
    polled: list[int] = []
    loop.stop("early")
    loop.run(until=lambda: bool(polled.append(1)), timeout=5.0)
    assert polled == []
    assert loop.stop_reason == "early"


def test_each_stop_is_consumed_by_the_run_it_ends(loop: EventLoop) -> None:
    loop.stop("first")
    loop.run()
    rounds: list[int] = []
    loop.run(until=lambda: len(rounds) >= 3 or bool(rounds.append(1)), timeout=5.0)
    assert rounds == [1, 1, 1]


def test_a_signal_between_installing_handlers_and_run_stops_the_loop(loop: EventLoop) -> None:
    loop.stop_on_signals()
    os.kill(os.getpid(), signal.SIGTERM)
    loop.run()
    assert loop.stop_reason == "signal SIGTERM"


def test_serve_stops_on_a_sigterm_that_arrives_right_after_the_banner(
        monkeypatch: pytest.MonkeyPatch) -> None:
    class SignalOnPrint(io.StringIO):
        def write(self, text: str) -> int:
            if "banner" in text:
                os.kill(os.getpid(), signal.SIGTERM)  # after the handlers, before run()
            return super().write(text)

    out = SignalOnPrint()
    monkeypatch.setattr("sys.stdout", out)
    loop = EventLoop()  # run_servers closes it
    watchdog = threading.Timer(10.0, loop.stop, args=("watchdog",))
    watchdog.start()
    try:
        assert run_servers([], loop, "banner", argparse.Namespace(quiet=False)) == 0
    finally:
        watchdog.cancel()
    assert "banner" in out.getvalue()
    assert loop.stop_reason == "signal SIGTERM"


# ---- periodic timers --------------------------------------------------------------------


def test_a_periodic_timer_fires_repeatedly_until_cancelled(loop: EventLoop) -> None:
    fired: list[float] = []
    timer = loop.call_every(0.01, lambda: fired.append(loop.time()))
    loop.run(until=lambda: len(fired) >= 3, timeout=5.0)
    assert len(fired) >= 3
    timer.cancel()
    count = len(fired)
    loop.run(timeout=0.05)
    assert len(fired) == count


def test_a_periodic_timer_leaves_no_one_shot_timer_armed(loop: EventLoop) -> None:
    """A busy loop sleeps without a timeout while only periodic timers exist: they live in
    a timerfd, not in the loop's timer heap, so no wake-up arms a kernel timer."""
    timer = loop.call_every(0.25, lambda: None)
    assert loop._timers == []
    assert timer.fd >= 0
    timer.cancel()
    assert timer.fd == -1


def test_a_periodic_interval_must_be_positive(loop: EventLoop) -> None:
    with pytest.raises(ValueError, match="positive"):
        loop.call_every(0, lambda: None)
