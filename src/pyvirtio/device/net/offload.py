"""Software fallbacks for virtio-net offloads, for a frame whose sender used an offload its
receiver did not negotiate: a partial checksum (NEEDS_CSUM: the field holds only the
pseudo-header sum) is completed, a TSO frame (``gso_type``) cut into ``gso_size`` segments,
as Linux's ``skb_checksum_help`` and GSO would. Frames come from guests: malformed input
raises :class:`OffloadError` (a :class:`~pyvirtio.errors.PeerError`); the frame is dropped.
"""

from __future__ import annotations

import struct

from pyvirtio.device.net.endpoint import ETH_HLEN
from pyvirtio.errors import PeerError
from pyvirtio.spec import net as N

VLAN_HLEN = 4
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
ETH_P_8021AD = 0x88A8
IPPROTO_TCP = 6

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

#: a GSO frame may not be cut into more segments than this (a hostile gso_size of 1 on a
#: 64 KiB frame would otherwise cost 65536 segment builds)
MAX_SEGMENTS = 2048

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


class OffloadError(PeerError):
    """A frame's virtio-net header or packet headers do not allow the requested offload."""


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """The 16-bit ones' complement sum of ``data`` (big-endian words, odd tail padded),
    modulo 0xFFFF, in C: as 2**16 == 1 (mod 0xFFFF), a big-endian number is congruent to
    the sum of its 16-bit words. 0 stands for ones' complement zero (:func:`fold_checksum`).
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def fold_checksum(total: int) -> int:
    """The checksum field for a ones' complement ``total`` (as from :func:`ones_sum`, sums
    may be added): its complement, with 0 sent as 0xFFFF (Linux ``CSUM_MANGLED_0``)."""
    return 0xFFFF - total % 0xFFFF


def complete_checksum(frame: bytearray, csum_start: int, csum_offset: int) -> None:
    """Finish a partial checksum in place (VIRTIO 1.x §5.1.6.2): sum from ``csum_start`` to
    the end (the field at ``csum_start + csum_offset`` already holds the pseudo-header sum)
    and store the complement in that field."""
    pos = csum_start + csum_offset
    if csum_start < ETH_HLEN or pos + 2 > len(frame):
        raise OffloadError(
            f"checksum start {csum_start} + offset {csum_offset} lies outside the "
            f"{len(frame)}-byte frame"
        )
    total = ones_sum(memoryview(frame)[csum_start:])
    _U16.pack_into(frame, pos, fold_checksum(total))


def _l3_offset(frame: bytes | bytearray) -> tuple[int, int]:
    """(ethertype, offset of the network header), skipping up to two VLAN tags."""
    off = 12
    for _ in range(3):
        if off + 2 > len(frame):
            break
        ethertype = _U16.unpack_from(frame, off)[0]
        if ethertype not in (ETH_P_8021Q, ETH_P_8021AD):
            return ethertype, off + 2
        off += VLAN_HLEN
    raise OffloadError("frame too short or too many VLAN tags for segmentation")


def segment_tcp(hdr: N.NetHdr, frame: bytes | bytearray) -> list[bytes]:
    """Cut a TSO frame (gso_type TCPV4 or TCPV6) into ``gso_size``-byte segments with
    complete IP and TCP checksums, as the receiving stack would have seen them on a wire.

    Per segment: IPv4 total length, id (+1 each) and header checksum, or IPv6 payload length;
    TCP sequence number advanced; FIN and PSH only on the last segment, CWR only on the
    first; the TCP checksum computed over pseudo-header, header and payload.
    """
    gso = hdr.gso_type & ~N.VIRTIO_NET_HDR_GSO_ECN
    mss = hdr.gso_size
    if mss <= 0:
        raise OffloadError(f"GSO frame with gso_size {mss}")
    ethertype, l3 = _l3_offset(frame)
    n = len(frame)
    if gso == N.VIRTIO_NET_HDR_GSO_TCPV4:
        if ethertype != ETH_P_IP or l3 + 20 > n or frame[l3] >> 4 != 4:
            raise OffloadError("TCPV4 GSO frame does not carry IPv4")
        ihl = (frame[l3] & 0x0F) * 4
        if ihl < 20 or frame[l3 + 9] != IPPROTO_TCP:
            raise OffloadError("TCPV4 GSO frame: bad IPv4 header length or not TCP")
        l4 = l3 + ihl
    elif gso == N.VIRTIO_NET_HDR_GSO_TCPV6:
        if ethertype != ETH_P_IPV6 or l3 + 40 > n or frame[l3] >> 4 != 6:
            raise OffloadError("TCPV6 GSO frame does not carry IPv6")
        if frame[l3 + 6] != IPPROTO_TCP:
            raise OffloadError("TCPV6 GSO frame with extension headers is not supported")
        l4 = l3 + 40
    else:
        raise OffloadError(f"GSO type {hdr.gso_type} cannot be segmented in software")
    if l4 + 20 > n:
        raise OffloadError("GSO frame too short for its TCP header")
    thl = (frame[l4 + 12] >> 4) * 4
    data_off = l4 + thl
    if thl < 20 or data_off > n:
        raise OffloadError(f"GSO frame: bad TCP header length {thl}")
    payload = memoryview(bytes(frame))[data_off:]
    if len(payload) > mss * MAX_SEGMENTS:
        raise OffloadError(
            f"GSO frame of {len(payload)} payload bytes with gso_size {mss} would make more "
            f"than {MAX_SEGMENTS} segments"
        )
    template = bytearray(frame[:data_off])
    seq0 = _U32.unpack_from(template, l4 + 4)[0]
    tcp_flags = template[l4 + 13]
    v4 = gso == N.VIRTIO_NET_HDR_GSO_TCPV4
    if v4:
        ip_id = _U16.unpack_from(template, l3 + 4)[0]
        addr_sum = ones_sum(template[l3 + 12 : l3 + 20])
    else:
        addr_sum = ones_sum(template[l3 + 8 : l3 + 40])
    segments = []
    total = len(payload)
    offsets = range(0, total, mss) if total else range(1)
    for i, off in enumerate(offsets):
        chunk = payload[off : off + mss]
        h = bytearray(template)
        flags = tcp_flags
        if off + mss < total:
            flags &= ~(TCP_FIN | TCP_PSH)
        if i:
            flags &= ~TCP_CWR
        h[l4 + 13] = flags
        _U32.pack_into(h, l4 + 4, (seq0 + off) & 0xFFFFFFFF)
        tcp_len = thl + len(chunk)
        if v4:
            _U16.pack_into(h, l3 + 2, ihl + tcp_len)
            _U16.pack_into(h, l3 + 4, (ip_id + i) & 0xFFFF)
            _U16.pack_into(h, l3 + 10, 0)
            _U16.pack_into(h, l3 + 10, fold_checksum(ones_sum(h[l3:l4])))
        else:
            _U16.pack_into(h, l3 + 4, (l4 - l3 - 40) + tcp_len)
        _U16.pack_into(h, l4 + 16, 0)
        # pseudo-header: addresses, protocol, TCP length (the v4 and v6 forms sum alike)
        total_sum = addr_sum + IPPROTO_TCP + tcp_len + ones_sum(h[l4:]) + ones_sum(chunk)
        _U16.pack_into(h, l4 + 16, fold_checksum(total_sum))
        h += chunk
        segments.append(bytes(h))
    return segments
