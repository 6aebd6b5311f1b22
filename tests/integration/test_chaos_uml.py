"""Hostile-device mode against real Linux drivers: User-Mode Linux 6.1 in CI.

``pyvirtio serve ... --chaos`` is armed once the guest has booted, then every request gets
the fault (pyvirtio.testing.chaos.run_case, the same case the hardening report runs). The
assertions are on what Linux did: the kernel message of its ring check, or the driver's
error counters, and the device's own log of what it injected.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from peers import require_guest
from pyvirtio.testing.chaos import Outcome, run_case

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]


def case(device: str, fault: str, tmp_path: Path) -> Outcome:
    require_guest("uml")
    outcome = run_case(device, "uml", fault, tmp_path, watchdog=10.0)
    assert outcome.verdict not in ("boot failed", "not armed"), outcome
    assert outcome.injected, f"the device injected nothing: {outcome}"
    return outcome


@pytest.mark.parametrize(("fault", "said"), [
    ("bad-id", r"id \d+ is not a head!"),
    ("id-range", r"id \d+ out of range"),
])
def test_linux_virtio_blk_breaks_its_queue_on_a_used_id_we_forge(
        tmp_path: Path, fault: str, said: str) -> None:
    o = case("blk", fault, tmp_path)
    kind = "not a head" if fault == "bad-id" else "out of range"
    assert re.match(rf"chaos seed=7 req=\d+: \w+ queue 0: used id \d+ \({kind}", o.injected[0])
    assert any(re.search(rf"virtio_blk virtio\d+: \S+:{said}", line) for line in o.kernel), o
    assert o.verdict.startswith("detected"), o
    assert "hung" in o.verdict  # Linux breaks the queue; the request never completes


def test_linux_virtio_net_counts_used_lengths_beyond_its_receive_buffers(
        tmp_path: Path) -> None:
    o = case("net", "len", tmp_path)
    assert any(re.search(r"used len \d+ for head \d+, which has \d+ writable bytes", line)
               for line in o.injected)
    # virtio_net drops each such frame and counts it (its message is pr_debug only).
    counts = [int(m.group(1)) for key, value in o.io.items() if key.endswith("_errors")
              for m in [re.search(r"rx_length=(\d+)", value)] if m]
    assert counts and sum(counts) > 0, o
    assert "I/O error" in o.verdict, o
