"""What real Linux drivers do with a hostile device: one case of the hardening report.

:func:`run_case` serves one device type with ``pyvirtio serve KIND ... --chaos SEED:RATE
--chaos-faults FAULT --chaos-after signal`` in a child process, boots a Linux guest on it
(User-Mode Linux or QEMU 7.2 with the Debian 6.1 kernel), lets it boot undisturbed, arms the
device (SIGUSR2) once the guest's script is ready, has the guest do I/O on the device, and
classifies what happened from the guest's kernel log and the I/O's result:

* **detected**: a virtio driver logged the device's fault (its kernel message is quoted;
  for Linux's ring checks the queue is then broken);
* **I/O error**: the I/O failed (a nonzero status, a kernel I/O error, error counters);
* **hung**: the I/O did not finish before the watchdog (the guest is killed);
* **oops**: the kernel oopsed, hit a BUG or panicked (a finding, not a harness failure);
* **silently accepted**: none of these: the fault went unnoticed.

Everything has a timeout; nothing here raises because the guest misbehaved.
``benchmarks/chaos_report.py`` runs the whole matrix and writes ``docs/hardening.md``; the
integration tests run single cases.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pyvirtio.device.chaos import PACKED_FAULTS, SPLIT_FAULTS
from pyvirtio.guest import QemuGuest, UmlGuest, VhostUserDevice
from pyvirtio.guest.base import Guest
from pyvirtio.guest.errors import GuestError
from pyvirtio.guest.qemu import VhostUserBlk, VhostUserNet, VhostUserRng
from pyvirtio.spec import ids
from pyvirtio.testing.guests import ConsoleClient

SRC = Path(__file__).resolve().parents[2]

#: the device types of the report, and the guests that can attach each over vhost-user
#: (UML has no virtio-rng driver; QEMU 7.2 has no vhost-user console front-end)
DEVICE_GUESTS = {"blk": ("uml", "qemu"), "net": ("uml", "qemu"), "console": ("uml",),
                 "rng": ("qemu",)}

READY = "CHAOS-READY"
DONE = "CHAOS-DONE"

_PRELUDE = f"""\
echo 6 > /proc/sys/kernel/printk
echo {READY}
read go
"""

_SCRIPTS = {
    "blk": """\
dd if=/dev/vda of=/dev/null bs=4k count=256 iflag=direct 2>/tmp/e
result io_read $?
dd if=/dev/zero of=/dev/vda bs=4k count=64 oflag=direct 2>>/tmp/e
result io_write $?
result io_errors "$(tr '\\n' ' ' < /tmp/e)"
""",
    "net": """\
arping -c 8 -w 6 -I eth0 10.99.0.2 > /tmp/o 2>&1
result io_arping $?
result io_replies "$(grep -c -i reply /tmp/o)"
for i in eth0 eth1; do
  s=/sys/class/net/$i/statistics
  result io_${i}_errors "rx_length=$(cat $s/rx_length_errors) rx_errors=$(cat $s/rx_errors) \
rx_dropped=$(cat $s/rx_dropped) tx_errors=$(cat $s/tx_errors)"
done
""",
    "console": """\
(timeout 8 head -n 3 /dev/hvc0 > /tmp/in; echo $? > /tmp/in.rc) &
reader=$!
i=0
while [ $i -lt 50 ]; do echo "guest line $i" > /dev/hvc0 || break; i=$((i+1)); done
result io_written $i
wait $reader
result io_read "$(cat /tmp/in.rc)"
result io_lines "$(wc -l < /tmp/in)"
""",
    "rng": """\
head -c 8192 /dev/hwrng > /tmp/r
result io_read $?
result io_bytes "$(wc -c < /tmp/r)"
""",
}

# Both NICs are the guest's own: it must accept frames from its own addresses (ARP from
# eth0 arrives on eth1 with a local source address, a martian by default).
_NET_SETUP = """\
for f in /proc/sys/net/ipv4/conf/*/accept_local; do echo 1 > $f; done
for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done
ip link set eth0 up && ip link set eth1 up
ip addr add 10.99.0.1/24 dev eth0 && ip addr add 10.99.0.2/24 dev eth1
"""

#: the pseudo fault class of a baseline run: the same case with rate 0 (the workload must
#: pass on an honest device for the other verdicts to mean anything)
BASELINE = "none"

#: kernel lines worth quoting (Linux's virtio ring checks print "<driver> virtioN: <vq>:...")
_KERNEL = re.compile(
    r"virtio|hwrng|I/O error|blk_update_request|INFO: task|hung_task|soft lockup|Oops|BUG[: ]"
    r"|Kernel panic|WARNING: |Call Trace|RIP: |general protection|rcu.*stall|new size")
_DETECTED = re.compile(r"is not a head|out of range|exceeds|wrong|unexpected|invalid|bad "
                       r"|too (many|large)|error", re.IGNORECASE)
_OOPS = re.compile(r"Oops|BUG[: ]|Kernel panic|general protection fault|kernel BUG|RIP: ")
_IO_ERROR = re.compile(r"I/O error|blk_update_request")


@dataclass
class Outcome:
    """What one case showed."""

    device: str
    guest: str
    fault: str
    ring: str
    verdict: str = "not run"
    #: the guest's kernel lines about the fault (after the device was armed)
    kernel: list[str] = field(default_factory=list)
    #: the guest's ``result`` values of the I/O
    io: dict[str, str] = field(default_factory=dict)
    #: the device's chaos log lines
    injected: list[str] = field(default_factory=list)
    #: how to replay it (the serve command, with --chaos-after N)
    replay: str = ""
    note: str = ""
    elapsed: float = 0.0

    @property
    def quote(self) -> str:
        """The first kernel line that says what the driver saw."""
        for line in self.kernel:
            if _DETECTED.search(line) or _OOPS.search(line):
                return line
        return self.kernel[0] if self.kernel else ""


def ring_for(guest: str, fault: str) -> str:
    """The ring layout a case runs: what its fault needs, else the guest's default (UML
    takes the packed ring when offered; QEMU runs split unless told packed=on)."""
    if fault in SPLIT_FAULTS:
        return "split"
    if fault in PACKED_FAULTS:
        return "packed"
    return "packed" if guest == "uml" else "split"


def applicable(device: str, guest: str, fault: str) -> str | None:
    """Why a case cannot run (None: it can)."""
    if guest not in DEVICE_GUESTS[device]:
        return {"rng": "UML has no virtio-rng driver",
                "console": "QEMU 7.2 has no vhost-user console front-end"}.get(device, "n/a")
    if guest == "qemu" and ring_for(guest, fault) == "packed" and device != "blk":
        return "the QEMU helpers set packed=on for blk only"
    return None


class _Server:
    """``python -m pyvirtio serve KIND ARGS`` in its own session, output to ``log``."""

    def __init__(self, argv: list[str], log: Path, sockets: list[Path]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)}
        self.log = log
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + 30.0
        while not all(s.exists() for s in sockets):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise GuestError(f"the server did not start: {self.text()[-2000:]}")
            time.sleep(0.05)

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float) -> re.Match[str] | None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text())
            if m is not None or time.monotonic() > deadline:
                return m
            time.sleep(0.05)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10.0)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10.0)
        self._out.close()


def _serve_argv(device: str, workdir: Path, ring: str) -> tuple[list[str], list[Path]]:
    sock = workdir / "vu.sock"
    args: list[str]
    if device == "blk":
        image = workdir / "disk.img"
        with open(image, "wb") as f:
            f.truncate(64 << 20)
        args, sockets = [str(image), "--socket", str(sock)], [sock]
    elif device == "net":
        second = workdir / "vu1.sock"
        args, sockets = ["--socket", str(sock), "--socket", str(second)], [sock, second]
    elif device == "console":
        host = workdir / "hvc0.sock"
        args, sockets = ["--socket", str(sock), "--console", f"unix:{host}"], [sock, host]
    else:
        args, sockets = ["--socket", str(sock)], [sock]
    if ring == "split":
        args.append("--no-packed")
    return [sys.executable, "-m", "pyvirtio", "serve", device, *args], sockets


def _guest(device: str, guest: str, sockets: list[Path], ring: str, timeout: float) -> Guest:
    script = (_NET_SETUP if device == "net" else "") + _PRELUDE + _SCRIPTS[device] \
        + f"echo {DONE}\n"
    if guest == "uml":
        dev_id = {"blk": ids.BLOCK, "net": ids.NET, "console": ids.CONSOLE}[device]
        socks = sockets[:2] if device == "net" else sockets[:1]
        return UmlGuest(script, devices=[VhostUserDevice(s, dev_id) for s in socks],
                        timeout=timeout)
    devices: list[VhostUserBlk | VhostUserNet | VhostUserRng]
    if device == "blk":
        devices = [VhostUserBlk(sockets[0], packed=ring == "packed")]
    elif device == "net":
        devices = [VhostUserNet(sockets[0], mac="52:54:00:99:00:01"),
                   VhostUserNet(sockets[1], mac="52:54:00:99:00:02")]
    else:
        devices = [VhostUserRng(sockets[0])]
    return QemuGuest(script, devices=devices, timeout=timeout)


def run_case(device: str, guest: str, fault: str, workdir: Path, *, seed: int = 7,
             rate: float = 1.0, watchdog: float = 12.0, boot_timeout: float = 90.0
             ) -> Outcome:
    """Run one case (see the module doc) in ``workdir``; never raises for what the guest
    or the device did."""
    ring = ring_for(guest, fault)
    out = Outcome(device, guest, fault, ring)
    why_not = applicable(device, guest, fault)
    if why_not is not None:
        out.verdict, out.note = "n/a", why_not
        return out
    workdir.mkdir(parents=True, exist_ok=True)
    argv, sockets = _serve_argv(device, workdir, ring)
    if fault == BASELINE:
        argv += ["--chaos", f"{seed}:0", "--chaos-after", "signal", "-q"]
    else:
        argv += ["--chaos", f"{seed}:{rate}", "--chaos-faults", fault, "--chaos-after",
                 "signal", "-q"]
    started = time.monotonic()
    server = _Server(argv, workdir / "serve.log", sockets)
    client: ConsoleClient | None = None
    g = _guest(device, guest, sockets, ring, boot_timeout + watchdog + 30.0)
    finished = False
    try:
        if device == "console":
            client = ConsoleClient(str(sockets[1]))
        g.start()
        try:
            g.wait_for(READY, boot_timeout)
        except GuestError as exc:
            out.verdict, out.note = "boot failed", str(exc).splitlines()[0]
            return out
        mark = len(g.console)
        os.kill(server.proc.pid, signal.SIGUSR2)
        armed = server.wait_log(r"armed after (\d+) requests", 10.0)
        if armed is None:
            out.verdict, out.note = "not armed", server.text()[-500:]
            return out
        out.replay = " ".join(argv[2:-3]) + f" --chaos-after {armed.group(1)}"
        g.write("go\n")
        if client is not None:
            time.sleep(1.0)  # the guest's reader has hvc0 open by now
            client.send(b"host line 1\nhost line 2\nhost line 3\n")
        try:
            g.wait_for(DONE, watchdog)
            finished = True
            time.sleep(0.5)  # late kernel messages
        except GuestError:
            finished = False
        text = g.console[mark:]
        out.io = {k: v for k, v in g.results.items() if k.startswith("io_")}
    finally:
        if client is not None:
            client.close()
        if g.pid is not None:
            g.stop()
        server.close()
        out.elapsed = time.monotonic() - started
    out.kernel = [line.strip() for line in text.splitlines()
                  if _KERNEL.search(line) and not line.startswith(("result ", "PYVIRTIO"))]
    out.injected = [line[line.index("chaos seed="):] for line in server.text().splitlines()
                    if "chaos seed=" in line and "req=" in line]
    out.verdict = classify(out, finished)
    return out


def classify(out: Outcome, finished: bool) -> str:
    """The verdict from the kernel lines, the I/O results and whether the I/O finished."""
    parts = []
    if any(_OOPS.search(line) for line in out.kernel):
        parts.append("oops")
    if any(_DETECTED.search(line) and not _IO_ERROR.search(line) for line in out.kernel):
        parts.append("detected")
    if _io_failed(out) or any(_IO_ERROR.search(line) for line in out.kernel):
        parts.append("I/O error")
    if not finished:
        parts.append("hung")
    if out.fault == BASELINE:
        return " + ".join(parts) if parts else "ok"
    if not out.injected:
        parts.append("no fault injected")
    return " + ".join(parts) if parts else "silently accepted"


def _io_failed(out: Outcome) -> bool:
    io = out.io
    for key in ("io_read", "io_write", "io_arping"):
        if io.get(key, "0") != "0":
            return True
    for key, value in io.items():
        if key.endswith("_errors") and re.search(r"=[1-9]", value):
            return True
    if out.device == "console" and io.get("io_written", "50") != "50":
        return True
    return False
