"""The vhost-user protocol ABI (QEMU ``docs/interop/vhost-user.rst``).

A vhost-user message is a 12-byte header (request, flags, payload size: three u32) followed by
``size`` payload bytes; file descriptors ride along as SCM_RIGHTS ancillary data. All numbers
are in the machine's native byte order (both ends share one host), hence the ``=`` structs.

Front-end requests (:class:`Request`) travel on the main socket; back-end requests
(:class:`BackendRequest`, historically ``VHOST_USER_SLAVE_*``) travel on the optional channel
the front-end hands over with ``SET_BACKEND_REQ_FD`` (historically ``SET_SLAVE_REQ_FD``, same
number 21). Protocol extensions are gated by :class:`ProtocolFeature` bits, negotiated with
``GET/SET_PROTOCOL_FEATURES`` once the back-end offers virtio feature bit
:data:`VHOST_USER_F_PROTOCOL_FEATURES` (30).
"""

from __future__ import annotations

import enum
import struct

# ---- header ---------------------------------------------------------------------------------

#: request (u32), flags (u32), size (u32)
HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12

#: flags: the lower two bits carry the protocol version, currently 1
VERSION = 0x1
VERSION_MASK = 0x3
#: flags bit 2: set on every reply from the back-end (and front-end replies on the back-end
#: channel)
REPLY_FLAG = 1 << 2
#: flags bit 3: the sender wants a u64 ack (0 = success) even for a request without a reply
NEED_REPLY_FLAG = 1 << 3
#: every flag bit the specification defines
KNOWN_FLAGS = VERSION_MASK | REPLY_FLAG | NEED_REPLY_FLAG

#: the virtio feature bit by which a back-end says it speaks protocol features; never passed
#: on to the guest driver
VHOST_USER_F_PROTOCOL_FEATURES = 30

#: the vhost log page size (dirty logging for live migration)
VHOST_LOG_PAGE = 0x1000


class Request(enum.IntEnum):
    """Front-end -> back-end message types (``VHOST_USER_*``)."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # historically SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


SET_SLAVE_REQ_FD = Request.SET_BACKEND_REQ_FD  # the old name, same number


class BackendRequest(enum.IntEnum):
    """Back-end -> front-end message types on the back-end channel (``VHOST_USER_BACKEND_*``,
    formerly ``VHOST_USER_SLAVE_*``)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class ProtocolFeature(enum.IntEnum):
    """Protocol feature bit numbers (``VHOST_USER_PROTOCOL_F_*``); masks are ``1 << bit``."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5  # formerly SLAVE_REQ
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10  # formerly SLAVE_SEND_FD
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def protocol_mask(*bits: int) -> int:
    """The mask of the given protocol feature bits."""
    mask = 0
    for b in bits:
        mask |= 1 << b
    return mask


def describe_protocol_features(mask: int) -> str:
    """``'MQ|REPLY_ACK|bit 40'`` style rendering for logs."""
    names = []
    for n in range(mask.bit_length()):
        if mask >> n & 1:
            try:
                names.append(ProtocolFeature(n).name)
            except ValueError:
                names.append(f"bit {n}")
    return "|".join(names) or "none"


def request_name(request: int) -> str:
    """The request's name, or ``'request 99'`` for numbers the spec does not define."""
    try:
        return Request(request).name
    except ValueError:
        return f"request {request}"


def backend_request_name(request: int) -> str:
    try:
        return "BACKEND_" + BackendRequest(request).name
    except ValueError:
        return f"backend request {request}"


# ---- payloads -------------------------------------------------------------------------------

#: a single 64-bit integer
U64 = struct.Struct("=Q")

#: vring state description (``struct vhost_vring_state``): index (u32), num (u32)
VRING_STATE = struct.Struct("=II")

#: vring address description (``struct vhost_vring_addr``): index (u32), flags (u32),
#: desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr (u64 each).
#: Note the order: descriptor table, *used*, *avail*, log.
VRING_ADDR = struct.Struct("=IIQQQQ")

#: ``VRING_ADDR`` flags bit 0: log writes to the used ring (migration dirty logging)
VHOST_VRING_F_LOG = 0

#: SET_VRING_KICK / CALL / ERR u64 payload: bits 0-7 vring index, bit 8 "no fd" (poll)
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8

#: memory regions description header: nregions (u32), padding (u32)
MEMORY_HEADER = struct.Struct("=II")
#: one memory region: guest_phys_addr, memory_size, userspace_addr, mmap_offset (u64 each)
MEMORY_REGION = struct.Struct("=QQQQ")
#: regions in one SET_MEM_TABLE (``VHOST_MEMORY_BASELINE_NREGIONS``); also the most fds one
#: message may carry
MEMORY_BASELINE_NREGIONS = 8
MAX_FDS = MEMORY_BASELINE_NREGIONS
#: single memory region description (ADD/REM_MEM_REG): padding (u64) + one region
MEM_REG = struct.Struct("=QQQQQ")

#: log description (SET_LOG_BASE): mmap_size, mmap_offset
LOG = struct.Struct("=QQ")

#: device config space access header: offset (u32), size (u32), flags (u32); ``size`` bytes
#: of config follow
CONFIG_HEADER = struct.Struct("=III")
#: largest config space a message carries (``VHOST_USER_MAX_CONFIG_SIZE``)
MAX_CONFIG_SIZE = 256
#: SET_CONFIG flags
CONFIG_TYPE_FRONTEND = 0  # the guest wrote a writable field
CONFIG_TYPE_MIGRATION = 1  # live-migration restore: read-only fields may be written too

#: vring area description (back-end VRING_HOST_NOTIFIER_MSG): u64 (index | flags), size,
#: offset
VRING_AREA = struct.Struct("=QQQ")

#: inflight description (GET/SET_INFLIGHT_FD): mmap_size, mmap_offset (u64), num_queues,
#: queue_size (u16). The C struct is not packed, so it is padded to 24 bytes on the wire.
INFLIGHT = struct.Struct("=QQHH4x")

#: ``struct vhost_iotlb_msg``: iova, size, uaddr (u64), perm, type (u8), padded to 32 bytes
IOTLB = struct.Struct("=QQQBB6x")

#: device state transfer (SET_DEVICE_STATE_FD): direction (u32), phase (u32)
DEVICE_STATE = struct.Struct("=II")

#: The largest payload of any message this implementation knows how to carry: the size of
#: the reference payload union (libvhost-user's ``VhostUserMsg.payload``), whose largest
#: member is the config space description. Anything bigger is refused before it is read.
MAX_PAYLOAD_SIZE = CONFIG_HEADER.size + MAX_CONFIG_SIZE  # 268
assert MAX_PAYLOAD_SIZE >= MEMORY_HEADER.size + MEMORY_BASELINE_NREGIONS * MEMORY_REGION.size

#: memory slots libvhost-user and Linux vhost usually support (GET_MAX_MEM_SLOTS)
VHOST_USER_MAX_RAM_SLOTS = 509
