"""The balloon's control socket: change the target and read statistics from a shell.

One JSON object per line each way on a unix stream socket; a client sends one request and
reads one reply::

    {"op": "target", "bytes": 67108864}   -> {"ok": true, "attached": true, ...snapshot}
    {"op": "stats"}                       -> {"ok": true, "attached": false, ...}

Every reply carries the device's snapshot (target, actual, host memory reclaimed, the guest's
statistics) and ``attached``: whether a guest driver runs the device. ``pyvirtio balloon``
(:mod:`pyvirtio.cli.balloon`) is the command-line client; :func:`request` is the same from
Python. The server is a non-blocking reader on the device's event loop.
"""

from __future__ import annotations

import json
import logging
import socket
from typing import Any, Protocol

from pyvirtio.core.reactor import Reactor
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.io import unixsock

log = logging.getLogger("pyvirtio.io.balloon_control")

MAX_REQUEST = 4096


class Balloon(Protocol):
    def set_target(self, nbytes: int, notify: bool = True) -> None: ...
    def request_stats(self) -> bool: ...
    def snapshot(self) -> dict[str, object]: ...


class ControlServer:
    """Serve control requests for ``balloon()`` (the current device) on ``path``."""

    def __init__(self, path: str, balloon: Balloon, reactor: Reactor) -> None:
        self.path = path
        self.balloon = balloon
        self.reactor = reactor
        self._listener: socket.socket | None = unixsock.listen(path)
        self._clients: dict[int, tuple[socket.socket, bytearray]] = {}
        reactor.add_reader(self._listener.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket %s: accept failed: %s", self.path, exc)
                return
            sock.setblocking(False)
            fd = sock.fileno()
            self._clients[fd] = (sock, bytearray())
            self.reactor.add_reader(fd, lambda fd=fd: self._on_readable(fd))  # type: ignore[misc]

    def _drop(self, fd: int) -> None:
        entry = self._clients.pop(fd, None)
        if entry is not None:
            self.reactor.remove_reader(fd)
            entry[0].close()

    def _on_readable(self, fd: int) -> None:
        sock, buf = self._clients[fd]
        try:
            data = sock.recv(MAX_REQUEST)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        buf += data
        if b"\n" not in buf and data and len(buf) < MAX_REQUEST:
            return
        line = bytes(buf).split(b"\n", 1)[0]
        reply = self.answer(line)
        try:
            sock.setblocking(True)
            sock.settimeout(1.0)
            sock.sendall(json.dumps(reply).encode() + b"\n")
        except OSError as exc:
            log.info("control client went away: %s", exc)
        self._drop(fd)

    def answer(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line."""
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            op = req.get("op")
            if op == "target":
                nbytes = req.get("bytes")
                if not isinstance(nbytes, int) or nbytes < 0:
                    raise ValueError(f"target bytes must be a non-negative integer, not "
                                     f"{nbytes!r}")
                self.balloon.set_target(nbytes)
                log.info("control: balloon target set to %d bytes", nbytes)
            elif op == "stats":
                self.balloon.request_stats()
            else:
                raise ValueError(f"unknown op {op!r} (target, stats)")
        except ValueError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, **self.balloon.snapshot()}

    def close(self) -> None:
        for fd in list(self._clients):
            self._drop(fd)
        if self._listener is not None:
            self.reactor.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            unixsock.unlink_socket(self.path)


def request(path: str, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
    """Send one request to the control socket at ``path`` and return the reply."""
    try:
        sock = unixsock.connect(path, timeout)
    except (OSError, PeerError) as exc:
        raise LocalError(f"cannot reach the balloon control socket {path}: {exc}") from exc
    with sock:
        sock.settimeout(timeout)
        sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
        data = bytearray()
        while b"\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError as exc:
        raise PeerError(f"balloon control socket {path} sent a malformed reply: "
                        f"{bytes(data)[:100]!r}") from exc
    if not isinstance(reply, dict):
        raise PeerError(f"balloon control socket {path} sent {reply!r}")
    return reply
