"""The ABI in pyvirtio.spec equals the VIRTIO 1.x specification and Linux's uapi headers.

Expected values are written out here from the spec, not derived from pyvirtio's helpers.
"""

from __future__ import annotations

import struct

import pytest

from pyvirtio.spec import BE, LE, balloon, blk, console, mmio, net, packed, pci, split
from pyvirtio.spec import features as F
from pyvirtio.spec import status as ST

POWERS_OF_TWO = [1 << k for k in range(16)]  # 1 .. 32768


def linux_vring_size(num: int, align: int) -> int:
    """Linux include/uapi/linux/virtio_ring.h vring_size(), transcribed."""
    return ((16 * num + 2 * (3 + num) + align - 1) & ~(align - 1)) + 2 * 3 + 8 * num


@pytest.mark.parametrize("num", POWERS_OF_TWO)
def test_legacy_vring_size_and_offsets_equal_linux_vring_size(num: int) -> None:
    layout = split.LegacyLayout(num, 4096)
    assert split.vring_size(num, 4096) == linux_vring_size(num, 4096)
    assert layout.size == linux_vring_size(num, 4096)
    assert layout.desc == 0
    assert layout.avail == 16 * num
    # used starts at the first 4096 boundary after avail's flags, idx, ring[num], used_event
    assert layout.used == (16 * num + 2 * (3 + num) + 4095) & ~4095
    assert layout.used % 4096 == 0
    assert layout.used + 4 + 8 * num + 2 == layout.size


@pytest.mark.parametrize("num", POWERS_OF_TWO)
def test_split_ring_areas_follow_the_virtio_1_layout(num: int) -> None:
    assert split.desc_table_size(num) == 16 * num
    assert split.avail_size(num) == 2 + 2 + 2 * num + 2
    assert split.used_size(num) == 2 + 2 + 8 * num + 2
    assert split.used_event_offset(num) == 4 + 2 * num  # avail + 4 + 2*num
    assert split.avail_event_offset(num) == 4 + 8 * num  # used + 4 + 8*num
    layout = split.LegacyLayout(num)
    assert layout.avail + split.used_event_offset(num) == 16 * num + 4 + 2 * num
    assert layout.used % 4 == 0


@pytest.mark.parametrize("align", [4, 16, 64, 4096, 65536])
def test_vring_size_honours_other_alignments(align: int) -> None:
    for num in (1, 3 + 1, 256, 1024):
        assert split.vring_size(num, align) == linux_vring_size(num, align)


def test_queue_sizes_are_powers_of_two_up_to_32768() -> None:
    assert all(split.is_valid_queue_size(n) for n in POWERS_OF_TWO)
    for bad in (0, 3, 6, 100, 32767, 65536, -1):
        assert not split.is_valid_queue_size(bad)
    # packed queues may be any size in 1..32768
    assert packed.is_valid_queue_size(3) and packed.is_valid_queue_size(32768)
    assert not packed.is_valid_queue_size(0) and not packed.is_valid_queue_size(32769)


def test_vring_need_event_is_the_linux_window_rule() -> None:
    # notify iff event_idx is in [old, new) modulo 2^16
    assert split.vring_need_event(0, 1, 0)
    assert not split.vring_need_event(1, 1, 0)
    assert split.vring_need_event(5, 10, 3)
    assert not split.vring_need_event(10, 10, 3)
    assert not split.vring_need_event(2, 10, 3)
    assert split.vring_need_event(0xFFFF, 2, 0xFFFE)  # across the wrap
    assert split.vring_need_event(0, 2, 0xFFFE)
    assert not split.vring_need_event(2, 2, 0xFFFE)
    assert not split.vring_need_event(7, 7, 7)  # nothing moved


@pytest.mark.parametrize(
    ("helper", "size"),
    [
        (split.desc_struct, 16),
        (split.used_elem_struct, 8),
        (split.u16_struct, 2),
        (packed.desc_struct, 16),
        (packed.event_suppress_struct, 4),
        (blk.outhdr_struct, 16),
        (blk.discard_write_zeroes_struct, 16),
        (blk.config_struct, 72),
        (net.net_hdr_struct, 10),
        (net.net_hdr_mrg_struct, 12),
        (console.control_struct, 8),
        (console.config_struct, 12),
    ],
)
def test_struct_sizes_equal_the_spec_in_both_byte_orders(helper, size: int) -> None:
    assert helper(LE).size == size
    assert helper(BE).size == size


def test_fixed_struct_sizes_equal_the_spec() -> None:
    assert split.VRING_DESC_SIZE == 16
    assert split.VRING_USED_ELEM_SIZE == 8
    assert blk.OUTHDR_SIZE == 16
    assert blk.DISCARD_WRITE_ZEROES_SIZE == 16
    assert blk.CONFIG_SIZE == 72
    assert net.NET_HDR_SIZE_LEGACY == 10 and net.NET_HDR_SIZE == 12
    assert net.net_hdr_size(version_1=False, mrg_rxbuf=False) == 10
    assert net.net_hdr_size(version_1=True, mrg_rxbuf=False) == 12
    assert net.net_hdr_size(version_1=False, mrg_rxbuf=True) == 12
    assert console.CONTROL_SIZE == 8
    assert console.CONFIG_SIZE == 12
    assert pci.VIRTIO_PCI_CAP.size == pci.VIRTIO_PCI_CAP_SIZE == 16
    assert pci.VIRTIO_PCI_NOTIFY_CAP.size == pci.VIRTIO_PCI_NOTIFY_CAP_SIZE == 20
    assert balloon.STAT.size == balloon.STAT_SIZE == 10
    assert balloon.PFN.size == 4
    assert packed.PACKED_DESC_SIZE == 16 and packed.EVENT_SUPPRESS_SIZE == 4


def test_descriptor_struct_bytes_in_both_byte_orders() -> None:
    values = (0x0102030405060708, 0x0A0B0C0D, 0x0E0F, 0x1011)
    assert split.desc_struct(LE).pack(*values) == bytes.fromhex(
        "0807060504030201" "0d0c0b0a" "0f0e" "1110")
    assert split.desc_struct(BE).pack(*values) == bytes.fromhex(
        "0102030405060708" "0a0b0c0d" "0e0f" "1011")


def test_used_element_and_u16_bytes_in_both_byte_orders() -> None:
    assert split.used_elem_struct(LE).pack(0x11223344, 0x55667788) == bytes.fromhex(
        "44332211" "88776655")
    assert split.used_elem_struct(BE).pack(0x11223344, 0x55667788) == bytes.fromhex(
        "11223344" "55667788")
    assert split.u16_struct(LE).pack(0xBEEF) == b"\xef\xbe"
    assert split.u16_struct(BE).pack(0xBEEF) == b"\xbe\xef"


def test_blk_outhdr_and_discard_segment_bytes_in_both_byte_orders() -> None:
    # type, ioprio, sector
    assert blk.outhdr_struct(LE).pack(1, 2, 0x0102030405060708) == bytes.fromhex(
        "01000000" "02000000" "0807060504030201")
    assert blk.outhdr_struct(BE).pack(1, 2, 0x0102030405060708) == bytes.fromhex(
        "00000001" "00000002" "0102030405060708")
    # sector, num_sectors, flags
    assert blk.discard_write_zeroes_struct(LE).pack(9, 8, 1) == bytes.fromhex(
        "0900000000000000" "08000000" "01000000")
    assert blk.discard_write_zeroes_struct(BE).pack(9, 8, 1) == bytes.fromhex(
        "0000000000000009" "00000008" "00000001")


def test_net_header_bytes_in_both_byte_orders() -> None:
    fields = (1, 4, 0x0102, 0x0304, 0x0506, 0x0708)  # flags, gso_type, hdr_len, gso_size, ...
    assert net.net_hdr_struct(LE).pack(*fields) == bytes.fromhex("0104" "0201040306050807")
    assert net.net_hdr_struct(BE).pack(*fields) == bytes.fromhex("0104" "0102030405060708")
    assert net.net_hdr_mrg_struct(LE).pack(*fields, 3)[10:] == b"\x03\x00"
    assert net.net_hdr_mrg_struct(BE).pack(*fields, 3)[10:] == b"\x00\x03"


def test_console_control_and_packed_desc_bytes() -> None:
    assert console.control_struct(LE).pack(1, 6, 1) == bytes.fromhex("01000000" "0600" "0100")
    assert console.control_struct(BE).pack(1, 6, 1) == bytes.fromhex("00000001" "0006" "0001")
    # pvirtq_desc: addr, len, id, flags
    assert packed.desc_struct(LE).pack(0x10, 0x20, 3, 0x8080) == bytes.fromhex(
        "1000000000000000" "20000000" "0300" "8080")
    assert packed.event_suppress_struct(BE).pack(0x8001, 2) == bytes.fromhex("8001" "0002")


BLK_CONFIG_FIELDS = [
    # (offset constant, width, value): every field gets a distinct value
    (blk.CFG_CAPACITY, 8, 0x0102030405060708),
    (blk.CFG_SIZE_MAX, 4, 0x11111111),
    (blk.CFG_SEG_MAX, 4, 0x22222222),
    (blk.CFG_GEOMETRY_CYLINDERS, 2, 0x3333),
    (blk.CFG_GEOMETRY_HEADS, 1, 0x44),
    (blk.CFG_GEOMETRY_SECTORS, 1, 0x55),
    (blk.CFG_BLK_SIZE, 4, 0x66666666),
    (blk.CFG_PHYSICAL_BLOCK_EXP, 1, 0x77),
    (blk.CFG_ALIGNMENT_OFFSET, 1, 0x78),
    (blk.CFG_MIN_IO_SIZE, 2, 0x7979),
    (blk.CFG_OPT_IO_SIZE, 4, 0x7A7A7A7A),
    (blk.CFG_WRITEBACK, 1, 0x7B),
    (blk.CFG_NUM_QUEUES, 2, 0x7C7C),
    (blk.CFG_MAX_DISCARD_SECTORS, 4, 0x7D7D7D7D),
    (blk.CFG_MAX_DISCARD_SEG, 4, 0x7E7E7E7E),
    (blk.CFG_DISCARD_SECTOR_ALIGNMENT, 4, 0x7F7F7F7F),
    (blk.CFG_MAX_WRITE_ZEROES_SECTORS, 4, 0x80808080),
    (blk.CFG_MAX_WRITE_ZEROES_SEG, 4, 0x81818181),
    (blk.CFG_WRITE_ZEROES_MAY_UNMAP, 1, 0x82),
    (blk.CFG_MAX_SECURE_ERASE_SECTORS, 4, 0x83838383),
    (blk.CFG_MAX_SECURE_ERASE_SEG, 4, 0x84848484),
    (blk.CFG_SECURE_ERASE_SECTOR_ALIGNMENT, 4, 0x85858585),
]


def test_blk_config_field_offsets_equal_struct_virtio_blk_config() -> None:
    # The uapi struct, offset by offset.
    assert [off for off, _, _ in BLK_CONFIG_FIELDS] == [
        0, 8, 12, 16, 18, 19, 20, 24, 25, 26, 28, 32, 34, 36, 40, 44, 48, 52, 56, 60, 64, 68]
    for endian, order in ((LE, "little"), (BE, "big")):
        raw = blk.config_struct(endian).pack(*[v for _, _, v in BLK_CONFIG_FIELDS])
        assert len(raw) == 72
        for off, width, value in BLK_CONFIG_FIELDS:
            assert int.from_bytes(raw[off : off + width], order) == value, off
        # the padding bytes (unused at 33, unused1[3] at 57..59) are zero
        assert raw[33] == 0 and raw[57:60] == b"\0\0\0"


def test_net_config_field_offsets_equal_struct_virtio_net_config() -> None:
    assert (net.CFG_MAC, net.CFG_STATUS, net.CFG_MAX_VIRTQUEUE_PAIRS, net.CFG_MTU) == (0, 6, 8, 10)
    assert (net.CFG_SPEED, net.CFG_DUPLEX, net.CFG_RSS_MAX_KEY_SIZE) == (12, 16, 17)
    assert net.CFG_RSS_MAX_INDIRECTION_TABLE_LENGTH == 18
    assert net.CFG_SUPPORTED_HASH_TYPES == 20 and net.CONFIG_SIZE == 24


def test_console_and_balloon_config_offsets() -> None:
    assert (console.CFG_COLS, console.CFG_ROWS, console.CFG_MAX_NR_PORTS,
            console.CFG_EMERG_WR) == (0, 2, 4, 8)
    raw = console.config_struct(LE).pack(80, 25, 4, 0x41)
    assert raw == bytes.fromhex("5000" "1900" "04000000" "41000000")
    assert (balloon.CFG_NUM_PAGES, balloon.CFG_ACTUAL, balloon.CONFIG_SIZE) == (0, 4, 16)
    assert balloon.STAT.pack(4, 0x0102030405060708) == bytes.fromhex("0400" "0807060504030201")


def test_console_queue_numbering() -> None:
    assert [console.port_receiveq(p) for p in range(3)] == [0, 4, 6]
    assert [console.port_transmitq(p) for p in range(3)] == [1, 5, 7]
    assert console.num_queues(4, multiport=True) == 10
    assert console.num_queues(4, multiport=False) == 2


def test_pci_capability_bytes() -> None:
    # cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2], offset, length
    assert pci.VIRTIO_PCI_CAP.pack(0x09, 0x50, 16, 1, 4, 0, 0x1000, 0x38) == bytes.fromhex(
        "09501001" "0400" "0000" "00100000" "38000000")
    raw = pci.VIRTIO_PCI_NOTIFY_CAP.pack(0x09, 0, 20, 2, 4, 0, 0x3000, 0x1000, 4)
    assert raw[16:] == b"\x04\0\0\0"  # notify_off_multiplier


def test_pci_register_offsets() -> None:
    legacy = (pci.VIRTIO_PCI_HOST_FEATURES, pci.VIRTIO_PCI_GUEST_FEATURES,
              pci.VIRTIO_PCI_QUEUE_PFN, pci.VIRTIO_PCI_QUEUE_NUM, pci.VIRTIO_PCI_QUEUE_SEL,
              pci.VIRTIO_PCI_QUEUE_NOTIFY, pci.VIRTIO_PCI_STATUS, pci.VIRTIO_PCI_ISR,
              pci.VIRTIO_MSI_CONFIG_VECTOR, pci.VIRTIO_MSI_QUEUE_VECTOR)
    assert legacy == (0, 4, 8, 12, 14, 16, 18, 19, 20, 22)
    assert pci.legacy_config_offset(False) == 20 and pci.legacy_config_offset(True) == 24
    common = (pci.VIRTIO_PCI_COMMON_DFSELECT, pci.VIRTIO_PCI_COMMON_DF,
              pci.VIRTIO_PCI_COMMON_GFSELECT, pci.VIRTIO_PCI_COMMON_GF,
              pci.VIRTIO_PCI_COMMON_MSIX, pci.VIRTIO_PCI_COMMON_NUMQ,
              pci.VIRTIO_PCI_COMMON_STATUS, pci.VIRTIO_PCI_COMMON_CFGGENERATION,
              pci.VIRTIO_PCI_COMMON_Q_SELECT, pci.VIRTIO_PCI_COMMON_Q_SIZE,
              pci.VIRTIO_PCI_COMMON_Q_MSIX, pci.VIRTIO_PCI_COMMON_Q_ENABLE,
              pci.VIRTIO_PCI_COMMON_Q_NOFF, pci.VIRTIO_PCI_COMMON_Q_DESCLO,
              pci.VIRTIO_PCI_COMMON_Q_AVAILLO, pci.VIRTIO_PCI_COMMON_Q_USEDLO,
              pci.VIRTIO_PCI_COMMON_Q_NDATA, pci.VIRTIO_PCI_COMMON_Q_RESET)
    assert common == (0, 4, 8, 12, 16, 18, 20, 21, 22, 24, 26, 28, 30, 32, 40, 48, 56, 58)
    assert pci.VIRTIO_PCI_COMMON_CFG_SIZE == 56 and pci.VIRTIO_PCI_COMMON_CFG_SIZE_V12 == 60
    assert pci.modern_device_id(1) == 0x1041 and pci.LEGACY_DEVICE_IDS[2] == 0x1001


def test_mmio_register_offsets() -> None:
    regs = (mmio.VIRTIO_MMIO_MAGIC_VALUE, mmio.VIRTIO_MMIO_VERSION, mmio.VIRTIO_MMIO_DEVICE_ID,
            mmio.VIRTIO_MMIO_VENDOR_ID, mmio.VIRTIO_MMIO_DEVICE_FEATURES,
            mmio.VIRTIO_MMIO_DEVICE_FEATURES_SEL, mmio.VIRTIO_MMIO_DRIVER_FEATURES,
            mmio.VIRTIO_MMIO_DRIVER_FEATURES_SEL, mmio.VIRTIO_MMIO_QUEUE_SEL,
            mmio.VIRTIO_MMIO_QUEUE_NUM_MAX, mmio.VIRTIO_MMIO_QUEUE_NUM,
            mmio.VIRTIO_MMIO_QUEUE_READY, mmio.VIRTIO_MMIO_QUEUE_NOTIFY,
            mmio.VIRTIO_MMIO_INTERRUPT_STATUS, mmio.VIRTIO_MMIO_INTERRUPT_ACK,
            mmio.VIRTIO_MMIO_STATUS, mmio.VIRTIO_MMIO_QUEUE_DESC_LOW,
            mmio.VIRTIO_MMIO_QUEUE_AVAIL_LOW, mmio.VIRTIO_MMIO_QUEUE_USED_LOW,
            mmio.VIRTIO_MMIO_CONFIG_GENERATION, mmio.VIRTIO_MMIO_CONFIG)
    assert regs == (0, 4, 8, 0xC, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60,
                    0x64, 0x70, 0x80, 0x90, 0xA0, 0xFC, 0x100)
    assert struct.pack("<I", mmio.VIRTIO_MMIO_MAGIC) == b"virt"


def test_feature_and_status_bits() -> None:
    assert (F.NOTIFY_ON_EMPTY, F.ANY_LAYOUT, F.INDIRECT_DESC, F.EVENT_IDX) == (24, 27, 28, 29)
    assert (F.VERSION_1, F.ACCESS_PLATFORM, F.RING_PACKED, F.IN_ORDER) == (32, 33, 34, 35)
    assert (F.ORDER_PLATFORM, F.SR_IOV, F.NOTIFICATION_DATA, F.RING_RESET) == (36, 37, 38, 40)
    assert (ST.ACKNOWLEDGE, ST.DRIVER, ST.DRIVER_OK, ST.FEATURES_OK) == (1, 2, 4, 8)
    assert (ST.DEVICE_NEEDS_RESET, ST.FAILED) == (64, 128)
    assert ST.describe(0) == "0"
    assert ST.describe(3) == "ACKNOWLEDGE|DRIVER"
    assert F.bits(F.bit(F.VERSION_1) | F.bit(F.EVENT_IDX)) == [29, 32]
    assert F.has(1 << 32, F.VERSION_1) and not F.has(1 << 32, F.EVENT_IDX)
    assert F.mask(F.VERSION_1, F.EVENT_IDX, F.EVENT_IDX) == (1 << 32) | (1 << 29)


def test_device_feature_names_come_from_the_spec_constants() -> None:
    names = F.names_in(vars(blk), "VIRTIO_BLK_F_")
    assert names[blk.VIRTIO_BLK_F_FLUSH] == "FLUSH" and names[blk.VIRTIO_BLK_F_MQ] == "MQ"
    assert len(names) == len({k for k in vars(blk) if k.startswith("VIRTIO_BLK_F_")})
    assert F.names_in(vars(net), "VIRTIO_NET_F_")[net.VIRTIO_NET_F_HOST_TSO4] == "HOST_TSO4"
    assert F.names_in(vars(console), "VIRTIO_CONSOLE_F_", strip="VIRTIO_") == {
        0: "CONSOLE_F_SIZE", 1: "CONSOLE_F_MULTIPORT", 2: "CONSOLE_F_EMERG_WRITE"}


def test_ring_flag_values() -> None:
    assert (split.VRING_DESC_F_NEXT, split.VRING_DESC_F_WRITE,
            split.VRING_DESC_F_INDIRECT) == (1, 2, 4)
    assert split.VRING_AVAIL_F_NO_INTERRUPT == 1 and split.VRING_USED_F_NO_NOTIFY == 1
    assert (packed.VRING_PACKED_DESC_F_AVAIL, packed.VRING_PACKED_DESC_F_USED) == (7, 15)


def test_blk_request_types_and_feature_bits() -> None:
    assert (blk.VIRTIO_BLK_T_IN, blk.VIRTIO_BLK_T_OUT, blk.VIRTIO_BLK_T_FLUSH,
            blk.VIRTIO_BLK_T_GET_ID, blk.VIRTIO_BLK_T_DISCARD,
            blk.VIRTIO_BLK_T_WRITE_ZEROES) == (0, 1, 4, 8, 11, 13)
    assert (blk.VIRTIO_BLK_F_SEG_MAX, blk.VIRTIO_BLK_F_BLK_SIZE, blk.VIRTIO_BLK_F_FLUSH,
            blk.VIRTIO_BLK_F_MQ, blk.VIRTIO_BLK_F_DISCARD,
            blk.VIRTIO_BLK_F_WRITE_ZEROES) == (2, 6, 9, 12, 13, 14)
    assert (net.VIRTIO_NET_F_MAC, net.VIRTIO_NET_F_MRG_RXBUF, net.VIRTIO_NET_F_STATUS,
            net.VIRTIO_NET_F_CTRL_VQ, net.VIRTIO_NET_F_MQ) == (5, 15, 16, 17, 22)
