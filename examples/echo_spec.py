"""The "uppercase echo" device's ABI, shared by its device and its driver (what pyvirtio
keeps in ``pyvirtio.spec`` for the real device types).

One request queue. A request is a readable buffer of text followed by a writable buffer at
least as long; the device writes the text back upper-cased. Config space is one
little-endian u32, the longest request the device takes. Feature bit 0, REVERSE: the
device also reverses the text.
"""

import struct

#: Not assigned by the VIRTIO spec. On virtio-pci it shows as 1af4:10f0 (0x1040 + id), the
#: first PCI id QEMU leaves free for experimental devices; vhost-user never sends it.
ECHO_ID = 0xB0
REQUESTQ = 0
F_REVERSE = 0
CONFIG = struct.Struct("<I")  # max_len
