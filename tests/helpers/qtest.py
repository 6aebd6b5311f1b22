"""QEMU's virtio device models on each transport our drivers speak, under qtest.

A driver test parametrized over :data:`QTEST_TRANSPORTS` runs the same scenario against the
same QEMU device model behind virtio-pci (legacy ``disable-modern=on`` / modern
``disable-legacy=on``, on ``-M pc``) and behind virtio-mmio (version 1, QEMU's default, and
version 2 with ``-global virtio-mmio.force-legacy=off``, on ``-M microvm``: see
:data:`pyvirtio.guest.qtest.MICROVM`). QEMU names the two faces of one model
``virtio-X-pci`` and ``virtio-X-device``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyvirtio.guest.qtest import MICROVM, QtestMachine
from pyvirtio.transport.virtio_mmio import VirtioMmio
from pyvirtio.transport.virtio_pci import VirtioPciLegacy, VirtioPciModern

QtestTransport = VirtioPciLegacy | VirtioPciModern | VirtioMmio


@dataclass(frozen=True)
class QtestBus:
    """One way QEMU exposes a virtio device model: PCI or MMIO, legacy or modern."""

    name: str
    mmio: bool
    modern: bool

    def __str__(self) -> str:
        return self.name

    def device(self, model: str, props: str = "") -> list[str]:
        """``-device`` arguments for QEMU's ``model`` (``"virtio-net"``) on this bus."""
        if self.mmio:
            name = f"{model}-device"
        else:
            name = f"{model}-pci,{'disable-legacy' if self.modern else 'disable-modern'}=on"
        return ["-device", f"{name},{props}" if props else name]

    def machine(self, args: Sequence[str], **kwargs: Any) -> QtestMachine:
        """A (not yet started) :class:`QtestMachine` with ``args`` on this bus's machine."""
        if not self.mmio:
            return QtestMachine(args, **kwargs)
        legacy = "off" if self.modern else "on"
        return QtestMachine(["-global", f"virtio-mmio.force-legacy={legacy}", *args],
                            machine=MICROVM, **kwargs)

    def transports(self, machine: QtestMachine) -> list[QtestTransport]:
        """Every virtio device of the started ``machine``, each checked to sit behind this
        bus's register layout."""
        if self.mmio:
            mmio = machine.virtio_mmio_transports()
            assert [t.version for t in mmio] == [2 if self.modern else 1] * len(mmio)
            return list(mmio)
        pci = machine.virtio_transports()
        kind = VirtioPciModern if self.modern else VirtioPciLegacy
        assert [type(t) for t in pci] == [kind] * len(pci)
        return [t for t in pci if isinstance(t, kind)]


#: every transport our drivers reach QEMU's models through
QTEST_TRANSPORTS = (
    QtestBus("pci-legacy", mmio=False, modern=False),
    QtestBus("pci-modern", mmio=False, modern=True),
    QtestBus("mmio-v1", mmio=True, modern=False),
    QtestBus("mmio-v2", mmio=True, modern=True),
)
