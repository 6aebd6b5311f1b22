"""Helpers for the vhost-user tests: a raw (possibly hostile) front-end, a device with a
config space, the "a good front-end still gets entropy" check, and a recording host for the
sans-I/O back-end protocol.

A server child process imports the devices here as ``helpers.vhost_user:ConfigRngDevice``
with ``tests/`` on its PYTHONPATH (:data:`helpers.paths.TESTS`).
"""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Sequence

from pyvirtio.device.base import ConfigAccessError
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.rng import RngDriver
from pyvirtio.io import memfd as memfd_io
from pyvirtio.io import unixsock
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.memory import Region
from pyvirtio.spec import ids
from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C


class ConfigRngDevice(RngDevice):
    """virtio-rng with an 8-byte config space (rng has none): bytes 0-3 read-only (a serial
    number), bytes 4-5 writable; a write there is echoed by the device into bytes 6-7 with a
    config change notification, so config rules and CONFIG_CHANGE_MSG can be tested."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(config_size=8, **kwargs)
        self.config[0:4] = b"PVIO"

    def on_config_write(self, offset: int, data: bytes) -> None:
        if offset < 4 or offset + len(data) > 6:
            raise ConfigAccessError(f"{self.name}: config offset {offset} (+{len(data)}) is "
                                    "read-only")
        self.config[offset : offset + len(data)] = data
        self.update_config(6, bytes(self.config[4:6]))


class RecordingRngDevice(RngDevice):
    """virtio-rng that keeps every byte it served, so a test can find what a guest read,
    and every feature set it accepted (``negotiated``), which a reset would forget."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.stream = bytearray()
        self.negotiated: list[int] = []
        source = self.source

        def recorded(n: int) -> bytes:
            data = source(n)
            self.stream += data
            return data

        self.source = recorded

    def on_features_ok(self) -> None:
        self.negotiated.append(self.driver_features)


def memfd(size: int = 1 << 20, name: str = "hostile") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


class RawFrontend:
    """A front-end that sends whatever it is told, byte-exact, and reads replies."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = unixsock.connect(path, timeout)
        self.timeout = timeout

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        unixsock.send_all(self.sock, data, list(fds))

    def send(self, req: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             need_reply: bool = False, flags: int | None = None) -> None:
        msg = C.request(req, payload, need_reply=need_reply)
        if flags is not None:
            msg.flags = flags
        self.send_raw(msg.encode(), fds)

    def recv(self, timeout: float | None = None) -> C.Message:
        self.sock.settimeout(timeout or self.timeout)
        decoder = C.Decoder()
        while True:
            data, fds, truncated = unixsock.recv_exact(self.sock, decoder.wanted)
            msgs = decoder.feed(data, fds, truncated)
            if msgs:
                return msgs[0]

    def call(self, req: int, payload: bytes = b"", fds: Sequence[int] = (),
             need_reply: bool = True) -> C.Message:
        """Send and read the reply."""
        self.send(req, payload, fds, need_reply=need_reply)
        return self.recv()

    def ack(self, req: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; the u64 status of the ack."""
        reply = self.call(req, payload, fds)
        assert reply.request == req and reply.flags == V.VERSION | V.REPLY_FLAG, reply
        return C.parse_u64(reply.payload)

    def handshake(self, protocol_features: int | None = None) -> int:
        """SET_OWNER, features, protocol features (REPLY_ACK at least); returns the
        negotiated protocol features."""
        self.send(R.SET_OWNER)
        features = C.parse_u64(self.call(R.GET_FEATURES, need_reply=False).payload)
        assert features >> V.VHOST_USER_F_PROTOCOL_FEATURES & 1
        offered = C.parse_u64(self.call(R.GET_PROTOCOL_FEATURES, need_reply=False).payload)
        chosen = offered if protocol_features is None else protocol_features & offered
        self.send(R.SET_PROTOCOL_FEATURES, C.u64(chosen))
        return chosen

    def closed_by_peer(self, timeout: float = 30.0) -> bool:
        """Whether the server closes the connection within ``timeout`` (data sent before
        the close is discarded)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.sock], [], [], 0.1)
            if ready:
                try:
                    data = self.sock.recv(4096)
                except ConnectionResetError:
                    return True
                if not data:
                    return True
        return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_entropy(path: str, n: int = 256, **client_kwargs: object) -> bytes:
    """A good front-end (our client + RngDriver) reads ``n`` random bytes from ``path``."""
    with VhostUserClient(path, ids.RNG, **client_kwargs) as client:  # type: ignore[arg-type]
        driver = probe(client, RngDriver)
        assert isinstance(driver, RngDriver)
        return driver.read(n)


def socketpair_fd() -> tuple[int, socket.socket]:
    """An fd that is a socket (not mappable), and the object keeping the other end."""
    a, b = socket.socketpair()
    return a.detach(), b


class FakeHost:
    """Records what the protocol asks of the I/O layer."""

    def __init__(self) -> None:
        self.watched: dict[int, int] = {}
        self.polling: set[int] = set()
        self.signals: list[int] = []
        self.backend: list[bytes] = []

    def watch_kick(self, index: int, fd: int) -> None:
        self.watched[fd] = index

    def unwatch_kick(self, index: int, fd: int) -> None:
        self.watched.pop(fd, None)

    def start_polling(self, index: int) -> None:
        self.polling.add(index)

    def stop_polling(self, index: int) -> None:
        self.polling.discard(index)

    def adopt_signal_fd(self, fd: int) -> None:
        pass

    def signal(self, fd: int) -> None:
        self.signals.append(fd)

    def send_backend(self, fd: int, data: bytes) -> None:
        self.backend.append(data)

    def map_memory(self, fd: int, gpa: int, size: int, fd_offset: int,
                   user_addr: int | None) -> Region:
        return memfd_io.map_memory_fd(fd, gpa, size, fd_offset, user_addr)

    def close_fd(self, fd: int) -> None:
        memfd_io.close_fd(fd)
