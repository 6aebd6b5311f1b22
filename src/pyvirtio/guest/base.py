"""What UML and QEMU guests have in common: the process, the console, the markers, cleanup.

A :class:`Guest` boots a kernel with an initramfs from :mod:`pyvirtio.guest.image`, captures
its console in a background thread (so that pipes never fill), parses the ``PYVIRTIO-*``
marker lines and always cleans up: the guest runs in its own session, and every process of
that session is killed (SIGKILL) when the guest is stopped, times out, or the Python process
exits. Every wait has a timeout.

Two ways to use it::

    result = UmlGuest("result answer 42").run()      # one-shot: boot, wait, clean up
    assert result.ok and result.results == {"answer": "42"}

    with QemuGuest("read line; result got $line") as guest:   # act while it runs
        guest.wait_for("PYVIRTIO-READY", timeout=30)
        guest.write("hello\\n")
        result = guest.wait(timeout=30)
"""

from __future__ import annotations

import atexit
import codecs
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import ClassVar, Self

from pyvirtio.errors import LocalError
from pyvirtio.guest.errors import GuestError, GuestTimeoutError
from pyvirtio.guest.image import (
    EXIT_MARKER,
    MODULE_ERROR_MARKER,
    READY_MARKER,
    RESULT_MARKER,
    ExtraFiles,
    GuestKind,
    Initramfs,
    build_initramfs,
)

__all__ = ["Guest", "GuestResult", "session_processes"]

_RESULT_RE = re.compile(re.escape(RESULT_MARKER) + r" ([^\s=]+)=(.*)$")
_EXIT_RE = re.compile(re.escape(EXIT_MARKER) + r" status=(-?\d+)")
_MODULE_ERROR_RE = re.compile(re.escape(MODULE_ERROR_MARKER) + r" (.*)$")
# Terminal control sequences (SeaBIOS resets the terminal with ESC c): stripped from the
# console so that printing it does not garble the reader's terminal.
_ESCAPE_RE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_c])")

#: How long a guest may take to exit after printing its exit marker before it is killed.
EXIT_GRACE = 10.0
#: How long to wait for the console reader to drain after the guest exited.
DRAIN_TIMEOUT = 5.0
#: How long SIGKILLed guest processes may take to be gone after the kernel process is reaped.
KILL_SETTLE = 10.0


@dataclass(frozen=True)
class GuestResult:
    """What happened to a guest, once it is gone.

    ``finished`` is True when the script ran to its end (the ``PYVIRTIO-EXIT`` marker was
    seen); ``exit_status`` is then the script's exit status. ``timed_out`` and ``killed``
    say the harness killed the guest (at the timeout, or on request). ``returncode`` is the
    kernel process's own (negative: killed by that signal).
    """

    kind: GuestKind
    command: tuple[str, ...]
    command_line: str
    console: str
    stderr: str
    results: dict[str, str]
    exit_status: int | None
    finished: bool
    ready: bool
    timed_out: bool
    killed: bool
    returncode: int | None
    elapsed: float
    module_errors: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """The script finished and exited with status 0."""
        return self.finished and self.exit_status == 0

    def tail(self, lines: int = 40) -> str:
        """The last ``lines`` console lines (and host-side stderr, if any)."""
        text = "\n".join(self.console.splitlines()[-lines:])
        if self.stderr.strip():
            text += "\n--- stderr ---\n" + "\n".join(self.stderr.splitlines()[-lines:])
        return text

    def describe(self) -> str:
        """One paragraph for error messages: outcome, command, console tail."""
        if self.finished:
            outcome = f"script exited with status {self.exit_status}"
        elif self.timed_out:
            outcome = f"timed out after {self.elapsed:.1f}s (killed)"
        elif self.killed:
            outcome = "killed before the script finished"
        else:
            outcome = f"exited (returncode {self.returncode}) before the script finished"
        return (
            f"{self.kind} guest {outcome}\ncommand: {self.command_line}\n"
            f"last console lines:\n{self.tail()}"
        )

    def check(self) -> Self:
        """Return self if :attr:`ok`, else raise :class:`GuestError` with the details."""
        if not self.ok:
            raise GuestError(self.describe())
        return self


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, session) of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    except (IndexError, ValueError):
        return None


def session_processes(sid: int, *, include_zombies: bool = False) -> list[int]:
    """Pids of the processes in session ``sid`` (a guest's whole process tree)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        info = _proc_stat(int(entry))
        if info is None or (info[0] == "Z" and not include_zombies):
            continue
        if info[3] == sid or info[2] == sid:
            pids.append(int(entry))
    return sorted(pids)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _proc_stat(int(entry))
            if info is not None:
                children.setdefault(info[1], []).append(int(entry))
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


_LIVE: weakref.WeakSet[Guest] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    for guest in list(_LIVE):
        guest._kill_processes()
        if guest._workdir is not None:
            shutil.rmtree(guest._workdir, ignore_errors=True)


class Guest(ABC):
    """A Linux guest that runs ``script`` from a generated initramfs, then powers off.

    Subclasses (:class:`~pyvirtio.guest.uml.UmlGuest`,
    :class:`~pyvirtio.guest.qemu.QemuGuest`) only say how to build the command line.

    ``script`` is a busybox ``sh`` script; it may call ``result KEY VALUE`` to report
    values (see :mod:`pyvirtio.guest.image`). ``timeout`` (seconds, from start) bounds
    :meth:`run` and :meth:`wait`. ``image`` reuses a prebuilt initramfs instead of building
    one from ``script``/``extra_files``/``modules``.
    """

    kind: ClassVar[GuestKind]

    def __init__(
        self,
        script: str = "",
        *,
        extra_files: ExtraFiles | None = None,
        kernel_args: Sequence[str] = (),
        timeout: float = 60.0,
        modules: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        image: Initramfs | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if timeout <= 0:
            raise LocalError(f"timeout must be positive, not {timeout}")
        if image is not None and image.kind != self.kind:
            raise LocalError(f"a {image.kind} image cannot boot a {self.kind} guest")
        self.script = script
        self.extra_files = dict(extra_files or {})
        self.kernel_args = list(kernel_args)
        self.timeout = timeout
        self.modules = None if modules is None else list(modules)
        self.cache_dir = cache_dir
        self.env = dict(env or {})
        self._image = image
        self._cond = threading.Condition()
        self._init_state()

    def _init_state(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: Path | None = None
        self._argv: list[str] = []
        self._env_overrides: dict[str, str] = {}
        self._lines: list[str] = []
        self._partial = {"console": "", "stderr": ""}
        self._stderr: list[str] = []
        self._results: dict[str, str] = {}
        self._module_errors: list[str] = []
        self._exit_status: int | None = None
        self._exit_marker_at: float | None = None
        self._ready = False
        self._cursor = 0
        self._started_at = 0.0
        self._exited_at: float | None = None
        self._eof = False
        self._timed_out = False
        self._killed = False
        self._result: GuestResult | None = None
        self._threads: list[threading.Thread] = []
        self._stop_reading = threading.Event()
        self._stdin_lock = threading.Lock()

    # -- what subclasses provide -----------------------------------------------------------

    @abstractmethod
    def _command(self, image: Initramfs, workdir: Path) -> tuple[list[str], dict[str, str]]:
        """The argv and the environment variables to set, to boot ``image``."""

    def _workdir_parent(self) -> str | None:
        """Where to create the private temp dir (None: the default temp dir)."""
        return None

    # -- image and command line ------------------------------------------------------------

    def build(self) -> Initramfs:
        """Build (or fetch from the cache) the initramfs this guest boots."""
        if self._image is None:
            self._image = build_initramfs(
                self.kind,
                self.script,
                extra_files=self.extra_files,
                modules=self.modules,
                cache_dir=self.cache_dir,
            )
        return self._image

    @property
    def command(self) -> list[str]:
        """The argv of the running (or last) guest; empty before :meth:`start`."""
        return list(self._argv)

    @property
    def command_line(self) -> str:
        """The command as a shell line, environment included: paste it to reproduce."""
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self._env_overrides.items())
        return (env + " " if env else "") + shlex.join(self._argv)

    @property
    def pid(self) -> int | None:
        """Pid of the kernel process (also its session and process group id)."""
        return self._proc.pid if self._proc is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Boot the guest in the background and return at once."""
        if self._proc is not None:
            raise LocalError("guest already started: use a new Guest object to boot again")
        image = self.build()
        self._workdir = Path(
            tempfile.mkdtemp(prefix=f"pyvirtio-{self.kind}-", dir=self._workdir_parent())
        )
        try:
            argv, env_overrides = self._command(image, self._workdir)
            env_overrides = {**env_overrides, **self.env}
            self._argv, self._env_overrides = argv, env_overrides
            self._started_at = time.monotonic()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env={**os.environ, **env_overrides},
                cwd=self._workdir,
                start_new_session=True,
            )
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
            raise
        _LIVE.add(self)
        proc = self._proc
        for target, name in ((self._read_loop, "console"), (self._wait_loop, "waiter")):
            thread = threading.Thread(
                target=target, args=(proc,), name=f"pyvirtio-{self.kind}-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None:
            self.stop()

    def run(self, timeout: float | None = None) -> GuestResult:
        """Boot, wait for the script to finish (or the timeout), clean up, report.

        Never raises because the guest misbehaved: look at the result (or call
        :meth:`GuestResult.check`).
        """
        self.start()
        try:
            return self.wait(timeout)
        finally:
            self.stop()

    def wait(self, timeout: float | None = None) -> GuestResult:
        """Wait until the guest exits; kill it at the timeout; clean up and report.

        ``timeout`` counts from now; by default the guest's ``timeout`` from its start.
        A guest that printed its exit marker gets :data:`EXIT_GRACE` seconds to power off.
        """
        self._require_started()
        if self._result is not None:
            return self._result
        now = time.monotonic()
        deadline = self._started_at + self.timeout if timeout is None else now + timeout
        with self._cond:
            while self._exited_at is None:
                now = time.monotonic()
                if self._exit_marker_at is not None and now > self._exit_marker_at + EXIT_GRACE:
                    break
                if now >= deadline:
                    self._timed_out = True
                    break
                self._cond.wait(min(deadline - now, 0.5))
        return self.stop()

    def stop(self) -> GuestResult:
        """Kill the guest if it still runs, clean everything up, and report. Idempotent."""
        self._require_started()
        if self._result is None:
            if self._exited_at is None:
                self._killed = True
            self._kill_processes()
            self._result = self._finish()
        return self._result

    def kill(self) -> None:
        """SIGKILL the guest's whole process tree at once (simulates a crash).

        The console stays readable; call :meth:`wait` or :meth:`stop` for the result.
        """
        self._require_started()
        if self._exited_at is None:
            self._killed = True
        self._kill_processes()

    # -- console ---------------------------------------------------------------------------

    @property
    def console(self) -> str:
        """The console text so far (complete lines)."""
        with self._cond:
            return "".join(line + "\n" for line in self._lines)

    @property
    def results(self) -> dict[str, str]:
        """The ``result KEY VALUE`` pairs reported so far."""
        with self._cond:
            return dict(self._results)

    @property
    def running(self) -> bool:
        """True between :meth:`start` and the kernel process's exit."""
        return self._proc is not None and self._exited_at is None

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 30.0) -> re.Match[str]:
        """Wait for a console line matching ``pattern`` (a regex, searched in each line).

        Lines are consumed in order: each call starts after the line the previous call
        matched. Raises :class:`GuestTimeoutError` after ``timeout`` seconds, and
        :class:`GuestError` at once if the guest exits first.
        """
        self._require_started()
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        with self._cond:
            index = self._cursor
            while True:
                while index < len(self._lines):
                    match = regex.search(self._lines[index])
                    index += 1
                    if match:
                        self._cursor = index
                        return match
                if self._eof and self._exited_at is not None:
                    raise GuestError(self._describe_now(f"guest exited before {regex.pattern!r}"))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise GuestTimeoutError(
                        self._describe_now(
                            f"no console line matched {regex.pattern!r} within {timeout}s"
                        )
                    )
                self._cond.wait(min(remaining, 0.5))

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the modules are loaded and the script starts (``PYVIRTIO-READY``)."""
        self.wait_for(re.escape(READY_MARKER), timeout)

    def write(self, data: bytes | str) -> None:
        """Write to the guest console's input (the script's stdin)."""
        proc = self._require_started()
        if isinstance(data, str):
            data = data.encode()
        if proc.stdin is None or not self.running:
            raise GuestError(self._describe_now("cannot write: the guest is not running"))
        with self._stdin_lock:
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError) as exc:
                raise GuestError(self._describe_now(f"cannot write to console: {exc}")) from exc

    def processes(self) -> list[int]:
        """Live (non-zombie) pids of the guest's session: empty once it is cleaned up."""
        return session_processes(self._proc.pid) if self._proc is not None else []

    # -- internals -------------------------------------------------------------------------

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise LocalError("guest not started: call start() (or use run())")
        return self._proc

    def _describe_now(self, what: str) -> str:
        with self._cond:
            lines = self._lines[-40:]
            err = self._stderr[-20:]
        text = f"{what}\ncommand: {self.command_line}\nlast console lines:\n" + "\n".join(lines)
        if err:
            text += "\n--- stderr ---\n" + "\n".join(err)
        return text

    def _feed(self, stream: str, text: str, final: bool = False) -> None:
        """Split decoded output into lines and parse the markers (called with no lock)."""
        with self._cond:
            buffered = self._partial[stream] + text.replace("\r\n", "\n")
            *complete, rest = buffered.split("\n")
            if final and rest:
                complete.append(rest)
                rest = ""
            self._partial[stream] = rest
            for raw in complete:
                line = raw.rstrip("\r")
                if "\x1b" in line:
                    line = _ESCAPE_RE.sub("", line)
                if stream == "stderr":
                    self._stderr.append(line)
                    continue
                self._lines.append(line)
                self._parse(line)
            self._cond.notify_all()

    def _parse(self, line: str) -> None:
        if RESULT_MARKER in line:
            match = _RESULT_RE.search(line)
            if match:
                self._results[match.group(1)] = match.group(2).rstrip()
        elif EXIT_MARKER in line:
            match = _EXIT_RE.search(line)
            if match and self._exit_status is None:
                self._exit_status = int(match.group(1))
                self._exit_marker_at = time.monotonic()
        elif READY_MARKER in line:
            self._ready = True
        elif MODULE_ERROR_MARKER in line:
            match = _MODULE_ERROR_RE.search(line)
            if match:
                self._module_errors.append(match.group(1))

    def _read_loop(self, proc: subprocess.Popen[bytes]) -> None:
        """Console reader thread: drain stdout and stderr until EOF (or told to stop)."""
        streams = {"console": proc.stdout, "stderr": proc.stderr}
        decoders = {name: codecs.getincrementaldecoder("utf-8")("replace") for name in streams}
        with selectors.DefaultSelector() as sel:
            for name, pipe in streams.items():
                if pipe is not None:
                    os.set_blocking(pipe.fileno(), False)
                    sel.register(pipe.fileno(), selectors.EVENT_READ, name)
            while sel.get_map() and not self._stop_reading.is_set():
                for key, _ in sel.select(timeout=0.2):
                    name = key.data
                    try:
                        data = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        self._feed(name, decoders[name].decode(data))
                    else:
                        sel.unregister(key.fd)
                        self._feed(name, decoders[name].decode(b"", final=True), final=True)
        for name in streams:
            self._feed(name, "", final=True)  # a last line without newline, if stopped early
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def _wait_loop(self, proc: subprocess.Popen[bytes]) -> None:
        """Waiter thread: notice the exit without reaping, so the pid stays reserved."""
        while True:
            try:
                os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                pass  # already reaped by stop()
            except InterruptedError:
                continue
            break
        with self._cond:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            self._cond.notify_all()

    def _kill_processes(self) -> None:
        """SIGKILL every process of the guest's session (and its descendants), then reap.

        The kernel process is not reaped before its group is killed, so its pid (the
        session and group id) cannot be reused by an unrelated process meanwhile.
        """
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        sid = proc.pid
        victims = set(session_processes(sid, include_zombies=False)) | _descendants(sid)
        try:
            os.killpg(sid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in victims - {sid}:
            info = _proc_stat(pid)
            if info is not None and info[0] != "Z":
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL cannot be ignored
            pass
        # A SIGKILLed process takes a moment to die (UML's address-space processes tear
        # down large mappings; longer on a loaded machine): the guest is stopped only
        # when none of its session still runs.
        deadline = time.monotonic() + KILL_SETTLE
        while session_processes(sid) and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            self._cond.notify_all()

    def _finish(self) -> GuestResult:
        proc = self._require_started()
        for thread in self._threads:
            if thread.name.endswith("console"):
                thread.join(DRAIN_TIMEOUT)
                if thread.is_alive():
                    self._stop_reading.set()
                    thread.join(DRAIN_TIMEOUT)
            else:
                thread.join(DRAIN_TIMEOUT)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                try:
                    pipe.close()
                except OSError:
                    pass
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        _LIVE.discard(self)
        with self._cond:
            exited = self._exited_at if self._exited_at is not None else time.monotonic()
            return GuestResult(
                kind=self.kind,
                command=tuple(self._argv),
                command_line=self.command_line,
                console="".join(line + "\n" for line in self._lines),
                stderr="".join(line + "\n" for line in self._stderr),
                results=dict(self._results),
                exit_status=self._exit_status,
                finished=self._exit_status is not None,
                ready=self._ready,
                timed_out=self._timed_out,
                killed=self._killed,
                returncode=proc.returncode,
                elapsed=exited - self._started_at,
                module_errors=tuple(self._module_errors),
            )
