"""Classic pcap capture files (the format of tcpdump -w and Wireshark's "pcap"), Ethernet
link type, microsecond timestamps.

File layout: a 24-byte global header (magic 0xa1b2c3d4 in the writer's byte order, version
2.4, zone 0, sigfigs 0, snaplen, link type), then per frame a 16-byte record header
(seconds, microseconds, captured length, original length) and the captured bytes. Frames are
written without their virtio-net header: what a wire would carry. GSO frames larger than the
MTU are written whole (as tcpdump on a host interface shows them) up to ``snaplen``.

:func:`global_header` and :func:`record_header` are the pure encoding;
:class:`PcapWriter` owns the file and implements the
:class:`~pyvirtio.device.net.endpoint.FrameSink` protocol that devices and switch ports call.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Callable, Sequence
from typing import BinaryIO

PCAP_MAGIC = 0xA1B2C3D4  # microsecond resolution
PCAP_VERSION = (2, 4)
LINKTYPE_ETHERNET = 1
#: tcpdump's default snap length: enough for any 64 KiB GSO frame
DEFAULT_SNAPLEN = 262144

_GLOBAL = struct.Struct("=IHHiIII")
_RECORD = struct.Struct("=IIII")


def global_header(snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    """The 24-byte pcap file header (native byte order, as libpcap writes it)."""
    return _GLOBAL.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, snaplen, linktype)


def record_header(timestamp: float, captured: int, original: int) -> bytes:
    """The 16-byte header of one captured frame."""
    sec = int(timestamp)
    usec = round((timestamp - sec) * 1_000_000)
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    return _RECORD.pack(sec, usec, captured, original)


class PcapWriter:
    """Append frames to a pcap file.

    ``target`` is a path (created/truncated) or a binary file object (left open by
    :meth:`close` only if we did not open it). ``clock`` gives wall-clock timestamps
    (``time.time``); tests may pass a fixed one.
    """

    def __init__(self, target: str | os.PathLike[str] | BinaryIO, *,
                 snaplen: int = DEFAULT_SNAPLEN, linktype: int = LINKTYPE_ETHERNET,
                 clock: Callable[[], float] = time.time) -> None:
        if isinstance(target, (str, os.PathLike)):
            self._file: BinaryIO = open(target, "wb")  # closed in close()
            self._owned = True
        else:
            self._file = target
            self._owned = False
        self.snaplen = snaplen
        self.clock = clock
        self.frames = 0
        self.bytes = 0
        self._file.write(global_header(snaplen, linktype))

    def write_frame(self, frame: Sequence[bytes | bytearray | memoryview], length: int) -> None:
        """Record one frame given as segments totalling ``length`` bytes."""
        captured = min(length, self.snaplen)
        write = self._file.write
        write(record_header(self.clock(), captured, length))
        left = captured
        for seg in frame:
            if left <= 0:
                break
            n = len(seg)
            if n <= left:
                write(seg)
                left -= n
            else:
                write(seg[:left])
                left = 0
        self.frames += 1
        self.bytes += length

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Record one frame given as a single buffer."""
        self.write_frame((data,), len(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if self._file.closed:
            return
        self._file.flush()
        if self._owned:
            self._file.close()

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
