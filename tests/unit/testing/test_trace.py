"""BusRecorder: a driver-side register trace that names structures, not addresses.

Our driver runs on an in-process VMM bus through the recorder; what the recorder holds must
be exactly the accesses that reached the device's register windows (the register model's own
RegisterTrace sees the same accesses), with PCI configuration cycles and other addresses
passed through but not recorded.
"""

from __future__ import annotations

import pytest

from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.base import probe
from pyvirtio.driver.rng import RngDriver
from pyvirtio.memory import GuestMemory
from pyvirtio.memory.alloc import Allocator
from pyvirtio.spec import mmio as M
from pyvirtio.testing.trace import BusRecorder
from pyvirtio.testing.vmm import plug
from pyvirtio.transport.mmio_device import VirtioMmioDevice
from pyvirtio.transport.pci_device import VirtioPciDevice
from pyvirtio.transport.register_model import RegisterTrace

MIB = 1 << 20


@pytest.mark.parametrize("kind", ["pci-legacy", "pci-modern", "mmio"])
def test_recorder_sees_what_the_model_sees_named_by_structure(kind: str) -> None:
    memory = GuestMemory.anonymous(16 * MIB)
    try:
        device = RngDevice()
        model: VirtioPciDevice | VirtioMmioDevice
        if kind == "mmio":
            model = VirtioMmioDevice(device, memory)
        else:
            model = VirtioPciDevice(device, memory, legacy=kind == "pci-legacy",
                                    modern=kind == "pci-modern")
        model_trace = RegisterTrace(model)
        recorders: list[BusRecorder] = []

        def wrap(inner: object) -> BusRecorder:
            recorders.append(BusRecorder(inner))  # type: ignore[arg-type]
            return recorders[-1]

        _, transport = plug(model, memory, Allocator(MIB, 15 * MIB), model_trace, wrap=wrap)
        (recorder,) = recorders
        assert recorder.accesses == []  # nothing watched yet: discovery is not recorded
        recorder.watch(transport)
        skip = len(model_trace.accesses)
        driver = probe(transport, RngDriver)
        assert isinstance(driver, RngDriver)
        assert len(driver.read(256)) == 256
        ours = [(a.offset, a.size, a.value, a.write) for a in recorder.accesses]
        theirs = [(a.offset, a.size, a.value, a.write) for a in model_trace.accesses[skip:]]
        assert len(ours) == len(theirs) > 10
        spaces = {a.space for a in recorder.accesses}
        if kind == "mmio":
            assert spaces == {"mmio"}
            assert ours == theirs  # one window from offset 0: offsets agree as well
            assert ("mmio", M.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0, True) in {
                (a.space, a.offset, a.size, a.value, a.write) for a in recorder.accesses}
        elif kind == "pci-legacy":
            assert spaces == {"legacy"}
            assert ours == theirs  # the legacy structure is BAR0 from offset 0
        else:
            assert spaces >= {"common", "notify"}
            assert [x[1:] for x in ours] == [x[1:] for x in theirs]  # sizes, values, order
    finally:
        memory.close()


def test_accesses_outside_watched_windows_pass_through_unrecorded() -> None:
    memory = GuestMemory.anonymous(16 * MIB)
    try:
        model = VirtioMmioDevice(RngDevice(), memory)
        recorders: list[BusRecorder] = []

        def wrap(inner: object) -> BusRecorder:
            recorders.append(BusRecorder(inner))  # type: ignore[arg-type]
            return recorders[-1]

        _, transport = plug(model, memory, Allocator(MIB, 15 * MIB), wrap=wrap)
        (recorder,) = recorders
        recorder.watch(transport)
        assert recorder.mmio_read(transport.base, 4) == M.VIRTIO_MMIO_MAGIC
        recorder.mmio_read(transport.base + 0x1000, 4)  # past the window
        recorder.io_read(0xCFC, 4)  # a PCI configuration cycle
        assert [str(a) for a in recorder.accesses] == [f"r mmio+0x0/4 = 0x{M.VIRTIO_MMIO_MAGIC:x}"]
        recorder.recording = False
        recorder.mmio_read(transport.base, 4)
        assert len(recorder.accesses) == 1
    finally:
        memory.close()
