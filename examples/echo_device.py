"""The device side of the uppercase echo device (see echo_spec.py and
docs/write-a-device.md)."""

from echo_spec import CONFIG, ECHO_ID, F_REVERSE

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import PeerError
from pyvirtio.ring import DescriptorChain


class EchoDevice(VirtioDevice):
    device_id = ECHO_ID
    feature_names = {F_REVERSE: "REVERSE"}

    def __init__(self, max_len: int = 4096) -> None:
        super().__init__(num_queues=1, device_features=1 << F_REVERSE,
                         config_size=CONFIG.size, name="echo")
        self.config[:] = CONFIG.pack(max_len)
        self.max_len = max_len
        self.served = 0  # requests answered

    def handle(self, queue: int, chain: DescriptorChain) -> int:
        if chain.readable_len > self.max_len:
            raise PeerError(f"request of {chain.readable_len} bytes exceeds max_len "
                            f"{self.max_len}")
        if chain.writable_len < chain.readable_len:
            raise PeerError(f"reply buffer of {chain.writable_len} bytes is shorter than "
                            f"the {chain.readable_len}-byte request")
        text = chain.read().upper()
        if self.has_feature(F_REVERSE):
            text = text[::-1]
        self.served += 1
        return chain.write(text)
