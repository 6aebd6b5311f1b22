"""ProcessDevicePair: the driver here, the device in a child process, over vhost-user.

The child is a :class:`~pyvirtio.testing.server.ServerProcess`: our vhost-user server serving
the device. The parent's transport is our vhost-user front-end
(:class:`~pyvirtio.io.vhost_user_client.VhostUserClient`): guest memory is a sealed memfd
both map, kick and call doorbells are eventfds, config space travels as GET/SET_CONFIG. The
ring itself is only ever exchanged through shared memory, so this proves that both ends of
pyvirtio's rings (and both ends of its vhost-user) work across address spaces with real
concurrency, the way a hypervisor and a back-end do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from pyvirtio.driver.base import Driver, probe
from pyvirtio.errors import LocalError
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.testing.server import ServerProcess, load_object


class ProcessTransport(VhostUserClient):
    """A vhost-user front-end connected to ``device`` ("module:Class" built with ``kwargs``)
    served in a child process; :meth:`device_attr` reads the child's device (tests)."""

    def __init__(self, device: str, kwargs: dict[str, Any] | None = None,
                 memory_size: int = 16 << 20) -> None:
        self.workdir = tempfile.mkdtemp(prefix="pyvirtio-process-pair-")
        path = os.path.join(self.workdir, "device.sock")
        self.server: ServerProcess | None = None
        try:
            self.server = ServerProcess(path, device, kwargs, log_level="WARNING",
                                        log_path=os.path.join(self.workdir, "device.log"),
                                        introspect=True)
            super().__init__(path, load_object(device).device_id, memory_size=memory_size)
        except BaseException:
            self._stop_child()
            raise

    @property
    def proc(self) -> Any:
        """The child process (``subprocess.Popen``)."""
        assert self.server is not None
        return self.server.proc

    def device_attr(self, name: str) -> Any:
        """Read an attribute of the device object in the child (test introspection)."""
        assert self.server is not None
        return self.server.device_attr(name)

    def queue_broken_reason(self, index: int) -> str | None:
        """Why the device in the child gave up on queue ``index`` (read from the child)."""
        try:
            reason = self.device_attr(f"queues.{index}.ring.broken")
        except LocalError:
            return None
        return None if reason is None else str(reason)

    def log_text(self) -> str:
        """What the child logged (warnings and errors)."""
        return self.server.log_text() if self.server is not None else ""

    def _stop_child(self) -> None:
        if self.server is not None:
            self.server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._stop_child()


class ProcessDevicePair:
    """``device`` ("module:Class") runs in a child process; the driver runs here."""

    def __init__(self, device: str, kwargs: dict[str, Any] | None = None,
                 memory_size: int = 16 << 20) -> None:
        self.transport = ProcessTransport(device, kwargs, memory_size)
        self.memory = self.transport.memory
        self.driver: Driver | None = None

    @property
    def pid(self) -> int:
        pid: int = self.transport.proc.pid
        return pid

    def probe(self, driver: type[Driver] | None = None, features: int | None = None) -> Driver:
        import pyvirtio.driver.all  # noqa: F401

        self.driver = probe(self.transport, driver, features)
        return self.driver

    def close(self) -> None:
        if self.driver is not None:
            try:
                self.driver.remove()
            finally:
                self.driver = None
        self.transport.close()

    def __enter__(self) -> ProcessDevicePair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # last resort: never leave a child behind
        server = getattr(getattr(self, "transport", None), "server", None)
        if server is not None and server.alive():
            server.kill()
