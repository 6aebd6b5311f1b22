"""A device queue the serving-engine tests drive by hand: a split driver ring (EVENT_IDX,
INDIRECT) at the bottom of a guest memory, and a device brought to DRIVER_OK on it."""

from __future__ import annotations

from pyvirtio.device.base import VirtioDevice
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.ring import DriverQueue
from pyvirtio.spec import features as F
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S

QSIZE = 16


def start(device: VirtioDevice, memory: GuestMemory) -> None:
    device.memory = memory
    device.set_driver_features(F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC))
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
    device.set_status(S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)


def driver_ring(memory: GuestMemory) -> tuple[DriverQueue, Allocator, tuple[int, int, int]]:
    """A split driver ring (EVENT_IDX, INDIRECT) at the bottom of ``memory``."""
    alloc = Allocator(0, 1 << 20)
    rings = (alloc.alloc(SP.desc_table_size(QSIZE), 4096),
             alloc.alloc(SP.avail_size(QSIZE), 4096),
             alloc.alloc(SP.used_size(QSIZE), 4096))
    return (DriverQueue(memory, QSIZE, *rings, event_idx=True, indirect=True,
                        allocator=alloc), alloc, rings)
