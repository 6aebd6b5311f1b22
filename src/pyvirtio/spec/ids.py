"""Virtio device ids (VIRTIO 1.x §5)."""

NET = 1
BLOCK = 2
CONSOLE = 3
RNG = 4
BALLOON = 5
IOMEM = 6
RPMSG = 7
SCSI = 8
NINEP = 9
MAC80211_WLAN = 10
RPROC_SERIAL = 11
CAIF = 12
MEMORY_BALLOON = 13
GPU = 16
CLOCK = 17
INPUT = 18
VSOCK = 19
CRYPTO = 20
SIGNAL_DIST = 21
PSTORE = 22
IOMMU = 23
MEM = 24
SOUND = 25
FS = 26
PMEM = 27
RPMB = 28
MAC80211_HWSIM = 29
VIDEO_ENCODER = 30
VIDEO_DECODER = 31
SCMI = 32
NITRO_SEC_MOD = 33
I2C_ADAPTER = 34
WATCHDOG = 35
CAN = 36
PARAM_SERV = 38
AUDIO_POLICY = 39
BT = 40
GPIO = 41

NAMES = {
    NET: "net", BLOCK: "block", CONSOLE: "console", RNG: "rng", BALLOON: "balloon",
    SCSI: "scsi", NINEP: "9p", GPU: "gpu", INPUT: "input", VSOCK: "vsock", CRYPTO: "crypto",
    IOMMU: "iommu", MEM: "mem", SOUND: "sound", FS: "fs", PMEM: "pmem", GPIO: "gpio",
    I2C_ADAPTER: "i2c", CAN: "can", BT: "bt",
}


def name(device_id: int) -> str:
    """A short human name, ``'id 42'`` for ids without one."""
    return NAMES.get(device_id, f"id {device_id}")
