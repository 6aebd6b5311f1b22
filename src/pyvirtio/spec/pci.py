"""virtio over PCI: the paper's legacy I/O BAR layout and the VIRTIO 1.x capability layout.

Legacy (BAR0, I/O space; §4.1.4.8 "Legacy Interfaces"): registers at fixed offsets, device
config after them at 20, or at 24 when MSI-X is enabled (two vector registers are inserted).
Legacy registers and config are guest-native endian (little-endian on x86).

Modern (§4.1.4): vendor capabilities in PCI config space point to BAR regions holding the
common configuration, notification area, ISR and device configuration. Little-endian.
"""

from __future__ import annotations

import struct

PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1AF4
PCI_SUBSYSTEM_VENDOR_ID = 0x1AF4
LEGACY_DEVICE_ID_MIN = 0x1000
LEGACY_DEVICE_ID_MAX = 0x103F
MODERN_DEVICE_ID_BASE = 0x1040

# Transitional device ids (legacy PCI device id -> virtio device id is via subsystem id).
LEGACY_DEVICE_IDS = {
    1: 0x1000,  # net
    2: 0x1001,  # block
    5: 0x1002,  # balloon
    3: 0x1003,  # console
    8: 0x1004,  # scsi
    4: 0x1005,  # rng
    9: 0x1009,  # 9p
}


def modern_device_id(virtio_id: int) -> int:
    return MODERN_DEVICE_ID_BASE + virtio_id


# ---- legacy I/O layout (offsets in BAR0) ----
VIRTIO_PCI_HOST_FEATURES = 0  # u32, r: device features bits 0-31
VIRTIO_PCI_GUEST_FEATURES = 4  # u32, rw: driver features bits 0-31
VIRTIO_PCI_QUEUE_PFN = 8  # u32, rw: vring address >> VIRTIO_PCI_QUEUE_ADDR_SHIFT
VIRTIO_PCI_QUEUE_NUM = 12  # u16, r: size of the selected queue (0 = absent)
VIRTIO_PCI_QUEUE_SEL = 14  # u16, rw
VIRTIO_PCI_QUEUE_NOTIFY = 16  # u16, w: queue index
VIRTIO_PCI_STATUS = 18  # u8, rw
VIRTIO_PCI_ISR = 19  # u8, r: reading clears
VIRTIO_MSI_CONFIG_VECTOR = 20  # u16, rw (only with MSI-X enabled)
VIRTIO_MSI_QUEUE_VECTOR = 22  # u16, rw (only with MSI-X enabled)

VIRTIO_PCI_CONFIG_OFF_NO_MSIX = 20
VIRTIO_PCI_CONFIG_OFF_MSIX = 24


def legacy_config_offset(msix_enabled: bool) -> int:
    """Where device-specific config starts in the legacy BAR."""
    return VIRTIO_PCI_CONFIG_OFF_MSIX if msix_enabled else VIRTIO_PCI_CONFIG_OFF_NO_MSIX


VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12
VIRTIO_PCI_VRING_ALIGN = 4096
VIRTIO_MSI_NO_VECTOR = 0xFFFF

# ISR status bits (legacy and modern)
VIRTIO_PCI_ISR_QUEUE = 0x1
VIRTIO_PCI_ISR_CONFIG = 0x2

# ---- modern capabilities ----
PCI_CAP_ID_VNDR = 0x09
PCI_CAP_ID_MSIX = 0x11
PCI_MSIX_FLAGS = 2  # le16 message control, from the MSI-X capability start
PCI_MSIX_FLAGS_ENABLE = 0x8000
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5
VIRTIO_PCI_CAP_SHARED_MEMORY_CFG = 8
VIRTIO_PCI_CAP_VENDOR_CFG = 9

# struct virtio_pci_cap: cap_vndr, cap_next, cap_len, cfg_type, bar, id, padding[2],
# offset (le32), length (le32)
VIRTIO_PCI_CAP = struct.Struct("<BBBBBB2xII")
VIRTIO_PCI_CAP_SIZE = 16
# struct virtio_pci_notify_cap = virtio_pci_cap + notify_off_multiplier (le32)
VIRTIO_PCI_NOTIFY_CAP = struct.Struct("<BBBBBB2xIII")
VIRTIO_PCI_NOTIFY_CAP_SIZE = 20

# struct virtio_pci_common_cfg field offsets
VIRTIO_PCI_COMMON_DFSELECT = 0  # le32 device_feature_select
VIRTIO_PCI_COMMON_DF = 4  # le32 device_feature
VIRTIO_PCI_COMMON_GFSELECT = 8  # le32 driver_feature_select
VIRTIO_PCI_COMMON_GF = 12  # le32 driver_feature
VIRTIO_PCI_COMMON_MSIX = 16  # le16 config_msix_vector
VIRTIO_PCI_COMMON_NUMQ = 18  # le16 num_queues
VIRTIO_PCI_COMMON_STATUS = 20  # u8 device_status
VIRTIO_PCI_COMMON_CFGGENERATION = 21  # u8 config_generation
VIRTIO_PCI_COMMON_Q_SELECT = 22  # le16 queue_select
VIRTIO_PCI_COMMON_Q_SIZE = 24  # le16 queue_size
VIRTIO_PCI_COMMON_Q_MSIX = 26  # le16 queue_msix_vector
VIRTIO_PCI_COMMON_Q_ENABLE = 28  # le16 queue_enable
VIRTIO_PCI_COMMON_Q_NOFF = 30  # le16 queue_notify_off
VIRTIO_PCI_COMMON_Q_DESCLO = 32  # le64 queue_desc
VIRTIO_PCI_COMMON_Q_DESCHI = 36
VIRTIO_PCI_COMMON_Q_AVAILLO = 40  # le64 queue_driver
VIRTIO_PCI_COMMON_Q_AVAILHI = 44
VIRTIO_PCI_COMMON_Q_USEDLO = 48  # le64 queue_device
VIRTIO_PCI_COMMON_Q_USEDHI = 52
VIRTIO_PCI_COMMON_Q_NDATA = 56  # le16 queue_notify_data
VIRTIO_PCI_COMMON_Q_RESET = 58  # le16 queue_reset
VIRTIO_PCI_COMMON_CFG_SIZE = 56  # without the 1.2 notify_data/reset fields
VIRTIO_PCI_COMMON_CFG_SIZE_V12 = 60

# PCI configuration space (type 0 header) offsets the transport needs.
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_STATUS = 0x06
PCI_STATUS_CAP_LIST = 0x10
PCI_REVISION_ID = 0x08
PCI_CLASS_REVISION = 0x08
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_SUBSYSTEM_VENDOR_ID_OFF = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
