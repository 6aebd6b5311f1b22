"""Frame builders and checks for the virtio-net tests.

Frames are built byte by byte with struct (so tests control every field, including partial
checksums) and verified with an independent, deliberately naive checksum loop, never with the
code under test.
"""

from __future__ import annotations

import socket
import struct

from pyvirtio.driver.net import NetDriver
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr
from pyvirtio.testing.pair import DevicePair

BROADCAST = b"\xff" * 6
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806


def mac(n: int) -> bytes:
    """A locally administered unicast MAC ending in ``n``."""
    return bytes((0x02, 0, 0, 0, 0, n))


def ip4(text: str) -> bytes:
    return socket.inet_aton(text)


def ip6(text: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6, text)


def inet_sum(data: bytes) -> int:
    """RFC 1071 the slow way: add 16-bit words with end-around carry."""
    total = 0
    for i in range(0, len(data), 2):
        word = data[i] << 8
        if i + 1 < len(data):
            word |= data[i + 1]
        total += word
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
    return total


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, src_mac, ip4(src_ip),
                       b"\0" * 6, ip4(target_ip))
    return eth(BROADCAST, src_mac, ETH_P_ARP, body + b"\0" * 18)


def ipv4_header(src: str, dst: str, proto: int, payload_len: int, ident: int = 1) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000,
                                64, proto, 0, ip4(src), ip4(dst)))
    struct.pack_into("!H", hdr, 10, 0xFFFF - inet_sum(bytes(hdr)))
    return bytes(hdr)


def pseudo4(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip4(src) + ip4(dst) + struct.pack("!BBH", 0, proto, length)


def pseudo6(src: str, dst: str, proto: int, length: int) -> bytes:
    return ip6(src) + ip6(dst) + struct.pack("!I3xB", length, proto)


def udp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int,
              dport: int, payload: bytes, *, partial: bool = False) -> tuple[bytes, NetHdr]:
    """A UDP/IPv4 frame; with ``partial`` the UDP checksum field holds only the pseudo-header
    sum and the header asks for NEEDS_CSUM (what Linux sends with CSUM offload)."""
    ulen = 8 + len(payload)
    udp = bytearray(struct.pack("!HHHH", sport, dport, ulen, 0) + payload)
    pseudo = pseudo4(src_ip, dst_ip, 17, ulen)
    if partial:
        struct.pack_into("!H", udp, 6, inet_sum(pseudo))
        hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, 0, 0, 0, 34, 6)
    else:
        csum = 0xFFFF - inet_sum(pseudo + bytes(udp))
        struct.pack_into("!H", udp, 6, csum or 0xFFFF)
        hdr = NetHdr()
    frame = eth(dst_mac, src_mac, ETH_P_IP,
                ipv4_header(src_ip, dst_ip, 17, len(udp)) + bytes(udp))
    return frame, hdr


def tcp_tso_frame(src_mac: bytes, dst_mac: bytes, payload: bytes, mss: int, *,
                  v6: bool = False, seq: int = 1000, flags: int = 0x18,
                  ips: tuple[str, str] = ("10.0.0.1", "10.0.0.2"),
                  ports: tuple[int, int] = (40000, 5001), ack: int = 1) -> tuple[bytes, NetHdr]:
    """One large TCP frame for TSO: partial checksum (pseudo-header sum with the full TCP
    length, as Linux computes it for GSO) and a TCPV4/TCPV6 header (``ips`` for IPv4)."""
    tcp = bytearray(struct.pack("!HHIIBBHHH", *ports, seq, ack, 5 << 4, flags, 65535, 0,
                                0) + payload)
    tlen = len(tcp)
    if v6:
        src, dst = "fd00::1", "fd00::2"
        struct.pack_into("!H", tcp, 16, inet_sum(pseudo6(src, dst, 6, tlen)))
        l3 = struct.pack("!IHBB16s16s", 6 << 28, tlen, 6, 64, ip6(src), ip6(dst))
        frame = eth(dst_mac, src_mac, ETH_P_IPV6, l3 + bytes(tcp))
        gso = N.VIRTIO_NET_HDR_GSO_TCPV6
        start = 54
    else:
        src, dst = ips
        struct.pack_into("!H", tcp, 16, inet_sum(pseudo4(src, dst, 6, tlen)))
        frame = eth(dst_mac, src_mac, ETH_P_IP, ipv4_header(src, dst, 6, tlen) + bytes(tcp))
        gso = N.VIRTIO_NET_HDR_GSO_TCPV4
        start = 34
    hdr = NetHdr(N.VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, start + 20, mss, start, 16)
    return frame, hdr


def l4_checksum_ok(frame: bytes) -> bool:
    """Whether the UDP/TCP checksum of an IPv4 or IPv6 frame verifies."""
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_IP:
        ihl = (frame[14] & 0xF) * 4
        proto = frame[23]
        seg = frame[14 + ihl :]
        total_len = struct.unpack_from("!H", frame, 16)[0]
        seg = seg[: total_len - ihl]
        pseudo = frame[26:34] + struct.pack("!BBH", 0, proto, len(seg))
    else:
        proto = frame[20]
        plen = struct.unpack_from("!H", frame, 18)[0]
        seg = frame[54 : 54 + plen]
        pseudo = frame[22:54] + struct.pack("!I3xB", len(seg), proto)
    return inet_sum(pseudo + seg) == 0xFFFF


def ipv4_header_ok(frame: bytes) -> bool:
    ihl = (frame[14] & 0xF) * 4
    return inet_sum(frame[14 : 14 + ihl]) == 0xFFFF


def probe(pair: DevicePair, driver: type[NetDriver] = NetDriver,
          features: int | None = None) -> NetDriver:
    drv = pair.probe(driver, features)
    assert isinstance(drv, NetDriver)
    return drv


def features_without(*bits: int) -> int:
    """NetDriver's default features (device and transport) minus ``bits``."""
    out = NetDriver.features | NetDriver.transport_features
    for b in bits:
        out &= ~(1 << b)
    return out
