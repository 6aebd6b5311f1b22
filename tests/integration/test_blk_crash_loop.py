"""Back-end crash loop (issue 9): a QEMU guest runs fio ``--verify=crc32c`` random writes
while ``pyvirtio serve blk`` is SIGKILLed and restarted at random moments, again and again;
fio sees no error, and every write it saw acknowledged is on the disk afterwards.

QEMU 7.2's vhost-user-blk-pci with ``-chardev socket,...,reconnect=1`` reconnects to each
new back-end and hands it the INFLIGHT_SHMFD region, so requests that were in flight at the
kill are resubmitted (see test_blk_crash.py for the single, deterministic in-flight kill).

The guest runs the host's own fio (its 64 shared libraries and loader are put in the
initramfs by :func:`pyvirtio.guest.host_program`). fio runs pass after pass over the first
8 MiB of the disk: each pass writes every 4 KiB block once in random order (libaio, queue
depth 8, O_DIRECT), then reads every block back (``--do_verify=1``). Each pass has its own
``--randseed``, so each block's content and the seed in its fio header differ from pass
to pass. What proves what:

* fio's verify phase checks every write it saw acknowledged in that pass: the block read
  back must carry that write's seed (a stale block from an earlier pass fails), its offset
  and write number, and a matching crc32c of the data. ``--continue_on_error=all`` makes
  fio count every error instead of stopping: its terse line's error, total-error and
  first-error fields must be 0, and it must have written and read back the whole range.
* After the last kill, a ``--verify_only`` pass reads the whole range through the
  restarted device: every block is a complete fio block for its own offset with a good
  crc32c (nothing torn, zeroed or misplaced).
* The guest's sha256 of the range (O_DIRECT) equals the host's sha256 of the image file, so
  what fio verified is what the file holds; the host also checks each block's fio header
  (magic, verify type, length, offset) on its own.

* Nothing hangs: a guest whose I/O stops (as it did when a back-end died between
  publishing completions and writing the call fd, before a resumed ring notified the
  driver) fails the bounded wait for the passes to end.

CI form: at least 5 kills over at least 30 s. ``PYVIRTIO_SOAK=1``: at least 20 kills
over at least 3 minutes.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import time
from pathlib import Path

import pytest

from helpers.blk import BLOCK, BlkServer, GuardedImage
from peers import require_guest
from pyvirtio.guest import QemuGuest, VhostUserBlk, host_program

SOAK = bool(os.environ.get("PYVIRTIO_SOAK"))
KILLS = 20 if SOAK else 5
MIN_SECONDS = 180.0 if SOAK else 30.0

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800 if SOAK else 280)]

RANGE = 8 << 20  # the bytes fio writes, at the start of a 16 MiB disk
FIO_HEADER = struct.Struct("<HHIQQ")  # magic, verify type, length, rand seed, offset
FIO_MAGIC = 0xACCA
FIO_VERIFY_CRC32C = 5  # fio's enum value for --verify=crc32c (3.33)
# terse v3 with --continue_on_error: 132 fields; 5 error, 6 read KiB, 47 write KiB,
# 131 total errors, 132 first error (1-based, as fio's documentation counts them)
TERSE_FIELDS = 132

FIO_LOOP = f"""
FIO="fio --name=crash --filename=/dev/vda --rw=randwrite --bs=4k --size={RANGE}
     --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1
     --continue_on_error=all --output-format=terse --terse-version=3"
fio_pass() {{  # fio_pass NAME ARGS...: one fio run, its stderr and terse line on the console
    name=$1
    shift
    $FIO "$@" > /tmp/fio.out 2> /tmp/fio.err
    status=$?
    sed 's/^/FIO-STDERR /' /tmp/fio.err
    echo "FIO $name status=$status terse=$(grep '^3;' /tmp/fio.out)"
}}
(
    p=0
    while [ ! -e /tmp/stop ]; do
        p=$((p + 1))
        fio_pass pass$p --randseed=$p
        echo $p > /tmp/last
    done
) &
echo FIO-STARTED
read go
touch /tmp/stop
wait
echo PASSES-DONE
fio_pass final --randseed=$(cat /tmp/last) --verify_only
result passes $(cat /tmp/last)
result sha $(dd if=/dev/vda bs=4096 count={RANGE // BLOCK} iflag=direct status=none |
    sha256sum | cut -d' ' -f1)
"""

FIO_LINE = re.compile(r"^FIO (\S+) status=(\d+) terse=(.*?)\s*$", re.M)


def fio_runs(console: str) -> dict[str, list[str]]:
    """Each fio run's terse v3 fields, by run name (``pass1``... ``final``)."""
    runs = {}
    for name, status, terse in FIO_LINE.findall(console):
        fields = terse.split(";")
        assert status == "0" and len(fields) == TERSE_FIELDS, \
            f"fio run {name} exited {status} with terse line {terse!r}"
        runs[name] = fields
    return runs


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_fio_verify_survives_blk_back_end_killed_again_and_again(tmp_path: Path,
                                                                  packed: bool) -> None:
    """On split rings, and on packed rings (``packed=on``: each restarted back-end takes the
    ring's positions from the packed inflight region; docs/peers.md)."""
    require_guest("qemu")
    seed = random.randrange(1 << 32)
    print(f"crash loop seed {seed}")
    rng = random.Random(seed)
    image = GuardedImage(tmp_path, 16 << 20)
    sock = tmp_path / "blk.sock"
    servers = [BlkServer(image.path, sock, log_path=tmp_path / "serve-0.log")]
    try:
        guest = QemuGuest(FIO_LOOP, devices=[VhostUserBlk(str(sock), reconnect=1, packed=packed)],
                          extra_files=host_program("/usr/bin/fio"),
                          timeout=(1800 if SOAK else 270))
        t0 = time.monotonic()
        cached = guest.build().cached  # 84 MB of fio and libraries: built once, then cached
        t1 = time.monotonic()
        with guest:
            guest.wait_for("^FIO-STARTED", timeout=150)
            started = time.monotonic()
            kills = 0
            while kills < KILLS or time.monotonic() - started < MIN_SECONDS:
                time.sleep(rng.uniform(0.05, 3.0))  # fio is running: kill anywhere
                servers[-1].kill()
                kills += 1
                server = BlkServer(image.path, sock, log_path=tmp_path / f"serve-{kills}.log")
                servers.append(server)
                # QEMU reconnected and restarted the ring: fio's I/O flows again.
                server.wait_log(r"vring 0 started", timeout=60)
            seconds = time.monotonic() - started
            guest.write("go\n")
            guest.wait_for("^PASSES-DONE", timeout=120)
            result = guest.wait(timeout=150)
            ended = time.monotonic()
        assert servers[-1].stop() == 0
        if packed:  # the guest ran packed rings, restored from the region after the kills
            assert any("from the inflight region" in s.log() for s in servers[1:]), \
                servers[-1].log()
    finally:
        for server in servers:
            server.close()
    result.check()
    assert "FIO-STDERR" not in result.console, result.tail(40)
    runs = fio_runs(result.console)
    passes = int(result.results["passes"])
    assert set(runs) == {f"pass{p}" for p in range(1, passes + 1)} | {"final"}, sorted(runs)
    kib = str(RANGE >> 10)
    for name, fields in runs.items():
        # 0 errors of any kind (I/O or verify), all of them counted, none fatal ...
        assert (fields[4], fields[130], fields[131]) == ("0", "0", "0"), (name, fields[4:6])
        # ... and the whole range read back (verified); each pass also wrote all of it.
        assert fields[5] == kib and fields[46] == kib, (name, fields[5], fields[46])
    logs = "".join(s.log() for s in servers)
    resubmitted = sum(int(n) for n in re.findall(
        r"vring 0 restarts at used idx \d+ with (\d+) request\(s\) in flight", logs))
    assert "INFLIGHT_SHMFD" in logs, "QEMU did not negotiate INFLIGHT_SHMFD"
    # What fio verified through the device is what the image file holds ...
    data = image.read(0, RANGE)
    assert hashlib.sha256(data).hexdigest() == result.results["sha"]
    # ... and every block there is a fio block of the right kind at its own offset.
    wrong = [i for i in range(RANGE // BLOCK)
             if FIO_HEADER.unpack_from(data, i * BLOCK)[:3] != (FIO_MAGIC, FIO_VERIFY_CRC32C,
                                                                 BLOCK)
             or FIO_HEADER.unpack_from(data, i * BLOCK)[4] != i * BLOCK]
    assert not wrong, f"blocks without a valid fio header for their offset: {wrong[:20]}"
    assert image.read(RANGE) == bytes(image.size - RANGE), "fio wrote outside its range"
    image.assert_outside_untouched()
    print(f"crash loop: {kills} kills survived in {seconds:.0f} s; fio wrote and verified "
          f"{passes} passes of {RANGE >> 20} MiB ({passes * RANGE} bytes) with 0 errors, "
          f"then a verify-only pass after the last kill; {resubmitted} in-flight "
          f"request(s) resubmitted. Image {'cached' if cached else 'built'} in "
          f"{t1 - t0:.1f} s, boot to fio {started - t1:.1f} s, kill loop {seconds:.1f} s, "
          f"last pass + verify-only pass + poweroff {ended - started - seconds:.1f} s")
