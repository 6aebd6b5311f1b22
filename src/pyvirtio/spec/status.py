"""Device status field bits (VIRTIO 1.x §2.1)."""

ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

NAMES = {
    ACKNOWLEDGE: "ACKNOWLEDGE",
    DRIVER: "DRIVER",
    DRIVER_OK: "DRIVER_OK",
    FEATURES_OK: "FEATURES_OK",
    DEVICE_NEEDS_RESET: "DEVICE_NEEDS_RESET",
    FAILED: "FAILED",
}


def describe(status: int) -> str:
    """``'ACKNOWLEDGE|DRIVER'`` for 3; ``'0'`` for a reset device."""
    names = [name for bit, name in NAMES.items() if status & bit]
    rest = status & ~sum(NAMES)
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"
