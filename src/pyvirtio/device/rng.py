"""The entropy device (virtio-rng, VIRTIO 1.x §5.4): fill each writable buffer with random
bytes from a source, optionally no faster than a byte rate."""

from __future__ import annotations

import hashlib
import os
from collections import deque
from collections.abc import Callable

from pyvirtio.core.reactor import TimerHandle
from pyvirtio.device.base import VirtioDevice
from pyvirtio.ring import DescriptorChain
from pyvirtio.spec import ids
from pyvirtio.spec import rng as R


class TokenBucket:
    """``rate`` bytes per second, bursts up to ``burst`` bytes.

    Grants are all or nothing: a buffer no larger than the burst is filled whole once enough
    tokens have accumulated (a larger one gets a burst's worth). Dribbling out whatever few
    tokens there are leaves a Linux guest with a stream of tiny completions after which it
    stops reading /dev/hwrng altogether; whole buffers at the same average rate work.
    """

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, want: int, now: float) -> int:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        need = min(want, int(self.burst))
        if self.tokens < need:
            return 0
        self.tokens -= need
        return need

    def wait_time(self, want: int) -> float:
        return max(0.0, (min(want, self.burst) - self.tokens) / self.rate)


class RngDevice(VirtioDevice):
    """virtio-rng. ``source(n)`` returns ``n`` random bytes (default ``os.urandom``).

    ``rate_limit`` (bytes/s) needs a reactor to finish deferred requests. ``served`` counts
    bytes handed to the driver and ``digest`` hashes exactly that stream, so a test can prove
    the guest got the very bytes we served.
    """

    device_id = ids.RNG

    def __init__(self, source: Callable[[int], bytes] = os.urandom, *,
                 rate_limit: float | None = None, **kwargs: object) -> None:
        super().__init__(R.NUM_QUEUES, **kwargs)  # type: ignore[arg-type]
        self.source = source
        self.rate_limit = rate_limit
        self._bucket: TokenBucket | None = None
        self._waiting: deque[DescriptorChain] = deque()
        self._timer: TimerHandle | None = None
        self.served = 0
        self.digest = hashlib.sha256()
        self.throttled = 0  # times a request had to wait for the rate limit

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        if self.rate_limit is None:
            return self._fill(chain, chain.writable_len)
        self._waiting.append(chain)
        self._drain()
        return None

    def _fill(self, chain: DescriptorChain, n: int) -> int:
        data = self.source(n)
        written = chain.write(data)
        self.served += written
        self.digest.update(data[:written])
        return written

    def _drain(self) -> None:
        assert self.rate_limit is not None
        if self.reactor is None:
            raise RuntimeError("a rate-limited RngDevice needs a reactor")
        now = self.reactor.time()
        if self._bucket is None:
            self._bucket = TokenBucket(self.rate_limit, max(self.rate_limit / 10, 4096), now)
        while self._waiting:
            chain = self._waiting[0]
            n = self._bucket.take(chain.writable_len, now)
            if n == 0:
                if self._timer is None:
                    self.throttled += 1
                    delay = self._bucket.wait_time(chain.writable_len)
                    self._timer = self.reactor.call_later(delay, self._on_timer)
                return
            self._waiting.popleft()
            self.complete(R.REQUESTQ, chain, self._fill(chain, n))

    def _on_timer(self) -> None:
        self._timer = None
        self._drain()

    def on_reset(self) -> None:
        self._waiting.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
