"""The event loop's ways of sparing system calls: an action asked for several times in one
epoll wake-up runs once, at its end (coalesced call notifications); armed pollers are
looked at, without an epoll wait, before the loop sleeps (adaptive polling); and the loop
counts its epoll waits, so a benchmark can tell system calls per request."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from pyvirtio.io.loop import EventLoop


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    watchdog = threading.Timer(10.0, loop.stop, args=("watchdog",))
    watchdog.start()
    try:
        yield loop
    finally:
        watchdog.cancel()
        loop.close()


def ready_pipe(loop: EventLoop, callback: object) -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    loop.add_reader(r, lambda: (os.read(r, 64), callback()))  # type: ignore[operator]
    os.write(w, b"x")
    return r, w


def test_an_action_asked_for_by_every_ready_fd_of_a_wake_up_runs_once_after_them(
        loop: EventLoop) -> None:
    events: list[str] = []

    def notify(key: int) -> None:
        events.append(f"notify {key}")

    def reader(name: str) -> None:
        events.append(name)
        loop.coalesce(7, notify)  # deferred: the loop dispatches two ready fds

    fds = [*ready_pipe(loop, lambda: reader("a")), *ready_pipe(loop, lambda: reader("b"))]
    try:
        loop.run_once(1.0)
        assert sorted(events[:2]) == ["a", "b"]
        assert events[2:] == ["notify 7"]  # once, after both readers
        assert loop.coalesced == 1
    finally:
        for fd in fds:
            os.close(fd)


def test_outside_a_dispatch_nothing_is_deferred(loop: EventLoop) -> None:
    ran: list[int] = []
    assert not loop.coalesce(3, ran.append)  # the caller acts now
    loop.run_once(0.0)
    assert ran == []


def test_a_wake_up_with_one_ready_fd_defers_nothing(loop: EventLoop) -> None:
    answers: list[bool] = []
    fds = ready_pipe(loop, lambda: answers.append(loop.coalesce(9, lambda key: None)))
    try:
        loop.run_once(1.0)
        assert answers == [False]  # nothing to merge with: the caller writes at once
    finally:
        for fd in fds:
            os.close(fd)


def test_a_forgotten_action_does_not_run(loop: EventLoop) -> None:
    ran: list[int] = []
    deferred: list[bool] = []

    def reader() -> None:
        deferred.append(loop.coalesce(5, ran.append))
        loop.forget_coalesced(5)  # say the fd was closed meanwhile

    fds = [*ready_pipe(loop, reader), *ready_pipe(loop, lambda: None)]
    try:
        loop.run_once(1.0)
        assert deferred == [True]
        assert ran == []
    finally:
        for fd in fds:
            os.close(fd)


class Poller:
    """Work appears after ``after`` looks (None: never)."""

    def __init__(self, loop: EventLoop, after: int | None) -> None:
        self.loop = loop
        self.after = after
        self.looks = 0
        self.served = self.expired = 0
        self.waits_when_served = -1

    def ready(self) -> bool:
        self.looks += 1
        return self.after is not None and self.looks > self.after

    def serve(self) -> None:
        self.served += 1
        self.waits_when_served = self.loop.waits

    def expire(self) -> None:
        self.expired += 1


def test_work_that_appears_during_the_window_is_served_before_any_epoll_wait(
        loop: EventLoop) -> None:
    poller = Poller(loop, after=3)
    waits = loop.waits
    loop.arm_poller(poller, 10.0)
    loop.run_once(0.0)
    assert (poller.served, poller.expired, poller.looks) == (1, 0, 4)
    assert poller.waits_when_served == waits  # no system call before it was served


def test_a_window_without_work_expires_and_the_poller_is_dropped(loop: EventLoop) -> None:
    poller = Poller(loop, after=None)
    loop.arm_poller(poller, 1e-4)
    loop.run_once(0.0)
    assert (poller.served, poller.expired) == (0, 1)
    looks = poller.looks
    loop.run_once(0.0)
    assert poller.looks == looks  # disarmed: not looked at again


def test_a_poller_armed_again_by_its_serve_waits_for_the_next_turn(loop: EventLoop) -> None:
    poller = Poller(loop, after=0)
    serve = poller.serve

    def serve_and_rearm() -> None:
        serve()
        loop.arm_poller(poller, 10.0)

    poller.serve = serve_and_rearm  # type: ignore[method-assign]
    loop.arm_poller(poller, 10.0)
    waits = loop.waits
    loop.run_once(5.0)  # must not sleep 5 s: a poller is armed
    assert poller.served == 1  # one per turn: the fds get their look in between
    assert loop.waits == waits + 1
    loop.run_once(5.0)
    assert poller.served == 2


def test_the_loop_counts_its_epoll_waits(loop: EventLoop) -> None:
    waits = loop.waits
    for _ in range(3):
        loop.run_once(0.0)
    assert loop.waits == waits + 3
