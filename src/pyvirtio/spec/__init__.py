"""Pure virtio ABI: constants, flags, struct layouts and sizes, named as in the VIRTIO 1.x
specification and the Linux uapi headers. Nothing here does I/O or keeps state.

Byte order is a parameter wherever it matters: VERSION_1 devices are little-endian, the legacy
interface is guest-native. Structs are built per byte order by the ``*_struct(endian)``
helpers; ``LE`` and ``BE`` are the two ``struct`` prefixes.
"""

from typing import Literal

Endian = Literal["<", ">"]
LE: Endian = "<"
BE: Endian = ">"
