"""virtio-blk (VIRTIO 1.x §5.2; Linux ``uapi/linux/virtio_blk.h``).

A request is a descriptor chain: a readable ``virtio_blk_outhdr`` (16 bytes), then data
(readable for OUT, writable for IN/GET_ID), then one writable status byte.
"""

from __future__ import annotations

import struct
from functools import cache

from pyvirtio.spec import LE, Endian

# Feature bits
VIRTIO_BLK_F_BARRIER = 0  # legacy
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_SCSI = 7  # legacy
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14
VIRTIO_BLK_F_LIFETIME = 15
VIRTIO_BLK_F_SECURE_ERASE = 16
VIRTIO_BLK_F_ZONED = 17

# Request types
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_SCSI_CMD = 2  # legacy
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_GET_LIFETIME = 10
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13
VIRTIO_BLK_T_SECURE_ERASE = 14

# Status byte
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR_SHIFT = 9
SECTOR_SIZE = 512
VIRTIO_BLK_ID_BYTES = 20

# virtio_blk_discard_write_zeroes.flags
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1

OUTHDR_SIZE = 16
DISCARD_WRITE_ZEROES_SIZE = 16


@cache
def outhdr_struct(endian: Endian = LE) -> struct.Struct:
    """``struct virtio_blk_outhdr``: type (u32), ioprio (u32), sector (u64)."""
    return struct.Struct(endian + "IIQ")


@cache
def discard_write_zeroes_struct(endian: Endian = LE) -> struct.Struct:
    """``struct virtio_blk_discard_write_zeroes``: sector (u64), num_sectors (u32), flags."""
    return struct.Struct(endian + "QII")


# struct virtio_blk_config field offsets
CFG_CAPACITY = 0  # le64, in 512-byte sectors
CFG_SIZE_MAX = 8  # le32
CFG_SEG_MAX = 12  # le32
CFG_GEOMETRY_CYLINDERS = 16  # le16
CFG_GEOMETRY_HEADS = 18  # u8
CFG_GEOMETRY_SECTORS = 19  # u8
CFG_BLK_SIZE = 20  # le32
CFG_PHYSICAL_BLOCK_EXP = 24  # u8
CFG_ALIGNMENT_OFFSET = 25  # u8
CFG_MIN_IO_SIZE = 26  # le16
CFG_OPT_IO_SIZE = 28  # le32
CFG_WRITEBACK = 32  # u8
CFG_NUM_QUEUES = 34  # le16
CFG_MAX_DISCARD_SECTORS = 36  # le32
CFG_MAX_DISCARD_SEG = 40  # le32
CFG_DISCARD_SECTOR_ALIGNMENT = 44  # le32
CFG_MAX_WRITE_ZEROES_SECTORS = 48  # le32
CFG_MAX_WRITE_ZEROES_SEG = 52  # le32
CFG_WRITE_ZEROES_MAY_UNMAP = 56  # u8
CFG_MAX_SECURE_ERASE_SECTORS = 60  # le32
CFG_MAX_SECURE_ERASE_SEG = 64  # le32
CFG_SECURE_ERASE_SECTOR_ALIGNMENT = 68  # le32
CONFIG_SIZE = 72  # through secure-erase fields (zoned fields are not offered)


@cache
def config_struct(endian: Endian = LE) -> struct.Struct:
    """The whole ``struct virtio_blk_config`` through the secure-erase fields (72 bytes)."""
    return struct.Struct(endian + "QIIHBBIBBHIBxHIIIIIB3xIII")
