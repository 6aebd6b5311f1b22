"""``python -m pyvirtio [GLOBAL...] serve KIND ARGS`` as a child process, for tests that
drive the real command line (blk, net, rng, console all start the same way).

stdout (the banner, ``--stats`` tables) is collected line by line by a thread, so a test
waits for a line instead of sleeping; stderr (the log) goes to a file, or joins stdout.
:meth:`ServeProcess.stop` is the clean shutdown (a signal, then the exit status),
:meth:`ServeProcess.kill` a crash; call :meth:`ServeProcess.close` in ``finally``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from helpers.paths import SRC


class ServeProcess:
    """One ``pyvirtio serve`` child (in its own session, optionally in a network namespace).

    ``log_path`` receives stderr; without it stderr joins the collected stdout lines.
    ``stdin`` is its standard input (an open fd; default /dev/null).
    """

    def __init__(self, kind: str, args: Sequence[str], *, log_path: Path | None = None,
                 global_args: Sequence[str] = (), netns: str | None = None,
                 stdin: int | None = None, command: str = "serve") -> None:
        argv = [sys.executable, "-m", "pyvirtio", *global_args, command, kind, *args]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)}
        self.argv = argv
        self.kind = kind
        self.log_path = log_path
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._log = open(log_path, "ab") if log_path is not None else None
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.STDOUT, env=env,
            start_new_session=True)
        self._reader = threading.Thread(target=self._read, daemon=True,
                                        name=f"serve-{kind}-output")
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    # ---- what it printed ---------------------------------------------------------------------

    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def log(self) -> str:
        """stderr so far ("" when it joins stdout: see :meth:`output`)."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """The current line count (pass as ``start`` to wait only for newer lines)."""
        with self._cond:
            return len(self.lines)

    def tail(self, n: int = 60) -> str:
        with self._cond:
            lines = "\n".join(self.lines[-n:])
        return f"{lines}\n{self.log()[-4000:]}" if self.log_path is not None else lines

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first stdout line (from line ``start``) matching ``pattern``; fails when the
        process exits first or ``timeout`` passes."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            index = start
            while True:
                while index < len(self.lines):
                    m = regex.search(self.lines[index])
                    index += 1
                    if m:
                        return m
                if self._eof:
                    raise AssertionError(f"serve {self.kind} exited ({self.proc.poll()}) "
                                         f"before printing {pattern!r}:\n{self.tail()}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"serve {self.kind} never printed {pattern!r} in "
                                         f"{timeout}s:\n{self.tail()}")
                self._cond.wait(min(remaining, 0.5))

    def wait_for_path(self, path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        """Until ``path`` exists (a socket the server binds: it is up to that point); fails
        when the process exits first or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if self.proc.poll() is not None:
                raise AssertionError(f"serve {self.kind} exited ({self.proc.returncode}) "
                                     f"before creating {path}:\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"serve {self.kind} did not create {path} in "
                                     f"{timeout}s:\n{self.tail()}")
            time.sleep(0.001)

    def banner_args(self, kind: str) -> list[str]:
        """The arguments the banner printed after ``qemu-system-x86_64 ...`` (kind "qemu")
        or ``linux.uml ...`` (kind "uml")."""
        prefix = r"qemu-system-x86_64 \.\.\. " if kind == "qemu" else r"linux\.uml \.\.\. "
        return shlex.split(self.wait_for(rf"^\s*{prefix}(.*)$").group(1))

    # ---- ending it ----------------------------------------------------------------------------

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` (SIGTERM: the clean shutdown) and return the exit status; a server
        that does not exit in ``timeout`` s is killed and the test fails."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"serve {self.kind} ignored {signal.Signals(sig).name} "
                                     f"for {timeout}s:\n{self.tail()}") from None
        self._reader.join(5)
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL to its whole session: a crash (a socket file stays behind, as it would)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        """Kill whatever is left and release the pipes (idempotent; for ``finally``)."""
        self.kill()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
