"""virtio-net (VIRTIO 1.x §5.1; Linux ``uapi/linux/virtio_net.h``).

Every frame on the rx and tx queues is preceded by ``virtio_net_hdr``: 10 bytes for legacy
devices without MRG_RXBUF, 12 bytes (with ``num_buffers``) for VERSION_1 or MRG_RXBUF.
"""

from __future__ import annotations

import struct
from functools import cache
from typing import NamedTuple

from pyvirtio.spec import LE, Endian

# Feature bits
VIRTIO_NET_F_CSUM = 0
VIRTIO_NET_F_GUEST_CSUM = 1
VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 2
VIRTIO_NET_F_MTU = 3
VIRTIO_NET_F_MAC = 5
VIRTIO_NET_F_GSO = 6  # legacy
VIRTIO_NET_F_GUEST_TSO4 = 7
VIRTIO_NET_F_GUEST_TSO6 = 8
VIRTIO_NET_F_GUEST_ECN = 9
VIRTIO_NET_F_GUEST_UFO = 10
VIRTIO_NET_F_HOST_TSO4 = 11
VIRTIO_NET_F_HOST_TSO6 = 12
VIRTIO_NET_F_HOST_ECN = 13
VIRTIO_NET_F_HOST_UFO = 14
VIRTIO_NET_F_MRG_RXBUF = 15
VIRTIO_NET_F_STATUS = 16
VIRTIO_NET_F_CTRL_VQ = 17
VIRTIO_NET_F_CTRL_RX = 18
VIRTIO_NET_F_CTRL_VLAN = 19
VIRTIO_NET_F_CTRL_RX_EXTRA = 20
VIRTIO_NET_F_GUEST_ANNOUNCE = 21
VIRTIO_NET_F_MQ = 22
VIRTIO_NET_F_CTRL_MAC_ADDR = 23
VIRTIO_NET_F_HASH_REPORT = 57
VIRTIO_NET_F_RSS = 60
VIRTIO_NET_F_RSC_EXT = 61
VIRTIO_NET_F_STANDBY = 62
VIRTIO_NET_F_SPEED_DUPLEX = 63

# virtio_net_hdr.flags
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
VIRTIO_NET_HDR_F_RSC_INFO = 4

# virtio_net_hdr.gso_type
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_UDP_L4 = 5
VIRTIO_NET_HDR_GSO_ECN = 0x80

NET_HDR_SIZE_LEGACY = 10
NET_HDR_SIZE = 12  # with num_buffers: VERSION_1 or MRG_RXBUF


def net_hdr_size(version_1: bool, mrg_rxbuf: bool) -> int:
    """Header length for the negotiated features (§5.1.6)."""
    return NET_HDR_SIZE if version_1 or mrg_rxbuf else NET_HDR_SIZE_LEGACY


@cache
def net_hdr_struct(endian: Endian = LE) -> struct.Struct:
    """``struct virtio_net_hdr``: flags, gso_type (u8), hdr_len, gso_size, csum_start,
    csum_offset (u16)."""
    return struct.Struct(endian + "BBHHHH")


@cache
def net_hdr_mrg_struct(endian: Endian = LE) -> struct.Struct:
    """``struct virtio_net_hdr_mrg_rxbuf``: the 10-byte header plus num_buffers (u16)."""
    return struct.Struct(endian + "BBHHHHH")


class NetHdr(NamedTuple):
    """The fields of ``struct virtio_net_hdr`` that describe a frame (everything but
    ``num_buffers``, which only says how a received frame was placed in receive buffers).

    Shared by both ends: the device parses it from transmit chains, the driver from receive
    buffers; back-ends (tap, switch) pass it along with the frame bytes.
    """

    flags: int = 0
    gso_type: int = 0
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0


# struct virtio_net_config field offsets
CFG_MAC = 0  # u8[6]
CFG_STATUS = 6  # le16
CFG_MAX_VIRTQUEUE_PAIRS = 8  # le16
CFG_MTU = 10  # le16
CFG_SPEED = 12  # le32
CFG_DUPLEX = 16  # u8
CFG_RSS_MAX_KEY_SIZE = 17  # u8
CFG_RSS_MAX_INDIRECTION_TABLE_LENGTH = 18  # le16
CFG_SUPPORTED_HASH_TYPES = 20  # le32
CONFIG_SIZE = 24

# config.status bits
VIRTIO_NET_S_LINK_UP = 1
VIRTIO_NET_S_ANNOUNCE = 2

# Control virtqueue: a readable {class u8, cmd u8} header, command data, a writable ack u8.
CTRL_HDR = struct.Struct("BB")
VIRTIO_NET_OK = 0
VIRTIO_NET_ERR = 1

VIRTIO_NET_CTRL_RX = 0
VIRTIO_NET_CTRL_RX_PROMISC = 0
VIRTIO_NET_CTRL_RX_ALLMULTI = 1
VIRTIO_NET_CTRL_RX_ALLUNI = 2
VIRTIO_NET_CTRL_RX_NOMULTI = 3
VIRTIO_NET_CTRL_RX_NOUNI = 4
VIRTIO_NET_CTRL_RX_NOBCAST = 5

VIRTIO_NET_CTRL_MAC = 1
VIRTIO_NET_CTRL_MAC_TABLE_SET = 0  # two tables: {le32 entries; u8 macs[entries][6]}
VIRTIO_NET_CTRL_MAC_ADDR_SET = 1

VIRTIO_NET_CTRL_VLAN = 2
VIRTIO_NET_CTRL_VLAN_ADD = 0
VIRTIO_NET_CTRL_VLAN_DEL = 1

VIRTIO_NET_CTRL_ANNOUNCE = 3
VIRTIO_NET_CTRL_ANNOUNCE_ACK = 0

VIRTIO_NET_CTRL_MQ = 4
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET = 0
VIRTIO_NET_CTRL_MQ_RSS_CONFIG = 1
VIRTIO_NET_CTRL_MQ_HASH_CONFIG = 2
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MIN = 1
VIRTIO_NET_CTRL_MQ_VQ_PAIRS_MAX = 0x8000

VIRTIO_NET_CTRL_GUEST_OFFLOADS = 5
VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET = 0

ETH_ALEN = 6
