"""Harnesses that run a :class:`~pyvirtio.io.vhost_user_server.VhostUserServer` for tests
and demos: :class:`ServerThread` (its loop in a background thread) and
:class:`ServerProcess` (the server in a child process, logging to a file, stopped by
SIGTERM). The child side of :class:`ServerProcess` is this module run with ``-m``; it is the
harness's own entry point, not a command line (that is ``pyvirtio serve``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.io import unixsock
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer

log = logging.getLogger("pyvirtio.testing.server")


class ServerThread:
    """A server's event loop in a daemon thread; :meth:`stop` stops it and closes the
    server."""

    def __init__(self, server: VhostUserServer) -> None:
        self.server = server
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"vhost-user {server.path}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def stop(self, timeout: float = 10.0) -> None:
        self.server.stop()  # pending until the loop sees it, even before run() starts
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise RuntimeError(f"server thread for {self.server.path} did not stop")
        self.server.close()
        if self.error is not None:
            raise RuntimeError("server thread failed") from self.error

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ServerProcess:
    """A :class:`VhostUserServer` serving ``device`` ("module:Class" built with ``kwargs``)
    in a child process, logging to a file.

    Waits until the socket accepts connections. :meth:`stop` sends SIGTERM (then SIGKILL);
    :meth:`log_text` and :meth:`wait_for_log` read the child's log. ``pythonpath`` adds
    directories the child imports the device module from. ``extensions`` names the
    server's extensions factory ("module:function", e.g.
    ``"pyvirtio.io.inflight:inflight_extensions"``); ``server_options`` are keyword
    arguments of :class:`VhostUserServer` (``{"max_mem_slots": 4}``...). With
    ``introspect`` the child also answers :meth:`device_attr` (test introspection of the
    device it serves, on a socket of its own beside ``path``).
    """

    def __init__(self, path: str | os.PathLike[str],
                 device: str = "pyvirtio.device.rng:RngDevice",
                 kwargs: dict[str, Any] | None = None, *, log_level: str = "DEBUG",
                 log_path: str | os.PathLike[str] | None = None,
                 extensions: str | None = None,
                 server_options: dict[str, Any] | None = None,
                 pythonpath: Sequence[str] = (), start_timeout: float = 15.0,
                 introspect: bool = False) -> None:
        self.path = os.fspath(path)
        self.introspect_path = self.path + ".attr" if introspect else None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="vhost-user-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        ready_r, ready_w = os.pipe()
        spec = {"socket": self.path, "device": device, "kwargs": kwargs or {},
                "extensions": extensions, "server": server_options or {},
                "log_level": log_level, "ready_fd": ready_w,
                "introspect": self.introspect_path}
        cmd = [sys.executable, "-m", "pyvirtio.testing.server", json.dumps(spec)]
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[2])
        paths = [src, *map(str, pythonpath), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        try:
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT, env=env,
                                             pass_fds=(ready_w,))
            os.close(ready_w)
            ready_w = -1
            self._wait_ready(ready_r, start_timeout)
        except BaseException:
            if hasattr(self, "proc"):
                self.kill()
            raise
        finally:
            os.close(ready_r)
            if ready_w >= 0:
                os.close(ready_w)

    def _wait_ready(self, ready_fd: int, timeout: float) -> None:
        # The child writes to ready_fd once it listens (probing the socket instead would be
        # a front-end connection of its own in the server's log and counters).
        ready, _, _ = select.select([ready_fd], [], [], timeout)
        if not ready:
            raise TimeoutError(f"vhost-user server did not listen on {self.path} within "
                               f"{timeout} s")
        if os.read(ready_fd, 16) != b"ready\n":
            self.proc.wait(5)
            raise LocalError(f"vhost-user server exited with {self.proc.returncode}: "
                             f"{self.log_text()[-2000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """Wait until the log (from character ``start``) matches ``pattern`` (a regex)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.log_text(), start)
            if m is not None:
                return m
            if time.monotonic() >= deadline:
                raise TimeoutError(f"log never matched {pattern!r}; tail:\n"
                                   f"{self.log_text()[-3000:]}")
            time.sleep(0.02)

    def device_attr(self, name: str, timeout: float = 10.0) -> Any:
        """An attribute of the device the child serves now (a hash object reads as its hex
        digest; ``name`` may be a dotted path with indices, ``queues.0.ring.broken``); needs
        ``introspect=True``."""
        if self.introspect_path is None:
            raise LocalError("this ServerProcess was started without introspect=True")
        with unixsock.connect(self.introspect_path, timeout) as sock:
            sock.settimeout(timeout)
            sock.sendall(name.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
        reply = json.loads(data or b"{}")
        if "error" in reply:
            raise LocalError(f"device attribute {name!r}: {reply['error']}")
        return reply["value"]

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, wait, SIGKILL if needed; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_object(spec: str) -> Any:
    """``"package.module:name"`` -> that object."""
    module, _, name = spec.partition(":")
    if not name:
        raise LocalError(f"{spec!r} is not of the form package.module:name")
    return getattr(importlib.import_module(module), name)


def device_factory(spec: str, kwargs: dict[str, Any]) -> Callable[[], VirtioDevice]:
    """``"package.module:Class"`` plus keyword arguments -> a device factory."""
    cls = load_object(spec)
    if not (isinstance(cls, type) and issubclass(cls, VirtioDevice)):
        raise LocalError(f"{spec} is not a VirtioDevice class")

    def factory() -> VirtioDevice:
        device: VirtioDevice = cls(**kwargs)
        return device

    return factory


def _serve_attributes(server: VhostUserServer, path: str) -> None:
    """Answer one attribute name per connection with ``{"value": ...}`` as JSON."""
    listener = unixsock.listen(path, 4)

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5.0)
            try:
                name = conn.recv(256).decode().strip()
                value: Any = server.last_device
                for part in name.split("."):  # "queues.0.ring.broken": attributes, indices
                    value = value[int(part)] if part.isdigit() else getattr(value, part)
                if hasattr(value, "hexdigest"):
                    value = value.hexdigest()
                reply = {"value": value}
            except Exception as exc:  # a test's bad name: say so, keep serving
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    server.loop.add_reader(listener.fileno(), answer)


def _child(spec: dict[str, Any]) -> int:
    """The child of :class:`ServerProcess`: serve until SIGTERM."""
    logging.basicConfig(level=str(spec["log_level"]).upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ready_fd = int(spec["ready_fd"])
    # The handlers go in before the socket is bound: a SIGTERM from then on is a clean stop
    # (pending until the loop runs), never a death that leaves the socket file behind.
    loop = EventLoop()
    loop.stop_on_signals()
    try:
        extensions = spec.get("extensions")
        server = VhostUserServer(
            spec["socket"], device_factory(spec["device"], spec["kwargs"]), loop,
            extensions=load_object(extensions) if extensions else None, **spec["server"])
    except (LocalError, PeerError, OSError, ValueError, TypeError) as exc:
        log.error("cannot start: %s", exc)
        loop.close()
        return 1
    if spec.get("introspect"):
        _serve_attributes(server, spec["introspect"])
    with contextlib.suppress(OSError):
        os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    try:
        server.serve_forever(stop_on_signals=True)
        log.info("stopping: %s", server.loop.stop_reason)
    finally:
        server.close()
        loop.close()
        if spec.get("introspect"):
            with contextlib.suppress(OSError):
                os.unlink(spec["introspect"])
    return 0


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
