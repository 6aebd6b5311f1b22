"""Crash safety: the back-end is SIGKILLed mid-write, restarted on the same socket, and the
guest carries on without losing a request or an acknowledged write.

The front-end is QEMU 7.2's vhost-user-blk with ``-chardev socket,...,reconnect=1``: it
reconnects to the restarted back-end and restarts the rings. (User-Mode Linux does not
reconnect: virtio_uml unregisters the device when its socket breaks; docs/peers.md.) What
was in flight is recovered through VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD: the region QEMU got
from the first back-end (GET_INFLIGHT_FD) and hands to every later one (SET_INFLIGHT_FD).

Two crashes in one guest run: the real ``pyvirtio serve blk`` killed at an arbitrary moment
of the write stream, then a back-end whose writes take half a second killed while it is
certainly inside one (its log says so), so the restarted ``pyvirtio serve blk`` must
resubmit that request. The guest's four writers each write their own blocks once with
O_DIRECT (every ``dd`` that returns is an acknowledged write); afterwards the guest reads
everything back through the device and the host reads the image: every block holds what
was written, and nothing outside the disk changed.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from helpers.blk import (
    BLOCK,
    BlkServer,
    GuardedImage,
    block_pattern,
)
from helpers.paths import TESTS
from peers import require_guest
from pyvirtio.guest import QemuGuest, VhostUserBlk
from pyvirtio.testing.server import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WRITERS = 4
BLOCKS_EACH = 64

WRITE_VERIFY = f"""
W={WRITERS}; N={BLOCKS_EACH}
write_range() {{
    i=$(($1 * N)); end=$((i + N))
    while [ $i -lt $end ]; do
        printf '%-4096s' "pyvirtio block $i" |
            dd of=/dev/vda bs=4096 seek=$i oflag=direct conv=notrunc status=none ||
            echo "WRITE-FAILED $i"
        i=$((i + 1))
    done
}}
echo WRITERS-STARTED
for w in $(seq 0 $((W - 1))); do write_range $w & done
wait
echo WRITERS-DONE
result expected $(i=0; while [ $i -lt $((W * N)) ]; do printf '%-4096s' "pyvirtio block $i"; \
i=$((i + 1)); done | sha256sum | cut -d' ' -f1)
result actual $(dd if=/dev/vda bs=4096 count=$((W * N)) iflag=direct status=none |
    sha256sum | cut -d' ' -f1)
"""


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
def test_killed_back_end_is_restarted_and_the_guest_loses_nothing(tmp_path: Path,
                                                                  packed: bool) -> None:
    """Split rings, and packed rings (``packed=on``): QEMU 7.2 restarts a packed ring with
    a fresh ring's SET_VRING_BASE after a reconnection, and the restarted back-end takes
    the ring's real positions from the packed inflight region instead."""
    require_guest("qemu")
    image = GuardedImage(tmp_path, 16 << 20)
    sock = tmp_path / "blk.sock"
    first = BlkServer(image.path, sock, log_path=tmp_path / "first.log")
    slow: ServerProcess | None = None
    last: BlkServer | None = None
    try:
        guest = QemuGuest(WRITE_VERIFY, devices=[VhostUserBlk(str(sock), reconnect=1,
                                                        packed=packed)],
                          timeout=180)
        with guest:
            guest.wait_for("^WRITERS-STARTED", timeout=120)
            time.sleep(0.3)
            first.kill()  # crash 1: anywhere in the write stream
            slow = ServerProcess(str(sock), "helpers.blk:SlowBlkDevice",
                                 {"path": str(image.path), "delay": 0.5}, log_level="INFO",
                                 extensions="pyvirtio.io.inflight:inflight_extensions",
                                 log_path=tmp_path / "slow.log", pythonpath=[TESTS])
            slow.wait_for_log("slow write of 4096 bytes", timeout=60)
            slow.kill()  # crash 2: inside a write, so a request is in flight for sure
            last = BlkServer(image.path, sock, log_path=tmp_path / "last.log")
            guest.wait_for("^WRITERS-DONE", timeout=120)
            result = guest.wait(timeout=60)
        assert "INFLIGHT_SHMFD" in slow.log_text(), "QEMU did not negotiate INFLIGHT_SHMFD"
        resumed = last.wait_log(r"vring 0 restarts at used idx \d+ with (\d+) request\(s\) "
                                r"in flight", timeout=5)
        assert int(resumed.group(1)) >= 1, "the request in flight was not resubmitted"
        if packed:  # the positions came from the region (a packed ring was running)
            assert "from the inflight region" in last.log(), last.log()
        assert last.stop() == 0
    finally:
        first.close()
        if slow is not None:
            slow.kill()
        if last is not None:
            last.close()
    result.check()
    assert "WRITE-FAILED" not in result.console, result.tail(40)
    assert result.results["actual"] == result.results["expected"]
    data = image.read(0, WRITERS * BLOCKS_EACH * BLOCK)
    lost = [i for i in range(WRITERS * BLOCKS_EACH)
            if data[i * BLOCK : (i + 1) * BLOCK] != block_pattern(i)]
    assert not lost, f"blocks without their acknowledged write: {lost}"
    image.assert_outside_untouched()
    # The first crash came while the guest was writing too: QEMU reconnected twice.
    assert len(re.findall("front-end connected", slow.log_text() + last.log())) == 2
