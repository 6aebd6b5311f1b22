"""Linux tap devices as network endpoints: frames to and from the host kernel.

:class:`Tap` owns the fd: ``/dev/net/tun`` opened with ``IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR`` so every frame read or written is preceded by a virtio-net header (set to 12
bytes with ``TUNSETVNETHDRSZ``, the VERSION_1 layout). The header passes between kernel and
guest unchanged in meaning: partial checksums and GSO frames cross without any work in
Python. ``TUNSETOFFLOAD`` says what the kernel may hand *us*: it is set from what the peer
accepts (for a device: the guest's negotiated GUEST_CSUM / GUEST_TSO4 / GUEST_TSO6), so the
kernel segments and checksums for a guest that cannot. In the other direction the kernel
accepts every valid offload we write, which is why the device offers CSUM and HOST_TSO4/6.

:class:`TapBackend` links a tap to any :class:`~pyvirtio.device.net.endpoint.NetEndpoint`
(a :class:`~pyvirtio.device.net.NetDevice` directly, or a switch port) through a reactor:

* readable tap -> read up to ``budget`` frames into one bounce buffer, hand each to the
  peer, publish the batch with one ``flush_rx``. If the peer is BUSY (guest has no receive
  buffers) the frame is kept and reading stops until the peer calls ``peer_ready``: the
  kernel's queue holds (and eventually drops) the rest, not us.
* peer sends -> one ``writev`` of header + the frame's segments (zero-copy from guest
  memory). EAGAIN -> BUSY, and ``peer_ready`` once the fd is writable again.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct

from pyvirtio.core.reactor import Reactor
from pyvirtio.device.net.endpoint import (
    ALL_OFFLOADS,
    Delivery,
    Frame,
    FrameSink,
    NetEndpoint,
    Offload,
    frame_bytes,
)
from pyvirtio.errors import LocalError
from pyvirtio.spec import net as N
from pyvirtio.spec.net import NetHdr

log = logging.getLogger("pyvirtio.device.net.tap")

TUN_PATH = "/dev/net/tun"
# ioctl numbers from linux/if_tun.h (_IOW('T', n, int) = 0x400454xx on every Linux ABI we run)
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, flags, union padding
_INT = struct.Struct("i")

#: largest frame the kernel hands a tap reader: a 64 KiB GSO packet plus headers
READ_BUFFER = 65536 + 256
#: frames handed on per readable event before yielding to the loop
DEFAULT_BUDGET = 64
#: writev takes at most IOV_MAX (1024) buffers; frames with more segments are gathered
MAX_IOV = 1000

_HDR = N.net_hdr_mrg_struct()


def tun_offload_flags(offloads: Offload) -> int:
    """``TUN_F_*`` for ``offloads``; TSO only together with CSUM, as the kernel requires."""
    flags = 0
    if offloads & Offload.CSUM:
        flags |= TUN_F_CSUM
        if offloads & Offload.TSO4:
            flags |= TUN_F_TSO4
        if offloads & Offload.TSO6:
            flags |= TUN_F_TSO6
    return flags


class Tap:
    """A tap fd with the virtio-net header enabled (non-blocking, close-on-exec)."""

    def __init__(self, fd: int, name: str, vnet_hdr_size: int = N.NET_HDR_SIZE) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr_size = vnet_hdr_size
        self.offload_flags = 0

    @classmethod
    def open(cls, name: str = "", *, vnet_hdr_size: int = N.NET_HDR_SIZE,
             path: str = TUN_PATH) -> Tap:
        """Create (or attach to) tap ``name`` ("" lets the kernel pick tapN) in the calling
        process's network namespace."""
        if len(name.encode()) >= IFNAMSIZ:
            raise LocalError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = _IFREQ.pack(name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            res = fcntl.ioctl(fd, TUNSETIFF, ifr)
            actual = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
            tap = cls(fd, actual, vnet_hdr_size)
            tap._configure()
        except BaseException:
            os.close(fd)
            raise
        return tap

    @classmethod
    def from_fd(cls, fd: int, *, vnet_hdr_size: int = N.NET_HDR_SIZE) -> Tap:
        """Adopt a tap fd opened elsewhere (e.g. in another network namespace and passed
        over a unix socket). It must have been created with IFF_TAP and IFF_VNET_HDR."""
        res = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
        raw_name, flags = _IFREQ.unpack(res)
        if not flags & IFF_TAP or not flags & IFF_VNET_HDR or not flags & IFF_NO_PI:
            raise LocalError(f"fd {fd} is not a tap with IFF_NO_PI|IFF_VNET_HDR "
                             f"(flags 0x{flags:x})")
        os.set_blocking(fd, False)
        tap = cls(fd, raw_name.rstrip(b"\0").decode(), vnet_hdr_size)
        tap._configure()
        return tap

    def _configure(self) -> None:
        fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, _INT.pack(self.vnet_hdr_size))
        self.set_offload(Offload.NONE)

    def set_offload(self, offloads: Offload) -> None:
        """Tell the kernel which offloads frames it hands us may carry (TUNSETOFFLOAD)."""
        flags = tun_offload_flags(offloads)
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        self.offload_flags = flags

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Tap({self.name}, fd={self.fd})"


class TapBackend(NetEndpoint):
    """Carries frames between a :class:`Tap` and its peer endpoint, driven by ``reactor``.

    ``capture`` sees every frame in both directions. Counters: ``rx_*`` are frames read from
    the kernel and delivered to the peer, ``tx_*`` frames written to the kernel.
    """

    def __init__(self, tap: Tap, reactor: Reactor, *, budget: int = DEFAULT_BUDGET,
                 capture: FrameSink | None = None, name: str | None = None) -> None:
        self.tap = tap
        self.reactor = reactor
        self.budget = budget
        self.capture = capture
        self.name = name or tap.name
        self._buf = bytearray(tap.vnet_hdr_size + READ_BUFFER)
        self._view = memoryview(self._buf)
        self._held: tuple[NetHdr, bytes] | None = None  # a frame the peer was busy for
        self._reading = False
        self._writer_armed = False
        self._in_read = False
        self.closed = False
        self.rx_frames = self.rx_bytes = self.rx_dropped = 0
        self.tx_frames = self.tx_bytes = self.tx_errors = 0
        self.last_error: str | None = None

    # ---- wiring -------------------------------------------------------------------------

    def connect(self, peer: NetEndpoint | None) -> None:
        super().connect(peer)
        if peer is None:
            self._stop_reading()
            return
        self.peer_offloads_changed()
        self._start_reading()

    def peer_offloads_changed(self) -> None:
        if self.closed:
            return
        offloads = self.peer.rx_offloads() if self.peer is not None else Offload.NONE
        self.tap.set_offload(offloads & ALL_OFFLOADS)

    def rx_offloads(self) -> Offload:
        return ALL_OFFLOADS  # the kernel takes any valid partial checksum or TCP GSO frame

    def _start_reading(self) -> None:
        if not self._reading and not self.closed:
            self.reactor.add_reader(self.tap.fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self.reactor.remove_reader(self.tap.fd)
            self._reading = False

    def close(self) -> None:
        """Stop watching the fd and close the tap (the kernel deletes a non-persistent tap)."""
        if self.closed:
            return
        self._stop_reading()
        if self._writer_armed:
            self.reactor.remove_writer(self.tap.fd)
            self._writer_armed = False
        self.closed = True
        self.tap.close()

    # ---- kernel -> peer -----------------------------------------------------------------

    def _offer(self, hdr: NetHdr, frame: Frame, length: int) -> Delivery:
        peer = self.peer
        if peer is None:
            self.rx_dropped += 1
            return Delivery.DROPPED
        result = peer.receive(hdr, frame, length, flush=False)
        if result == Delivery.DELIVERED:
            self.rx_frames += 1
            self.rx_bytes += length
            if self.capture is not None:
                self.capture.write_frame(frame, length)
        elif result == Delivery.DROPPED:
            self.rx_dropped += 1
        return result

    def _on_readable(self) -> None:
        if self._in_read or self._held is not None or self.closed:
            return
        self._in_read = True
        hsize = self.tap.vnet_hdr_size
        view = self._view
        try:
            for _ in range(self.budget):
                try:
                    n = os.readv(self.tap.fd, [self._buf])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno == errno.EINTR:
                        continue
                    self.last_error = f"{self.name}: read failed: {exc}"
                    log.warning("%s", self.last_error)
                    self._stop_reading()
                    break
                if n < hsize:
                    continue
                flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = (
                    _HDR.unpack_from(self._buf, 0))
                hdr = NetHdr(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)
                frame = view[hsize:n]
                if self._offer(hdr, (frame,), n - hsize) == Delivery.BUSY:
                    self._held = (hdr, bytes(frame))
                    self._stop_reading()
                    break
        finally:
            self._in_read = False
            if self.peer is not None:
                self.peer.flush_rx()

    def peer_ready(self) -> None:
        """The peer has room again: deliver the held frame, then resume reading."""
        if self.closed:
            return
        held = self._held
        if held is not None:
            hdr, data = held
            result = self._offer(hdr, (data,), len(data))
            if self.peer is not None:
                self.peer.flush_rx()
            if result == Delivery.BUSY:
                return
            self._held = None
        self._start_reading()

    # ---- peer -> kernel -----------------------------------------------------------------

    def receive(self, hdr: NetHdr, frame: Frame, length: int, *,
                flush: bool = True) -> Delivery:
        if self.closed:
            return Delivery.DROPPED
        head = _HDR.pack(*hdr, 0)[: self.tap.vnet_hdr_size]
        iov: list[bytes | bytearray | memoryview] = [head]
        if len(frame) < MAX_IOV:
            iov.extend(frame)
        else:
            iov.append(frame_bytes(frame, length))
        try:
            written = os.writev(self.tap.fd, iov)
        except BlockingIOError:
            if not self._writer_armed:
                self.reactor.add_writer(self.tap.fd, self._on_writable)
                self._writer_armed = True
            return Delivery.BUSY
        except OSError as exc:
            # EIO: interface down; EINVAL: the kernel rejected the header. Either way this
            # frame is lost, the link is not.
            self.tx_errors += 1
            self.last_error = f"{self.name}: write of {length}-byte frame failed: {exc}"
            if self.tx_errors <= 10:
                log.warning("%s", self.last_error)
            return Delivery.DROPPED
        if written != len(head) + length:
            self.tx_errors += 1
            self.last_error = f"{self.name}: short write {written} of {len(head) + length}"
            return Delivery.DROPPED
        self.tx_frames += 1
        self.tx_bytes += length
        if self.capture is not None:
            self.capture.write_frame(frame, length)
        return Delivery.DELIVERED

    def _on_writable(self) -> None:
        if self._writer_armed:
            self.reactor.remove_writer(self.tap.fd)
            self._writer_armed = False
        if self.peer is not None:
            self.peer.peer_ready()
