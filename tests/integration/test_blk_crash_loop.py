"""Back-end crash loop (issue 9): a QEMU guest keeps writing while ``pyvirtio serve blk`` is
SIGKILLed and restarted at random moments, again and again; no write fails, and every write
the guest saw acknowledged is on the disk afterwards.

QEMU 7.2's vhost-user-blk-pci with ``-chardev socket,...,reconnect=1`` reconnects to each
new back-end and hands it the INFLIGHT_SHMFD region, so requests that were in flight at the
kill are resubmitted (see test_blk_crash.py for the single, deterministic in-flight kill).

The writers are the guest's own: four busybox shells, each owning 64 blocks, each writing a
block at a pseudo-random index with O_DIRECT and a content naming its writer, generation
and index, and logging the write in guest RAM only once ``dd`` returned (the guest saw it
acknowledged). fio is not used: the QEMU guest runs from an initramfs, and fio with its 64
shared libraries (84 MB) does not fit one; UML guests, which run the host's fio through
hostfs, do not reconnect (docs/peers.md). After the last kill the guest reads the whole
range back through the restarted device and compares it with what its log says it wrote,
and the host compares the image with the same log, block by block.

CI form: at least 5 kills over at least 30 s. ``PYVIRTIO_SOAK=1``: at least 20 kills
over at least 3 minutes.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest
from blk_guest_helpers import BLOCK, BlkServer, GuardedImage

from peers import require_guest
from pyvirtio.guest import QemuGuest, VhostUserBlk

SOAK = bool(os.environ.get("PYVIRTIO_SOAK"))
KILLS = 20 if SOAK else 5
MIN_SECONDS = 180.0 if SOAK else 30.0

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800 if SOAK else 280)]

WRITERS = 4
BLOCKS_EACH = 64

WRITE_LOOP = f"""
W={WRITERS}; N={BLOCKS_EACH}
writer() {{
    w=$1; g=0; s=$((w * 7919 + 17)); : > /tmp/acked$w
    while [ ! -e /tmp/stop ]; do
        g=$((g + 1)); s=$(((s * 1103515245 + 12345) % 2147483648))
        i=$((w * N + (s >> 8) % N))
        if printf '%-4096s' "pyvirtio writer $w gen $g block $i" |
            dd of=/dev/vda bs=4096 seek=$i oflag=direct conv=notrunc status=none; then
            echo "$i $w $g" >> /tmp/acked$w
        else
            echo "WRITE-FAILED $i"
        fi
    done
}}
for w in $(seq 0 $((W - 1))); do writer $w & done
echo WRITERS-STARTED
read go
touch /tmp/stop
wait
echo WRITERS-DONE
cat /tmp/acked* > /tmp/acked
result acked $(wc -l < /tmp/acked)
expected() {{
    i=0
    while [ $i -lt $((W * N)) ]; do
        line=$(grep "^FINAL $i " /tmp/final)
        if [ -n "$line" ]; then
            set -- $line
            printf '%-4096s' "pyvirtio writer $3 gen $4 block $i"
        else
            dd if=/dev/zero bs=4096 count=1 status=none
        fi
        i=$((i + 1))
    done
}}
awk '{{last[$1] = $2 " " $3}} END {{for (i in last) print "FINAL " i " " last[i]}}' \\
    /tmp/acked > /tmp/final
cat /tmp/final
result expected $(expected | sha256sum | cut -d' ' -f1)
echo 3 > /proc/sys/vm/drop_caches
result actual $(dd if=/dev/vda bs=4096 count=$((W * N)) iflag=direct status=none |
    sha256sum | cut -d' ' -f1)
"""


def test_blk_back_end_killed_again_and_again_loses_no_acknowledged_write(
        tmp_path: Path) -> None:
    require_guest("qemu")
    seed = random.randrange(1 << 32)
    print(f"crash loop seed {seed}")
    rng = random.Random(seed)
    image = GuardedImage(tmp_path, 16 << 20)
    sock = tmp_path / "blk.sock"
    servers = [BlkServer(image.path, sock, log_path=tmp_path / "serve-0.log")]
    try:
        guest = QemuGuest(WRITE_LOOP, devices=[VhostUserBlk(str(sock), reconnect=1)],
                          timeout=(1800 if SOAK else 270))
        with guest:
            guest.wait_for("^WRITERS-STARTED", timeout=150)
            started = time.monotonic()
            kills = 0
            while kills < KILLS or time.monotonic() - started < MIN_SECONDS:
                time.sleep(rng.uniform(0.05, 3.0))  # the writers are running: kill anywhere
                servers[-1].kill()
                kills += 1
                server = BlkServer(image.path, sock, log_path=tmp_path / f"serve-{kills}.log")
                servers.append(server)
                # QEMU reconnected and restarted the ring: the guest writes again.
                server.wait_log(r"vring 0 started", timeout=60)
            seconds = time.monotonic() - started
            guest.write("go\n")
            guest.wait_for("^WRITERS-DONE", timeout=120)
            result = guest.wait(timeout=150)
        assert servers[-1].stop() == 0
    finally:
        for server in servers:
            server.close()
    result.check()
    assert "WRITE-FAILED" not in result.console, result.tail(40)
    logs = "".join(s.log() for s in servers)
    resubmitted = sum(int(n) for n in re.findall(
        r"vring 0 restarts at used idx \d+ with (\d+) request\(s\) in flight", logs))
    assert "INFLIGHT_SHMFD" in logs, "QEMU did not negotiate INFLIGHT_SHMFD"
    # The guest's read-back through the device matches what it saw acknowledged ...
    assert result.results["actual"] == result.results["expected"]
    # ... and so does the image on the host, block by block.
    final = {int(i): (int(w), int(g)) for i, w, g in
             re.findall(r"^FINAL (\d+) (\d+) (\d+)\s*$", result.console, re.M)}
    acked = int(result.results["acked"])
    assert final and acked >= len(final)
    data = image.read(0, WRITERS * BLOCKS_EACH * BLOCK)
    wrong = []
    for i in range(WRITERS * BLOCKS_EACH):
        block = data[i * BLOCK : (i + 1) * BLOCK]
        want = (f"pyvirtio writer {final[i][0]} gen {final[i][1]} block {i}".ljust(BLOCK)
                .encode() if i in final else bytes(BLOCK))
        if block != want:
            wrong.append(i)
    assert not wrong, f"blocks without their last acknowledged write: {wrong}"
    image.assert_outside_untouched()
    print(f"crash loop: {kills} kills survived in {seconds:.0f} s, {acked} acknowledged "
          f"writes ({acked * BLOCK} bytes), {len(final)} blocks ({len(final) * BLOCK} "
          f"bytes) verified on the host and by the guest's read-back, {resubmitted} "
          f"in-flight request(s) resubmitted")
