"""``pyvirtio serve blk`` with real Linux guests: User-Mode Linux and QEMU 7.2.

Each guest is attached with exactly the arguments the server's banner printed. In the
guest: busybox makes an ext2 file system, files are written, synced, the file system is
unmounted, the caches dropped, mounted again and read back with matching checksums; then
the host's ``e2fsck -fn`` finds the image clean. In UML, the host's fio (through hostfs)
writes 64 MiB of random 4 KiB blocks at queue depth 16 with crc32c verification, on a
one-queue and on a two-queue device; discard and write-zeroes issued by the guest leave
holes the host sees. UML is uniprocessor and Linux's virtio_blk uses at most one queue per
CPU, so UML negotiates MQ and sees two queues offered but runs one; a two-vCPU QEMU guest
runs both (writes pinned to each CPU). The servers stop cleanly on SIGTERM: exit
status 0, socket removed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.blk import (
    FIO,
    FS_BLOCKS,
    FS_SCRIPT,
    BlkServer,
    GuardedImage,
)
from peers import require_guest
from pyvirtio.guest import QemuGuest, UmlGuest
from pyvirtio.guest.image import host_program
from pyvirtio.spec import features as F

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
TRIM_SCRIPT = """
dd if=/dev/urandom of={dev} bs=1M seek={seek} count=16 oflag=direct 2>/dev/null
sync
echo TRIM-READY
read go
blkdiscard -o $(({seek} << 20)) -l $((8 << 20)) {dev}
result blkdiscard $?
host_run /usr/bin/fallocate --punch-hole -o $((({seek} + 8) << 20)) -l $((4 << 20)) {dev}
result punch $?
sync
echo TRIM-DONE
read go
"""


@pytest.fixture
def e2fsck() -> str:
    exe = shutil.which("e2fsck") or "/sbin/e2fsck"
    if not Path(exe).exists():
        pytest.skip("e2fsck missing (Debian package e2fsprogs)")
    return exe


def assert_fsck_clean(e2fsck: str, image: Path) -> None:
    # -f: check even if marked clean; -n: open read-only, answer no. Exit 0: no errors.
    r = subprocess.run([e2fsck, "-fn", str(image)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, f"e2fsck found problems:\n{r.stdout}\n{r.stderr}"


def stopped_cleanly(server: BlkServer) -> None:
    assert server.stop() == 0, server.log()
    assert not server.sock.exists(), "the socket file was left behind"
    assert "shutting down" in server.log()


@pytest.fixture
def servers() -> Iterator[list[BlkServer]]:
    started: list[BlkServer] = []
    yield started
    for s in started:
        s.close()


def test_uml_guest_gets_a_working_disk_with_one_and_with_two_queues(
        tmp_path: Path, servers: list[BlkServer], e2fsck: str) -> None:
    require_guest("uml")
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    one = GuardedImage(one_dir, 128 * MiB)
    two = GuardedImage(two_dir, 80 * MiB)
    stats = tmp_path / "one.stats.json"
    servers.append(BlkServer(one.path, tmp_path / "one.sock", ["--stats-file", str(stats)],
                             log_path=tmp_path / "one.log"))
    servers.append(BlkServer(two.path, tmp_path / "two.sock", ["--queues", "2"],
                             log_path=tmp_path / "two.log"))
    kernel_args = [*servers[0].banner_args("uml"), *servers[1].banner_args("uml")]
    assert kernel_args == [f"virtio_uml.device={tmp_path / 'one.sock'}:2",
                           f"virtio_uml.device={tmp_path / 'two.sock'}:2"]
    script = (
        "result cpus $(nproc)\n"
        "result vda_queues $(ls /sys/block/vda/mq | wc -l)\n"
        "result vdb_queues $(ls /sys/block/vdb/mq | wc -l)\n"
        "result vdb_features $(cat /sys/block/vdb/device/features)\n"
        "result vda_sectors $(cat /sys/block/vda/size)\n"
        + FS_SCRIPT.format(dev="/dev/vda", fs_blocks=FS_BLOCKS)
        + FIO.format(dev="/dev/vda", offset="32M", name="vda")
        + FIO.format(dev="/dev/vdb", offset="0", name="vdb")
        + TRIM_SCRIPT.format(dev="/dev/vda", seek=100)
    )
    with UmlGuest(script, kernel_args=kernel_args, timeout=180) as guest:
        guest.wait_for("^TRIM-READY", timeout=150)
        before = one.blocks() * 512  # st_blocks: 512-byte units
        guest.write("go\n")
        guest.wait_for("^TRIM-DONE", timeout=30)
        after = one.blocks() * 512
        guest.write("go\n")
        result = guest.wait(timeout=30)
    result.check()
    r = result.results
    assert r["vda_queues"] == "1"
    assert r["vdb_features"][12] == "1", "UML did not negotiate VIRTIO_BLK_F_MQ"
    # UML runs Linux's packed ring on our device although virtio_uml sends SET_VRING_BASE 0
    # (wrap counter 0) for it: the back-end starts a never-wrapped ring fresh.
    assert r["vdb_features"][F.RING_PACKED] == "1", "UML did not negotiate RING_PACKED"
    assert "SET_VRING_BASE 0 on a packed ring that never wrapped" in servers[1].log()
    # One hardware queue per CPU at most (virtio_blk caps num_vqs at nr_cpu_ids).
    assert int(r["vdb_queues"]) == min(2, int(r["cpus"]))
    assert int(r["vda_sectors"]) == 128 * MiB // 512
    assert r["fs_after"] == r["fs_before"] and r["fs_hello"] == "hello"
    for name in ("vda", "vdb"):
        assert r[f"fio_{name}_status"] == "0", result.tail(60)
        assert r[f"fio_{name}"] == "0;65536;65536", "fio: error;read KiB;write KiB"
    assert r["blkdiscard"] == "0" and r["punch"] == "0"
    # 8 MiB discarded plus 4 MiB punched out of 16 MiB written: the host sees the holes.
    assert before - after >= 12 * MiB - 64 * 1024, (before, after)
    for s in servers:
        stopped_cleanly(s)
    counters = json.loads(stats.read_text())
    assert counters["discards"] >= 1 and counters["write_zeroes"] >= 1, counters
    assert counters["ioerr"] == 0 and counters["unsupp"] == 0, counters
    # fio's QD16 writes kept vda busy enough for batch mode (the default): the verify above
    # passed with requests served from timer ticks as well as from kicks.
    assert counters["batch_ticks"] > 0, counters
    assert_fsck_clean(e2fsck, one.path)
    one.assert_outside_untouched()
    two.assert_outside_untouched()


def test_qemu_guest_gets_a_working_disk(tmp_path: Path, servers: list[BlkServer],
                                         e2fsck: str) -> None:
    """Linux's packed-ring driver (the banner's packed=on) on our device: features show
    RING_PACKED (bit 34), fio verifies, a file system survives, discards arrive."""
    require_guest("qemu")
    fio = shutil.which("fio")
    if fio is None:
        pytest.skip("fio missing (Debian package fio)")
    image = GuardedImage(tmp_path, 64 * MiB)
    sock = tmp_path / "blk.sock"
    stats = tmp_path / "stats.json"
    servers.append(BlkServer(image.path, sock, ["--queues", "2", "--stats-file", str(stats)],
                             log_path=tmp_path / "server.log"))
    banner = servers[0].banner_args("qemu")
    assert banner[-4:] == ["-chardev", f"socket,id=vu0,path={sock}", "-device",
                           "vhost-user-blk-pci,chardev=vu0,num-queues=2,packed=on"]
    assert "memory-backend-memfd,id=mem,size=512M,share=on" in banner
    script = (
        "result queues $(ls /sys/block/vda/mq | wc -l)\n"
        "result features $(cat /sys/block/vda/device/features)\n"
        f"{fio} --name=verify --filename=/dev/vda --offset=50M --size=8M --bs=4k "
        "--rw=randwrite --ioengine=psync --direct=1 --iodepth=1 --verify=crc32c "
        "--verify_fatal=1 --do_verify=1 --numjobs=1 >/dev/null 2>&1\n"
        "result fio $?\n"
        "result serial $(cat /sys/block/vda/serial)\n"
        + FS_SCRIPT.format(dev="/dev/vda", fs_blocks=FS_BLOCKS)
        # One writer pinned to each vCPU: blk-mq maps each CPU to its own queue.
        + "for cpu in 0 1; do taskset -c $cpu dd if=/dev/urandom of=/dev/vda bs=4k "
          "seek=$((9000 + cpu * 64)) count=64 oflag=direct 2>/dev/null & done; wait\n"
        + "blkdiscard -o $((40 << 20)) -l $((8 << 20)) /dev/vda\nresult blkdiscard $?\n"
    )
    # QemuGuest brings the shared-memory machine itself; the rest is the banner's.
    result = QemuGuest(script, extra_args=banner[-4:], smp=2, timeout=180,
                       extra_files=host_program(fio)).run()
    result.check()
    r = result.results
    assert r["features"][F.RING_PACKED] == "1", r["features"]  # the guest runs packed rings
    assert r["fio"] == "0"  # fio wrote 8 MiB and verified every block (crc32c)
    assert r["queues"] == "2" and r["serial"] == "pyvirtio-blk"
    log = servers[0].log()
    assert "vring 0 started" in log and "vring 1 started" in log
    assert r["fs_after"] == r["fs_before"] and r["fs_hello"] == "hello"
    assert r["blkdiscard"] == "0"
    stopped_cleanly(servers[0])
    counters = json.loads(stats.read_text())
    assert counters["discards"] >= 1 and counters["ioerr"] == 0, counters
    assert_fsck_clean(e2fsck, image.path)
    image.assert_outside_untouched()
