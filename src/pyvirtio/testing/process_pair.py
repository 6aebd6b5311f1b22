"""ProcessDevicePair: the driver here, the device in a child process.

The two share guest memory through a memfd (mapped by both), kick and call doorbells are
eventfds passed with SCM_RIGHTS, and config ops travel as JSON messages over a
``SOCK_SEQPACKET`` socketpair. The ring itself is only ever exchanged through shared memory,
so this proves that both ends of pyvirtio's rings work across address spaces with real
concurrency, the way a hypervisor and a guest do.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pyvirtio.driver.base import ConfigOps, Driver, Virtqueue, probe
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.io.eventfd import EventFd
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue

REPLY_TIMEOUT = 10.0


class ProcessTransport(ConfigOps):
    """Config ops forwarded to a device running in a child process."""

    def __init__(self, device: str, kwargs: dict[str, Any] | None = None,
                 memory_size: int = 16 << 20) -> None:
        self.memory = GuestMemory.anonymous(memory_size, name="pyvirtio-process-pair")
        self.allocator = Allocator(0, memory_size)
        self._sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        region = self.memory.regions[0]
        assert region.fd is not None
        self._kicks: dict[int, EventFd] = {}
        self._calls: dict[int, EventFd] = {}
        self.vqs: dict[int, Virtqueue] = {}
        self._config_irq = EventFd()
        self._config_callback: Callable[[], None] | None = None
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pyvirtio.testing.device_process",
                 "--device", device, "--kwargs", json.dumps(kwargs or {}),
                 "--ctrl-fd", str(child_sock.fileno()), "--mem-fd", str(region.fd),
                 "--mem-size", str(memory_size)],
                pass_fds=(child_sock.fileno(), region.fd),
            )
        finally:
            child_sock.close()
        hello = self._call("hello")
        self.device_id = int(hello["device_id"])
        self.vendor_id = int(hello["vendor_id"])
        self._call("config_irq", fds=[self._config_irq.fd])

    def _call(self, op: str, fds: list[int] | None = None, **args: Any) -> Any:
        msg = json.dumps({"op": op, **args}).encode()
        if fds:
            socket.send_fds(self._sock, [msg], fds)
        else:
            self._sock.send(msg)
        ready, _, _ = select.select([self._sock], [], [], REPLY_TIMEOUT)
        if not ready:
            raise PeerError(f"device process did not answer {op!r} within {REPLY_TIMEOUT} s")
        data = self._sock.recv(1 << 20)
        if not data:
            raise PeerError(f"device process closed the connection during {op!r}")
        reply = json.loads(data)
        if "error" in reply:
            kind = PeerError if reply.get("kind") == "peer" else LocalError
            raise kind(f"device process: {reply['error']}")
        return reply["ok"]

    def get_features(self) -> int:
        return int(self._call("get_features"))

    def set_features(self, features: int) -> None:
        self._call("set_features", value=features)

    def get_status(self) -> int:
        return int(self._call("get_status"))

    def set_status(self, status: int) -> None:
        self._call("set_status", value=status)
        if status == 0:
            self._close_queues()

    def read_config(self, offset: int, length: int) -> bytes:
        return bytes.fromhex(self._call("read_config", offset=offset, length=length))

    def write_config(self, offset: int, data: bytes) -> None:
        self._call("write_config", offset=offset, data=data.hex())

    def generation(self) -> int:
        return int(self._call("generation"))

    def queue_max_size(self, index: int) -> int:
        return int(self._call("queue_max_size", index=index))

    def bind_queue(self, index: int, vq: Virtqueue) -> None:
        self.vqs[index] = vq

    def bind_config(self, callback: Callable[[], None] | None) -> None:
        self._config_callback = callback

    def queue_broken_reason(self, index: int) -> str | None:
        reason = self._call("queue_broken", index=index)
        return None if reason is None else str(reason)

    def setup_queue(self, index: int, ring: DriverQueue) -> None:
        kick, call = EventFd(), EventFd()
        self._kicks[index], self._calls[index] = kick, call
        self._call("start_queue", fds=[kick.fd, call.fd], index=index, size=ring.size,
                   desc=ring.desc_addr, avail=ring.avail_addr, used=ring.used_addr)

    def notify(self, index: int) -> None:
        self._kicks[index].signal()

    def wait(self, timeout: float) -> bool:
        calls = {efd.fd: idx for idx, efd in self._calls.items()}
        config = self._config_irq.fd
        ready, _, _ = select.select([config, *calls], [], [], timeout)
        for fd in ready:
            if fd == config:
                if self._config_irq.drain() and self._config_callback is not None:
                    self._config_callback()
                continue
            idx = calls[fd]
            if self._calls[idx].drain():
                vq = self.vqs.get(idx)
                if vq is not None:
                    vq.interrupt()
        return bool(ready)

    def device_attr(self, name: str) -> Any:
        """Read an attribute of the device object in the child (test introspection)."""
        return self._call("attr", name=name)

    def _close_queues(self) -> None:
        for efd in [*self._kicks.values(), *self._calls.values()]:
            efd.close()
        self._kicks.clear()
        self._calls.clear()
        self.vqs.clear()

    def close(self) -> None:
        try:
            self._sock.close()
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self._close_queues()
            self._config_irq.close()
            self.memory.close()


class ProcessDevicePair:
    """``device`` ("module:Class") runs in a child process; the driver runs here."""

    def __init__(self, device: str, kwargs: dict[str, Any] | None = None,
                 memory_size: int = 16 << 20) -> None:
        self.transport = ProcessTransport(device, kwargs, memory_size)
        self.memory = self.transport.memory
        self.driver: Driver | None = None

    @property
    def pid(self) -> int:
        return self.transport.proc.pid

    def probe(self, driver: type[Driver] | None = None, features: int | None = None) -> Driver:
        import pyvirtio.driver.all  # noqa: F401

        self.driver = probe(self.transport, driver, features)
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            try:
                self.driver.remove()
            finally:
                self.driver.device.detach_queues("its ProcessDevicePair is closed")
                self.driver = None
        self.transport.close()

    def __enter__(self) -> ProcessDevicePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a child behind
        proc = getattr(getattr(self, "transport", None), "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
