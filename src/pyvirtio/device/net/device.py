"""The network device (virtio-net, VIRTIO 1.x §5.1).

Queues as Linux ``virtio_net.c`` lays them out: receiveq ``2*i``, transmitq ``2*i + 1``,
then the control queue (2 without MQ, ``2 * max_queue_pairs`` with it). The device is a
:class:`~pyvirtio.device.net.endpoint.NetEndpoint` linked to a peer (a tap, a switch port,
another device).

Transmit (the engine's drain): each chain's header is checked and its frame handed to the
peer zero-copy (views of guest memory, valid during the call); a BUSY peer puts the chain
back until ``peer_ready``: backpressure, not loss. Receive: a frame is copied into buffers
the device holds from the receive queue (several, ``num_buffers`` in the header, with
MRG_RXBUF), each used length exactly the bytes written; ``flush=False`` batches the used
entries until :meth:`NetDevice.flush_rx` (fast lane: a frame's one-descriptor buffers as
tuples from ``pop_writable``). A frame carrying an offload this guest did not negotiate is
finished in software (:mod:`.offload`), so any endpoint may send any valid frame.

Hostile guests: a malformed transmit chain (header, offload, size) is dropped and counted
(``stats.tx_errors``); a malformed ring breaks its queue and sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.engine import RETRY, Completion, QueueEngine
from pyvirtio.device.net.endpoint import (
    BROADCAST,
    ETH_ALEN,
    ETH_HLEN,
    Delivery,
    Frame,
    FrameSink,
    NetEndpoint,
    Offload,
    format_mac,
    frame_bytes,
    parse_mac,
    random_mac,
)
from pyvirtio.device.net.offload import OffloadError, complete_checksum, segment_tcp
from pyvirtio.errors import LocalError
from pyvirtio.ring import DescriptorChain, DeviceRing, RingError
from pyvirtio.ring.chain import split_header
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import net as N
from pyvirtio.spec import status as S
from pyvirtio.spec.net import NetHdr

log = logging.getLogger("pyvirtio.device.net")

#: largest frame accepted: a 64 KiB IP packet (TSO) behind an Ethernet header and a VLAN tag
MAX_FRAME_LEN = 65535 + ETH_HLEN + 4
#: MAC table entries per kind before the device falls back to accepting all (QEMU: 64)
MAC_TABLE_ENTRIES = 64
#: control commands larger than this are refused (a MAC table of 2 * 10000 entries fits)
MAX_CTRL_LEN = 1 << 17
#: transmit chains handled per kick before yielding to the reactor (fairness between guests)
DEFAULT_TX_BUDGET = 256
#: transmit completions published together (one used-index update)
TX_PUSH_BATCH = 64

#: CTRL_RX commands and the RxFilter flag each sets (the second table needs CTRL_RX_EXTRA)
_RX_MODES = {N.VIRTIO_NET_CTRL_RX_PROMISC: "promisc", N.VIRTIO_NET_CTRL_RX_ALLMULTI: "allmulti"}
_RX_EXTRA_MODES = {N.VIRTIO_NET_CTRL_RX_ALLUNI: "alluni", N.VIRTIO_NET_CTRL_RX_NOMULTI: "nomulti",
                   N.VIRTIO_NET_CTRL_RX_NOUNI: "nouni", N.VIRTIO_NET_CTRL_RX_NOBCAST: "nobcast"}

#: the GSO types pyvirtio handles (ECN, UFO, USO: never offered), each with the offload a
#: receiving driver must accept and the feature a transmitting driver must have negotiated
_GSO = {N.VIRTIO_NET_HDR_GSO_TCPV4: (Offload.TSO4, N.VIRTIO_NET_F_HOST_TSO4),
        N.VIRTIO_NET_HDR_GSO_TCPV6: (Offload.TSO6, N.VIRTIO_NET_F_HOST_TSO6)}
_HDR = N.net_hdr_struct()  # the 10-byte header; num_buffers is packed separately
_U16 = struct.Struct("<H")
#: a receive buffer to fill: a chain (or a head), and its writable memory
_Target = tuple[DescriptorChain | int, Sequence[memoryview]]
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


@dataclass
class NetStats:
    """Counters of one device, from the guest's point of view."""

    tx_frames: int = 0  # frames the guest transmitted that we handed on
    tx_bytes: int = 0
    tx_errors: int = 0  # transmit chains dropped as malformed (header, offload, size)
    tx_dropped: int = 0  # well-formed frames the peer refused, or no peer connected
    rx_frames: int = 0  # frames placed in the guest's receive buffers
    rx_bytes: int = 0
    rx_dropped: int = 0  # frames we refused: too big for the buffers, link down, bad offload
    rx_filtered: int = 0  # frames the guest's receive filter (CTRL_RX, MAC table) excluded
    rx_busy: int = 0  # times we answered BUSY (no receive buffers)
    rx_converted: int = 0  # frames checksummed or segmented in software for this guest
    rx_bad_buffers: int = 0  # receive buffers too small to hold even a header: returned empty
    rx_fast: int = 0  # frames the receive fast lane placed (straight from the ring)


@dataclass
class RxFilter:
    """The receive filter the driver programs over the control queue (§5.1.6.5.1).

    After reset the device is promiscuous, as QEMU's is: a driver without CTRL_RX receives
    everything, and Linux turns promiscuity off itself when it opens the interface.
    """

    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    unicast: frozenset[bytes] = frozenset()
    multicast: frozenset[bytes] = frozenset()
    uni_overflow: bool = False
    multi_overflow: bool = False

    def accepts(self, dst: bytes, own_mac: bytes) -> bool:
        if self.promisc:
            return True
        if dst[0] & 1:
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dst in self.multicast
        if self.nouni:
            return False
        return (self.alluni or self.uni_overflow or dst == own_mac or dst in self.unicast)


class NetDevice(VirtioDevice, NetEndpoint):
    """virtio-net.

    ``mac``: the address in config space (random locally administered if None).
    ``queue_pairs``: > 1 offers MQ. ``offloads``: offer CSUM/GUEST_CSUM/HOST_TSO4/6/
    GUEST_TSO4/6 and CTRL_GUEST_OFFLOADS. ``mrg_rxbuf``, ``ctrl``: offer MRG_RXBUF and the
    control queue (CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR, GUEST_ANNOUNCE). ``mtu``: offer MTU.
    ``capture``: a :class:`FrameSink` that sees every frame the guest sends and receives.
    """

    device_id = ids.NET
    push_batch = TX_PUSH_BATCH
    _ctrl_index: int | None  # the control queue's index, once negotiated
    feature_names = F.names_in(vars(N), "VIRTIO_NET_F_")

    def __init__(
        self,
        mac: bytes | str | None = None,
        *,
        queue_pairs: int = 1,
        offloads: bool = True,
        mrg_rxbuf: bool = True,
        ctrl: bool = True,
        mtu: int | None = None,
        link_up: bool = True,
        tx_budget: int = DEFAULT_TX_BUDGET,
        capture: FrameSink | None = None,
        **kwargs: object,
    ) -> None:
        if not 1 <= queue_pairs <= N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX:
            raise LocalError(f"queue_pairs must be in 1..32768, not {queue_pairs}")
        if queue_pairs > 1 and not ctrl:
            raise LocalError("multiqueue needs the control queue (ctrl=True)")
        feats = F.mask(N.VIRTIO_NET_F_MAC, N.VIRTIO_NET_F_STATUS)
        if mrg_rxbuf:
            feats |= F.bit(N.VIRTIO_NET_F_MRG_RXBUF)
        if offloads:
            feats |= F.mask(N.VIRTIO_NET_F_CSUM, N.VIRTIO_NET_F_GUEST_CSUM,
                            N.VIRTIO_NET_F_HOST_TSO4, N.VIRTIO_NET_F_HOST_TSO6,
                            N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_TSO6)
        if ctrl:
            feats |= F.mask(N.VIRTIO_NET_F_CTRL_VQ, N.VIRTIO_NET_F_CTRL_RX,
                            N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_GUEST_ANNOUNCE,
                            N.VIRTIO_NET_F_CTRL_MAC_ADDR)
            if offloads:
                feats |= F.bit(N.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)
            if queue_pairs > 1:
                feats |= F.bit(N.VIRTIO_NET_F_MQ)
        if mtu is not None:
            if not 68 <= mtu <= 65535:
                raise LocalError(f"mtu must be in 68..65535, not {mtu}")
            feats |= F.bit(N.VIRTIO_NET_F_MTU)
        num_queues = 2 * queue_pairs + (1 if ctrl else 0)
        super().__init__(num_queues, feats, config_size=N.CONFIG_SIZE, **kwargs)  # type: ignore[arg-type]
        self.initial_mac = parse_mac(mac) if mac is not None else random_mac()
        self.max_queue_pairs = queue_pairs
        self.mtu = mtu
        self.drain_budget = self.tx_budget = tx_budget
        self.capture = capture
        self.stats = NetStats()
        self.last_error: str | None = None  # the newest dropped-frame reason, for humans
        self._link_up = link_up
        self.on_reset()  # the negotiated state, as after a reset

    # ---- config space -------------------------------------------------------------------

    @property
    def mac(self) -> bytes:
        """The MAC address the driver currently uses (config space)."""
        return self._mac

    @property
    def link_up(self) -> bool:
        return self._link_up

    def _status_word(self) -> int:
        return ((N.VIRTIO_NET_S_LINK_UP if self._link_up else 0)
                | (N.VIRTIO_NET_S_ANNOUNCE if self._announce else 0))

    def _fill_config(self) -> None:
        c = self.config
        c[N.CFG_MAC : N.CFG_MAC + ETH_ALEN] = self.initial_mac
        self._mac = self.initial_mac
        _U16.pack_into(c, N.CFG_STATUS, self._status_word())
        _U16.pack_into(c, N.CFG_MAX_VIRTQUEUE_PAIRS, self.max_queue_pairs)
        _U16.pack_into(c, N.CFG_MTU, self.mtu or 1500)
        _U32.pack_into(c, N.CFG_SPEED, 0xFFFFFFFF)  # SPEED_UNKNOWN
        c[N.CFG_DUPLEX] = 0xFF  # DUPLEX_UNKNOWN

    def set_link(self, up: bool) -> None:
        """Carrier up or down; the driver sees a config change (with STATUS)."""
        if up == self._link_up:
            return
        self._link_up = up
        self.update_config(N.CFG_STATUS, _U16.pack(self._status_word()))

    def announce(self) -> bool:
        """Ask the guest to announce itself (gratuitous ARP after migration; GUEST_ANNOUNCE).
        Returns False if the driver did not negotiate it."""
        if not self.has_feature(N.VIRTIO_NET_F_GUEST_ANNOUNCE) or not self.status & S.DRIVER_OK:
            return False
        self._announce = True
        self.update_config(N.CFG_STATUS, _U16.pack(self._status_word()))
        return True

    @property
    def announce_pending(self) -> bool:
        return self._announce

    def on_config_write(self, offset: int, data: bytes) -> None:
        # Legacy drivers without CTRL_MAC_ADDR set the MAC by writing config space.
        if not self.has_feature(F.VERSION_1) and offset + len(data) <= ETH_ALEN:
            self.config[offset : offset + len(data)] = data
            self._mac = bytes(self.config[N.CFG_MAC : N.CFG_MAC + ETH_ALEN])
            return
        super().on_config_write(offset, data)

    # ---- negotiation --------------------------------------------------------------------

    feature_depends = (  # §5.1.3.1
        (N.VIRTIO_NET_F_GUEST_TSO4, N.VIRTIO_NET_F_GUEST_CSUM),
        (N.VIRTIO_NET_F_GUEST_TSO6, N.VIRTIO_NET_F_GUEST_CSUM),
        (N.VIRTIO_NET_F_GUEST_UFO, N.VIRTIO_NET_F_GUEST_CSUM),
        (N.VIRTIO_NET_F_HOST_TSO4, N.VIRTIO_NET_F_CSUM),
        (N.VIRTIO_NET_F_HOST_TSO6, N.VIRTIO_NET_F_CSUM),
        (N.VIRTIO_NET_F_HOST_UFO, N.VIRTIO_NET_F_CSUM),
        (N.VIRTIO_NET_F_CTRL_RX, N.VIRTIO_NET_F_CTRL_VQ),
        (N.VIRTIO_NET_F_CTRL_VLAN, N.VIRTIO_NET_F_CTRL_VQ),
        # GUEST_ANNOUNCE and MQ are not checked against CTRL_VQ: a vhost-user front-end
        # (QEMU 7.2) keeps the control queue to itself and relays these two bits without
        # CTRL_VQ (docs/peers.md); without the queue here they simply have no effect.
        (N.VIRTIO_NET_F_CTRL_MAC_ADDR, N.VIRTIO_NET_F_CTRL_VQ),
        (N.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, N.VIRTIO_NET_F_CTRL_VQ),
        (N.VIRTIO_NET_F_CTRL_RX_EXTRA, N.VIRTIO_NET_F_CTRL_RX),
    )

    def on_features_ok(self) -> None:
        feats = self.driver_features
        self._mrg = F.has(feats, N.VIRTIO_NET_F_MRG_RXBUF)
        self._hdr_len = N.net_hdr_size(F.has(feats, F.VERSION_1), self._mrg)
        self._guest_offloads = Offload.from_guest_features(feats)
        if F.has(feats, N.VIRTIO_NET_F_CTRL_VQ):
            pairs = self.max_queue_pairs if F.has(feats, N.VIRTIO_NET_F_MQ) else 1
            self._ctrl_index = 2 * pairs
        else:
            self._ctrl_index = None
        self._active_pairs = 1
        if self.peer is not None:
            self.peer.peer_offloads_changed()

    def on_driver_ok(self) -> None:
        if self.peer is not None:
            self.peer.peer_ready()  # frames may have waited for the guest to come up
        # (Kicks before DRIVER_OK were not served: the framework looks at every ring now.)

    def on_reset(self) -> None:
        self._announce = False
        self._mrg = False
        self._hdr_len = N.NET_HDR_SIZE
        self._ctrl_index = None
        self._active_pairs = 1
        self._guest_offloads = Offload.NONE
        self.rx_filter = RxFilter()
        self._fill_config()
        if self.peer is not None:
            self.peer.peer_offloads_changed()

    @property
    def hdr_len(self) -> int:
        """The negotiated virtio-net header length (10 or 12)."""
        return self._hdr_len

    @property
    def active_queue_pairs(self) -> int:
        return self._active_pairs

    # ---- queue roles --------------------------------------------------------------------

    def _is_rx(self, index: int) -> bool:
        return index != self._ctrl_index and index % 2 == 0

    def on_queue_started(self, index: int, ring: DeviceRing) -> None:
        if self._is_rx(index) and self.status & S.DRIVER_OK and self.peer is not None:
            self.peer.peer_ready()

    def process_queue(self, index: int, ring: DeviceRing) -> None:
        if self._is_rx(index):  # receive buffers posted: we asked only when we ran out
            engine = self.queues[index].engine
            if engine is not None and engine.buffers_posted() and self.peer is not None:
                self.peer.peer_ready()
            return
        super().process_queue(index, ring)  # transmit and control: the engine's drain
        if self.peer is not None:
            self.peer.flush_rx()

    # ---- control queue ------------------------------------------------------------------

    def handle(self, queue: int, chain: DescriptorChain) -> int | None:
        """A transmitted frame (see :meth:`_transmit`), or a control command: {class,
        command} + data readable, one ack byte writable."""
        if queue != self._ctrl_index:
            return RETRY if self._transmit(chain) == Delivery.BUSY else 0
        if chain.writable_len < 1:
            self._peer_problem(f"{self.name}: control command (chain {chain.head}) has no "
                               "writable ack byte")
            return 0
        if chain.readable_len < 2 or chain.readable_len > MAX_CTRL_LEN:
            ack = N.VIRTIO_NET_ERR
        else:
            raw = chain.read()
            ack = self._control(raw[0], raw[1], raw[2:])
        chain.write(bytes((ack,)))
        return 1

    def _control(self, cls: int, cmd: int, data: bytes) -> int:
        ok, err = N.VIRTIO_NET_OK, N.VIRTIO_NET_ERR
        if cls == N.VIRTIO_NET_CTRL_RX and self.has_feature(N.VIRTIO_NET_F_CTRL_RX):
            attr = _RX_MODES.get(cmd)
            if attr is None and self.has_feature(N.VIRTIO_NET_F_CTRL_RX_EXTRA):
                attr = _RX_EXTRA_MODES.get(cmd)
            if attr is None or len(data) != 1:
                return err
            setattr(self.rx_filter, attr, bool(data[0]))
            return ok
        if cls == N.VIRTIO_NET_CTRL_MAC:
            if cmd == N.VIRTIO_NET_CTRL_MAC_TABLE_SET and self.has_feature(
                    N.VIRTIO_NET_F_CTRL_RX):
                return self._mac_table_set(data)
            if cmd == N.VIRTIO_NET_CTRL_MAC_ADDR_SET and self.has_feature(
                    N.VIRTIO_NET_F_CTRL_MAC_ADDR):
                if len(data) != ETH_ALEN:
                    return err
                self.config[N.CFG_MAC : N.CFG_MAC + ETH_ALEN] = data
                self._mac = bytes(data)
                return ok
            return err
        if (cls == N.VIRTIO_NET_CTRL_ANNOUNCE and cmd == N.VIRTIO_NET_CTRL_ANNOUNCE_ACK
                and self.has_feature(N.VIRTIO_NET_F_GUEST_ANNOUNCE)):
            if self._announce:
                self._announce = False
                self.update_config(N.CFG_STATUS, _U16.pack(self._status_word()), notify=False)
            return ok
        if (cls == N.VIRTIO_NET_CTRL_MQ and cmd == N.VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
                and self.has_feature(N.VIRTIO_NET_F_MQ)):
            if len(data) != 2:
                return err
            pairs = _U16.unpack(data)[0]
            if not 1 <= pairs <= self.max_queue_pairs:
                return err
            self._active_pairs = pairs
            return ok
        if (cls == N.VIRTIO_NET_CTRL_GUEST_OFFLOADS
                and cmd == N.VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET
                and self.has_feature(N.VIRTIO_NET_F_CTRL_GUEST_OFFLOADS)):
            if len(data) != 8:
                return err
            wanted = _U64.unpack(data)[0]
            guest_bits = F.mask(N.VIRTIO_NET_F_GUEST_CSUM, N.VIRTIO_NET_F_GUEST_TSO4,
                                N.VIRTIO_NET_F_GUEST_TSO6, N.VIRTIO_NET_F_GUEST_ECN,
                                N.VIRTIO_NET_F_GUEST_UFO)
            if wanted & ~(self.driver_features & guest_bits):
                return err  # only negotiated receive offloads may be (re-)enabled
            self._guest_offloads = Offload.from_guest_features(wanted)
            if self.peer is not None:
                self.peer.peer_offloads_changed()
            return ok
        return err

    def _mac_table_set(self, data: bytes) -> int:
        tables: list[frozenset[bytes]] = []
        overflow: list[bool] = []
        pos = 0
        for _ in range(2):  # unicast, then multicast
            if pos + 4 > len(data):
                return N.VIRTIO_NET_ERR
            n = _U32.unpack_from(data, pos)[0]
            pos += 4
            if n > (len(data) - pos) // ETH_ALEN:
                return N.VIRTIO_NET_ERR
            macs = [data[pos + ETH_ALEN * i : pos + ETH_ALEN * (i + 1)] for i in range(n)]
            pos += ETH_ALEN * n
            overflow.append(n > MAC_TABLE_ENTRIES)
            tables.append(frozenset(macs) if n <= MAC_TABLE_ENTRIES else frozenset())
        if pos != len(data):
            return N.VIRTIO_NET_ERR
        f = self.rx_filter
        f.unicast, f.multicast = tables
        f.uni_overflow, f.multi_overflow = overflow
        return N.VIRTIO_NET_OK

    # ---- transmit -----------------------------------------------------------------------

    def _tx_error(self, message: str) -> None:
        self.stats.tx_errors += 1
        self.last_error = f"{self.name}: {message}"
        if self.stats.tx_errors <= 10:  # a hostile guest must not flood the log
            self.log.warning("%s (frame dropped)", self.last_error)

    def _check_tx_hdr(self, hdr: NetHdr, length: int) -> str | None:
        if length < ETH_HLEN:
            return f"frame of {length} bytes is shorter than an Ethernet header"
        if length > MAX_FRAME_LEN:
            return f"frame of {length} bytes exceeds {MAX_FRAME_LEN}"
        if hdr.flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
            if not self.driver_features >> N.VIRTIO_NET_F_CSUM & 1:
                return "NEEDS_CSUM set but VIRTIO_NET_F_CSUM was not negotiated"
            if (hdr.csum_start < ETH_HLEN
                    or hdr.csum_start + hdr.csum_offset + 2 > length):
                return (f"checksum start {hdr.csum_start} + offset {hdr.csum_offset} is "
                        f"outside the {length}-byte frame")
        gso = hdr.gso_type
        if gso != N.VIRTIO_NET_HDR_GSO_NONE:
            if gso not in _GSO or not self.driver_features >> _GSO[gso][1] & 1:
                return f"GSO type 0x{gso:x} was not negotiated"
            if hdr.gso_size == 0:
                return "GSO frame with gso_size 0"
            if not hdr.flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                return "GSO frame without NEEDS_CSUM"
        return None

    def _transmit(self, chain: DescriptorChain) -> Delivery:
        """Hand one transmit chain's frame to the peer (zero-copy)."""
        hlen = self._hdr_len
        if chain.readable_len < hlen:
            self._tx_error(f"transmit chain {chain.head} has {chain.readable_len} readable "
                           f"bytes, less than the {hlen}-byte virtio-net header")
            return Delivery.DROPPED
        header, frame = split_header(chain.readable, hlen)
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = _HDR.unpack_from(header)
        # Drivers set only NEEDS_CSUM on transmit (§5.1.6.2); other bits mean nothing here.
        hdr = NetHdr(flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size,
                     csum_start, csum_offset)
        length = chain.readable_len - hlen
        problem = self._check_tx_hdr(hdr, length)
        if problem is not None:
            self._tx_error(f"transmit chain {chain.head}: {problem}")
            return Delivery.DROPPED
        peer = self.peer
        if peer is None:
            self.stats.tx_dropped += 1
            return Delivery.DROPPED
        result = peer.receive(hdr, frame, length, flush=False)
        if result == Delivery.BUSY:
            return result
        if self.capture is not None:
            self.capture.write_frame(frame, length)
        self.stats.tx_frames += 1
        self.stats.tx_bytes += length
        if result == Delivery.DROPPED:
            self.stats.tx_dropped += 1
        return result

    def peer_ready(self) -> None:
        """The peer can take frames again: resume transmit queues that it blocked."""
        if not self.live:
            return
        for q in self.queues:
            if q.engine is not None and q.engine.blocked:
                q.engine.run()
        if self.peer is not None:
            self.peer.flush_rx()

    # ---- receive ------------------------------------------------------------------------

    def rx_offloads(self) -> Offload:
        return self._guest_offloads

    def _rx_drop(self, reason: str) -> Delivery:
        self.stats.rx_dropped += 1
        self.last_error = f"{self.name}: {reason}"
        return Delivery.DROPPED

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        """Place a frame in the guest's receive buffers (see the module docstring)."""
        if not self._link_up:
            return self._rx_drop("link is down")
        if not self.status & S.DRIVER_OK or self.status & S.DEVICE_NEEDS_RESET:
            self.stats.rx_busy += 1
            return Delivery.BUSY  # on_driver_ok calls peer_ready
        if length < ETH_HLEN or length > MAX_FRAME_LEN:
            return self._rx_drop(f"frame of {length} bytes")
        if not self.rx_filter.accepts(frame_bytes(frame, ETH_ALEN), self._mac):
            self.stats.rx_filtered += 1
            return Delivery.DROPPED
        guest = self._guest_offloads
        gso = hdr.gso_type
        needs_csum = bool(hdr.flags & N.VIRTIO_NET_HDR_F_NEEDS_CSUM)
        if gso != N.VIRTIO_NET_HDR_GSO_NONE:
            if gso not in _GSO or not guest & _GSO[gso][0]:
                return self._receive_converted(hdr, frame, length, flush)
        elif needs_csum and not guest & Offload.CSUM:
            return self._receive_converted(hdr, frame, length, flush)
        if not guest & Offload.CSUM:
            hdr = NetHdr()  # no GUEST_CSUM: flags must be zero (§5.1.6.4)
        elif not needs_csum and gso == N.VIRTIO_NET_HDR_GSO_NONE:
            hdr = NetHdr(hdr.flags & N.VIRTIO_NET_HDR_F_DATA_VALID)
        return self._place(self._select_rx(frame), hdr, frame, length, flush)

    def _receive_converted(self, hdr: NetHdr, frame: Frame, length: int,
                           flush: bool) -> Delivery:
        """Finish an offload the guest did not negotiate, then place the result.

        All resulting frames are placed or none: buffers for every segment are reserved
        first, so a BUSY answer leaves nothing half-delivered and the sender can retry.
        """
        data = bytearray(frame_bytes(frame, length))
        try:
            if hdr.gso_type != N.VIRTIO_NET_HDR_GSO_NONE:
                pieces = segment_tcp(hdr, data)
            else:
                complete_checksum(data, hdr.csum_start, hdr.csum_offset)
                pieces = [bytes(data)]
        except OffloadError as exc:
            return self._rx_drop(f"cannot complete offload: {exc}")
        index = self._select_rx((pieces[0],))  # segments of one flow share a queue
        engine = self.queues[index].engine
        if engine is None:
            self.stats.rx_busy += 1
            return Delivery.BUSY
        if engine.ring.broken:
            return self._rx_drop(f"receive queue {index} is broken")
        needs = [self._hdr_len + len(p) for p in pieces]
        try:
            while not self._fits(engine, needs):
                if len(engine.held) >= min(engine.ring.size, 0xFFFF):
                    break  # the ring can never hold them all at once: place what fits
                self.stats.rx_busy += 1
                if not engine.out_of_buffers():
                    return Delivery.BUSY  # the kick calls the peer's peer_ready
        except RingError as exc:
            self._peer_problem(str(exc), needs_reset=True)
            return self._rx_drop(f"receive queue {index} broke: {exc}")
        self.stats.rx_converted += 1
        out_hdr = (NetHdr(N.VIRTIO_NET_HDR_F_DATA_VALID) if self._guest_offloads & Offload.CSUM
                   else NetHdr())
        delivered = 0
        for i, piece in enumerate(pieces):
            res = self._place(index, out_hdr, (piece,), len(piece), False)
            if res == Delivery.BUSY:
                # Only when the ring is too small for the whole burst: the rest is lost (as
                # on a wire; TCP retransmits), counted, and nothing stalls.
                self.stats.rx_dropped += len(pieces) - i
                break
            delivered += res == Delivery.DELIVERED
        if flush:
            self.flush_rx()
        return Delivery.DELIVERED if delivered else Delivery.DROPPED

    def _fits(self, engine: QueueEngine, needs: list[int]) -> bool:
        """Whether the receive buffers available now hold frames of ``needs`` bytes (header
        included), each starting in a fresh buffer as :meth:`_place` will put them."""
        pos = 0
        for need in needs:
            capacity = 0
            while capacity < need:
                chain = engine.buffer(pos)
                if chain is None:
                    return False
                pos += 1
                if not self._mrg:
                    break  # one buffer per frame; a too-small one drops just that frame
                capacity += chain.writable_len
        return True

    def _select_rx(self, frame: Frame) -> int:
        """The receive queue for a frame: by flow (addresses and ports) so one flow is
        never reordered across queues."""
        pairs = self._active_pairs
        if pairs == 1:
            return 0
        head = frame_bytes(frame, 58)
        ethertype = head[12:14]
        if ethertype == b"\x08\x00" and len(head) >= 34:
            ihl = (head[14] & 0x0F) * 4
            key = bytes(head[23:24]) + bytes(head[26:34]) + bytes(head[14 + ihl : 18 + ihl])
        elif ethertype == b"\x86\xdd" and len(head) >= 58:
            key = bytes(head[20:21]) + bytes(head[22:58])
        else:
            key = bytes(head[:12])
        return 2 * (zlib.crc32(key) % pairs)

    def _place(self, index: int, hdr: NetHdr, frame: Frame, length: int,
               flush: bool) -> Delivery:
        engine = self.queues[index].engine
        if engine is None:
            self.stats.rx_busy += 1
            return Delivery.BUSY  # on_queue_started calls peer_ready
        ring = engine.ring
        if ring.broken:
            return self._rx_drop(f"receive queue {index} is broken")
        hlen = self._hdr_len
        need = hlen + length
        spare = engine.held
        pending = engine.done
        bufs = ring.pop_writable(need) if self._mrg and not spare else ()  # the fast lane
        if bufs and bufs[0][3] >= hlen:
            self.stats.rx_fast += 1
            return self._fill(hdr, frame, length, engine, flush, pending,
                              [(h, (b[o : o + n],)) for h, b, o, n in bufs])
        ring.rewind(len(bufs))  # none, or one too small for a header: the general path
        try:
            while True:
                # Pick the chains this frame will fill (nothing is written yet).
                count = 0
                capacity = 0
                short = False
                while capacity < need:
                    chain = engine.buffer(count)
                    if chain is None:
                        short = True
                        break
                    if count == 0 and chain.writable_len < (hlen + ETH_HLEN if not self._mrg
                                                            else hlen):
                        # Cannot hold even a header: give it back empty (the driver counts a
                        # length error), rather than letting it block the queue forever.
                        spare.popleft()
                        pending.append((chain, 0))
                        self.stats.rx_bad_buffers += 1
                        continue
                    count += 1
                    capacity += chain.writable_len
                    if not self._mrg:
                        break
                if not short and capacity < need:
                    # Without MRG_RXBUF a frame needs one buffer big enough (Linux posts
                    # hdr + 1518 bytes without GUEST_TSO): drop it, keep the buffer.
                    return self._rx_drop(
                        f"frame of {length} bytes does not fit the {capacity - hlen}-byte "
                        "receive buffer (MRG_RXBUF not negotiated)")
                if not short:
                    break
                if len(spare) >= min(ring.size, 0xFFFF):
                    return self._rx_drop(
                        f"frame of {length} bytes does not fit all {len(spare)} receive "
                        "buffers posted")
                self.stats.rx_busy += 1
                if not engine.out_of_buffers():
                    return Delivery.BUSY  # the kick calls the peer's peer_ready
        except RingError as exc:
            self._peer_problem(str(exc), needs_reset=True)
            return self._rx_drop(f"receive queue {index} broke: {exc}")
        return self._fill(hdr, frame, length, engine, flush, pending, [
            (chain, chain.writable) for chain in (spare.popleft() for _ in range(count))])

    def _fill(self, hdr: NetHdr, frame: Frame, length: int, engine: QueueEngine, flush: bool,
              pending: list[Completion], targets: list[_Target]) -> Delivery:
        """Write the header (``num_buffers`` = how many targets) and the frame across the
        targets; queue each one's used entry with the bytes written into it; count it."""
        raw = _HDR.pack(*hdr)
        if self._hdr_len == N.NET_HDR_SIZE:
            raw += _U16.pack(len(targets))
        src = [raw, *frame]
        left = len(raw) + length
        i = off = 0  # where the copy is in src: segment, offset
        for chain, writable in targets:
            written = 0
            for dst in writable:
                room = len(dst)
                pos = 0
                while pos < room and left:
                    seg = src[i]
                    take = min(len(seg) - off, room - pos, left)
                    dst[pos : pos + take] = seg[off : off + take]
                    pos += take
                    off += take
                    left -= take
                    if off >= len(seg):
                        i += 1
                        off = 0
                written += pos
                if not left:
                    break
            pending.append((chain, written))
        self.stats.rx_frames += 1
        self.stats.rx_bytes += length
        if self.capture is not None:
            self.capture.write_frame(frame, length)
        if flush:
            engine.complete(())
        return Delivery.DELIVERED

    def flush_rx(self) -> None:
        """Publish every received frame still batched: one used-index update and at most
        one interrupt per receive queue."""
        for q in self.queues:
            if q.engine is not None and q.engine.done:
                q.engine.complete(())

    def __repr__(self) -> str:
        return f"NetDevice({self.name}, mac={format_mac(self.mac)}, {super().__repr__()})"
