"""Helpers for the real-guest tests of the entropy and console devices (issue 3).

* :data:`RING_FEATURES`: the parametrization every guest test runs with (EVENT_IDX and
  INDIRECT_DESC negotiated, then not) and how each front-end is told to turn them off.
* Entropy: a deterministic recorded stream (:func:`recording_rng`), the guest script that
  reads 64 KiB from /dev/hwrng (:data:`HWRNG_SCRIPT`) and the exact proof that the guest got
  a contiguous slice of what the device served (:func:`served_slice`).
* Console: the guest script (:func:`console_script`) and the host ends of its ports
  (:class:`ConsoleClient`, :class:`DataPeer`): hvc0 text both ways and 1 MiB each way on a
  named port, checksummed on both sides.
* :class:`CliServer`: ``python -m pyvirtio ... serve ...`` as a child process, its banner
  parsed into the QEMU/UML arguments it printed; always stopped.

Every thread and socket here has a timeout, and every object has a ``close``/``stop`` the
tests call in ``finally`` blocks or fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.serve_process import ServeProcess
from helpers.vhost_user import RecordingRngDevice
from pyvirtio.device.console import ConsoleDevice
from pyvirtio.guest import UmlGuest, VhostUserDevice
from pyvirtio.io import unixsock
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import features as F
from pyvirtio.testing.guests import (
    HWRNG_BYTES,
    ConsoleClient,
    NotServed,
    find_served_slice,
    hwrng_script,
)

#: seconds any single wait on a guest or a peer may take
WAIT = 60.0
RING_BITS = F.bit(F.EVENT_IDX) | F.bit(F.INDIRECT_DESC)



# ---- ring features ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RingFeatures:
    """EVENT_IDX and INDIRECT_DESC on or off, for both kinds of front-end.

    UML passes on what the back-end offers, so the back-end simply does not offer them.
    QEMU 7.2's vhost-user-rng acks its own offer whatever the back-end offered, so they are
    also turned off on QEMU's side with the virtio device properties.
    """

    on: bool

    @property
    def transport_features(self) -> int:
        """The device's transport feature offer."""
        return F.bit(F.VERSION_1) | (RING_BITS if self.on else 0)

    @property
    def qemu_device_props(self) -> str:
        """Appended to QEMU's ``-device`` option."""
        return "" if self.on else ",event_idx=off,indirect_desc=off"

    @property
    def cli_args(self) -> list[str]:
        """``pyvirtio serve`` options for the back-end's offer."""
        return [] if self.on else ["--no-event-idx", "--no-indirect"]

    def check_negotiated(self, features: int) -> None:
        """The device's negotiated features have both ring features, or neither."""
        assert features & F.bit(F.VERSION_1), hex(features)
        assert features & RING_BITS == (RING_BITS if self.on else 0), hex(features)

    def check_guest_view(self, bitmap: str) -> None:
        """The guest's /sys/bus/virtio/devices/*/features (a '0'/'1' per bit, bit 0 first)
        agrees."""
        assert bitmap[F.VERSION_1] == "1", bitmap
        want = "1" if self.on else "0"
        assert bitmap[F.EVENT_IDX] == want and bitmap[F.INDIRECT_DESC] == want, bitmap

    def __str__(self) -> str:
        return "ring-features-on" if self.on else "ring-features-off"


RING_FEATURES = pytest.mark.parametrize("ring", [RingFeatures(True), RingFeatures(False)],
                                        ids=str)


def wait_closed(server: VhostUserServer, count: int, timeout: float = 10.0) -> None:
    """Wait until ``count`` front-end connections of ``server`` have ended."""
    deadline = time.monotonic() + timeout
    while len(server.closed_reasons) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(server.closed_reasons) >= count, (
        f"{len(server.closed_reasons)} of {count} front-ends disconnected: "
        f"{server.closed_reasons}")


# ---- entropy ---------------------------------------------------------------------------------

HWRNG_SCRIPT = f"""\
result current $(cat /sys/class/misc/hw_random/rng_current)
result guest_features $(cat /sys/bus/virtio/devices/virtio0/features)
{hwrng_script(HWRNG_BYTES)}"""


def recording_rng(seed: int, **kwargs: object) -> RecordingRngDevice:
    """An entropy device serving a deterministic stream (seeded) that it also records, and
    remembering every feature set it accepted."""
    return RecordingRngDevice(source=random.Random(seed).randbytes, **kwargs)


def served_slice(stream: bytes, results: dict[str, str]) -> int:
    """Where the guest's 64 KiB are in the served ``stream``; fails the test unless they
    are exactly one contiguous slice of it (see pyvirtio.testing.guests)."""
    try:
        return find_served_slice(stream, results, HWRNG_BYTES)
    except NotServed as exc:
        pytest.fail(str(exc))


def check_hwrng(results: dict[str, str], ring: RingFeatures) -> None:
    """What the guest itself reports about its hwrng."""
    assert results["current"] == "virtio_rng.0", results
    # The kernel's hwrng thread stayed asleep while the script read (see HWRNG_SCRIPT).
    thread = results["hwrng_thread"].split()
    assert len(thread) == 5 and thread[1] == thread[3] == "S" and thread[2] == thread[4], results
    ring.check_guest_view(results["guest_features"])


# ---- console ---------------------------------------------------------------------------------

DATA_PORT = "org.pyvirtio.data"
DATA_BYTES = 1 << 20
#: What the guest writes on /dev/hvc0 (raw mode: no output processing, so byte-exact).
GREETING = ("hello from the guest on /dev/hvc0\n"
            "\ttabs, CR LF\r\n, UTF-8: \u017elu\u0165ou\u010dk\u00fd k\u016f\u0148 "
            "\u2603, and ASCII ~!@#$%^&*()_+{}|:<>?\n").encode()
TYPED = b"typed on the host, read by the guest\n"


def console_script(data_port: str = DATA_PORT, size: int = DATA_BYTES, *,
                   linger: bool = False, extra: str = "") -> str:
    """The console check, run in a UML guest: wait for hvc0, report the features and the
    console size, write :data:`GREETING` on hvc0 (raw, so byte-exact), read one line the
    host types, then move ``size`` bytes each way at once through the named port (one
    read-write fd), with sha256 on both directions. ``linger`` keeps the guest up at the end
    (the test then stops it); ``extra`` runs just before the end. Needs
    ``/pyvirtio/greeting`` (see :func:`console_files`).
    """
    return f"""\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
DATA=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "{data_port}" ] && DATA=/dev/${{p##*/}}
done
result data_dev $DATA
result guest_features $(cat /sys/bus/virtio/devices/virtio0/features)
result hvc_size $(stty -F /dev/hvc0 size)
exec 3<>/dev/hvc0
stty raw -echo <&3
cat /pyvirtio/greeting >&3
read -r -t 30 line <&3
result typed "$line"
dd if=/dev/urandom of=/tmp/out bs=65536 count={size // 65536} 2>/dev/null
result out_sha $(sha256sum /tmp/out | cut -d' ' -f1)
exec 4<>$DATA
cat /tmp/out >&4 &
head -c {size} <&4 > /tmp/in
wait
exec 4>&-
result in_bytes $(wc -c < /tmp/in)
result in_sha $(sha256sum /tmp/in | cut -d' ' -f1)
{extra}
result done yes
{"sleep 600" if linger else ""}
"""


def console_files() -> dict[str, bytes]:
    return {"pyvirtio/greeting": GREETING}


class RecordingConsoleDevice(ConsoleDevice):
    """virtio-console remembering every feature set it accepted (a reset forgets them)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.negotiated: list[int] = []

    def on_features_ok(self) -> None:
        super().on_features_ok()
        self.negotiated.append(self.driver_features)


class DataPeer:
    """The host end of a named port: sends ``payload`` and receives ``expect`` bytes at
    the same time (two threads), like the guest does on its side."""

    def __init__(self, path: str, payload: bytes, expect: int) -> None:
        self.sock = unixsock.connect(path, timeout=WAIT)
        self.sock.settimeout(WAIT)
        self.payload = payload
        self.expect = expect
        self.received = bytearray()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._recv, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        try:
            self.sock.sendall(self.payload)
        except OSError as exc:
            self.errors.append(exc)

    def _recv(self) -> None:
        try:
            while len(self.received) < self.expect:
                data = self.sock.recv(65536)
                if not data:
                    break
                self.received += data
        except OSError as exc:
            self.errors.append(exc)

    def join(self, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self._threads), (
            f"port transfer unfinished: received {len(self.received)} of {self.expect}")
        assert not self.errors, self.errors

    def close(self) -> None:
        # shutdown first: a thread blocked in recv() keeps a merely closed socket alive,
        # and the port would never see its host peer go.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for thread in self._threads:
            thread.join(5)


def check_console(results: dict[str, str], peer: ConsoleClient, data: DataPeer,
                  ring: RingFeatures) -> None:
    """The guest's console report against what the host ends saw."""
    assert results["done"] == "yes", results
    ring.check_guest_view(results["guest_features"])
    assert results["typed"] == TYPED.decode().rstrip("\n")
    assert results["data_dev"].startswith("/dev/vport"), results
    data.join()
    assert len(data.received) == DATA_BYTES
    assert hashlib.sha256(data.received).hexdigest() == results["out_sha"]
    assert results["in_bytes"] == str(DATA_BYTES)
    assert hashlib.sha256(data.payload).hexdigest() == results["in_sha"]
    # Byte-exact, and nothing but: the guest wrote nothing else on hvc0.
    assert bytes(peer.received) == GREETING


def type_after_greeting(peer: ConsoleClient) -> None:
    """Wait for the guest's greeting on hvc0, then type a line for it to read."""
    got = peer.wait_bytes(len(GREETING))
    assert got == GREETING, got
    peer.send(TYPED)


def console_guest_round(devices: Sequence[VhostUserDevice], console: ConsoleClient,
                        data_path: str, seed: int, ring: RingFeatures) -> dict[str, str]:
    """One UML guest runs :func:`console_script` on the console at ``devices``: greets on
    hvc0, reads the typed line, and moves :data:`DATA_BYTES` each way on the named port
    (host end at ``data_path``, payload from ``seed``); every end is checked byte-exact.
    Returns the guest's results."""
    data = DataPeer(data_path, random_payload(seed), DATA_BYTES)
    guest = UmlGuest(console_script(), extra_files=console_files(), devices=list(devices),
                     timeout=WAIT)
    try:
        guest.start()
        type_after_greeting(console)
        result = guest.wait()
        assert result.ok, result.describe()
        check_console(result.results, console, data, ring)
        return result.results
    finally:
        guest.stop()
        data.close()


# ---- the CLI as a child process -------------------------------------------------------------


class CliServer(ServeProcess):
    """``python -m pyvirtio [GLOBAL...] serve KIND ARGS`` (``args[0]`` is KIND), stderr
    to ``log_path``."""

    def __init__(self, args: Sequence[str], log_path: Path, *, global_args: Sequence[str] = (),
                 stdin: int | None = None) -> None:
        super().__init__(args[0], args[1:], log_path=log_path, global_args=global_args,
                         stdin=stdin)

    def qemu_device_args(self) -> list[str]:
        """The chardev/device part of the QEMU line the banner printed (QemuGuest brings
        the shared-memory machine options itself; the banner's are checked here)."""
        args = self.banner_args("qemu")
        assert "memory-backend-memfd,id=mem,size=512M,share=on" in args, args
        return args[args.index("-chardev"):]


def random_payload(seed: int, size: int = DATA_BYTES) -> bytes:
    return random.Random(seed).randbytes(size)


def socket_gone(path: str | os.PathLike[str]) -> bool:
    """Nothing at ``path`` any more, and nobody listening there."""
    if os.path.exists(path):
        return False
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(os.fspath(path))
    except OSError:
        return True
    finally:
        probe.close()
    return False
