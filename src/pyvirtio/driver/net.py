"""The network driver (virtio-net, VIRTIO 1.x §5.1), written the way Linux ``virtio_net.c``
uses the paper's virtqueue API.

Receive: buffers are posted in batches with one kick per refill (``try_fill_recv``). Three
buffer layouts, chosen by the negotiated features as Linux does:

* MRG_RXBUF: ``mergeable_buf_len``-byte buffers; a frame may span several, the count is
  ``num_buffers`` in the first buffer's header;
* no MRG_RXBUF, no GUEST_TSO: "small" buffers of header + 1518 bytes;
* no MRG_RXBUF, GUEST_TSO4/6: "big" buffers, header descriptor + 64 KiB.

The receive interrupt only marks work pending and disables further callbacks (NAPI);
:meth:`NetDriver.poll` collects frames, refills when half the ring is free, and re-enables
callbacks closing the race of §3.1 (if buffers were used meanwhile, poll again).

Transmit: header and frame in one descriptor when the layout allows (VERSION_1:
``can_push``), else a separate header descriptor. Transmit interrupts stay disabled; used
buffers are reclaimed on the next send (``free_old_xmit``). When the ring is nearly full the
driver stops and uses ``enable_cb_delayed`` so the device interrupts only after ~3/4 of the
outstanding buffers are done: the paper's completion batching.

Control: :meth:`NetDriver.set_promisc`, :meth:`set_mac_table`, :meth:`set_mac`,
:meth:`announce_ack`, :meth:`set_queue_pairs`, :meth:`set_guest_offloads`... each sends one
command on the control queue and waits for the ack.
"""

from __future__ import annotations

import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

from pyvirtio.driver.base import Driver, Virtqueue, register_driver
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr

GOOD_PACKET_LEN = 14 + 4 + 1500  # Ethernet header, VLAN tag, MTU payload (Linux)
MAX_FRAME_LEN = 65535 + 14 + 4
DEFAULT_MERGEABLE_LEN = 1536
BIG_BUFFERS = 16  # "big" (64 KiB) receive buffers posted without MRG_RXBUF
TX_SLOT = 2048  # transmit buffers up to this size come from a preallocated pool
CTRL_BUF = 16384

_HDR = N.net_hdr_struct()
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

DEFAULT_FEATURES = 0
for _bit in (N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_MAC,
             N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6, N.VIRTIO_NET_F_HOST_TSO4,
             N.VIRTIO_NET_F_HOST_TSO6, N.VIRTIO_NET_F_MRG_RXBUF, N.VIRTIO_NET_F_STATUS,
             N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_RX_EXTRA,
             N.VIRTIO_NET_F_GUEST_ANNOUNCE, N.VIRTIO_NET_F_MQ, N.VIRTIO_NET_F_CTRL_MAC_ADDR,
             N.VIRTIO_NET_F_MTU, N.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS):
    DEFAULT_FEATURES |= F.bit(_bit)


class ControlQueueTimeout(PeerError):
    """The device did not answer a control command in time (a back-end that offers
    CTRL_VQ without serving the control queue: DPDK's vhost PMD does that)."""


class RxFrame(NamedTuple):
    """A received frame: its header, its bytes, the used length the device reported for
    each receive buffer it spanned, and the receive queue it came on."""

    hdr: NetHdr
    data: bytes
    lengths: tuple[int, ...]
    queue: int = 0

    @property
    def num_buffers(self) -> int:
        return len(self.lengths)


class RxBuffer:
    """A receive buffer the driver posts (the token of its receive-queue entries)."""

    __slots__ = ("addr", "size")

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size


@register_driver
class NetDriver(Driver):
    """virtio-net driver. Options are class attributes; :meth:`with_options` makes a
    configured subclass to pass to ``probe(driver=...)``/``DevicePair.probe``."""

    device_ids = (ids.NET,)
    features: ClassVar[int] = DEFAULT_FEATURES
    #: receive buffer size with MRG_RXBUF (Linux adapts it; a fixed size is enough here)
    mergeable_buf_len: ClassVar[int] = DEFAULT_MERGEABLE_LEN
    #: receive buffers to keep posted (None: fill the ring; BIG_BUFFERS in big mode)
    rx_buffers: ClassVar[int | None] = None
    #: put the header in its own descriptor even when it could share one with the frame
    tx_split_header: ClassVar[bool] = False
    #: queue size to request (None: the device's maximum)
    queue_size: ClassVar[int | None] = None

    @classmethod
    def with_options(cls, **options: object) -> type[NetDriver]:
        """A subclass with some class-attribute options changed, e.g.
        ``NetDriver.with_options(mergeable_buf_len=256, features=...)``."""
        for key in options:
            if not hasattr(cls, key):
                raise LocalError(f"NetDriver has no option {key!r}")
        return type(f"{cls.__name__}Configured", (cls,), dict(options))

    # ---- probe --------------------------------------------------------------------------

    def probe(self) -> None:
        dev = self.device
        self.hdr_len = N.net_hdr_size(dev.has_feature(F.VERSION_1),
                                      dev.has_feature(N.VIRTIO_NET_F_MRG_RXBUF))
        self.mergeable = dev.has_feature(N.VIRTIO_NET_F_MRG_RXBUF)
        self.big_packets = not self.mergeable and (
            dev.has_feature(N.VIRTIO_NET_F_GUEST_TSO4)
            or dev.has_feature(N.VIRTIO_NET_F_GUEST_TSO6))
        # Linux pushes the header in front of the frame only with VERSION_1/ANY_LAYOUT.
        self.any_layout = dev.has_feature(F.VERSION_1) or dev.has_feature(F.ANY_LAYOUT)
        if dev.has_feature(N.VIRTIO_NET_F_MAC):
            self.mac = dev.read_config(N.CFG_MAC, 6)
        else:
            self.mac = bytes((0x02, 0, 0, 0, 0, 1))
        self.max_queue_pairs = 1
        if dev.has_feature(N.VIRTIO_NET_F_MQ):
            self.max_queue_pairs = max(1, _U16.unpack(
                dev.read_config(N.CFG_MAX_VIRTQUEUE_PAIRS, 2))[0])
        self.mtu = (_U16.unpack(dev.read_config(N.CFG_MTU, 2))[0]
                    if dev.has_feature(N.VIRTIO_NET_F_MTU) else 1500)
        self.rx_vqs: list[Virtqueue] = []
        self.tx_vqs: list[Virtqueue] = []
        for i in range(self.max_queue_pairs):
            self.rx_vqs.append(dev.setup_vq(2 * i, self._rx_interrupt, self.queue_size))
            self.tx_vqs.append(dev.setup_vq(2 * i + 1, self._tx_interrupt, self.queue_size))
        self.ctrl_vq: Virtqueue | None = None
        self.ctrl_stuck: str | None = None  # why the control queue is unusable
        if dev.has_feature(N.VIRTIO_NET_F_CTRL_VQ):
            self.ctrl_vq = dev.setup_vq(2 * self.max_queue_pairs, None, self.queue_size)
            self.ctrl_buf = dev.allocator.alloc(CTRL_BUF, 64)
        self.rx_pending = [False] * self.max_queue_pairs
        self.tx_interrupts = 0
        self.rx_interrupts = 0
        self.rx_errors = 0
        #: frames polled by :meth:`recv` and not yet returned
        self.frames: deque[RxFrame] = deque()
        self._allocs: list[int] = []
        self._setup_rx_pools()
        self._setup_tx_pools()
        for vq in self.tx_vqs:
            vq.disable_cb()  # completions are reaped on the next send
        for q in range(self.max_queue_pairs):
            self._refill(q)

    def _setup_rx_pools(self) -> None:
        alloc = self.device.allocator
        self._rx_free: list[list[RxBuffer]] = []
        self._rx_total: list[int] = []
        #: (guest address, bytes) of each receive queue's buffer pool
        self.rx_pools: list[tuple[int, int]] = []
        for vq in self.rx_vqs:
            size = vq.ring.size
            if self.mergeable:
                buf_len = max(self.mergeable_buf_len, self.hdr_len)
                count = self.rx_buffers or size
            elif self.big_packets:
                buf_len = self.hdr_len + MAX_FRAME_LEN
                count = self.rx_buffers or min(size // 2, BIG_BUFFERS)
            else:
                buf_len = self.hdr_len + max(GOOD_PACKET_LEN, self.mtu + 18)
                count = self.rx_buffers or size
            self.rx_buf_len = buf_len
            count = min(count, size if not self.big_packets else size // 2)
            base = alloc.alloc(buf_len * count, 64)
            self._allocs.append(base)
            self._rx_free.append([RxBuffer(base + i * buf_len, buf_len) for i in range(count)])
            self._rx_total.append(count)
            self.rx_pools.append((base, buf_len * count))

    def _setup_tx_pools(self) -> None:
        alloc = self.device.allocator
        self._tx_slots: list[list[int]] = []
        for vq in self.tx_vqs:
            size = vq.ring.size
            base = alloc.alloc(TX_SLOT * size, 64)
            self._allocs.append(base)
            self._tx_slots.append([base + i * TX_SLOT for i in range(size)])

    def remove(self) -> None:
        alloc = self.device.allocator
        for base in self._allocs:
            alloc.free(base)
        self._allocs.clear()
        if self.ctrl_vq is not None:
            alloc.free(self.ctrl_buf)

    # ---- interrupts ---------------------------------------------------------------------

    def _rx_interrupt(self, vq: Virtqueue) -> None:
        # NAPI: note the work, stop further interrupts until poll() has drained the ring.
        self.rx_interrupts += 1
        vq.disable_cb()
        self.rx_pending[vq.index // 2] = True

    def _tx_interrupt(self, vq: Virtqueue) -> None:
        self.tx_interrupts += 1
        vq.disable_cb()
        self._free_old_xmit(vq.index // 2)

    # ---- receive ------------------------------------------------------------------------

    def _refill(self, q: int) -> int:
        """Post every free receive buffer; one kick for the whole batch."""
        vq = self.rx_vqs[q]
        free = self._rx_free[q]
        added = 0
        hl = self.hdr_len
        while free:
            buf = free.pop()
            if self.big_packets:
                sgs = [(buf.addr, hl), (buf.addr + hl, buf.size - hl)]
            else:
                sgs = [(buf.addr, buf.size)]
            try:
                vq.add_buf([], sgs, buf)
            except LocalError:  # ring full
                free.append(buf)
                break
            added += 1
        if added:
            vq.kick()
        return added

    def _read_used(self, q: int) -> RxFrame | None:
        """One frame from receive queue ``q`` (assembling MRG_RXBUF spans), or None."""
        vq = self.rx_vqs[q]
        mem = self.device.memory
        free = self._rx_free[q]
        hl = self.hdr_len
        while True:
            got = vq.get_buf()
            if got is None:
                return None
            buf, length = got
            assert isinstance(buf, RxBuffer)
            free.append(buf)
            if length >= hl + 14:
                break
            self.rx_errors += 1  # Linux: "rx error: len too small"; the buffer is reused
        raw = mem.read(buf.addr, length)
        hdr = NetHdr(*_HDR.unpack_from(raw, 0))
        if not self.mergeable:
            return RxFrame(hdr, raw[hl:], (length,), q)
        num = _U16.unpack_from(raw, N.NET_HDR_SIZE_LEGACY)[0]
        data = bytearray(raw[hl:])
        lengths = [length]
        for missing in range(num - 1, 0, -1):
            more = vq.get_buf()
            if more is None:
                self.rx_errors += 1
                raise PeerError(f"receive frame claims {num} buffers but {missing} are "
                                "missing from the used ring")
            nbuf, nlen = more
            assert isinstance(nbuf, RxBuffer)
            free.append(nbuf)
            lengths.append(nlen)
            data += mem.read(nbuf.addr, nlen)
        return RxFrame(hdr, bytes(data), tuple(lengths), q)

    def poll(self, budget: int = 64) -> list[RxFrame]:
        """Collect up to ``budget`` received frames from every receive queue and return them,
        refill in batches, and re-enable receive interrupts without losing the race of §3.1
        (buffers used between the last get_buf and enable_cb). NAPI's poll."""
        out: list[RxFrame] = []
        for q, vq in enumerate(self.rx_vqs):
            self.rx_pending[q] = False
            free = self._rx_free[q]
            half = max(1, self._rx_total[q] // 2)
            while len(out) < budget:
                frame = self._read_used(q)
                if frame is not None:
                    out.append(frame)
                    if len(free) >= half:
                        self._refill(q)  # half the buffers consumed: post them in one go
                    continue
                if free:
                    self._refill(q)
                if vq.enable_cb():
                    break
                vq.disable_cb()  # used buffers arrived meanwhile: keep polling
        return out

    def recv(self, timeout: float = 0.0) -> RxFrame | None:
        """The next received frame, waiting up to ``timeout`` seconds on transports that
        deliver interrupts asynchronously; None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.frames:
                self.frames.extend(self.poll())
            if self.frames:
                return self.frames.popleft()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self.device.check_needs_reset()
            self.device.transport.wait(min(remaining, 0.2))

    def recv_all(self) -> list[RxFrame]:
        """Every frame received and not yet returned by :meth:`recv`/:meth:`recv_all`."""
        out = list(self.frames)
        self.frames.clear()
        out += self.poll(budget=1 << 30)
        return out

    # ---- transmit -----------------------------------------------------------------------

    def _free_old_xmit(self, q: int) -> int:
        vq = self.tx_vqs[q]
        n = 0
        while (got := vq.get_buf()) is not None:
            token, _ = got
            assert isinstance(token, tuple)
            addr, pooled = token
            if pooled:
                self._tx_slots[q].append(addr)
            else:
                self.device.allocator.free(addr)
            n += 1
        return n

    def send(self, frame: bytes | bytearray | memoryview, hdr: NetHdr | None = None,
             queue: int = 0, timeout: float = 5.0) -> None:
        """Transmit one Ethernet frame (with ``hdr`` for offloads)."""
        vq = self.tx_vqs[queue]
        hl = self.hdr_len
        self._free_old_xmit(queue)
        need_descs = 1 if self.any_layout and not self.tx_split_header else 2
        deadline = time.monotonic() + timeout
        while vq.num_free < need_descs or (not self._tx_slots[queue]
                                             and len(frame) + hl <= TX_SLOT):
            # Ring full: ask for one interrupt once ~3/4 of what is in flight is done.
            if not vq.enable_cb_delayed():
                vq.disable_cb()
                if self._free_old_xmit(queue):
                    continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"transmit queue {queue} stayed full for {timeout} s")
            self.device.check_needs_reset(vq.index)
            self.device.transport.wait(min(remaining, 0.2))
            vq.disable_cb()
            self._free_old_xmit(queue)
        total = hl + len(frame)
        if total <= TX_SLOT and self._tx_slots[queue]:
            addr, pooled = self._tx_slots[queue].pop(), True
        else:
            addr, pooled = self.device.allocator.alloc(total, 64), False
        mem = self.device.memory
        h = hdr or NetHdr()
        raw = _HDR.pack(*h) + (b"\0\0" if hl == N.NET_HDR_SIZE else b"")
        mem.write(addr, raw)
        mem.write(addr + hl, frame)
        if need_descs == 1:
            sgs = [(addr, total)]
        else:
            sgs = [(addr, hl), (addr + hl, len(frame))]
        vq.add_buf(sgs, [], (addr, pooled))
        vq.kick()

    def send_many(self, frames: Sequence[bytes], queue: int = 0) -> None:
        for frame in frames:
            self.send(frame, queue=queue)

    # ---- config -------------------------------------------------------------------------

    @property
    def status(self) -> int:
        if not self.device.has_feature(N.VIRTIO_NET_F_STATUS):
            return N.VIRTIO_NET_S_LINK_UP
        return int(_U16.unpack(self.device.read_config(N.CFG_STATUS, 2))[0])

    @property
    def link_up(self) -> bool:
        return bool(self.status & N.VIRTIO_NET_S_LINK_UP)

    @property
    def announce_requested(self) -> bool:
        return bool(self.status & N.VIRTIO_NET_S_ANNOUNCE)

    def config_mac(self) -> bytes:
        return self.device.read_config(N.CFG_MAC, 6)

    # ---- control queue ------------------------------------------------------------------

    def command(self, cls: int, cmd: int, *data: bytes, timeout: float = 5.0) -> bool:
        """Send one control command; True if the device acknowledged VIRTIO_NET_OK."""
        vq = self.ctrl_vq
        if vq is None:
            raise LocalError("VIRTIO_NET_F_CTRL_VQ was not negotiated")
        if self.ctrl_stuck is not None:
            # The unanswered command still owns the control buffer: never reuse it.
            raise ControlQueueTimeout(self.ctrl_stuck)
        mem = self.device.memory
        base = self.ctrl_buf
        pos = base
        out = [(pos, 2)]
        mem.write(pos, N.CTRL_HDR.pack(cls, cmd))
        pos += 2
        for part in data:
            if pos + len(part) + 1 > base + CTRL_BUF:
                raise LocalError("control command too large")
            if part:
                mem.write(pos, part)
                out.append((pos, len(part)))
                pos += len(part)
        ack_addr = pos
        mem.write(ack_addr, b"\xff")
        vq.add_buf(out, [(ack_addr, 1)], token="ctrl")
        vq.kick()
        try:
            vq.wait_buf(timeout)
        except TimeoutError as exc:
            self.ctrl_stuck = (f"the device did not answer control command class {cls} "
                               f"command {cmd} within {timeout} s: its control queue is not "
                               "served (the control queue is unusable from now on)")
            raise ControlQueueTimeout(self.ctrl_stuck) from exc
        return mem.read(ack_addr, 1)[0] == N.VIRTIO_NET_OK

    def _rx_cmd(self, cmd: int, on: bool) -> bool:
        return self.command(N.VIRTIO_NET_CTRL_RX, cmd, bytes((1 if on else 0,)))

    def set_promisc(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_PROMISC, on)

    def set_allmulti(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_ALLMULTI, on)

    def set_alluni(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_ALLUNI, on)

    def set_nomulti(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_NOMULTI, on)

    def set_nouni(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_NOUNI, on)

    def set_nobcast(self, on: bool) -> bool:
        return self._rx_cmd(N.VIRTIO_NET_CTRL_RX_NOBCAST, on)

    def set_mac_table(self, unicast: Sequence[bytes] = (), multicast: Sequence[bytes] = ()
                      ) -> bool:
        """Program the receive filter's address tables (both are sent, as Linux does)."""
        uni = _U32.pack(len(unicast)) + b"".join(unicast)
        multi = _U32.pack(len(multicast)) + b"".join(multicast)
        return self.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_TABLE_SET, uni, multi)

    def set_mac(self, mac: bytes) -> bool:
        ok = self.command(N.VIRTIO_NET_CTRL_MAC, N.VIRTIO_NET_CTRL_MAC_ADDR_SET, mac)
        if ok:
            self.mac = bytes(mac)
        return ok

    def announce_ack(self) -> bool:
        return self.command(N.VIRTIO_NET_CTRL_ANNOUNCE, N.VIRTIO_NET_CTRL_ANNOUNCE_ACK)

    def set_queue_pairs(self, pairs: int) -> bool:
        return self.command(N.VIRTIO_NET_CTRL_MQ, N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
                            _U16.pack(pairs))

    def set_guest_offloads(self, feature_bits: int) -> bool:
        """Enable only these GUEST_* receive offloads (a mask of feature bits)."""
        return self.command(N.VIRTIO_NET_CTRL_GUEST_OFFLOADS,
                            N.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, _U64.pack(feature_bits))
