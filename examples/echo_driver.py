"""The driver side of the uppercase echo device (see echo_spec.py and
docs/write-a-device.md)."""

from echo_spec import CONFIG, ECHO_ID, F_REVERSE

from pyvirtio.driver.base import Driver, register_driver
from pyvirtio.errors import LocalError


@register_driver
class EchoDriver(Driver):
    device_ids = (ECHO_ID,)
    features = 1 << F_REVERSE  # used when the device offers it

    def probe(self) -> None:
        (self.vq,) = self.device.find_vqs(1)
        (self.max_len,) = CONFIG.unpack(self.device.read_config(0, CONFIG.size))
        self.request = self.device.allocator.alloc(self.max_len)
        self.reply = self.device.allocator.alloc(self.max_len)

    @property
    def reverses(self) -> bool:
        return self.device.has_feature(F_REVERSE)

    def echo(self, text: bytes, timeout: float = 5.0) -> bytes:
        """Send ``text``; return what the device wrote back."""
        if not 0 < len(text) <= self.max_len:
            raise LocalError(f"text must be 1..{self.max_len} bytes, not {len(text)}")
        self.device.memory.write(self.request, text)
        self.vq.add_buf([(self.request, len(text))], [(self.reply, len(text))], token=text)
        self.vq.kick()
        token, written = self.vq.wait_buf(timeout)
        assert token is text
        return self.device.memory.read(self.reply, written)

    def remove(self) -> None:
        self.device.allocator.free(self.request)
        self.device.allocator.free(self.reply)
