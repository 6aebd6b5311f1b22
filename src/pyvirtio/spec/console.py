"""virtio-console (VIRTIO 1.x §5.3; Linux ``uapi/linux/virtio_console.h``).

Queues: port 0 receiveq (0) and transmitq (1); with MULTIPORT the control receiveq (2) and
control transmitq (3), then port N's receiveq at 2N+2 and transmitq at 2N+3 for N >= 1.
"Receive" is from the driver's point of view: the device fills receiveq buffers.
"""

from __future__ import annotations

import struct
from functools import cache

from pyvirtio.spec import LE, Endian

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# struct virtio_console_config field offsets
CFG_COLS = 0  # le16
CFG_ROWS = 2  # le16
CFG_MAX_NR_PORTS = 4  # le32
CFG_EMERG_WR = 8  # le32
CONFIG_SIZE = 12

# struct virtio_console_control: id (le32), event (le16), value (le16)
CONTROL_SIZE = 8


@cache
def control_struct(endian: Endian = LE) -> struct.Struct:
    return struct.Struct(endian + "IHH")


@cache
def config_struct(endian: Endian = LE) -> struct.Struct:
    return struct.Struct(endian + "HHII")


VIRTIO_CONSOLE_DEVICE_READY = 0
VIRTIO_CONSOLE_DEVICE_ADD = 1
VIRTIO_CONSOLE_DEVICE_REMOVE = 2
VIRTIO_CONSOLE_PORT_READY = 3
VIRTIO_CONSOLE_CONSOLE_PORT = 4
VIRTIO_CONSOLE_RESIZE = 5
VIRTIO_CONSOLE_PORT_OPEN = 6
VIRTIO_CONSOLE_PORT_NAME = 7

VIRTIO_CONSOLE_BAD_ID = 0xFFFFFFFF

# RESIZE carries struct virtio_console_resize {le16 cols; le16 rows} after the control header.
RESIZE = struct.Struct("<HH")

CONTROL_RECEIVEQ = 2
CONTROL_TRANSMITQ = 3


def port_receiveq(port: int) -> int:
    """Queue index the device fills for ``port`` (driver receive)."""
    return 0 if port == 0 else 2 * port + 2


def port_transmitq(port: int) -> int:
    """Queue index the driver fills for ``port`` (driver transmit)."""
    return 1 if port == 0 else 2 * port + 3


def num_queues(max_nr_ports: int, multiport: bool) -> int:
    """Total queues for a device with ``max_nr_ports`` ports."""
    return 2 * max_nr_ports + 2 if multiport else 2
