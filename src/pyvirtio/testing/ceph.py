"""A throw-away single-node Ceph cluster on loopback, for tests, benchmarks and development.

One monitor, one manager and one OSD whose object store lives in RAM (``memstore``), all
started from the Debian packages' binaries (``ceph-mon``, ``ceph-mgr``, ``ceph-osd``) in a
private directory: no systemd, no ``/etc/ceph``, no ``/var/lib/ceph``. Authentication is off
(``auth ... required = none``), pools have one replica (``mon allow pool size one``), every
daemon listens on 127.0.0.1 only (messenger v2). :class:`CephCluster` starts it, waits (with
timeouts) until the monitor answers, the OSD is up and a pool takes writes, and tears it all
down again: daemons killed, directory removed, even when starting failed half-way.

By hand, for development (the cluster outlives the command; ``stop`` kills it)::

    python -m pyvirtio.testing.ceph start DIR      # prints the ceph.conf path
    python -m pyvirtio.testing.ceph stop DIR

Clients reach it with ``rados.Rados(conffile=cluster.conf)``, or ``pyvirtio serve blk
rbd:POOL/IMAGE@CONF``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from pyvirtio.errors import LocalError

DAEMONS = ("ceph-mon", "ceph-mgr", "ceph-osd")
STATE_FILE = "cluster.json"
DEFAULT_POOL = "rbd"


def bindings() -> tuple[Any, Any]:
    """The ``rados`` and ``rbd`` modules (Debian ``python3-rados``/``python3-rbd``; ``make
    deps`` links them into the project's venv). Raises LocalError naming the package."""
    try:
        return importlib.import_module("rados"), importlib.import_module("rbd")
    except ImportError as exc:
        raise LocalError(f"librados/librbd Python bindings missing ({exc}); install the "
                         "Debian package python3-rbd and run make deps") from exc


def missing_binaries() -> list[str]:
    """The Ceph daemons not on PATH."""
    return [d for d in (*DAEMONS, "monmaptool") if shutil.which(d) is None]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class CephError(LocalError):
    """The test cluster could not be started (the message says which step and shows the
    daemon's log)."""


class CephCluster:
    """A single-node cluster in ``directory`` (a fresh temporary one if None; removed by
    :meth:`stop` if this object made it). ``memstore_bytes`` caps the OSD's RAM store.
    :attr:`start_seconds` is how long :meth:`start` took, :meth:`rss_bytes` what the daemons
    use now."""

    def __init__(self, directory: str | os.PathLike[str] | None = None, *,
                 pool: str = DEFAULT_POOL, memstore_bytes: int = 1 << 30,
                 timeout: float = 120.0) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory) if directory is not None else Path(
            tempfile.mkdtemp(prefix="pyvirtio-ceph-", dir=_tmp_base()))
        self.pool = pool
        self.memstore_bytes = memstore_bytes
        self.timeout = timeout
        self.conf = self.dir / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pids: dict[str, int] = {}
        self.start_seconds = 0.0

    def __repr__(self) -> str:
        return f"CephCluster({str(self.dir)!r}, mon 127.0.0.1:{self.port})"

    # ---- start ---------------------------------------------------------------------------

    def start(self) -> None:
        """Create and start the cluster; on any failure everything started is stopped and
        :class:`CephError` says what failed (with the tail of the daemon's log)."""
        missing = missing_binaries()
        if missing:
            raise CephError(f"Ceph binaries missing: {', '.join(missing)} (Debian packages "
                            "ceph-mon, ceph-mgr, ceph-osd)")
        began = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began

    def _start(self) -> None:
        rados, _ = bindings()
        for sub in ("mon", "mgr", "osd", "run", "log", "crash"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.conf.write_text(self._config())
        monmap = self.dir / "monmap"
        self._run(["monmaptool", "--create", "--clobber", "--fsid", self.fsid,
                   "--addv", "a", f"[v2:127.0.0.1:{self.port}]", str(monmap)], "monmaptool")
        self._run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a",
                   "--monmap", str(monmap)], "ceph-mon --mkfs")
        self._spawn("mon.a", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        clients: list[Any] = []
        try:
            self._wait("the monitor to answer", lambda: self._connect(rados, clients))
            client = clients[0]
            osd_uuid = str(uuid.uuid4())
            ret, out, err = client.mon_command(
                json.dumps({"prefix": "osd new", "uuid": osd_uuid, "format": "json"}), b"")
            if ret != 0:
                raise CephError(f"'osd new' failed: {err} (ret {ret})")
            osd_id = int(json.loads(out)["osdid"]) if out.strip().startswith(b"{") \
                else int(out.strip() or 0)
            (self.dir / "mgr" / "mgr.x").mkdir(exist_ok=True)
            (self.dir / "osd" / f"osd.{osd_id}").mkdir(exist_ok=True)
            self._spawn("mgr.x", ["ceph-mgr", "-f", "-c", str(self.conf), "-i", "x"])
            self._run(["ceph-osd", "-c", str(self.conf), "-i", str(osd_id), "--mkfs",
                       "--osd-uuid", osd_uuid], "ceph-osd --mkfs", timeout=60)
            self._spawn(f"osd.{osd_id}", ["ceph-osd", "-f", "-c", str(self.conf), "-i",
                                          str(osd_id)])
            self._wait("the OSD to be up", lambda: self._osd_up(client, osd_id))
            if self.pool not in client.list_pools():
                client.create_pool(self.pool)
            ioctx = client.open_ioctx(self.pool)
            try:
                with contextlib.suppress(rados.Error):
                    ioctx.application_enable("rbd")
                self._wait(f"pool {self.pool!r} to take writes",
                           lambda: self._writable(rados, ioctx))
            finally:
                ioctx.close()
            self._wait("the manager to be available", lambda: self._mgr_available(client))
        finally:
            for c in clients:
                c.shutdown()
        self._save_state()

    def _config(self) -> str:
        d = self.dir
        return f"""[global]
fsid = {self.fsid}
mon host = [v2:127.0.0.1:{self.port}]
public addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
crash dir = {d}/crash
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
keyring = {d}/keyring
mon data = {d}/mon/$name
mgr data = {d}/mgr/$name
osd data = {d}/osd/$name
osd objectstore = memstore
memstore device bytes = {self.memstore_bytes}
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd op num shards = 1
osd op num threads per shard = 2
ms async op threads = 2
mgr initial modules =

[client]
log file = {d}/log/$name.$pid.log
admin socket = {d}/run/$name.$pid.$cctid.asok
rados osd op timeout = 60
rados mon op timeout = 60
"""

    def _run(self, argv: list[str], what: str, timeout: float = 30.0) -> None:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                               cwd=self.dir)
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{what} did not finish within {timeout} s") from exc
        if r.returncode != 0:
            raise CephError(f"{what} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}"
                            f"{self._log_tail(argv)}")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.dir / "log" / f"{name}.out", "wb")
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=self.dir,
                                    start_new_session=True)
        finally:
            out.close()
        self.procs[name] = proc
        self.pids[name] = proc.pid
        self._save_state()

    def _log_tail(self, argv: list[str] | None = None, name: str | None = None) -> str:
        names = [name] if name else list(self.pids)
        if argv is not None and "-i" in argv:
            names.append(f"{argv[0][5:]}.{argv[argv.index('-i') + 1]}")
        tails = []
        for n in names:
            for path in (self.dir / "log" / f"{n}.out", self.dir / "log" / f"{n}.log"):
                if path.exists():
                    text = path.read_text(errors="replace")[-1500:]
                    tails.append(f"--- {path.name} (tail) ---\n{text}")
        return "\n" + "\n".join(tails) if tails else ""

    def _wait(self, what: str, ready: Any) -> None:
        deadline = time.monotonic() + self.timeout
        last: object = None
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise CephError(f"{name} exited with status {proc.returncode} while "
                                    f"waiting for {what}{self._log_tail(name=name)}")
            try:
                if ready():
                    return
            except Exception as exc:  # not ready yet; shown if it never gets there
                last = exc
            if time.monotonic() > deadline:
                raise CephError(f"timed out after {self.timeout} s waiting for {what} "
                                f"(last: {last!r}){self._log_tail()}")
            time.sleep(0.2)

    def _connect(self, rados: Any, clients: list[Any]) -> bool:
        client = rados.Rados(conffile=str(self.conf))
        try:
            client.connect(timeout=5)
        except BaseException:
            client.shutdown()
            raise
        clients.append(client)
        return True

    def _osd_up(self, client: Any, osd_id: int) -> bool:
        ret, out, _ = client.mon_command(json.dumps({"prefix": "osd dump",
                                                     "format": "json"}), b"")
        if ret != 0:
            return False
        return any(o["osd"] == osd_id and o["up"] and o["in"]
                   for o in json.loads(out)["osds"])

    def _mgr_available(self, client: Any) -> bool:
        ret, out, _ = client.mon_command(json.dumps({"prefix": "mgr stat",
                                                     "format": "json"}), b"")
        return ret == 0 and bool(json.loads(out).get("available"))

    def _writable(self, rados: Any, ioctx: Any) -> bool:
        done: list[int] = []
        comp = ioctx.aio_write_full("pyvirtio-probe", b"ok",
                                    oncomplete=lambda c: done.append(c.get_return_value()))
        deadline = time.monotonic() + 5
        while not done and time.monotonic() < deadline:
            time.sleep(0.05)
        if not done:
            return False  # the PG is not active yet: the write waits (retried later)
        del comp
        return done[0] == 0

    def _save_state(self) -> None:
        state = {"pids": self.pids, "conf": str(self.conf), "pool": self.pool,
                 "port": self.port, "own_dir": self._own_dir}
        (self.dir / STATE_FILE).write_text(json.dumps(state))

    # ---- what a running cluster offers ------------------------------------------------------

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each daemon now."""
        return {name: _rss_kib(pid) * 1024 for name, pid in self.pids.items()}

    @contextlib.contextmanager
    def client(self) -> Iterator[Any]:
        """A connected ``rados.Rados`` (shut down at exit)."""
        rados, _ = bindings()
        client = rados.Rados(conffile=str(self.conf))
        client.connect(timeout=30)
        try:
            yield client
        finally:
            client.shutdown()

    def target(self, image: str, pool: str | None = None) -> str:
        """The ``serve blk`` target of an image: ``rbd:POOL/IMAGE@CONF``."""
        return f"rbd:{pool or self.pool}/{image}@{self.conf}"

    def create_image(self, name: str, size: int, pool: str | None = None) -> None:
        _, rbd = bindings()
        with self.client() as client, contextlib.closing(
                client.open_ioctx(pool or self.pool)) as ioctx:
            rbd.RBD().create(ioctx, name, size)

    def remove_image(self, name: str, pool: str | None = None) -> None:
        _, rbd = bindings()
        with self.client() as client, contextlib.closing(
                client.open_ioctx(pool or self.pool)) as ioctx:
            rbd.RBD().remove(ioctx, name)

    # ---- stop ----------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0) -> None:
        """Kill the daemons (SIGTERM, then SIGKILL) and remove the directory if this object
        made it. Idempotent."""
        stop_pids(self.pids, self.dir, timeout)
        for proc in self.procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self.procs.clear()
        self.pids.clear()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> CephCluster:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _tmp_base() -> str | None:
    """Where the cluster's directory goes: tmpfs if there is one (the monitor's database
    syncs often), else the default temporary directory."""
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def _is_ours(pid: int, directory: Path) -> bool:
    """Whether ``pid`` is still one of this cluster's daemons (not a recycled pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]).decode(errors="replace") in DAEMONS \
        and str(directory / "ceph.conf").encode() in cmdline


def stop_pids(pids: dict[str, int], directory: Path, timeout: float = 15.0) -> None:
    """SIGTERM every daemon of the cluster in ``directory`` that still runs, then SIGKILL
    what is left after ``timeout`` seconds."""
    alive = [pid for pid in pids.values() if _is_ours(pid, directory)]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _is_ours(pid, directory) and not _reaped(pid)]
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reaped(pid)


def _reaped(pid: int) -> bool:
    """Reap ``pid`` if it is our child and has exited; True once it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:
        # Not our child (``stop`` from another process): gone when /proc says so, or a
        # zombie waiting for its parent.
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        return state in ("Z", "X")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyvirtio.testing.ceph",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_start = sub.add_parser("start", help="start a cluster in DIR (created if missing)")
    p_start.add_argument("dir", metavar="DIR")
    p_start.add_argument("--pool", default=DEFAULT_POOL)
    p_stop = sub.add_parser("stop", help="stop the cluster in DIR and remove DIR")
    p_stop.add_argument("dir", metavar="DIR")
    args = parser.parse_args(argv)
    directory = Path(args.dir).resolve()
    if args.cmd == "start":
        if (directory / STATE_FILE).exists():
            raise SystemExit(f"{directory} already holds a cluster: stop it first")
        directory.mkdir(parents=True, exist_ok=True)
        cluster = CephCluster(directory, pool=args.pool)
        try:
            cluster.start()
        except CephError as exc:
            shutil.rmtree(directory, ignore_errors=True)
            raise SystemExit(f"starting the cluster failed: {exc}") from exc
        rss = sum(cluster.rss_bytes().values())
        print(f"ceph cluster up in {cluster.start_seconds:.1f} s, daemons' RSS "
              f"{rss / (1 << 20):.0f} MiB, pool {cluster.pool!r}")
        print(cluster.conf)
        return 0
    state_path = directory / STATE_FILE
    if not state_path.exists():
        raise SystemExit(f"no cluster in {directory}")
    state = json.loads(state_path.read_text())
    stop_pids({k: int(v) for k, v in state["pids"].items()}, directory)
    shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
