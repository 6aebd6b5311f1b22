"""The memory balloon device (virtio-balloon, VIRTIO 1.x §5.5), host side.

The host sets a target (config ``num_pages``, in 4 KiB pages) and the guest's driver inflates
the balloon towards it: it allocates pages and posts their frame numbers on the inflate
queue. Every page given to us is discarded from the guest's shared memory at once
(:mod:`.discard`), so the host really gets it back; the driver writes how many pages the
balloon holds into ``actual``. Deflating gives pages back to the guest: nothing to do on our
side, they read as zeros on their next touch. The stats queue carries the guest's memory
statistics; the reporting queue (FREE_PAGE_REPORTING) carries ranges of free guest memory,
discarded the same way without any target change.

Queue numbering follows the negotiated features (as Linux and QEMU do): inflate 0, deflate 1,
then stats if STATS_VQ, then reporting if REPORTING.

A hostile driver's page lists are checked before anything is punched: a page outside guest
memory, a list whose length is not a multiple of 4 bytes, a page inflated twice (or deflated
while not in the balloon), a report with more buffers than the queue has entries: each is
recorded in :attr:`VirtioDevice.problems` naming the culprit, the buffer is returned to the
driver, and serving goes on.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyvirtio.device.balloon.discard import (
    PageDiscarder,
    allocated_bytes,
    page_ranges,
    region_of,
    region_of_view,
)
from pyvirtio.device.base import VirtioDevice
from pyvirtio.ring import DescriptorChain
from pyvirtio.spec import balloon as B
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import status as S

INFLATE, DEFLATE, STATS, REPORTING = "inflate", "deflate", "stats", "reporting"

STAT_NAMES = {
    B.VIRTIO_BALLOON_S_SWAP_IN: "swap_in",
    B.VIRTIO_BALLOON_S_SWAP_OUT: "swap_out",
    B.VIRTIO_BALLOON_S_MAJFLT: "major_faults",
    B.VIRTIO_BALLOON_S_MINFLT: "minor_faults",
    B.VIRTIO_BALLOON_S_MEMFREE: "free",
    B.VIRTIO_BALLOON_S_MEMTOT: "total",
    B.VIRTIO_BALLOON_S_AVAIL: "available",
    B.VIRTIO_BALLOON_S_CACHES: "caches",
    B.VIRTIO_BALLOON_S_HTLB_PGALLOC: "hugetlb_allocations",
    B.VIRTIO_BALLOON_S_HTLB_PGFAIL: "hugetlb_failures",
}

DEFAULT_FEATURES = (1 << B.VIRTIO_BALLOON_F_STATS_VQ | 1 << B.VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                    | 1 << B.VIRTIO_BALLOON_F_REPORTING | 1 << B.VIRTIO_BALLOON_F_MUST_TELL_HOST)
_U32 = struct.Struct("<I")


@dataclass
class BalloonCounters:
    """What the guest did with the balloon (pages unless said otherwise)."""

    inflated: int = 0
    deflated: int = 0
    reported_bytes: int = 0  # free page reporting: bytes reported
    reports: int = 0
    stats_updates: int = 0
    refused: int = 0  # buffers refused as malformed
    history: list[str] = field(default_factory=list)


class BalloonDevice(VirtioDevice):
    """virtio-balloon whose inflated and reported pages are discarded from guest memory.

    ``target`` is the initial balloon size in bytes (rounded down to pages). Change it with
    :meth:`set_target`; read the guest's side with :attr:`actual_bytes` and :attr:`stats`.
    """

    device_id = ids.BALLOON
    feature_names = F.names_in(vars(B), "VIRTIO_BALLOON_F_")

    def __init__(self, target: int = 0, *, features: int = DEFAULT_FEATURES,
                 **kwargs: object) -> None:
        super().__init__(4, features, config_size=B.CONFIG_SIZE,
                         **kwargs)  # type: ignore[arg-type]
        self.discarder = PageDiscarder()
        self.counters = BalloonCounters()
        self.roles: list[str] = [INFLATE, DEFLATE, STATS, REPORTING]
        #: page frame numbers the balloon holds now (inflated and not deflated)
        self.balloon: set[int] = set()
        #: the guest's latest statistics, by name (see STAT_NAMES), values in bytes/counts
        self.stats: dict[str, int] = {}
        self.stats_time: float | None = None
        self._stats_chain: DescriptorChain | None = None
        self.set_target(target, notify=False)

    # ---- the host's side ------------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        return int(_U32.unpack_from(self.config, B.CFG_NUM_PAGES)[0])

    @property
    def actual_pages(self) -> int:
        return int(_U32.unpack_from(self.config, B.CFG_ACTUAL)[0])

    @property
    def actual_bytes(self) -> int:
        return self.actual_pages * B.PAGE_SIZE

    @property
    def target_bytes(self) -> int:
        return self.target_pages * B.PAGE_SIZE

    @property
    def attached(self) -> bool:
        """Whether a driver is running the device (its inflate queue is live)."""
        q = self.queues[0]
        return q.ring is not None or bool(self.status & S.DRIVER_OK)

    def set_target(self, nbytes: int, notify: bool = True) -> None:
        """Ask the guest for a balloon of ``nbytes`` (rounded down to 4 KiB pages) and raise
        the config interrupt (over vhost-user: CONFIG_CHANGE_MSG) if a driver is there."""
        if nbytes < 0:
            raise ValueError(f"balloon target {nbytes} is negative")
        pages = min(nbytes // B.PAGE_SIZE, 0xFFFFFFFF)
        self.config[B.CFG_NUM_PAGES : B.CFG_NUM_PAGES + 4] = _U32.pack(pages)
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self.counters.history.append(f"target {pages} pages")
        # A vhost-user front-end without the STATUS protocol feature never tells us about
        # DRIVER_OK: running queues mean a driver is there.
        if notify and self.attached:
            self.notify_config()

    def request_stats(self) -> bool:
        """Give the guest its stats buffer back so that it sends fresh numbers. Returns
        whether a buffer was held (the guest answers asynchronously)."""
        chain = self._stats_chain
        if chain is None or STATS not in self.roles:
            return False
        self._stats_chain = None
        self.complete(self.roles.index(STATS), chain, 0)
        return True

    def host_allocated(self) -> int:
        """Bytes of host memory guest RAM occupies now (allocated blocks of its files)."""
        return allocated_bytes(self.memory) if self.memory is not None else 0

    def snapshot(self) -> dict[str, object]:
        """Everything a control client or a stats line shows."""
        return {
            "attached": self.attached,
            "target": self.target_bytes,
            "actual": self.actual_bytes,
            "balloon_pages": len(self.balloon),
            "discarded": self.discarder.stats.discarded,
            "reported": self.counters.reported_bytes,
            "host_allocated": self.host_allocated(),
            "guest_memory": self.memory.size if self.memory is not None else 0,
            "stats": dict(self.stats),
            "stats_age": (None if self.stats_time is None or self.reactor is None
                          else self.reactor.time() - self.stats_time),
            "problems": len(self.problems),
        }

    # ---- device framework hooks -------------------------------------------------------------

    def on_features_ok(self) -> None:
        roles = [INFLATE, DEFLATE]
        if self.has_feature(B.VIRTIO_BALLOON_F_STATS_VQ):
            roles.append(STATS)
        if self.has_feature(B.VIRTIO_BALLOON_F_REPORTING):
            roles.append(REPORTING)
        self.roles = roles

    def on_reset(self) -> None:
        self.balloon.clear()
        self._stats_chain = None
        self.config[B.CFG_ACTUAL : B.CFG_ACTUAL + 4] = bytes(4)
        self.roles = [INFLATE, DEFLATE, STATS, REPORTING]

    def on_config_write(self, offset: int, data: bytes) -> None:
        if offset == B.CFG_ACTUAL and len(data) == 4:
            self.config[B.CFG_ACTUAL : B.CFG_ACTUAL + 4] = data
            return
        super().on_config_write(offset, data)

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        role = self.roles[queue] if queue < len(self.roles) else None
        if role == INFLATE:
            self._inflate(queue, chain)
        elif role == DEFLATE:
            self._deflate(queue, chain)
        elif role == STATS:
            return self._stats(queue, chain)
        elif role == REPORTING:
            self._report(queue, chain)
        else:
            self._refuse(f"queue {queue} is not used with features 0x{self.driver_features:x}")
        return 0

    # ---- the queues ---------------------------------------------------------------------

    def _refuse(self, message: str) -> None:
        self.counters.refused += 1
        self._peer_problem(f"{self.name}: {message}")

    def _pfns(self, queue: int, chain: DescriptorChain, what: str) -> list[int] | None:
        n = chain.readable_len
        if n % B.PFN.size:
            self._refuse(f"{what} buffer (queue {queue}, descriptor {chain.head}) holds {n} "
                         "bytes, not a whole number of 4-byte page frame numbers; ignored")
            return None
        data = chain.read()
        return [p for (p,) in struct.iter_unpack("<I", data)]

    def _inflate(self, queue: int, chain: DescriptorChain) -> None:
        pfns = self._pfns(queue, chain, "inflate")
        if pfns is None:
            return
        memory = self.memory
        assert memory is not None
        fresh: list[int] = []
        seen: set[int] = set()
        for pfn in pfns:
            gpa = pfn << B.VIRTIO_BALLOON_PFN_SHIFT
            if region_of(memory, gpa, B.PAGE_SIZE) is None:
                self._refuse(f"inflate (descriptor {chain.head}): page frame {pfn} "
                             f"(0x{gpa:x}) is outside guest memory; not discarded")
            elif pfn in self.balloon or pfn in seen:
                self._refuse(f"inflate (descriptor {chain.head}): page frame {pfn} "
                             f"(0x{gpa:x}) is already in the balloon")
            else:
                seen.add(pfn)
                fresh.append(pfn)
        self.balloon.update(fresh)
        self.counters.inflated += len(fresh)
        self.discarder.discard_gpa_ranges(
            memory, ((p << B.VIRTIO_BALLOON_PFN_SHIFT, n * B.PAGE_SIZE)
                     for p, n in page_ranges(fresh)))

    def _deflate(self, queue: int, chain: DescriptorChain) -> None:
        pfns = self._pfns(queue, chain, "deflate")
        if pfns is None:
            return
        for pfn in pfns:
            if pfn in self.balloon:
                self.balloon.remove(pfn)
                self.counters.deflated += 1
            else:
                self._refuse(f"deflate (descriptor {chain.head}): page frame {pfn} "
                             f"(0x{pfn << B.VIRTIO_BALLOON_PFN_SHIFT:x}) is not in the balloon")

    def _stats(self, queue: int, chain: DescriptorChain) -> int | None:
        data = chain.read()
        if len(data) % B.STAT_SIZE:
            self._refuse(f"stats buffer (descriptor {chain.head}) holds {len(data)} bytes, "
                         f"not a whole number of {B.STAT_SIZE}-byte entries; ignored")
        else:
            stats: dict[str, int] = {}
            for off in range(0, len(data), B.STAT_SIZE):
                tag, value = B.STAT.unpack_from(data, off)
                stats[STAT_NAMES.get(tag, f"tag{tag}")] = value
            self.stats = stats
            self.stats_time = self.reactor.time() if self.reactor is not None else None
            self.counters.stats_updates += 1
        if self._stats_chain is not None:
            # The guest has only one stats buffer out; a second is the driver's doing.
            self._refuse(f"stats buffer (descriptor {chain.head}) posted while another is "
                         "held; returning the older one")
            old, self._stats_chain = self._stats_chain, None
            self.complete(queue, old, 0)
        self._stats_chain = chain
        return None  # held until the host wants fresh numbers

    def _report(self, queue: int, chain: DescriptorChain) -> None:
        ring = self.ring(queue)
        limit = ring.size if ring is not None else 0
        segments = chain.writable + chain.readable
        if len(segments) > limit:
            self._refuse(f"free page report (descriptor {chain.head}) has {len(segments)} "
                         f"buffers, more than the queue's {limit} entries; not discarded")
            return
        memory = self.memory
        assert memory is not None
        self.counters.reports += 1
        for view in segments:
            where = region_of_view(memory, view)
            if where is None:  # cannot happen for views the ring gave us
                self._refuse(f"free page report (descriptor {chain.head}): a buffer is not "
                             "in guest memory")
                continue
            region, offset = where
            # Whole pages only: a partial page at either end may hold live data.
            start = -(-offset // B.PAGE_SIZE) * B.PAGE_SIZE
            end = (offset + len(view)) // B.PAGE_SIZE * B.PAGE_SIZE
            if end > start:
                self.counters.reported_bytes += end - start
                self.discarder.discard_range(region, start, end - start)
