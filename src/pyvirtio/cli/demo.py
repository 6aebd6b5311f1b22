"""``pyvirtio demo``: pyvirtio devices driven by real Linux kernels, narrated.

1. A User-Mode Linux 6.1 guest (the kernel runs as a host process) attaches a pyvirtio
   virtio-console over vhost-user. Its kernel finds the device and binds virtio_console;
   the guest greets the host on /dev/hvc0, runs a command the host types there, and moves
   1 MiB each way through a named port, sha256 on both sides.
2. A QEMU 7.2 guest (TCG, the Debian cloud kernel) gets a pyvirtio virtio-rng as
   vhost-user-rng-pci with packed=on. Its kernel finds the PCI device, the hwrng core picks
   virtio_rng.0, and 64 KiB read from /dev/hwrng are shown to be exactly a slice of the
   stream pyvirtio served.

Each act says which ring format (split or packed) the guest's driver negotiated.
3. A User-Mode Linux guest with 256 MiB on a pyvirtio virtio-balloon gives 192 MiB back to
   the host: the pages leave its memory file (the host-side figure), then come back and
   hold 150 MiB the guest writes and verifies.

``pyvirtio demo --in-memory`` needs no guests: a pyvirtio driver reads a pyvirtio entropy
device, in one process and then across two.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pyvirtio import __version__
from pyvirtio.core.features import describe, ring_format
from pyvirtio.device.base import VirtioDevice
from pyvirtio.device.console import ConsoleDevice, Port
from pyvirtio.device.console.ports import UnixSocketPort
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.rng import RngDriver
from pyvirtio.errors import LocalError
from pyvirtio.guest import (
    Guest,
    GuestError,
    MissingDependencyError,
    QemuGuest,
    UmlGuest,
    VhostUserDevice,
)
from pyvirtio.guest.qemu import qemu_args as guest_qemu_args
from pyvirtio.guest.uml import uml_args
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import ids
from pyvirtio.testing.guests import (
    HWRNG_BYTES,
    ConsoleClient,
    NotServed,
    RecordedStream,
    find_served_slice,
    hwrng_script,
)
from pyvirtio.testing.pair import DevicePair
from pyvirtio.testing.process_pair import ProcessDevicePair
from pyvirtio.testing.server import ServerThread

PORT_NAME = "org.pyvirtio.demo"
TRANSFER = 1 << 20
#: seconds any one step may take before the demo gives up
STEP_TIMEOUT = 60.0
COMMAND = "uname -sr; grep MemTotal /proc/meminfo; ls /dev/hvc0 /dev/vport0p*"


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="boot real Linux guests on pyvirtio devices, narrated",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in-memory", action="store_true",
                   help="no guests: a pyvirtio driver reads a pyvirtio entropy device "
                   "in memory (for machines without UML and QEMU)")
    p.add_argument("--bytes", type=int, default=1 << 20,
                   help="entropy to read with --in-memory (default 1 MiB)")
    p.set_defaults(func=run)


def say(text: str) -> None:
    print(f"pyvirtio demo | {text}", flush=True)


def show(source: str, text: str) -> None:
    """A line of the guest's own (kernel or console) output, indented under the narration."""
    print(f"{source:>13} |     {text}", flush=True)


def mark(ok: bool) -> str:
    utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
    if utf8:
        return "\u2713" if ok else "\u2717"
    return "ok" if ok else "FAIL"


class DemoFailure(Exception):
    """A step did not happen as it should; the message says which."""


def run(args: argparse.Namespace) -> int:
    if args.in_memory:
        return run_in_memory(args.bytes)
    # SIGTERM unwinds like Ctrl-C, so that the guests and servers are stopped on the way out.
    signal.signal(signal.SIGTERM, _terminate)
    say(f"pyvirtio {__version__}: virtio devices written in Python, used by real Linux kernels")
    checks: list[tuple[str, bool]] = []
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="pyvirtio-demo-"))
    try:
        uml_part(workdir, checks)
        qemu_part(workdir, checks)
        from pyvirtio.cli.demo_balloon import balloon_part

        balloon_part(workdir, checks)
    except MissingDependencyError as exc:
        say(f"cannot boot guests on this machine: {exc}")
        say("`make demo` installs them; `pyvirtio demo --in-memory` runs without guests")
        return 1
    except (DemoFailure, GuestError, LocalError, OSError) as exc:
        say(f"FAILED: {exc}")
        return 1
    except KeyboardInterrupt:
        say("interrupted: guests and servers stopped")
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ok = all(passed for _, passed in checks)
    say("")
    for label, passed in checks:
        say(f"  {mark(passed):<4} {label}")
    elapsed = time.monotonic() - started
    if ok:
        say(f"SUCCESS: three real Linux kernels used pyvirtio devices, every byte accounted for "
            f"({elapsed:.0f} s)")
        return 0
    say("FAILURE: see the checks above")
    return 1


# ---- helpers -----------------------------------------------------------------------------------


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


class _Recording(VirtioDevice):
    """A device remembering the features each driver accepted (for the narration)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.negotiated: list[int] = []

    def on_features_ok(self) -> None:
        super().on_features_ok()
        self.negotiated.append(self.driver_features)


class RecordingConsole(_Recording, ConsoleDevice):
    """The console device, remembering the features each driver accepted."""


class RecordingRng(_Recording, RngDevice):
    """The rng device, remembering the features each driver accepted."""


@contextmanager
def serving(server: VhostUserServer) -> Iterator[VhostUserServer]:
    with ServerThread(server):
        yield server


@contextmanager
def booted(guest: Guest) -> Iterator[Guest]:
    guest.start()
    try:
        yield guest
    finally:
        guest.stop()


def expect(guest: Guest, pattern: str) -> re.Match[str]:
    return guest.wait_for(pattern, timeout=STEP_TIMEOUT)


def kernel_lines(guest: Guest, source: str, until: str) -> str:
    """Show the guest's ``pyvirtio-klog`` lines as they come, until a line matches
    ``until`` (a pattern with one group); returns that group."""
    while True:
        m = expect(guest, rf"^pyvirtio-klog (.*)$|{until}")
        if m.group(1) is None:
            return m.group(2)
        if m.group(1).strip():
            show(source, m.group(1).strip())


def short_hex(digest: str) -> str:
    return f"{digest[:16]}..."


# ---- part 1: UML and the console device -------------------------------------------------------

UML_SCRIPT = f"""\
klog() {{ echo "pyvirtio-klog $*"; }}
klog "$(dmesg | grep -m1 'Registering device virtio-uml')"
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
klog "virtio0: $(tr '\\n' ' ' < /sys/bus/virtio/devices/virtio0/uevent)"
for p in /sys/class/virtio-ports/*; do
    name=$(cat $p/name 2>/dev/null)
    if [ -n "$name" ]; then klog "${{p##*/}}: name $name"; else klog "${{p##*/}}: /dev/hvc0"; fi
    [ "$name" = "{PORT_NAME}" ] && DATA=/dev/${{p##*/}}
done
result features $(cat /sys/bus/virtio/devices/virtio0/features)
exec 3<>/dev/hvc0
stty raw -echo <&3
set -- $(stty size <&3)
printf 'Hello from Linux %s on /dev/hvc0, a %s x %s console\\n' "$(uname -r)" "$2" "$1" >&3
read -r -t 30 cmd <&3
sh -c "$cmd" >&3 2>&1 </dev/null
printf '\\004' >&3
dd if=/dev/urandom of=/tmp/out bs=65536 count={TRANSFER // 65536} 2>/dev/null
result out_sha $(sha256sum /tmp/out | cut -d' ' -f1)
exec 4<>$DATA
cat /tmp/out >&4 &
head -c {TRANSFER} <&4 > /tmp/in
wait
result in_sha $(sha256sum /tmp/in | cut -d' ' -f1)
"""


def uml_part(workdir: Path, checks: list[tuple[str, bool]]) -> None:
    say("")
    say("1/3  User-Mode Linux 6.1 (a Linux kernel running as a host process) "
        "on a pyvirtio virtio-console")
    vu, hvc0, data = (str(workdir / name) for name in ("console.sock", "hvc0.sock", "port.sock"))
    device = RecordingConsole([Port(UnixSocketPort(hvc0)),
                               Port(UnixSocketPort(data), name=PORT_NAME)], cols=132, rows=43)
    with ExitStack() as stack:
        stack.callback(device.close)
        server = VhostUserServer(vu, lambda: device)
        device.reactor = server.loop  # ports take their host clients before the guest comes
        stack.enter_context(serving(server))
        console = ConsoleClient(hvc0)
        stack.callback(console.close)
        port = ConsoleClient(data)
        stack.callback(port.close)
        to_guest = random.Random(2024).randbytes(TRANSFER)
        port.send_in_background(to_guest)
        say(f"serving virtio-console on {vu}: port 0 is the console (hvc0), port 1 is named "
            f"{PORT_NAME!r}; pyvirtio holds the host end of both")
        say(f"booting  linux.uml ... {shlex.join(uml_args(server.path, ids.CONSOLE))}")
        guest = stack.enter_context(booted(UmlGuest(UML_SCRIPT, devices=[
            VhostUserDevice(vu, ids.CONSOLE)], timeout=STEP_TIMEOUT * 2)))
        bitmap = kernel_lines(guest, "uml kernel", r"PYVIRTIO-RESULT features=(\S+)")
        features = device.negotiated[-1] if device.negotiated else 0
        say(f"its virtio_console driver negotiated "
            f"{describe(features, ConsoleDevice.feature_names)} ({ring_format(features)})")
        checks.append(("UML: the kernel bound virtio_console to pyvirtio's device",
                       bitmap[32:33] == "1" and bool(features)))

        greeting = console.wait_until(lambda b: b"\n" in b, "its greeting on hvc0")
        console.take()
        text = greeting.split(b"\n", 1)[0].decode(errors="replace")
        say(f"guest -> host on hvc0: {text!r}")
        checks.append(("UML: text written to /dev/hvc0 reached the host",
                       text.startswith("Hello from Linux ") and "132 x 43" in text))
        say(f"host -> guest on hvc0: {COMMAND!r} (the guest runs it, answers on hvc0)")
        console.sock.sendall(COMMAND.encode() + b"\n")
        answer = console.wait_until(lambda b: b"\x04" in b, "the command's output")
        lines = answer.split(b"\x04", 1)[0].decode(errors="replace").splitlines()
        for line in lines:
            show("hvc0", line)
        checks.append(("UML: a command typed on the host ran in the guest",
                       bool(lines) and lines[0].startswith("Linux ")))

        say(f"named port {PORT_NAME!r}: 1 MiB each way at once, sha256 on both sides")
        out_sha = expect(guest, r"PYVIRTIO-RESULT out_sha=(\S+)").group(1)
        in_sha = expect(guest, r"PYVIRTIO-RESULT in_sha=(\S+)").group(1)
        got = port.wait_until(lambda b: len(b) >= TRANSFER, "1 MiB on the named port")
        host_out = hashlib.sha256(got[:TRANSFER]).hexdigest()
        host_in = hashlib.sha256(to_guest).hexdigest()
        say(f"guest -> host: guest {short_hex(out_sha)} host {short_hex(host_out)} "
            f"{mark(out_sha == host_out)}")
        say(f"host -> guest: host {short_hex(host_in)} guest {short_hex(in_sha)} "
            f"{mark(in_sha == host_in)}")
        checks.append(("UML: 1 MiB guest -> host on the named port, checksums equal",
                       out_sha == host_out and len(got) == TRANSFER))
        checks.append(("UML: 1 MiB host -> guest on the named port, checksums equal",
                       in_sha == host_in))
        result = guest.wait(timeout=STEP_TIMEOUT)
        if not result.ok:
            raise DemoFailure(result.describe())
        say(f"the guest finished its script and powered off, {result.elapsed:.1f} s after "
            f"boot; problems the device noticed: {len(device.problems)}")
        checks.append(("UML: the guest ran to the end, the device saw no problems",
                       not device.problems))


# ---- part 2: QEMU and the entropy device -----------------------------------------------------

QEMU_SCRIPT = f"""\
klog() {{ echo "pyvirtio-klog $*"; }}
klog "$(dmesg | grep -m1 '\\[1af4:1044\\]' | sed 's/^\\[[ 0-9.]*\\] //')"
klog "virtio0: $(tr '\\n' ' ' < /sys/bus/virtio/devices/virtio0/uevent)"
klog "hw_random: rng_available $(cat /sys/class/misc/hw_random/rng_available)"
result features $(cat /sys/bus/virtio/devices/virtio0/features)
result current $(cat /sys/class/misc/hw_random/rng_current)
{hwrng_script(HWRNG_BYTES)}"""


def qemu_part(workdir: Path, checks: list[tuple[str, bool]]) -> None:
    say("")
    say("2/3  QEMU 7.2 (TCG, Debian's cloud kernel 6.1) on a pyvirtio virtio-rng")
    vu = str(workdir / "rng.sock")
    source = RecordedStream(seed=7)
    device = RecordingRng(source)
    server = VhostUserServer(vu, lambda: device)
    with serving(server):
        # packed=on: the guest may run the packed ring, which pyvirtio offers
        qemu_args = guest_qemu_args(server.path, ids.RNG, extra=",packed=on")
        say(f"serving virtio-rng on {vu}: a recorded, deterministic byte stream")
        say(f"booting  qemu-system-x86_64 ... {shlex.join(qemu_args)}")
        with booted(QemuGuest(QEMU_SCRIPT, extra_args=qemu_args,
                              timeout=STEP_TIMEOUT * 2)) as guest:
            bitmap = kernel_lines(guest, "qemu kernel", r"PYVIRTIO-RESULT features=(\S+)")
            features = device.negotiated[-1] if device.negotiated else 0
            say(f"its virtio_rng driver negotiated {describe(features)} "
                f"({ring_format(features)})")
            checks.append(("QEMU: the kernel's virtio_rng runs on pyvirtio's device, in the "
                           "ring format the guest reports",
                           bool(features) and bitmap[34:35] == str(features >> 34 & 1)))
            current = kernel_lines(guest, "qemu kernel", r"PYVIRTIO-RESULT current=(\S+)")
            say(f"the kernel's hwrng core uses {current}; the guest reads {HWRNG_BYTES // 1024}"
                " KiB from /dev/hwrng")
            checks.append(("QEMU: the kernel picked pyvirtio's device as its hwrng",
                           current == "virtio_rng.0"))
            result = guest.wait(timeout=STEP_TIMEOUT)
            if not result.ok:
                raise DemoFailure(result.describe())
    attempts = int(result.results["hwrng_attempts"])
    digest = result.results["hwrng_sha"]
    stream = bytes(source.stream)
    try:
        offset = find_served_slice(stream, result.results, HWRNG_BYTES)
    except NotServed as exc:
        say(f"the guest's bytes are not what pyvirtio served: {exc}")
        offset = -1
    same = offset >= 0
    say(f"guest's sha256 {short_hex(digest)}; pyvirtio served {len(stream)} bytes in "
        f"{source.requests} buffers")
    if same:
        before = ("the kernel's own reads" if attempts == 1 else
                  f"the kernel's own reads and {attempts - 1} read(s) its hwrng thread disturbed")
        say(f"bytes {offset}..{offset + HWRNG_BYTES - 1} of that stream hash to the same "
            f"{mark(same)} (before them: {before})")
    checks.append(("QEMU: the guest's 64 KiB are exactly bytes pyvirtio served", same))


# ---- --in-memory ------------------------------------------------------------------------------


def run_in_memory(n: int) -> int:
    say("in one process: a pyvirtio rng driver probes a pyvirtio rng device over loopback")
    device = RngDevice()
    with DevicePair(device) as pair:
        driver = pair.probe()
        assert isinstance(driver, RngDriver)
        say(f"negotiated features: {describe(driver.device.features)} "
            f"({ring_format(driver.device.features)})")
        start = time.perf_counter()
        data = driver.read(n)
        elapsed = time.perf_counter() - start
        same = hashlib.sha256(data).hexdigest() == device.digest.hexdigest()
        say(f"read {len(data)} bytes in {elapsed * 1000:.1f} ms "
            f"({len(data) / elapsed / 1e6:.1f} MB/s), {pair.transport.kicks} kicks, "
            f"{pair.transport.interrupts} interrupts; digest matches what the device served: "
            f"{same}")
        ok1 = same and len(data) == n
    say("across two processes: the device runs in a child behind vhost-user (memfd, eventfds)")
    with ProcessDevicePair("pyvirtio.device.rng:RngDevice") as ppair:
        driver = ppair.probe()
        assert isinstance(driver, RngDriver)
        start = time.perf_counter()
        data = driver.read(n)
        elapsed = time.perf_counter() - start
        served = ppair.transport.device_attr("digest")
        same = hashlib.sha256(data).hexdigest() == served
        say(f"device pid {ppair.pid}: read {len(data)} bytes in {elapsed * 1000:.1f} ms; "
            f"digest matches the child's: {same}")
        ok2 = same and len(data) == n
    ok = ok1 and ok2
    say("SUCCESS: both pairs delivered exactly the served bytes" if ok else "FAILURE")
    return 0 if ok else 1
