"""Hostile register access sequences for the device-side register models.

:class:`HostileRegisterGenerator` writes what a buggy or malicious driver could do to a
virtio-pci (legacy, modern, transitional with MSI-X) or virtio-mmio (version 2, 1) device:
random accesses anywhere in the register spaces at any width, alongside plausible steps
(status progressions, feature writes, queue setups, notifications, ISR reads, config
accesses) whose values are often wrong: out-of-range selectors, read-only registers written,
misaligned and wrong-width accesses, queue sizes of 0 or not a power of two, rings outside
guest memory or straddling its holes, features written after FEATURES_OK.

It knows the layouts from the spec (:mod:`pyvirtio.spec.pci`, :mod:`pyvirtio.spec.mmio`),
not from the models, and tags every operation the spec forbids whatever the device's state
with why (:attr:`RegOp.refuse`): the model must record a problem for each of those. What
depends on state (features after FEATURES_OK...) is for the test to judge.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

from pyvirtio.spec import features as F
from pyvirtio.spec import mmio as M
from pyvirtio.spec import pci as P
from pyvirtio.spec import split as SP
from pyvirtio.spec import status as S

#: the model kinds a generator knows
KINDS = ("pci-legacy", "pci-modern", "pci-transitional-msix", "mmio", "mmio-legacy")

# where the models put things on PCI (QEMU's layout: the generator targets it on purpose)
MODERN_BAR = "bar4"
COMMON, ISR, DEVICE_CFG, NOTIFY = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
MSIX_BAR = "bar1"


class RegOp(NamedTuple):
    """One access; ``refuse`` says why the spec forbids it in every state (None: allowed,
    or it depends on the state)."""

    space: str
    offset: int
    size: int
    value: int
    write: bool
    refuse: str | None = None

    def __str__(self) -> str:
        op = "w" if self.write else "r"
        tag = f"  [{self.refuse}]" if self.refuse else ""
        return f"{op} {self.space}+0x{self.offset:x}/{self.size} 0x{self.value:x}{tag}"


@dataclass
class Layout:
    """The registers of one kind: ``(space, offset) -> (width, mode)``, mode "r", "w" or
    "rw"; ``areas`` are the register ranges in which an offset not in the table (or a wrong
    width) is refused."""

    spaces: dict[str, int]
    registers: dict[tuple[str, int], tuple[int, str]]
    areas: list[tuple[str, int, int]]
    status: tuple[str, int, int]
    config: tuple[str, int] | None
    driver_features: list[tuple[str, int]] = field(default_factory=list)


def _pci_legacy(layout: Layout, msix: bool) -> None:
    regs = {
        P.VIRTIO_PCI_HOST_FEATURES: (4, "r"), P.VIRTIO_PCI_GUEST_FEATURES: (4, "rw"),
        P.VIRTIO_PCI_QUEUE_PFN: (4, "rw"), P.VIRTIO_PCI_QUEUE_NUM: (2, "r"),
        P.VIRTIO_PCI_QUEUE_SEL: (2, "rw"), P.VIRTIO_PCI_QUEUE_NOTIFY: (2, "rw"),
        P.VIRTIO_PCI_STATUS: (1, "rw"), P.VIRTIO_PCI_ISR: (1, "r"),
    }
    layout.spaces["bar0"] = 256
    for off, spec in regs.items():
        layout.registers[("bar0", off)] = spec
    layout.areas.append(("bar0", 0, 20))  # 20.. is config, or MSI-X vectors: state decides
    layout.driver_features.append(("bar0", P.VIRTIO_PCI_GUEST_FEATURES))
    if not msix:
        layout.config = ("bar0", P.VIRTIO_PCI_CONFIG_OFF_NO_MSIX)


def _pci_modern(layout: Layout) -> None:
    layout.spaces[MODERN_BAR] = 0x4000
    common = {
        P.VIRTIO_PCI_COMMON_DFSELECT: (4, "rw"), P.VIRTIO_PCI_COMMON_DF: (4, "r"),
        P.VIRTIO_PCI_COMMON_GFSELECT: (4, "rw"), P.VIRTIO_PCI_COMMON_GF: (4, "rw"),
        P.VIRTIO_PCI_COMMON_MSIX: (2, "rw"), P.VIRTIO_PCI_COMMON_NUMQ: (2, "r"),
        P.VIRTIO_PCI_COMMON_STATUS: (1, "rw"), P.VIRTIO_PCI_COMMON_CFGGENERATION: (1, "r"),
        P.VIRTIO_PCI_COMMON_Q_SELECT: (2, "rw"), P.VIRTIO_PCI_COMMON_Q_SIZE: (2, "rw"),
        P.VIRTIO_PCI_COMMON_Q_MSIX: (2, "rw"), P.VIRTIO_PCI_COMMON_Q_ENABLE: (2, "rw"),
        P.VIRTIO_PCI_COMMON_Q_NOFF: (2, "r"),
    }
    for off in range(P.VIRTIO_PCI_COMMON_Q_DESCLO, P.VIRTIO_PCI_COMMON_Q_USEDHI + 4, 4):
        common[off] = (4, "rw")
    for off, spec in common.items():
        layout.registers[(MODERN_BAR, COMMON + off)] = spec
    layout.registers[(MODERN_BAR, ISR)] = (1, "r")
    layout.areas += [(MODERN_BAR, COMMON, 0x1000), (MODERN_BAR, ISR, 0x1000)]
    layout.driver_features.append((MODERN_BAR, COMMON + P.VIRTIO_PCI_COMMON_GF))
    layout.config = (MODERN_BAR, DEVICE_CFG)


def _mmio(layout: Layout, version: int) -> None:
    layout.spaces["mmio"] = 0x200
    common = {
        M.VIRTIO_MMIO_MAGIC_VALUE: "r", M.VIRTIO_MMIO_VERSION: "r", M.VIRTIO_MMIO_DEVICE_ID: "r",
        M.VIRTIO_MMIO_VENDOR_ID: "r", M.VIRTIO_MMIO_DEVICE_FEATURES: "r",
        M.VIRTIO_MMIO_DEVICE_FEATURES_SEL: "w", M.VIRTIO_MMIO_DRIVER_FEATURES: "w",
        M.VIRTIO_MMIO_DRIVER_FEATURES_SEL: "w", M.VIRTIO_MMIO_QUEUE_SEL: "w",
        M.VIRTIO_MMIO_QUEUE_NUM_MAX: "r", M.VIRTIO_MMIO_QUEUE_NUM: "w",
        M.VIRTIO_MMIO_QUEUE_NOTIFY: "w", M.VIRTIO_MMIO_INTERRUPT_STATUS: "r",
        M.VIRTIO_MMIO_INTERRUPT_ACK: "w", M.VIRTIO_MMIO_STATUS: "rw",
    }
    if version == 2:
        common |= {M.VIRTIO_MMIO_QUEUE_READY: "rw", M.VIRTIO_MMIO_QUEUE_DESC_LOW: "w",
                   M.VIRTIO_MMIO_QUEUE_DESC_HIGH: "w", M.VIRTIO_MMIO_QUEUE_AVAIL_LOW: "w",
                   M.VIRTIO_MMIO_QUEUE_AVAIL_HIGH: "w", M.VIRTIO_MMIO_QUEUE_USED_LOW: "w",
                   M.VIRTIO_MMIO_QUEUE_USED_HIGH: "w", M.VIRTIO_MMIO_CONFIG_GENERATION: "r"}
    else:
        common |= {M.VIRTIO_MMIO_GUEST_PAGE_SIZE: "w", M.VIRTIO_MMIO_QUEUE_ALIGN: "w",
                   M.VIRTIO_MMIO_QUEUE_PFN: "rw"}
    for off, mode in common.items():
        layout.registers[("mmio", off)] = (4, mode)
    layout.areas.append(("mmio", 0, M.VIRTIO_MMIO_CONFIG))
    layout.driver_features.append(("mmio", M.VIRTIO_MMIO_DRIVER_FEATURES))
    layout.config = ("mmio", M.VIRTIO_MMIO_CONFIG)


def layout_of(kind: str) -> Layout:
    if kind not in KINDS:
        raise ValueError(f"unknown register model kind {kind!r}")
    layout = Layout({"config": 256}, {}, [], ("", 0, 0), None)
    if kind.startswith("mmio"):
        _mmio(layout, 1 if kind == "mmio-legacy" else 2)
        layout.status = ("mmio", M.VIRTIO_MMIO_STATUS, 4)
        return layout
    msix = kind.endswith("msix")
    if kind != "pci-modern":
        _pci_legacy(layout, msix)
        layout.status = ("bar0", P.VIRTIO_PCI_STATUS, 1)
    if kind != "pci-legacy":
        _pci_modern(layout)
        layout.status = (MODERN_BAR, COMMON + P.VIRTIO_PCI_COMMON_STATUS, 1)
    if msix:
        layout.spaces[MSIX_BAR] = 0x1000
    return layout


class HostileRegisterGenerator:
    """Sequences of hostile accesses to a model of ``kind`` whose device has ``num_queues``
    queues of at most ``queue_max`` entries, offers ``features`` and ``config_size`` config
    bytes, in guest memory made of ``regions`` ``(gpa, size)``."""

    def __init__(self, kind: str, *, num_queues: int, queue_max: int, features: int,
                 config_size: int, regions: list[tuple[int, int]], msix_vectors: int = 0,
                 seed: int = 0) -> None:
        self.kind = kind
        self.layout = layout_of(kind)
        self.num_queues = num_queues
        self.queue_max = queue_max
        self.features = features
        self.config_size = config_size
        self.regions = sorted(regions)
        self.msix_vectors = msix_vectors
        self.rnd = random.Random(seed)
        self._spaces = list(self.layout.spaces)
        self._registers = list(self.layout.registers)
        self.legacy_iface = kind in ("pci-legacy", "mmio-legacy") or (
            kind == "pci-transitional-msix")
        end = max(g + n for g, n in self.regions)
        self.outside = [end, end + 0x1000, 1 << 40, (1 << 64) - 0x1000]
        for (g1, n1), (g2, _) in zip(self.regions, self.regions[1:], strict=False):
            if g1 + n1 < g2:
                self.outside.append(g1 + n1)  # the first byte of a hole
        if self.regions[0][0] > 0:
            self.outside.append(0)

    # ---- single accesses ----------------------------------------------------------------

    def op(self, space: str, offset: int, size: int, value: int, write: bool,
           refuse: str | None = None) -> RegOp:
        """An access, tagged by the layout rules when the caller did not tag it."""
        if refuse is None:
            refuse = self.judge(space, offset, size, write)
        return RegOp(space, offset, size, value & ((1 << (8 * max(size, 1))) - 1), write,
                     refuse)

    def judge(self, space: str, offset: int, size: int, write: bool) -> str | None:
        """Why an access is refused whatever the state, from the layout alone."""
        limit = self.layout.spaces.get(space)
        if limit is None:
            return "no such space"
        if size not in (1, 2, 4) or offset < 0 or offset + size > limit:
            return "width or range"
        if offset % size:
            return "misaligned"
        reg = self.layout.registers.get((space, offset))
        if reg is not None:
            width, mode = reg
            if width != size:
                return "wrong width"
            if write and "w" not in mode:
                return "read-only"
            if not write and "r" not in mode:
                return "write-only"
            return None
        for area_space, start, length in self.layout.areas:
            if area_space == space and start <= offset < start + length:
                return "no register"
        return None

    def random_op(self) -> RegOp:
        r = self.rnd
        if r.random() < 0.6 and self._registers:
            space, offset = r.choice(self._registers)
            offset += r.choice((0, 0, 0, 1, 2, 3, -1, 4))
        else:
            space = r.choice(self._spaces)
            offset = r.randrange(-4, self.layout.spaces[space] + 8)
        size = r.choice((1, 2, 4, 4, 4, 8, 3, 0))
        return self.op(space, offset, size, self.value(), r.random() < 0.6)

    def value(self) -> int:
        r = self.rnd
        return r.choice((0, 1, 2, 3, 0xFF, 0xFFFF, 0xFFFF_FFFF, self.num_queues,
                         self.queue_max, r.getrandbits(32), r.getrandbits(8),
                         self.features & 0xFFFF_FFFF, self.features >> 32))

    # ---- plausible steps with hostile values ----------------------------------------------

    def status(self, value: int) -> RegOp:
        space, offset, size = self.layout.status
        return self.op(space, offset, size, value, True)

    def bringup(self) -> Iterator[RegOp]:
        """ACKNOWLEDGE, DRIVER, features (often right), FEATURES_OK, DRIVER_OK: sometimes
        stopping early, sometimes with bits that are not offered."""
        r = self.rnd
        yield self.status(S.ACKNOWLEDGE)
        yield self.status(S.ACKNOWLEDGE | S.DRIVER)
        features = self.features
        if self.legacy_iface and r.random() < 0.7:
            features &= 0xFFFF_FFFF & ~F.bit(F.VERSION_1)
        if r.random() < 0.2:
            features |= 1 << r.randrange(64)
        yield from self.write_features(features)
        if r.random() < 0.1:
            return
        ok = S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK
        yield self.status(ok)
        if r.random() < 0.3:
            yield from self.write_features(r.getrandbits(64))  # after FEATURES_OK
        yield self.status(ok | S.DRIVER_OK)

    def write_features(self, features: int) -> Iterator[RegOp]:
        for space, offset in self.layout.driver_features:
            if space == "bar0":
                yield self.op(space, offset, 4, features, True)
                continue
            select = offset - 4 if space == MODERN_BAR else M.VIRTIO_MMIO_DRIVER_FEATURES_SEL
            for word in (0, 1) if self.rnd.random() < 0.9 else (0, 1, 2):
                yield self.op(space, select, 4, word, True)
                yield self.op(space, offset, 4, features >> (32 * word), True)

    def queue_address(self, need: int, align: int) -> tuple[int, str | None]:
        """A base for ``need`` bytes aligned to ``align``: mostly inside a region, else
        outside memory or straddling the end of a region (then tagged why)."""
        r = self.rnd
        need = max(need, 2)
        if r.random() < 0.75:
            gpa, length = r.choice(self.regions)
            if length >= need:
                return gpa + align * r.randint(0, (length - need) // align), None
        if r.random() < 0.5:
            return r.choice(self.outside), "ring outside memory"
        gpa, length = r.choice(self.regions)
        straddle = (gpa + length - need // 2) & ~(align - 1)
        if straddle + need > gpa + length and straddle >= gpa:
            return straddle, "ring straddles the end of a region"
        return r.choice(self.outside), "ring outside memory"

    def ring_parts(self, size: int) -> Iterator[tuple[int, int, int]]:
        """(register offset of the low half, bytes, alignment) of the three ring parts."""
        n = max(size, 1)
        if self.kind.startswith("mmio"):
            offsets = (M.VIRTIO_MMIO_QUEUE_DESC_LOW, M.VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                       M.VIRTIO_MMIO_QUEUE_USED_LOW)
        else:
            offsets = (COMMON + P.VIRTIO_PCI_COMMON_Q_DESCLO,
                       COMMON + P.VIRTIO_PCI_COMMON_Q_AVAILLO,
                       COMMON + P.VIRTIO_PCI_COMMON_Q_USEDLO)
        yield from zip(offsets, (SP.desc_table_size(n), SP.avail_size(n), SP.used_size(n)),
                       (16, 2, 4), strict=True)

    def queue_setup(self) -> Iterator[RegOp]:
        r = self.rnd
        index = (r.randrange(self.num_queues) if r.random() < 0.8
                 else r.choice((self.num_queues, 0xFFFF, r.getrandbits(16))))
        bad_queue = "no such queue" if index >= self.num_queues else None
        if r.random() < 0.7:
            size = self.queue_max >> r.randrange(0, 3)
            bad_size = None
        else:
            size = r.choice((0, 3, 6, self.queue_max + 1, self.queue_max * 2, 0xFFFF))
            bad_size = f"queue size {size}"
        if self.kind.startswith("mmio"):
            yield from self._mmio_queue(index, size, bad_queue or bad_size)
        elif self.kind == "pci-legacy" or (self.kind.endswith("msix") and r.random() < 0.5):
            yield from self._legacy_pci_queue(index, bad_queue)
        else:
            yield from self._modern_queue(index, size, bad_queue or bad_size)

    def _legacy_pci_queue(self, index: int, bad_queue: str | None) -> Iterator[RegOp]:
        yield self.op("bar0", P.VIRTIO_PCI_QUEUE_SEL, 2, index, True)
        yield self.op("bar0", P.VIRTIO_PCI_QUEUE_NUM, 2, 0, False)
        base, bad = self.queue_address(SP.vring_size(self.queue_max, P.VIRTIO_PCI_VRING_ALIGN),
                                       P.VIRTIO_PCI_VRING_ALIGN)
        pfn = base >> P.VIRTIO_PCI_QUEUE_ADDR_SHIFT
        if pfn >> 32 or pfn == 0:
            pfn, bad = 0xFFFF_FFFF, "ring outside memory"
        yield self.op("bar0", P.VIRTIO_PCI_QUEUE_PFN, 4, pfn, True, bad_queue or bad)

    def _modern_queue(self, index: int, size: int, bad: str | None) -> Iterator[RegOp]:
        c = COMMON
        yield self.op(MODERN_BAR, c + P.VIRTIO_PCI_COMMON_Q_SELECT, 2, index, True)
        yield self.op(MODERN_BAR, c + P.VIRTIO_PCI_COMMON_Q_SIZE, 2, size, True,
                      "no such queue" if index >= self.num_queues else None)
        for low, need, align in self.ring_parts(size):
            addr, part_bad = self.queue_address(need, align)
            bad = bad or part_bad
            yield self.op(MODERN_BAR, low, 4, addr, True)
            yield self.op(MODERN_BAR, low + 4, 4, addr >> 32, True)
        if self.rnd.random() < 0.1:
            yield self.op(MODERN_BAR, c + P.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 0, True,
                          "queue_enable 0")
        yield self.op(MODERN_BAR, c + P.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1, True, bad)

    def _mmio_queue(self, index: int, size: int, bad: str | None) -> Iterator[RegOp]:
        yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_SEL, 4, index, True)
        yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_NUM_MAX, 4, 0, False)
        yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_NUM, 4, size, True,
                      "no such queue" if index >= self.num_queues else None)
        if self.kind == "mmio-legacy":
            yield self.op("mmio", M.VIRTIO_MMIO_GUEST_PAGE_SIZE, 4, 4096, True)
            yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_ALIGN, 4, 4096, True)
            base, part_bad = self.queue_address(SP.vring_size(max(size, 1), 4096), 4096)
            pfn = base >> 12
            if pfn >> 32 or pfn == 0:
                pfn, part_bad = 0xFFFF_FFFF, "ring outside memory"
            yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_PFN, 4, pfn, True, bad or part_bad)
            return
        for low, need, align in self.ring_parts(size):
            addr, part_bad = self.queue_address(need, align)
            bad = bad or part_bad
            yield self.op("mmio", low, 4, addr, True)
            yield self.op("mmio", low + 4, 4, addr >> 32, True)
        yield self.op("mmio", M.VIRTIO_MMIO_QUEUE_READY, 4, 1, True, bad)

    def notify(self) -> RegOp:
        r = self.rnd
        index = (r.randrange(self.num_queues) if r.random() < 0.85
                 else r.choice((self.num_queues, 0xFFFF)))
        bad = "no such queue" if index >= self.num_queues else None
        if self.kind.startswith("mmio"):
            return self.op("mmio", M.VIRTIO_MMIO_QUEUE_NOTIFY, 4, index, True, bad)
        if self.kind == "pci-legacy" or (self.kind.endswith("msix") and r.random() < 0.5):
            return self.op("bar0", P.VIRTIO_PCI_QUEUE_NOTIFY, 2, index, True, bad)
        offset = NOTIFY + NOTIFY_MULTIPLIER * index
        if offset + 2 > 0x4000:
            return self.op(MODERN_BAR, NOTIFY + 1, 2, index, True)  # misaligned: judged
        return self.op(MODERN_BAR, offset, 2, index, True, bad)

    def interrupt(self) -> Iterator[RegOp]:
        if self.kind.startswith("mmio"):
            yield self.op("mmio", M.VIRTIO_MMIO_INTERRUPT_STATUS, 4, 0, False)
            yield self.op("mmio", M.VIRTIO_MMIO_INTERRUPT_ACK, 4, self.value(), True)
        elif self.kind == "pci-legacy":
            yield self.op("bar0", P.VIRTIO_PCI_ISR, 1, 0, False)
        else:
            yield self.op(MODERN_BAR, ISR, 1, 0, False)

    def config(self) -> RegOp:
        r = self.rnd
        if self.layout.config is None:  # legacy with MSI-X: where config starts depends
            return self.op("bar0", r.randrange(20, 40), r.choice((1, 2, 4)), self.value(),
                           r.random() < 0.5)
        space, base = self.layout.config
        size = r.choice((1, 2, 4))
        inside = r.random() < 0.7 and self.config_size >= size
        offset = (r.randrange(0, self.config_size - size + 1) if inside
                  else r.randrange(self.config_size, self.config_size + 64))
        offset -= offset % size
        write = r.random() < 0.3
        limit = self.layout.spaces[space] - base
        refuse = None
        if offset + size > self.config_size and offset + size <= limit:
            refuse = "outside the device configuration"
        return self.op(space, base + offset, size, self.value(), write, refuse)

    def msix(self) -> Iterator[RegOp]:
        """MSI-X: the enable and mask bits, table entries, vector numbers in and out of
        range (the modern common configuration refuses the latter)."""
        r = self.rnd
        # The generator does not read the capability list: it pokes the dwords where
        # capabilities usually are; the model must cope with anything there.
        cap = r.choice(range(0x40, 0x90, 4))
        yield self.op("config", cap, 4, r.choice((0x8000_0000, 0xC000_0000, 0, r.getrandbits(32))),
                      True)
        entry = 16 * r.randrange(max(self.msix_vectors, 1) + 1)
        yield self.op(MSIX_BAR, entry + r.choice((0, 4, 8, 12)), 4, r.getrandbits(32), True)
        vector = r.choice((0, 1, self.msix_vectors, 0xFFFF, r.getrandbits(16)))
        bad = "no such vector" if self.msix_vectors <= vector != 0xFFFF else None
        if self.kind != "pci-legacy":
            yield self.op(MODERN_BAR, COMMON + P.VIRTIO_PCI_COMMON_MSIX, 2, vector, True, bad)

    # ---- sequences -----------------------------------------------------------------------

    def sequence(self, length: int = 16) -> list[RegOp]:
        r = self.rnd
        out: list[RegOp] = []
        if r.random() < 0.6:
            out += self.bringup()
        while len(out) < length:
            pick = r.random()
            if pick < 0.25:
                out.append(self.random_op())
            elif pick < 0.45:
                out += self.queue_setup()
            elif pick < 0.6:
                out.append(self.notify())
            elif pick < 0.7:
                out += self.interrupt()
            elif pick < 0.8:
                out.append(self.config())
            elif pick < 0.88:
                out += self.bringup()
            elif pick < 0.93 and self.msix_vectors:
                out += self.msix()
            elif pick < 0.96:
                out.append(self.status(r.choice((0, r.getrandbits(8)))))
            else:
                out += self.write_features(r.getrandbits(64))
        return out

    def sequences(self, count: int, length: int = 16) -> Iterator[list[RegOp]]:
        for _ in range(count):
            yield self.sequence(length)


__all__ = ["KINDS", "HostileRegisterGenerator", "Layout", "RegOp", "layout_of"]
