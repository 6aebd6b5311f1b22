"""A device that offers CTRL_VQ and never serves the control queue (DPDK's vhost PMD does
this): our net driver's control command fails after a bounded wait with an error that
says so, never hangs, and never reuses the buffer the device still holds; the data path
keeps working."""

from __future__ import annotations

import pytest

from helpers.net import mac, probe
from pyvirtio.device.net import NetDevice
from pyvirtio.driver.net import ControlQueueTimeout
from pyvirtio.errors import PeerError
from pyvirtio.ring import DeviceRing
from pyvirtio.testing.pair import DevicePair


class DeafControlNetDevice(NetDevice):
    """Serves rx and tx; kicks of the control queue are ignored."""

    ignored_control_kicks = 0

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        if index == 2:
            self.ignored_control_kicks += 1
            return
        super().process_queue(index, ring)


def test_an_unserved_control_queue_fails_the_command_with_a_clear_error() -> None:
    device = DeafControlNetDevice(mac(1), name="deaf")
    with DevicePair(device) as pair:
        drv = probe(pair)
        assert drv.ctrl_vq is not None
        with pytest.raises(ControlQueueTimeout, match="did not answer control command") as e:
            drv.command(0, 0, b"\x01", timeout=0.2)
        assert isinstance(e.value, PeerError)  # the device's fault
        assert device.ignored_control_kicks >= 1
        # the buffer is still the device's: a second command is refused at once
        with pytest.raises(ControlQueueTimeout, match="not served"):
            drv.set_promisc(True)
        # the data path is unaffected
        frame = mac(2) + mac(1) + b"\x88\xb5" + bytes(200)
        drv.send(frame)
        assert device.stats.tx_frames + device.stats.tx_dropped == 1  # taken (no peer)
