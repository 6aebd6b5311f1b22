"""nbdkit, the real NBD server the NBD back-end is tested against.

:class:`Nbdkit` runs ``nbdkit --foreground`` in its own session (optionally inside a
network namespace), listening on a unix socket or on a TCP address, and returns once the
server listens (its pid file appears only then). stderr goes to a log file: the ``error``
filter writes a line per injected error there, which tests count. :meth:`Nbdkit.kill` is a
crash, :meth:`Nbdkit.stop` the clean shutdown, :meth:`Nbdkit.close` for ``finally`` blocks.
The server also exits with the test process (``--exit-with-parent``).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from peers import require_binaries
from pyvirtio.core.reactor import Reactor
from pyvirtio.io.loop import EventLoop

WAIT = 20.0


def require_nbd() -> None:
    """nbdkit and libnbd's Python bindings are here (skip locally, fail under CI)."""
    require_binaries("nbdkit")
    from peers import skip_or_fail
    from pyvirtio.device.blk import nbd as nbd_backend

    if not nbd_backend.available():
        skip_or_fail("libnbd's Python bindings are missing (Debian python3-libnbd; "
                     "make deps links them into .venv)")


class Nbdkit:
    """``nbdkit --foreground [FILTERS] PLUGIN ARGS`` on ``unix`` (a socket path) or on
    ``ip``:``port`` (TCP, inside ``netns`` if given); ``readonly`` adds ``-r``."""

    def __init__(self, plugin: Sequence[str], *, log_path: Path, unix: Path | None = None,
                 ip: str | None = None, port: int = 10809, netns: str | None = None,
                 filters: Sequence[str] = (), readonly: bool = False,
                 timeout: float = WAIT) -> None:
        self.log_path = log_path
        self.pidfile = log_path.with_suffix(".pid")
        with contextlib.suppress(FileNotFoundError):
            self.pidfile.unlink()
        argv = ["nbdkit", "--foreground", "--exit-with-parent", "-P", str(self.pidfile)]
        if unix is not None:
            with contextlib.suppress(FileNotFoundError):
                unix.unlink()  # a killed server's socket (it never removes it)
            argv += ["--unix", str(unix)]
            self.uri = f"nbd+unix:///?socket={unix}"
        else:
            assert ip is not None, "a unix socket or an address"
            argv += ["--ipaddr", ip, "--port", str(port)]
            self.uri = f"nbd://{ip}:{port}/"
        if readonly:
            argv.append("-r")
        argv += [f"--filter={f}" for f in filters]
        argv += plugin
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.argv = argv
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not self.pidfile.exists():
                if self.proc.poll() is not None:
                    raise AssertionError(f"nbdkit exited ({self.proc.returncode}) before "
                                         f"listening:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"nbdkit did not listen in {timeout} s:\n"
                                         f"{self.log()}")
                time.sleep(0.01)
        except BaseException:
            self.close()
            raise

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def count(self, pattern: str) -> int:
        """How many log lines match ``pattern``."""
        regex = re.compile(pattern)
        return sum(1 for line in self.log().splitlines() if regex.search(line))

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a crash (connections break without a word)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(WAIT)

    def stop(self) -> int | None:
        """SIGTERM and its exit status."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.poll()

    def close(self) -> None:
        self.kill()
        self._log.close()


@contextlib.contextmanager
def event_loop() -> Iterator[EventLoop]:
    loop = EventLoop()
    try:
        yield loop
    finally:
        loop.close()


def run_until(loop: Reactor, done: Callable[[], bool], timeout: float = WAIT,
              what: str = "the requests") -> None:
    """Run ``loop`` until ``done()``; fail after ``timeout`` seconds."""
    assert isinstance(loop, EventLoop)
    loop.run(until=done, timeout=timeout)
    if not done():
        raise AssertionError(f"{what} did not complete within {timeout} s")
