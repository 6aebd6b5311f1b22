"""Signals and shutdown (issue 9): for every ``pyvirtio serve`` command, SIGTERM and SIGINT
at random moments — right after its first socket exists (before or around the banner), idle
after the banner, while a front-end is in its vhost-user handshake, and while it moves data —
end the process within 2 s with exit status 0 and its sockets removed. SIGKILL leaves stale
socket files behind, and a restart on the same paths replaces them.

The front-end is pyvirtio's own vhost-user client (a real peer over the real socket: the
full handshake, shared memory, rings, eventfds); booting a UML guest per signal would cost
seconds each, and the guest-connected shutdown is covered by test_serve_cli.py. The seed is
printed and can be fixed with PYVIRTIO_SIGNAL_SEED. A command's 20 signals are spread over
a few lanes that run at the same time, each with its own servers and paths.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.guests import socket_gone
from helpers.serve_process import ServeProcess
from pyvirtio.driver.base import Driver, probe
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.driver.console import ConsoleDriver
from pyvirtio.driver.net import NetDriver
from pyvirtio.driver.rng import RngDriver
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.spec import ids

SIGNALS_PER_COMMAND = 20
SHUTDOWN_DEADLINE = 2.0  # the bound on a clean shutdown, not a performance figure
MOMENTS = ("socket-up", "idle", "handshake", "transfer")
LANES = 4  # servers signalled at once (see the test)


def _traffic(driver: Driver, rng: random.Random) -> bool:
    """One round of data through ``driver``'s device; False: nothing could move yet."""
    if isinstance(driver, RngDriver):
        driver.read(4096)
    elif isinstance(driver, BlkDriver):
        sector = rng.randrange(0, 1024)
        data = rng.randbytes(4096)
        driver.write(sector, data)
        assert driver.read(sector, 8) == data
    elif isinstance(driver, NetDriver):
        driver.send(b"\xff" * 6 + bytes.fromhex("525400aabbcc") + b"\x88\xb5" + bytes(64))
    elif isinstance(driver, ConsoleDriver):
        driver.poll()  # the device announces its ports over the control queue
        if 0 not in driver.ports:
            time.sleep(0.005)
            return False
        return driver.send(0, b"chaos\n") > 0
    return True


@dataclass
class Command:
    kind: str
    device_id: int
    args: Callable[[Path], list[str]]
    sockets: Callable[[Path], list[Path]]


def _blk_args(tmp: Path) -> list[str]:
    image = tmp / "disk.img"
    if not image.exists():
        image.write_bytes(bytes(1 << 20))
    return ["--socket", str(tmp / "blk.sock"), str(image)]


COMMANDS = {
    "rng": Command("rng", ids.RNG, lambda t: ["--socket", str(t / "rng.sock")],
                   lambda t: [t / "rng.sock"]),
    "console": Command("console", ids.CONSOLE,
                       lambda t: ["--socket", str(t / "con.sock"),
                                  "--console", f"unix:{t / 'hvc0.sock'}"],
                       lambda t: [t / "con.sock", t / "hvc0.sock"]),
    "blk": Command("blk", ids.BLOCK, _blk_args, lambda t: [t / "blk.sock"]),
    "net": Command("net", ids.NET,
                   lambda t: ["--socket", str(t / "n0.sock"), "--socket", str(t / "n1.sock")],
                   lambda t: [t / "n0.sock", t / "n1.sock"]),
}


class FrontEnd:
    """A vhost-user front-end in a thread: handshake, then (``transfer``) data until the
    server goes away. Its errors are expected once the signal lands; the test judges the
    server, and only checks that the front-end got as far as it was meant to."""

    def __init__(self, path: Path, device_id: int, transfer: bool, rng: random.Random) -> None:
        self.path, self.device_id, self.transfer = path, device_id, transfer
        self.rng = random.Random(rng.random())
        self.moving = threading.Event()
        self.done = threading.Event()  # the server is gone: stop (sends may not notice)
        self.rounds = 0
        self.thread = threading.Thread(target=self._run, daemon=True, name="chaos front-end")
        self.thread.start()

    def _run(self) -> None:
        with contextlib.suppress(Exception):
            with VhostUserClient(self.path, self.device_id, timeout=5.0) as client:
                driver = probe(client)
                while self.transfer and not self.done.is_set():
                    if _traffic(driver, self.rng):
                        self.rounds += 1
                        self.moving.set()

    def join(self) -> None:
        self.done.set()
        self.thread.join(15.0)
        assert not self.thread.is_alive(), "the front-end hung after the server went away"


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("PYVIRTIO_SIGNAL_SEED", random.randrange(1 << 32)))
    print(f"PYVIRTIO_SIGNAL_SEED={value}")
    return value


@contextlib.contextmanager
def serving(cmd: Command, tmp: Path) -> Iterator[ServeProcess]:
    server = ServeProcess(cmd.kind, ["-v", *cmd.args(tmp)], log_path=tmp / f"{cmd.kind}.log")
    try:
        yield server
    finally:
        server.close()


def _end_within_deadline(server: ServeProcess, sig: int, what: str) -> None:
    try:
        status = server.stop(sig, timeout=SHUTDOWN_DEADLINE)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None
    assert status == 0, f"{what}: exit status {status}\n{server.tail()}"


def _signal_rounds(cmd: Command, tmp: Path, rounds: list[tuple[int, int, str]],
                   rng: random.Random) -> int:
    """Start the server once per round (index, signal, moment), signal it at that moment,
    and check the shutdown; returns the data rounds the front-ends moved before."""
    sockets = cmd.sockets(tmp)
    transferred = 0
    for i, sig, moment in rounds:
        what = f"{cmd.kind} #{i} {signal.Signals(sig).name} at {moment}"
        front: FrontEnd | None = None
        with serving(cmd, tmp) as server:
            server.wait_for_path(sockets[0])
            if moment == "socket-up":
                time.sleep(rng.uniform(0, 0.005))
            else:
                server.wait_for(r"^pyvirtio: virtio-")
                if moment == "idle":
                    time.sleep(rng.uniform(0, 0.2))
                else:
                    front = FrontEnd(sockets[0], cmd.device_id, moment == "transfer", rng)
                    if moment == "transfer":
                        assert front.moving.wait(30), f"{what}: no data moved\n{server.tail()}"
                    time.sleep(rng.uniform(0, 0.03))
            _end_within_deadline(server, sig, what)
            if front is not None:
                front.join()
                transferred += front.rounds
            for path in sockets:
                assert socket_gone(path), f"{what}: {path} left behind\n{server.tail()}"
    return transferred


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_sigterm_and_sigint_at_random_moments_end_serve_cleanly_within_2s(
        kind: str, tmp_path: Path, seed: int) -> None:
    """The rounds run in LANES independent lanes at once (each its own server, sockets and
    front-end): a round is mostly waiting for a process to start, so lanes overlap it. Every
    signal is still a fresh server's only signal, judged on its own."""
    cmd = COMMANDS[kind]
    rng = random.Random(seed)
    moments = [MOMENTS[i % len(MOMENTS)] for i in range(SIGNALS_PER_COMMAND)]
    rng.shuffle(moments)
    rounds = [(i, (signal.SIGTERM, signal.SIGINT)[i % 2], m) for i, m in enumerate(moments)]
    lanes = []
    for lane in range(LANES):
        folder = tmp_path / f"lane{lane}"
        folder.mkdir()
        lanes.append((folder, rounds[lane::LANES], random.Random(rng.random())))
    with ThreadPoolExecutor(LANES, thread_name_prefix=f"signals-{kind}") as pool:
        futures = [pool.submit(_signal_rounds, cmd, *lane) for lane in lanes]
        transferred = sum(f.result() for f in futures)  # the first failing lane's error
    print(f"{kind}: {SIGNALS_PER_COMMAND} signals, {transferred} transfer rounds before them")


@pytest.mark.parametrize("kind", sorted(COMMANDS))
def test_sigkill_leaves_nothing_a_restart_trips_over(
        kind: str, tmp_path: Path, seed: int) -> None:
    cmd = COMMANDS[kind]
    rng = random.Random(seed)
    sockets = cmd.sockets(tmp_path)
    for round_ in range(2):
        with serving(cmd, tmp_path) as server:
            server.wait_for(r"^pyvirtio: virtio-")
            front = FrontEnd(sockets[0], cmd.device_id, True, rng)
            assert front.moving.wait(30), server.tail()
            server.kill()
            front.join()
        stale = [p for p in sockets if p.exists()]
        assert stale, f"round {round_}: SIGKILL removed the sockets (expected stale files)"
    with serving(cmd, tmp_path) as server:
        server.wait_for(r"^pyvirtio: virtio-")
        front = FrontEnd(sockets[0], cmd.device_id, True, rng)
        assert front.moving.wait(30), f"the restarted server moves no data\n{server.tail()}"
        _end_within_deadline(server, signal.SIGTERM, "after the restarts")
        front.join()
    for path in sockets:
        assert socket_gone(path), path
