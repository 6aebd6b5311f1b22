"""virtio-console: the device (:mod:`.device`: ports, MULTIPORT control, backpressure) and
its host-side port back-ends (:mod:`.ports`: stdio, pty, unix socket, memory).
:meth:`Port.parse` is the one parser of port specs (``KIND[:ARG][,name=NAME]``)."""

from pyvirtio.device.console.device import ConsoleDevice, Port
from pyvirtio.device.console.ports import (
    MemoryPort,
    PortBackend,
    PtyPort,
    StdioPort,
    UnixSocketPort,
)

__all__ = ["ConsoleDevice", "MemoryPort", "Port", "PortBackend", "PtyPort", "StdioPort",
           "UnixSocketPort"]
