"""Unix stream sockets with file descriptors attached (SCM_RIGHTS).

The kernel delivers fds sent with ``sendmsg`` together with the first bytes of that send, and
a stream ``recvmsg`` stops at the end of a send that carried fds. A reader that asks for
exactly the bytes of one message part (vhost-user's decoder tells how many) therefore always
gets each message's fds with that message. Received fds are close-on-exec.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import socket
import stat
import time
from collections.abc import Sequence

from pyvirtio.errors import LocalError, PeerError

#: fds one read makes room for; more than this and the kernel truncates (MSG_CTRUNC) and
#: closes the excess
RECV_FDS = 16
_INT = array.array("i").itemsize


def _fds_from_ancdata(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _INT])
            fds.extend(arr)
    return fds


def recv_with_fds(sock: socket.socket, nbytes: int,
                  max_fds: int = RECV_FDS) -> tuple[bytes, list[int], bool]:
    """One ``recvmsg`` of up to ``nbytes``: ``(data, fds, truncated)``. ``truncated`` means
    the peer sent more fds than ``max_fds`` (the excess was dropped by the kernel). ``data``
    is empty at end of stream. Raises BlockingIOError on a non-blocking socket with nothing
    to read."""
    data, ancdata, flags, _ = sock.recvmsg(nbytes, socket.CMSG_SPACE(max_fds * _INT),
                                          socket.MSG_CMSG_CLOEXEC)
    return data, _fds_from_ancdata(ancdata), bool(flags & socket.MSG_CTRUNC)


def send_with_fds(sock: socket.socket, data: bytes | memoryview,
                  fds: Sequence[int] = ()) -> int:
    """One ``sendmsg`` (fds attached); returns the bytes sent."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
        else []
    return sock.sendmsg([data], anc)


def send_all(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send everything on a blocking socket; the fds go with the first chunk."""
    view = memoryview(data)
    sent = send_with_fds(sock, view, fds)
    while sent < len(view):
        sent += sock.send(view[sent:])


def recv_exact(sock: socket.socket, nbytes: int,
               max_fds: int = RECV_FDS) -> tuple[bytes, list[int], bool]:
    """Read exactly ``nbytes`` from a blocking socket (with its timeout), collecting fds.
    Raises :class:`PeerError` if the peer closes first; ``TimeoutError`` on timeout."""
    chunks: list[bytes] = []
    fds: list[int] = []
    truncated = False
    got = 0
    try:
        while got < nbytes:
            data, more, trunc = recv_with_fds(sock, nbytes - got, max_fds)
            fds.extend(more)
            truncated |= trunc
            if not data:
                raise PeerError(f"peer closed the connection after {got} of {nbytes} bytes")
            chunks.append(data)
            got += len(data)
    except BaseException:
        close_fds(fds)
        raise
    return b"".join(chunks), fds, truncated


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def listen(path: str, backlog: int = 8) -> socket.socket:
    """A listening unix stream socket at ``path`` (non-blocking, close-on-exec).

    A stale socket file left by a dead server is replaced; any other existing file is not
    touched (LocalError)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise LocalError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # nobody listens: stale
        else:
            raise LocalError(f"another server is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    """Connect to ``path``, retrying until ``timeout`` while the server is not there yet.
    The returned socket is blocking with ``timeout`` as its per-operation timeout."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            return sock
        except OSError as exc:
            sock.close()
            retry = exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN)
            if not retry or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def unlink_socket(path: str) -> None:
    """Remove ``path`` if it is a socket (never another kind of file)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
