"""Helpers for the virtio-net guest tests: ``pyvirtio serve net`` as a child process, network
namespaces, guest scripts, and a raw (possibly hostile) virtio-net front-end.

Every process and namespace made here is registered with a :class:`Cleanup` that the test's
fixture runs on any exit, so nothing outlives a failing test.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
from collections.abc import Callable, Sequence

from serve_process import ServeProcess

from pyvirtio.driver.base import Driver, Virtqueue, probe
from pyvirtio.io.vhost_user_client import VhostUserClient
from pyvirtio.memory import GuestMemory
from pyvirtio.spec import features as F
from pyvirtio.spec import ids
from pyvirtio.spec import net as N

TIMEOUT = 30.0
VERBOSE = ["-v"]





# ---- the server process --------------------------------------------------------------------

class SwitchProcess(ServeProcess):
    """``pyvirtio -v serve net ARGS`` in a child process (optionally inside a network
    namespace), stderr joined to stdout; waits until every socket listens. :meth:`stats`
    parses the newest ``--stats`` table."""

    def __init__(self, args: Sequence[str], *, netns: str | None = None,
                 ready_timeout: float = 20.0) -> None:
        super().__init__("net", args, global_args=VERBOSE, netns=netns)
        try:
            # The banner ends with the last port's UML line: every socket listens by then.
            self.wait_for(r"^\s+UML:\s+virtio_uml\.device=" + re.escape(self._last_socket(args)),
                          ready_timeout)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _last_socket(args: Sequence[str]) -> str:
        sockets = [args[i + 1] for i, a in enumerate(args) if a == "--socket"]
        return sockets[-1]

    def stats(self, timeout: float = 5.0) -> dict[str, dict[str, str]]:
        """The next complete ``--stats`` table printed from now: port -> column -> value."""
        start = self.mark()
        self.wait_for(r"^learned \d+ addresses", timeout, start)
        with self._cond:
            lines = self.lines[start:]
        end = max(i for i, line in enumerate(lines) if line.startswith("learned "))
        head = max(i for i in range(end) if lines[i].startswith("port "))
        columns = lines[head].split()
        table = {}
        for line in lines[head + 1 : end]:
            values = line.split()
            table[values[0]] = dict(zip(columns, values, strict=True))
        return table


# ---- namespaces ----------------------------------------------------------------------------

class Netns:
    """A network namespace the test owns (``ip netns add``), deleted by :meth:`delete`."""

    def __init__(self, tag: str = "net") -> None:
        self.name = f"pyvirtio-{tag}-{os.getpid()}-{secrets.token_hex(3)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=TIMEOUT)
        self.run("ip", "link", "set", "lo", "up")

    def run(self, *cmd: str, check: bool = True, timeout: float = TIMEOUT
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], check=check,
                              capture_output=True, text=True, timeout=timeout)

    def popen(self, *cmd: str, **kwargs: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd],  # type: ignore[call-overload]
                                start_new_session=True, **kwargs)

    def pids(self) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                             text=True, timeout=TIMEOUT, check=False).stdout
        return [int(p) for p in out.split()]

    def delete(self) -> None:
        for pid in self.pids():  # nothing may keep the namespace (or its taps) alive
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=TIMEOUT)


class Cleanup:
    """Finalizers run in reverse order, each even if an earlier one failed."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], object]] = []

    def add(self, action: Callable[[], object]) -> None:
        self._actions.append(action)

    def run(self) -> None:
        errors = []
        while self._actions:
            action = self._actions.pop()
            try:
                action()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """Kill a child started in its own session (and its children), then reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)


# ---- guest scripts -------------------------------------------------------------------------

def net_setup(ip: str, mtu: int | None = None) -> str:
    """Shell lines that bring eth0 up with a static address (busybox ip)."""
    lines = [
        "ip link set lo up",
        "ip link set eth0 up" + (f" mtu {mtu}" if mtu else ""),
        f"ip addr add {ip}/24 dev eth0",
        "result mac $(cat /sys/class/net/eth0/address)",
    ]
    return "\n".join(lines) + "\n"


def ping_until(ip: str, tries: int = 50) -> str:
    """Shell lines: ping ``ip`` once a try until it answers (the peer may still be booting),
    then 3 more; ``result ping_IP 0`` on success."""
    return f"""
i=0
until ping -c 1 -W 1 {ip} >/dev/null 2>&1; do
    i=$((i + 1)); [ $i -ge {tries} ] && break
done
ping -c 3 -i 0.2 -W 2 {ip}
result ping_{ip} $?
"""



# ---- a raw virtio-net front-end ------------------------------------------------------------

class RawNet(Driver):
    """A virtio-net "driver" that only sets up the receive and transmit queues: the test
    then places descriptors itself (``rx``/``tx`` are the virtqueues, rings in ``.ring``).
    Nothing is posted and nothing is polled unless the test does it."""

    device_ids = (ids.NET,)
    features = 0

    def probe(self) -> None:
        self.rx: Virtqueue = self.device.setup_vq(0, None, 64)
        self.tx: Virtqueue = self.device.setup_vq(1, None, 64)


CANARY = 0xA5


class RawFrontend:
    """Our vhost-user front-end with :class:`RawNet` on one switch port: VERSION_1 only (a
    12-byte header, one receive buffer per frame), every descriptor placed by hand."""

    def __init__(self, path: str, memory_size: int = 4 << 20) -> None:
        self.client = VhostUserClient(path, ids.NET, memory_size=memory_size)
        try:
            feats = self.client.get_features() & (F.bit(F.VERSION_1)
                                                  | F.bit(N.VIRTIO_NET_F_MAC))
            drv = probe(self.client, RawNet, features=feats)
            assert isinstance(drv, RawNet)
            self.drv = drv
            self.mac = self.client.read_config(N.CFG_MAC, 6)
        except BaseException:
            self.client.close()
            raise
        self.memory_size = memory_size
        self.closed = False
        self.rx_posted: dict[int, int] = {}  # address -> size of each receive buffer

    @property
    def memory(self) -> GuestMemory:
        return self.client.memory

    def status(self) -> int:
        return self.client.get_status()

    def send(self, frame: bytes, *, wait: bool = True) -> int:
        """Transmit one well-formed frame (zero header); returns the used length."""
        return self.send_raw(bytes(N.NET_HDR_SIZE) + frame, wait=wait)

    def send_raw(self, data: bytes, *, wait: bool = True) -> int:
        """Transmit a chain whose one readable descriptor holds exactly ``data``."""
        addr = self.client.allocator.alloc(max(len(data), 1), 64)
        self.memory.write(addr, data)
        return self.send_sgs([(addr, len(data))], wait=wait)

    def send_sgs(self, sgs: Sequence[tuple[int, int]], *, wait: bool = True) -> int:
        """Transmit a chain of readable descriptors as given (addresses unchecked)."""
        self.drv.tx.add_buf(sgs, [], sgs)
        self.drv.tx.kick()
        if not wait:
            return -1
        _, length = self.drv.tx.wait_buf(TIMEOUT)
        return length

    def post_rx(self, sizes: Sequence[int]) -> None:
        """Post one receive buffer per size, each filled with :data:`CANARY` bytes."""
        for size in sizes:
            addr = self.client.allocator.alloc(size, 64)
            self.memory.write(addr, bytes([CANARY]) * size)
            self.drv.rx.add_buf([], [(addr, size)], addr)
            self.rx_posted[addr] = size
        self.drv.rx.kick()

    def used_rx(self) -> list[tuple[int, int]]:
        """(buffer address, used length) of every receive buffer returned so far."""
        out = []
        while (got := self.drv.rx.get_buf()) is not None:
            addr, length = got
            assert isinstance(addr, int)
            out.append((addr, length))
        return out

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()


def eth_frame(dst: bytes, src: bytes, size: int, fill: int = 0x42) -> bytes:
    """An Ethernet frame of ``size`` bytes with the local experimental ethertype 0x88b5
    (guests' stacks ignore it)."""
    return dst + src + b"\x88\xb5" + bytes([fill]) * (size - 14)
