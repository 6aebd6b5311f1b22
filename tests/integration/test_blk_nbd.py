"""``pyvirtio serve blk nbd://...``: a UML guest's disk is an nbdkit export on another "host".

Two network namespaces the module creates play two hosts joined by a veth pair: nbdkit
(file plugin, on a raw image) listens in one, ``pyvirtio serve blk nbd://ADDR/`` runs in the
other and reaches it over the veth; the UML guest only connects to the server's unix
socket. One nbdkit and one ``serve blk`` serve the whole module, in order:

1. the guest makes and reads back a file system and fio writes 64 MiB of 4 KiB blocks at
   queue depth 16 and verifies every one (crc32c);
2. nbdkit's ``error`` filter fails about 1% of reads (only while a trigger file exists):
   fio's failed reads, the device's IOERR answers and the errors nbdkit injected are the
   same number, and the disk reads back whole once the trigger is gone;
3. nbdkit is killed while four writers in the guest write numbered blocks (its writes are
   slowed so that some are in flight) and started again: the writers finish, and every
   block the guest wrote holds its number, on the server's image and read back by the guest.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers.blk import (
    BLOCK,
    FIO,
    FS_BLOCKS,
    FS_SCRIPT,
    BlkServer,
    GuardedImage,
    block_pattern,
    sha,
)
from helpers.nbd import Nbdkit, require_nbd
from helpers.net import Cleanup, Netns, join_namespaces
from peers import require_guest, require_root
from pyvirtio.guest import UmlGuest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MiB = 1 << 20
CLIENT_IP = "10.77.0.1"
SERVER_IP = "10.77.0.2"
DISK = 128 * MiB


@dataclass
class Remote:
    """The two hosts, the export, and the pyvirtio server reaching it."""

    workdir: Path
    image: GuardedImage
    server_ns: Netns
    trigger: Path  # while it exists, nbdkit fails ~1% of reads
    blk: BlkServer | None = None
    nbdkit: Nbdkit | None = None
    generation: int = 0
    kernel_args: list[str] = field(default_factory=list)

    @property
    def stats_path(self) -> Path:
        return self.workdir / "blk.stats.json"

    def start_nbdkit(self, *extra: str, filters: tuple[str, ...] = ("error",)) -> Nbdkit:
        self.generation += 1
        self.nbdkit = Nbdkit(
            ["file", f"file={self.image.path}", "error-pread=EIO", "error-pread-rate=1%",
             f"error-pread-file={self.trigger}", *extra],
            filters=filters, ip=SERVER_IP, netns=self.server_ns.name,
            log_path=self.workdir / f"nbdkit-{self.generation}.log")
        return self.nbdkit

    def stats(self) -> dict[str, object]:
        assert self.blk is not None
        return self.blk.stats(self.stats_path)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Remote]:
    require_guest("uml")
    require_root("network namespaces")
    require_nbd()
    cleanup = Cleanup()
    try:
        workdir = tmp_path_factory.mktemp("nbd")
        server_ns, client_ns = Netns("nbd-server"), None
        cleanup.add(server_ns.delete)
        client_ns = Netns("nbd-client")
        cleanup.add(client_ns.delete)
        join_namespaces(client_ns, server_ns, f"{CLIENT_IP}/24", f"{SERVER_IP}/24")
        r = Remote(workdir, GuardedImage(workdir, DISK), server_ns, workdir / "errors-on")
        r.start_nbdkit()
        cleanup.add(lambda: r.nbdkit and r.nbdkit.close())
        r.blk = BlkServer(f"nbd://{SERVER_IP}/", workdir / "blk.sock",
                          ["--stats-file", str(r.stats_path), "--reconnect-timeout", "60"],
                          log_path=workdir / "blk.log", netns=client_ns.name)
        cleanup.add(r.blk.close)
        r.kernel_args = r.blk.banner_args("uml")
        yield r
        assert r.blk.stop() == 0, r.blk.log()
    finally:
        cleanup.run()


def test_a_guest_makes_a_file_system_and_fio_verifies_64_mib_over_nbd(remote: Remote) -> None:
    assert remote.blk is not None
    assert f"nbd://{SERVER_IP}/" in remote.blk.output()
    script = (
        "result vda_sectors $(cat /sys/block/vda/size)\n"
        "result vda_features $(cat /sys/block/vda/device/features)\n"
        + FS_SCRIPT.format(dev="/dev/vda", fs_blocks=FS_BLOCKS)
        + FIO.format(dev="/dev/vda", offset="32M", name="vda")
    )
    with UmlGuest(script, kernel_args=remote.kernel_args, timeout=180) as guest:
        result = guest.wait(timeout=180)
    result.check()
    r = result.results
    assert int(r["vda_sectors"]) == DISK // 512
    assert r["fs_after"] == r["fs_before"] and r["fs_hello"] == "hello"
    assert r["fio_vda_status"] == "0", result.tail(60)
    assert r["fio_vda"] == "0;65536;65536", "fio: error;read KiB;write KiB"
    counters = remote.stats()
    assert counters["ioerr"] == 0 and counters["unsupp"] == 0, counters
    assert counters["writes"] >= 64 * MiB // BLOCK, counters  # fio's, at least
    # The export's data is on the server's image: the file system starts with ext2's magic.
    assert remote.image.read(1024 + 56, 2) == b"\x53\xef"
    remote.image.assert_outside_untouched()


ERROR_SCRIPT = """
echo ERRORS-READY
read go
# One 4 KiB read at a time (psync, O_DIRECT): each is one request, never merged with another.
host_run /usr/bin/fio --name=errors --filename=/dev/vda --rw=randread --bs=4k \\
    --ioengine=psync --direct=1 --size=64M --number_ios=3000 --continue_on_error=read \\
    --output-format=json > /tmp/fio-errors.json 2>/dev/null
result fio_errors_status $?
result fio_total_err $(grep -o '"total_err" *: *[0-9]*' /tmp/fio-errors.json | head -1 |
    tr -dc 0-9)
result fio_read_ios $(grep -o '"total_ios" *: *[0-9]*' /tmp/fio-errors.json | head -1 |
    tr -dc 0-9)
echo ERRORS-DONE
read go
result region_sha $(dd if=/dev/vda bs=1M count=64 iflag=direct 2>/dev/null | sha256sum |
    cut -d' ' -f1)
"""


def test_injected_read_errors_fail_those_requests_only(remote: Remote) -> None:
    assert remote.nbdkit is not None and remote.blk is not None
    before = remote.stats()
    injected_before = remote.nbdkit.count("injecting EIO error into pread")
    with UmlGuest(ERROR_SCRIPT, kernel_args=remote.kernel_args, timeout=180) as guest:
        guest.wait_for("^ERRORS-READY", timeout=90)
        remote.trigger.touch()
        try:
            guest.write("go\n")
            guest.wait_for("^ERRORS-DONE", timeout=150)
        finally:
            remote.trigger.unlink()
        guest.write("go\n")
        result = guest.wait(timeout=90)
    result.check()
    r = result.results
    after = remote.stats()
    injected = remote.nbdkit.count("injecting EIO error into pread") - injected_before
    ioerr = int(after["ioerr"]) - int(before["ioerr"])  # type: ignore[call-overload]
    # 1% of 3000 reads: dozens failed, and exactly those the server failed.
    assert injected >= 5, remote.nbdkit.log()[-2000:]
    assert int(r["fio_total_err"]) == injected == ioerr, (r, injected, ioerr)
    # The server kept going: still running, no reconnection, and the reads after the
    # errors give the server's bytes.
    assert remote.nbdkit.running
    assert after["backend"]["reconnects"] == before["backend"]["reconnects"]  # type: ignore[index]
    assert r["region_sha"] == sha(remote.image.read(0, 64 * MiB))


WRITERS = 4
BLOCKS_EACH = 100

RESTART_SCRIPT = f"""
W={WRITERS}; N={BLOCKS_EACH}
w=0
while [ $w -lt $W ]; do
    i=$((w * N)); end=$((i + N))
    while [ $i -lt $end ]; do printf '%-4096s' "pyvirtio block $i"; i=$((i + 1)); done \\
        > /tmp/blocks-$w
    w=$((w + 1))
done
echo WRITERS-STARTED
w=0
while [ $w -lt $W ]; do
    (dd if=/tmp/blocks-$w of=/dev/vda bs=4096 seek=$((w * N)) oflag=direct conv=notrunc,fsync \\
        2>/dev/null || echo "WRITE-FAILED $w") &
    w=$((w + 1))
done
wait
echo WRITERS-DONE
result expected $(cat /tmp/blocks-* | sha256sum | cut -d' ' -f1)
result actual $(dd if=/dev/vda bs=4096 count=$((W * N)) iflag=direct 2>/dev/null |
    sha256sum | cut -d' ' -f1)
"""


def test_a_killed_and_restarted_server_loses_no_acknowledged_write(remote: Remote) -> None:
    assert remote.nbdkit is not None and remote.blk is not None
    # The writes of this server take 30 ms each: while the guest writes, some are in flight.
    remote.nbdkit.kill()
    remote.start_nbdkit("delay-write=30ms", filters=("error", "delay"))
    mark = len(remote.blk.log())
    remote.blk.wait_log(r"reconnected after", timeout=30, start=mark)
    before = remote.stats()
    written = WRITERS * BLOCKS_EACH
    with UmlGuest(RESTART_SCRIPT, kernel_args=remote.kernel_args, timeout=180) as guest:
        guest.wait_for("^WRITERS-STARTED", timeout=90)
        _wait_for_blocks(remote.image, written, at_least=40, timeout=60)
        remote.nbdkit.kill()  # a crash, with writes in flight
        time.sleep(0.5)  # the guest's requests wait meanwhile
        remote.start_nbdkit()
        guest.wait_for("^WRITERS-DONE", timeout=120)
        result = guest.wait(timeout=60)
    result.check()
    assert "WRITE-FAILED" not in result.console, result.tail(40)
    assert result.results["actual"] == result.results["expected"]
    data = remote.image.read(0, written * BLOCK)
    lost = [i for i in range(written) if data[i * BLOCK : (i + 1) * BLOCK] != block_pattern(i)]
    assert not lost, f"blocks without their acknowledged write: {lost}"
    after = remote.stats()
    backend_before, backend_after = before["backend"], after["backend"]
    assert backend_after["reconnects"] == backend_before["reconnects"] + 1  # type: ignore[index]
    # Writes were in flight when the server died, and were issued again.
    assert backend_after["reissued"] > backend_before["reissued"], after  # type: ignore[index]
    assert after["ioerr"] == before["ioerr"], after
    assert re.search(r"connection lost", remote.blk.log()), remote.blk.log()[-3000:]
    remote.image.assert_outside_untouched()


def _wait_for_blocks(image: GuardedImage, total: int, at_least: int, timeout: float) -> int:
    """Until the server's image holds ``at_least`` of the numbered blocks."""
    deadline = time.monotonic() + timeout
    while True:
        data = image.read(0, total * BLOCK)
        done = sum(data[i * BLOCK : (i + 1) * BLOCK] == block_pattern(i) for i in range(total))
        if done >= at_least:
            return done
        if time.monotonic() > deadline:
            raise AssertionError(f"only {done} blocks written after {timeout} s")
        time.sleep(0.05)
