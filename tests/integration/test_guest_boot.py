"""Boot real UML and QEMU guests with pyvirtio.guest: results, exit status, hangs, cleanup.

These tests need the Debian packages user-mode-linux, qemu-system-x86, linux-image-cloud-amd64
and busybox-static; each test is skipped (with the missing package named) only when they are
absent. Images are cached (PYVIRTIO_CACHE or ~/.cache/pyvirtio), so reruns skip the build.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peers import require_guest
from pyvirtio.guest import (
    Guest,
    GuestError,
    GuestKind,
    GuestTimeoutError,
    MissingDependencyError,
    QemuGuest,
    UmlGuest,
    VhostUserBlk,
    VhostUserDevice,
    build_initramfs,
    find_qemu_kernel,
    find_uml_kernel,
    host_program,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RESULTS_SCRIPT = """\
result sum $((40 + 2))
result words hello guest world
result kernel $(uname -r)
result virtio_modules $(lsmod | grep -c '^virtio')
echo done with results
"""



@pytest.fixture(params=["uml", "qemu"])
def guest_cls(request: pytest.FixtureRequest) -> type[Guest]:
    """Each test using this runs on both UML and QEMU."""
    require_guest(request.param)
    return UmlGuest if request.param == "uml" else QemuGuest


@pytest.fixture
def uml() -> type[UmlGuest]:
    require_guest("uml")
    return UmlGuest


@pytest.fixture
def qemu() -> type[QemuGuest]:
    require_guest("qemu")
    return QemuGuest


def _gone(pid: int) -> bool:
    """True if ``pid`` no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rfind(")") + 2] == "Z"


def _read_newc(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Parse a newc cpio archive: path -> (mode, data). Independent of the writer."""
    entries: dict[str, tuple[int, bytes]] = {}
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701", f"bad magic at {offset}"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[data_start : data_start + size])
        offset = (data_start + size + 3) & ~3


# -- boots on both UML and QEMU --------------------------------------------------------------


def test_boot_reports_results(guest_cls: type[Guest]) -> None:
    result = guest_cls(RESULTS_SCRIPT).run()
    print(f"{guest_cls.kind}: boot to poweroff in {result.elapsed:.2f}s")
    result.check()
    assert result.finished and result.exit_status == 0 and result.ready
    assert not result.timed_out and not result.killed
    assert result.returncode == 0
    assert result.module_errors == ()
    assert result.results["sum"] == "42"
    assert result.results["words"] == "hello guest world"
    image = build_initramfs(guest_cls.kind, RESULTS_SCRIPT)
    assert image.cached
    assert result.results["kernel"] == image.kernel.version
    # every module we insmod'ed from the image is loaded (UML has virtio built in)
    virtio_loaded = [m for m in image.modules if m.startswith("virtio")]
    assert int(result.results["virtio_modules"]) == len(virtio_loaded)
    assert "done with results" in result.console
    assert str(image.path) in result.command_line


def test_nonzero_exit_is_reported(guest_cls: type[Guest]) -> None:
    result = guest_cls("result reached yes\nexit 7\nresult never yes").run()
    assert result.finished
    assert result.exit_status == 7
    assert not result.ok
    assert result.results == {"reached": "yes"}
    with pytest.raises(GuestError, match="status 7") as info:
        result.check()
    assert result.command[0] in str(info.value)  # errors carry the command line


def test_hang_is_killed_at_timeout_and_cleaned_up(guest_cls: type[Guest]) -> None:
    guest = guest_cls("echo going to sleep\nsleep 1000", timeout=120)
    with guest:
        guest.wait_for("going to sleep", timeout=60)
        pids = guest.processes()
        assert guest.pid in pids
        result = guest.wait(timeout=1.0)
    assert result.timed_out and result.killed
    assert not result.finished and result.exit_status is None
    assert result.ready
    assert result.returncode == -9
    assert guest.processes() == []
    assert all(_gone(pid) for pid in pids), [p for p in pids if not _gone(p)]
    workdirs = re.findall(r"uml_dir=(\S+)", result.command_line)
    assert all(not Path(d).exists() for d in workdirs)


# -- UML ------------------------------------------------------------------------------------


def test_uml_interactive_console_and_crash(uml: type[UmlGuest]) -> None:
    with uml("read line\nresult got $line\nsleep 1000") as guest:
        guest.wait_ready(timeout=60)
        guest.write("hello from the host\n")
        match = guest.wait_for(r"PYVIRTIO-RESULT got=(.*)", timeout=30)
        assert match.group(1) == "hello from the host"
        with pytest.raises(GuestTimeoutError):
            guest.wait_for("this line never comes", timeout=0.5)
        guest.kill()  # a crash: SIGKILL to the whole process tree
        result = guest.wait(timeout=10)
    assert result.killed and not result.timed_out and not result.finished
    assert result.returncode == -9
    assert result.results == {"got": "hello from the host"}
    assert guest.processes() == []


def test_uml_hostfs_runs_host_fio(uml: type[UmlGuest]) -> None:
    if not Path("/usr/bin/fio").is_file():
        pytest.skip("/usr/bin/fio not found: install the Debian package 'fio'")
    script = (
        "result fio $(host_run /usr/bin/fio --version)\n"
        "result mount $(grep ' /host ' /proc/mounts)\n"
    )
    result = uml(script).run().check()
    assert re.fullmatch(r"fio-\d+\.\d+.*", result.results["fio"]), result.results
    assert re.match(r"\S+ /host hostfs ro[, ]", result.results["mount"]), result.results


# -- QEMU -----------------------------------------------------------------------------------


def test_qemu_builtin_virtio_rng_binds_driver(qemu: type[QemuGuest]) -> None:
    script = (
        "result rng $(cat /sys/class/misc/hw_random/rng_current)\n"
        "result bytes $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | wc -c)\n"
    )
    result = qemu(script, extra_args=["-device", "virtio-rng-pci"]).run().check()
    assert result.results["rng"] == "virtio_rng.0"
    assert result.results["bytes"] == "16"
    assert "-device virtio-rng-pci" in result.command_line


# -- images ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["uml", "qemu"])
def test_image_is_cached_and_well_formed(kind: GuestKind, tmp_path: Path) -> None:
    require_guest(kind)
    script = f"result cache-test {kind}\n"
    extra = {"etc/pyvirtio-test": (b"payload\n", 0o600)}
    first = build_initramfs(kind, script, extra_files=extra, cache_dir=tmp_path)
    assert not first.cached
    stat = first.path.stat()
    second = build_initramfs(kind, script, extra_files=extra, cache_dir=tmp_path)
    assert second.cached and second.path == first.path
    assert second.path.stat().st_ino == stat.st_ino  # the same file, not a rewritten one
    other = build_initramfs(kind, script + "true\n", cache_dir=tmp_path)
    assert other.path != first.path

    # concurrent builders of one new image never see or leave a partial file
    paths: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            img = build_initramfs(kind, "result race 1\n", cache_dir=tmp_path)
            paths.append(img.path)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(paths)) == 1
    leftovers = [p.name for p in paths[0].parent.iterdir() if p.name.startswith(".tmp")]
    assert leftovers == []

    entries = _read_newc(gzip.decompress(first.path.read_bytes()))
    assert entries["init"][0] == 0o100755
    assert entries["bin/sh"] == (0o120777, b"busybox")
    assert entries["dev/console"][0] == 0o020600
    assert entries["pyvirtio/script.sh"][1] == script.encode()
    assert entries["etc/pyvirtio-test"] == (0o100600, b"payload\n")
    modules = {os.path.basename(n): d for n, (_, d) in entries.items() if n.endswith(".ko")}
    assert set(first.modules) == {n[:-3].replace("-", "_") for n in modules}
    assert all(data.startswith(b"\x7fELF") for data in modules.values())  # decompressed
    init = entries["init"][1].decode()
    order = [
        os.path.basename(line.split()[-1])[: -len(".ko")]
        for line in init.splitlines()
        if line.startswith("pyvirtio_insmod /")
    ]
    assert order.index("failover") < order.index("net_failover") < order.index("virtio_net")
    if kind == "qemu":
        assert order.index("virtio_ring") < order.index("virtio") < order.index("virtio_pci")
        assert "virtio-rng" in order


def test_host_program_brings_its_loader_and_exactly_its_libraries(tmp_path: Path) -> None:
    require_guest("qemu")
    fio = Path("/usr/bin/fio")
    if not fio.is_file():
        pytest.skip("/usr/bin/fio not found: install the Debian package 'fio'")
    files = host_program(fio)
    assert files[str(fio)] == (fio, 0o755)
    assert "/lib64/ld-linux-x86-64.so.2" in files  # fio's PT_INTERP, at its own path
    needed = subprocess.run(["readelf", "-d", str(fio)], capture_output=True, text=True,
                            check=True).stdout
    names = {os.path.basename(k) for k in files}
    assert set(re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", needed)) <= names
    assert all(source.is_file() and path.startswith("/") for path, (source, _) in
               files.items())
    assert not any("vdso" in k for k in files)
    busybox = shutil.which("busybox") or "/bin/busybox"
    assert host_program(busybox) == {busybox: (Path(busybox), 0o755)}  # static: itself only

    # a host Path as an extra file is copied into the image at build time
    src = tmp_path / "payload.bin"
    src.write_bytes(b"from the host\n")
    image = build_initramfs("qemu", "true\n", extra_files={"opt/p": (src, 0o600)},
                            cache_dir=tmp_path, compress=False)
    assert _read_newc(image.path.read_bytes())["opt/p"] == (0o100600, b"from the host\n")


def test_missing_package_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match="user-mode-linux"):
        find_uml_kernel(modules_root=tmp_path)
    with pytest.raises(MissingDependencyError, match="user-mode-linux"):
        find_uml_kernel(binary="linux.uml-not-installed")
    with pytest.raises(MissingDependencyError, match="linux-image-cloud-amd64"):
        find_qemu_kernel(roots=[tmp_path])


# -- a real vhost-user back-end (QEMU's own) on both front-ends ---------------------------


@pytest.fixture
def storage_daemon(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """qemu-storage-daemon exporting a 64 MiB disk as vhost-user-blk (2 queues)."""
    exe = shutil.which("qemu-storage-daemon")
    if exe is None:
        pytest.skip("qemu-storage-daemon not found: install the Debian package 'qemu-utils'")
    disk, sock = tmp_path / "disk.img", tmp_path / "blk.sock"
    with disk.open("wb") as f:
        f.truncate(64 << 20)
    proc = subprocess.Popen(
        [
            exe,
            "--blockdev",
            f"driver=file,node-name=f0,filename={disk}",
            "--export",
            f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={sock},"
            "writable=on,num-queues=2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "qemu-storage-daemon did not create its socket"
            time.sleep(0.05)
        yield disk, sock
    finally:
        proc.kill()
        proc.wait(timeout=10)


BLK_SCRIPT = """\
result sectors $(cat /sys/block/vda/size)
echo written-by-guest | dd of=/dev/vda bs=512 conv=sync 2>/dev/null
sync
"""


def test_vhost_user_blk_device(guest_cls: type[Guest], storage_daemon: tuple[Path, Path]) -> None:
    disk, sock = storage_daemon
    if guest_cls is UmlGuest:
        guest: Guest = UmlGuest(BLK_SCRIPT, devices=[VhostUserDevice(sock, 2)])
    else:
        guest = QemuGuest(BLK_SCRIPT, devices=[VhostUserBlk(sock, num_queues=2, reconnect=1)])
    result = guest.run().check()
    assert result.results["sectors"] == str((64 << 20) // 512)
    assert disk.read_bytes()[:17] == b"written-by-guest\n"
