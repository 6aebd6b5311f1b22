"""The queue interface: what devices and drivers use of a virtqueue, whatever its format.

A ring format (the split ring now, the packed ring next) implements :class:`DeviceRing`
for the device side and :class:`DriverRing` for the driver side. Code outside
:mod:`pyvirtio.ring` uses only these methods and attributes; it never reaches into a ring's
private state (``tests/unit/ring/test_interface.py`` checks that over the sources).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from pyvirtio.memory import GuestMemory
from pyvirtio.ring.chain import DescriptorChain

#: a short chain as :meth:`DeviceRing.pop_short` hands it out: head, the memory region's
#: buffer, then offset and length of each of its three descriptors, and whether the middle
#: one is device-writable
ShortChain = tuple[int, memoryview, int, int, int, int, bool, int, int]
#: a buffer of one device-writable descriptor as :meth:`DeviceRing.pop_writable` hands it
#: out: head, the memory region's buffer, the offset and length of the descriptor in it
WritableBuffer = tuple[int, memoryview, int, int]


class DeviceRing(Protocol):
    """The device side of a virtqueue (vhost, QEMU ``virtio.c``)."""

    memory: GuestMemory
    name: str
    size: int
    event_idx: bool
    indirect: bool
    #: why the queue is broken (the peer broke a ring rule), or None
    broken: str | None
    #: guest-physical addresses of the descriptor area, driver area and device area
    desc_addr: int
    avail_addr: int
    used_addr: int
    #: the next available entry to consume and the next used entry to fill; restored from
    #: outside for vhost-user (SET_VRING_BASE) and reconnection
    last_avail_idx: int
    used_idx: int

    # consuming
    def pending(self) -> int:
        """Available entries not popped yet."""
    def pop(self) -> DescriptorChain | None:
        """The next available chain (every ring rule applied), or None."""
    def pop_short(self, limit: int = 0xFFFF) -> list[ShortChain]:
        """Batch pop of the next short chains (three descriptors in one region) as tuples."""
    def pop_writable(self, need: int) -> list[WritableBuffer]:
        """Batch pop, all or nothing, of one-descriptor writable buffers for ``need`` bytes."""
    def chain(self, head: int) -> DescriptorChain:
        """The full chain of an in-flight head (one popped by :meth:`pop_short`)."""
    def rewind(self, count: int) -> None:
        """Un-pop the last ``count`` chains (not yet pushed)."""

    # returning
    def push(self, chain: DescriptorChain | int, written: int) -> None:
        """Return one chain with the bytes written into it."""
    def push_many(self, completions: Iterable[tuple[DescriptorChain | int, int]]) -> int:
        """Return several chains with one index update."""
    def needs_notification(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call."""
    def forge_used(self, buf_id: int, written: int, *, skip: int = 0,
                   wrong_wrap: bool = False, retire: bool = False) -> None:
        """Hostile-device testing: write a used entry unchecked (see the rings)."""

    # kick suppression
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (the device is polling)."""
    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (look again)."""

    # in-flight state, for resubmission after a back-end restart
    def in_flight(self) -> list[int]:
        """Heads popped and not yet pushed."""
    def resume(self, head: int) -> DescriptorChain:
        """Take ``head`` as popped again (resubmission), without consuming an entry."""
    def fail(self, reason: str) -> Exception:
        """Mark the queue broken (the device refused a request); returns the error."""


class DriverRing(Protocol):
    """The driver side of a virtqueue (the paper's virtqueue ops, Linux ``virtio_ring.c``)."""

    name: str
    size: int
    broken: str | None
    #: guest-physical addresses of the descriptor area, driver area and device area (split:
    #: descriptor table, avail ring, used ring; packed: descriptor ring and the driver's and
    #: device's event suppression structures), for the transport to tell the device
    desc_addr: int
    avail_addr: int
    used_addr: int

    @property
    def num_free(self) -> int:
        """Free descriptors."""

    def add_buf(self, out_sgs: Sequence[tuple[int, int]], in_sgs: Sequence[tuple[int, int]],
                token: object) -> int:
        """Expose a buffer; ``token`` comes back from :meth:`get_buf`."""
    def kick_prepare(self) -> bool:
        """Whether the device must be notified about what was added."""
    def get_buf(self) -> tuple[object, int] | None:
        """The next used buffer as ``(token, bytes_written)``, or None."""
    def has_used(self) -> bool:
        """Whether :meth:`get_buf` would return something."""
    def detach_unused(self) -> list[object]:
        """After a reset: take back every buffer still in flight."""
    def disable_cb(self) -> None:
        """Ask the device not to interrupt."""
    def enable_cb(self) -> bool:
        """Re-enable interrupts; False if buffers were used meanwhile (poll again)."""
    def enable_cb_delayed(self) -> bool:
        """Re-enable interrupts after ~3/4 of the outstanding buffers are used."""
