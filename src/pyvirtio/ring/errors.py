"""Ring errors, split by whose fault they are."""

from pyvirtio.errors import LocalError, PeerError


class RingError(PeerError):
    """The peer broke the ring protocol. The queue is now *broken*: every further pop, push
    or get_buf raises this again with the same reason, until the queue is rebuilt (reset)."""


class QueueFullError(LocalError):
    """add_buf found no free descriptors: wait for used buffers (the Linux -ENOSPC)."""


class QueueUsageError(LocalError):
    """The queue's own user broke a rule (pushing a head twice, a used length beyond the
    chain's writable bytes, an empty buffer list...)."""
