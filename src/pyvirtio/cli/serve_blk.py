"""``pyvirtio serve blk TARGET``: a raw image, or an NBD export, as a virtio-blk disk (QEMU:
vhost-user-blk-pci, UML: ``virtio_uml.device=SOCKET:2``).

TARGET is a file path, or names remote storage (:func:`open_target` maps one to a
back-end): ``nbd://HOST[:PORT]/EXPORT`` and ``nbd+unix:///EXPORT?socket=PATH`` through
libnbd (:mod:`pyvirtio.device.blk.nbd`), ``rbd:POOL/IMAGE[@CONF]`` a Ceph RBD image through
librbd (:mod:`pyvirtio.device.blk.rbd`).

The device outlives its front-ends: a guest that goes away (even killed) leaves the device
reset and the next one may connect. With the INFLIGHT_SHMFD protocol feature (on unless
``--no-inflight``) a QEMU front-end started with ``-chardev socket,...,reconnect=1`` also
survives this server being killed: restarted on the same socket, the server resubmits what
was in flight, on split and packed rings alike (for a packed ring it also takes the ring's
positions from the region, since QEMU 7.2 restarts it as a fresh ring; see
:mod:`pyvirtio.transport.vhost_user.inflight`).

Shutdown on SIGINT/SIGTERM is clean: connections closed, the image flushed (fdatasync) and
closed, the socket file removed. ``--stats-file`` gets the counters as JSON at exit and on
SIGUSR1 (the benchmark reads them between runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
from typing import Any

from pyvirtio.cli.serve import (
    add_poll_option,
    attach_instructions,
    make_hostile,
    poll_max,
    run_servers,
    transport_features,
)
from pyvirtio.core.reactor import Reactor
from pyvirtio.device.blk import BlkBackend, BlkDevice
from pyvirtio.device.blk.nbd import NbdBackend, is_nbd_target
from pyvirtio.device.blk.rbd import PREFIX as RBD_PREFIX
from pyvirtio.device.blk.rbd import RbdBackend
from pyvirtio.errors import LocalError
from pyvirtio.io.inflight import inflight_extensions
from pyvirtio.io.loop import EventLoop
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids

log = logging.getLogger("pyvirtio.cli.serve_blk")


def register(kinds: Any, common: argparse.ArgumentParser) -> None:
    p = kinds.add_parser(
        "blk", parents=[common], help="block device (virtio-blk) on a raw image, NBD or RBD",
        description="Serve a raw image file (or a host block device), an NBD export or a "
        "Ceph RBD image as a virtio-blk disk. For a file, reads and writes go with "
        "preadv/pwritev straight between the image and guest memory; discard and "
        "write-zeroes punch holes in the image. For NBD, libnbd moves the data straight "
        "between the server and guest memory, many requests in flight; FLUSH, DISCARD and "
        "WRITE_ZEROES are offered only if the export supports them, a read-only export is "
        "served read-only, and a lost connection is re-established while requests wait "
        "(see --reconnect-timeout). For RBD, librbd's asynchronous calls serve many "
        "requests at once, their completions handed to the event loop.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="TARGET forms:\n"
        "  PATH                              a raw image file or a host block device\n"
        "  nbd://HOST[:PORT]/EXPORT          an NBD export over TCP (default port 10809)\n"
        "  nbd+unix:///EXPORT?socket=PATH    an NBD export over a unix socket\n"
        "  (nbds:// and nbds+unix:// are the same with TLS; an empty EXPORT is the\n"
        "  server's default export)\n"
        "  rbd:POOL/IMAGE[@CEPH_CONF]        a Ceph RBD image through librbd (python3-rbd);\n"
        "                                    also rbd:POOL/NAMESPACE/IMAGE",
    )
    p.add_argument("image", metavar="TARGET",
                   help="raw image file or block device, an NBD URI or a Ceph RBD image "
                   "(forms below)")
    p.add_argument("--socket", required=True, metavar="PATH", help="unix socket to listen on")
    p.add_argument("--readonly", action="store_true",
                   help="offer VIRTIO_BLK_F_RO and refuse every modification (IOERR)")
    p.add_argument("--queues", type=int, default=1, metavar="N",
                   help="number of request queues (N > 1 offers VIRTIO_BLK_F_MQ; default 1)")
    p.add_argument("--direct", action="store_true",
                   help="open the image with O_DIRECT (bypass the host page cache)")
    p.add_argument("--serial", default="pyvirtio-blk", metavar="ID",
                   help="the serial number (GET_ID, up to 20 bytes; default %(default)s)")
    p.add_argument("--writethrough", action="store_true",
                   help="start in writethrough mode: every write is fdatasync'ed before it "
                   "completes (the guest may switch to writeback via CONFIG_WCE)")
    p.add_argument("--no-flush", action="store_true",
                   help="offer no FLUSH: writes are never synced (fast, unsafe on host crash)")
    p.add_argument("--no-discard", action="store_true", help="do not offer DISCARD")
    p.add_argument("--no-write-zeroes", action="store_true", help="do not offer WRITE_ZEROES")
    p.add_argument("--blk-size", type=int, metavar="BYTES",
                   help="logical block size (power of two >= 512; default: the image's)")
    p.add_argument("--mmap-reads", action="store_true",
                   help="serve reads as copies from the image mapped in memory (no system "
                   "call per read; faster). Caveat: an I/O error on an uncached page, or the "
                   "image truncated underneath, then kills the server (SIGBUS) instead of "
                   "failing the request")
    p.add_argument("--no-inflight", action="store_true",
                   help="do not offer INFLIGHT_SHMFD (no resubmission after a crash of this "
                   "server)")
    p.add_argument("--batch-interval", type=float, default=1.0, metavar="MS",
                   help="while a queue is kept busy, look at its ring every MS milliseconds "
                   "instead of waiting for a kick per request (fewer notifications and "
                   "wake-ups for both sides; only kept while it serves at least as fast; "
                   "0: always kick-driven; default %(default)s)")
    add_poll_option(p)
    p.add_argument("--reconnect-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="NBD: how long requests wait for a lost connection to come back "
                   "before they fail with an I/O error (reconnecting goes on; default "
                   "%(default)s)")
    p.add_argument("--stats-file", metavar="PATH",
                   help="write request/notification counters as JSON here at exit and on "
                   "SIGUSR1")
    p.set_defaults(func=run)


def device_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The BlkDevice keyword arguments the command line asks for."""
    return {
        "num_queues": args.queues,
        "read_only": args.readonly,
        "direct": args.direct,
        "serial": args.serial,
        "writeback": not args.writethrough,
        "flush": not args.no_flush,
        "config_wce": not args.no_flush,
        "discard": not args.no_discard,
        "write_zeroes": not args.no_write_zeroes,
        "blk_size": args.blk_size,
        "mmap_reads": args.mmap_reads,
        "batch_interval": args.batch_interval / 1000 if args.batch_interval > 0 else None,
        "queue_size": args.queue_size,
        "transport_features": transport_features(args),
    }


def open_target(target: str, args: argparse.Namespace, reactor: Reactor) -> BlkBackend | str:
    """The storage TARGET names: an NBD URI becomes an :class:`NbdBackend` on ``reactor``,
    ``rbd:POOL/IMAGE[@CONF]`` an :class:`RbdBackend` completing on ``reactor``; anything
    else is a file path, which :class:`BlkDevice` opens itself."""
    if target.startswith(RBD_PREFIX):
        if args.direct or args.mmap_reads:
            raise LocalError("--direct and --mmap-reads apply to image files only")
        return RbdBackend.from_target(target, read_only=args.readonly, reactor=reactor)
    if is_nbd_target(target):
        if args.direct or args.mmap_reads:
            raise LocalError("--direct and --mmap-reads apply to image files only")
        return NbdBackend(target, reactor, connections=args.queues, read_only=args.readonly,
                          reconnect_timeout=args.reconnect_timeout)
    return target


def stats(device: BlkDevice, server: VhostUserServer) -> dict[str, Any]:
    """Counters for the benchmark: requests by type, kicks received, calls sent."""
    s = device.stats
    return {
        "time": time.time(),
        "pid": os.getpid(),
        "reads": s.reads, "writes": s.writes, "flushes": s.flushes, "discards": s.discards,
        "write_zeroes": s.write_zeroes, "get_ids": s.get_ids, "ioerr": s.ioerr,
        "unsupp": s.unsupp, "bytes_read": s.bytes_read, "bytes_written": s.bytes_written,
        "batch_ticks": device.batch_ticks,
        "requests": (s.reads + s.writes + s.flushes + s.discards + s.write_zeroes
                     + s.get_ids + s.ioerr + s.unsupp),
        "kicks": server.kicks, "calls": server.calls,
        # system calls of the event loop (epoll waits) and wake-ups polling saved
        "loop_waits": server.loop.waits, "calls_coalesced": server.loop.coalesced,
        "poll_hits": device.poll_hits, "poll_misses": device.poll_misses,
        "connections": server.accepted,
        "features": device.driver_features,  # what the last driver negotiated (ring format)
        "backend": dict(getattr(device.backend, "counters", dict)()),
    }


def write_stats(path: str, data: dict[str, Any]) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    if args.queues < 1:
        raise SystemExit(f"pyvirtio serve blk: --queues must be at least 1, not {args.queues}")
    if args.batch_interval < 0:
        raise SystemExit("pyvirtio serve blk: --batch-interval must not be negative")
    if args.reconnect_timeout <= 0:
        raise SystemExit("pyvirtio serve blk: --reconnect-timeout must be positive")
    loop = EventLoop()
    backend: BlkBackend | str | None = None
    try:
        backend = open_target(args.image, args, loop)
        device = BlkDevice(backend, **device_kwargs(args))
    except (LocalError, OSError) as exc:
        if isinstance(backend, BlkBackend):
            backend.close()
        loop.close()
        raise SystemExit(f"pyvirtio serve blk: {args.image}: {exc}") from exc
    # Before any socket is bound: a signal from then on shuts down cleanly.
    loop.stop_on_signals()
    device.reactor = loop
    make_hostile(device, args)
    device.poll_max = poll_max(args)
    try:
        server = VhostUserServer(
            args.socket, lambda: device, loop,
            extensions=None if args.no_inflight else inflight_extensions,
        )
    except BaseException:
        device.close()
        if isinstance(backend, BlkBackend):
            backend.close()
        loop.close()
        raise

    dumps = 0

    def dump_stats(*_: object) -> None:
        nonlocal dumps
        if args.stats_file:
            write_stats(args.stats_file, {"seq": dumps, **stats(device, server)})
            dumps += 1

    if args.stats_file:
        signal.signal(signal.SIGUSR1, dump_stats)

    def cleanup() -> None:
        try:
            if not device.read_only:
                device.backend.flush()  # whatever the cache mode, leave the image stable
        except OSError as exc:
            log.warning("flushing %s at exit failed: %s", args.image, exc)
        dump_stats()
        device.close()
        if isinstance(backend, BlkBackend):
            backend.close()  # a back-end made here (the device closes only what it opened)

    mode = "read-only" if device.read_only else "read-write"
    extra = f",num-queues={args.queues}" if args.queues > 1 else ""
    banner = (
        f"pyvirtio: virtio-blk on {args.socket}: {args.image}, "
        f"{device.capacity} sectors ({device.capacity * 512} bytes), {mode}, "
        f"{args.queues} queue{'s' if args.queues > 1 else ''}"
        f"{', O_DIRECT' if args.direct else ''}\n"
        + attach_instructions([server], ids.BLOCK, qemu_extra=extra, packed=args.packed)
        + ("" if args.no_inflight else
           "\nSurviving a restart of this server (INFLIGHT_SHMFD, split or packed rings): "
           "add reconnect=1 to QEMU's -chardev socket")
    )
    return run_servers([server], loop, banner, args, cleanup=cleanup)
