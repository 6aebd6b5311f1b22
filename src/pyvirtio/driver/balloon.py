"""The memory balloon driver (virtio-balloon, VIRTIO 1.x §5.5), guest side.

Like Linux's ``virtio_balloon``: the device's target (config ``num_pages``) says how many
4 KiB pages the guest should hand over. :meth:`BalloonDriver.update` inflates by allocating
pages from the guest memory allocator and posting their frame numbers on the inflate queue,
or deflates by posting frame numbers on the deflate queue and freeing the pages once the
device has seen them (MUST_TELL_HOST order); after each batch it writes ``actual``. The stats
queue is answered with numbers from the allocator (free, total, available), and
:meth:`BalloonDriver.report_free` reports free memory on the reporting queue.

The driver is synchronous, as the other pyvirtio drivers are: call :meth:`service` (or
:meth:`run_until`) to react to target changes and stats requests.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable

from pyvirtio.driver.base import Driver, Virtqueue, register_driver
from pyvirtio.errors import PeerError
from pyvirtio.memory.alloc import OutOfGuestMemory
from pyvirtio.spec import balloon as B
from pyvirtio.spec import ids

#: page frame numbers per inflate/deflate buffer (Linux: VIRTIO_BALLOON_ARRAY_PFNS_MAX)
PFNS_PER_BUFFER = 256
REPORT_CHUNK = 1 << 20
_U32 = struct.Struct("<I")


@register_driver
class BalloonDriver(Driver):
    device_ids = (ids.BALLOON,)
    features = (1 << B.VIRTIO_BALLOON_F_MUST_TELL_HOST | 1 << B.VIRTIO_BALLOON_F_STATS_VQ
                | 1 << B.VIRTIO_BALLOON_F_DEFLATE_ON_OOM | 1 << B.VIRTIO_BALLOON_F_REPORTING)

    def probe(self) -> None:
        dev = self.device
        names = ["inflate", "deflate"]
        if dev.has_feature(B.VIRTIO_BALLOON_F_STATS_VQ):
            names.append("stats")
        if dev.has_feature(B.VIRTIO_BALLOON_F_REPORTING):
            names.append("reporting")
        vqs = dev.find_vqs(len(names))
        self.vqs: dict[str, Virtqueue] = dict(zip(names, vqs, strict=True))
        self.pages: list[int] = []  # guest-physical addresses of the pages in the balloon
        self.pfn_buf = dev.allocator.alloc(PFNS_PER_BUFFER * B.PFN.size, 16)
        self.stats_buf = dev.allocator.alloc(B.STAT_SIZE * len(B_STAT_TAGS), 16)
        #: extra statistics a test or a caller adds (tag -> value), e.g. swap counters
        self.extra_stats: dict[int, int] = {}
        self.stats_answered = 0
        self.reported = 0  # bytes reported free
        if "stats" in self.vqs:
            self._post_stats()

    # ---- the device's wishes ------------------------------------------------------------

    @property
    def target_pages(self) -> int:
        return int(_U32.unpack(self.device.read_config(B.CFG_NUM_PAGES, 4))[0])

    @property
    def actual_pages(self) -> int:
        return int(_U32.unpack(self.device.read_config(B.CFG_ACTUAL, 4))[0])

    def service(self, timeout: float = 5.0) -> bool:
        """One pass: answer a stats request, move the balloon towards the target. Returns
        whether the balloon is at the target."""
        self.answer_stats()
        return self.update(timeout)

    def run_until(self, done: Callable[[], bool], timeout: float, poll: float = 0.02) -> None:
        """Serve the device (:meth:`service`, waiting for interrupts in between) until
        ``done()`` or ``timeout`` seconds (TimeoutError)."""
        deadline = time.monotonic() + timeout
        while True:
            self.service()
            if done():
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"balloon: not done within {timeout} s (target "
                                   f"{self.target_pages} pages, balloon {len(self.pages)})")
            self.device.transport.wait(poll)

    def update(self, timeout: float = 5.0) -> bool:
        """Inflate or deflate towards the target; returns whether it was reached (False when
        the guest ran out of memory to give)."""
        while True:
            diff = self.target_pages - len(self.pages)
            if diff > 0:
                if self.inflate(min(diff, PFNS_PER_BUFFER), timeout) == 0:
                    return False
            elif diff < 0:
                self.deflate(min(-diff, PFNS_PER_BUFFER), timeout)
            else:
                if self.actual_pages != len(self.pages):
                    self._write_actual()
                return True

    # ---- inflate and deflate ------------------------------------------------------------

    def _post_pfns(self, vq: Virtqueue, pages: list[int], timeout: float) -> None:
        data = b"".join(_U32.pack(gpa >> B.VIRTIO_BALLOON_PFN_SHIFT) for gpa in pages)
        self.device.memory.write(self.pfn_buf, data)
        vq.add_buf([(self.pfn_buf, len(data))], [], token="pfns")
        vq.kick()
        token, _ = vq.wait_buf(timeout)
        if token != "pfns":
            raise PeerError(f"balloon: queue {vq.index} returned {token!r}, not our PFN list")

    def inflate(self, count: int, timeout: float = 5.0) -> int:
        """Give up to ``count`` pages (at most one buffer's worth) to the device; returns
        how many were given (fewer when the allocator runs dry)."""
        alloc = self.device.allocator
        pages: list[int] = []
        try:
            for _ in range(min(count, PFNS_PER_BUFFER)):
                pages.append(alloc.alloc(B.PAGE_SIZE, B.PAGE_SIZE))
        except OutOfGuestMemory:
            pass
        if not pages:
            return 0
        self._post_pfns(self.vqs["inflate"], pages, timeout)
        self.pages += pages
        self._write_actual()
        return len(pages)

    def deflate(self, count: int, timeout: float = 5.0) -> int:
        """Take up to ``count`` pages back; they are freed after the device saw the list."""
        count = min(count, PFNS_PER_BUFFER, len(self.pages))
        if count == 0:
            return 0
        pages = self.pages[-count:]
        self._post_pfns(self.vqs["deflate"], pages, timeout)
        del self.pages[-count:]
        for gpa in pages:
            self.device.allocator.free(gpa)
        self._write_actual()
        return count

    def _write_actual(self) -> None:
        self.device.write_config(B.CFG_ACTUAL, _U32.pack(len(self.pages)))

    # ---- statistics ---------------------------------------------------------------------

    def current_stats(self) -> dict[int, int]:
        """What the guest reports: its allocator's free and total memory."""
        alloc = self.device.allocator
        stats = {
            B.VIRTIO_BALLOON_S_SWAP_IN: 0,
            B.VIRTIO_BALLOON_S_SWAP_OUT: 0,
            B.VIRTIO_BALLOON_S_MAJFLT: 0,
            B.VIRTIO_BALLOON_S_MINFLT: 0,
            B.VIRTIO_BALLOON_S_MEMFREE: alloc.free_bytes,
            B.VIRTIO_BALLOON_S_MEMTOT: alloc.size,
            B.VIRTIO_BALLOON_S_AVAIL: alloc.free_bytes,
            B.VIRTIO_BALLOON_S_CACHES: 0,
        }
        stats.update(self.extra_stats)
        return stats

    def _post_stats(self) -> None:
        stats = self.current_stats()
        data = b"".join(B.STAT.pack(tag, value) for tag, value in stats.items())
        self.device.memory.write(self.stats_buf, data)
        vq = self.vqs["stats"]
        vq.add_buf([(self.stats_buf, len(data))], [], token="stats")
        vq.kick()

    def answer_stats(self) -> bool:
        """If the device gave the stats buffer back (it wants fresh numbers), send them."""
        vq = self.vqs.get("stats")
        if vq is None or vq.get_buf() is None:
            return False
        self.stats_answered += 1
        self._post_stats()
        return True

    # ---- free page reporting ------------------------------------------------------------

    def report_free(self, limit: int, chunk: int = REPORT_CHUNK, timeout: float = 5.0) -> int:
        """Report up to ``limit`` bytes of free guest memory, in ``chunk``-sized pieces held
        out of the allocator while the device looks at them. Returns the bytes reported."""
        vq = self.vqs.get("reporting")
        if vq is None:
            return 0
        alloc = self.device.allocator
        pieces: list[int] = []
        try:
            while (len(pieces) + 1) * chunk <= limit and len(pieces) < vq.ring.size:
                pieces.append(alloc.alloc(chunk, B.PAGE_SIZE))
        except OutOfGuestMemory:
            pass
        try:
            if not pieces:
                return 0
            vq.add_buf([], [(p, chunk) for p in pieces], token="report")
            vq.kick()
            token, _ = vq.wait_buf(timeout)
            if token != "report":
                raise PeerError(f"balloon: reporting queue returned {token!r}")
            self.reported += len(pieces) * chunk
            return len(pieces) * chunk
        finally:
            for p in pieces:
                alloc.free(p)

    def remove(self) -> None:
        alloc = self.device.allocator
        for gpa in self.pages:
            alloc.free(gpa)
        self.pages.clear()
        alloc.free(self.pfn_buf)
        alloc.free(self.stats_buf)


B_STAT_TAGS = range(B.VIRTIO_BALLOON_S_HTLB_PGFAIL + 1)
