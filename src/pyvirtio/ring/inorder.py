"""VIRTIO_F_IN_ORDER bookkeeping shared by both ring formats (device side).

With IN_ORDER negotiated a device must use buffers in the order they were made available
(VIRTIO 1.x §2.7.9, §2.8.8), and it may report a run of them with a single used entry
carrying the id of the run's last buffer: the driver takes the skipped buffers as used
*completely* (every writable byte written). :class:`InOrderCompletions` lets a device
complete out of order anyway (a back-end whose requests finish in any order needs no
change): completions are held back until every earlier buffer is complete, then released
as batches, each cut where a buffer was not filled completely (only the last buffer of a
batch may report a shorter length).
"""

from __future__ import annotations


class InOrderCompletions:
    """Popped buffers in pop order, their completions, and the batches ready to publish.

    ``key`` is what the ring calls a buffer (a split head, a packed buffer id); ``weight``
    what the ring advances by when it is used (1 for split, its descriptor count for
    packed); ``capacity`` its writable bytes.
    """

    __slots__ = ("_order",)

    def __init__(self) -> None:
        # key -> [weight, capacity, written or -1], insertion-ordered: the pop order
        self._order: dict[int, list[int]] = {}

    def popped(self, key: int, weight: int, capacity: int) -> None:
        self._order[key] = [weight, capacity, -1]

    def unpop(self, key: int) -> None:
        self._order.pop(key, None)

    def pending(self, key: int) -> bool:
        """Popped and not completed yet."""
        entry = self._order.get(key)
        return entry is not None and entry[2] < 0

    def complete(self, key: int, written: int) -> None:
        self._order[key][2] = written

    def clear(self) -> None:
        self._order.clear()

    def __len__(self) -> int:
        return len(self._order)

    def batches(self) -> list[tuple[list[int], int, int]]:
        """Take the completed prefix as ``(keys, total weight, written of the last)``
        batches, in order. Within a batch every buffer but the last was filled completely,
        so a single used entry (the last key, its length) describes the batch exactly."""
        out: list[tuple[list[int], int, int]] = []
        order = self._order
        keys: list[int] = []
        weight = 0
        while order:
            key = next(iter(order))
            w, capacity, written = order[key]
            if written < 0:
                break
            del order[key]
            keys.append(key)
            weight += w
            if written != capacity or not order or next(iter(order.values()))[2] < 0:
                out.append((keys, weight, written))
                keys = []
                weight = 0
        return out
