"""The entropy driver: post a writable buffer, kick, collect random bytes."""

from __future__ import annotations

from pyvirtio.driver.base import Driver, register_driver
from pyvirtio.spec import ids

BUFFER_SIZE = 4096


@register_driver
class RngDriver(Driver):
    device_ids = (ids.RNG,)

    def probe(self) -> None:
        (self.vq,) = self.device.find_vqs(1)
        self.buf = self.device.allocator.alloc(BUFFER_SIZE, 64)

    def read(self, n: int, timeout: float = 5.0) -> bytes:
        """Read ``n`` random bytes from the device (the device may return fewer per
        request, so this loops)."""
        out = bytearray()
        memory = self.device.memory
        while len(out) < n:
            want = min(n - len(out), BUFFER_SIZE)
            self.vq.add_buf([], [(self.buf, want)], token=want)
            self.vq.kick()
            _, got = self.vq.wait_buf(timeout)
            out += memory.read(self.buf, got)
        return bytes(out)

    def remove(self) -> None:
        self.device.allocator.free(self.buf)
