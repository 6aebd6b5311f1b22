"""``pyvirtio demo`` (what ``make demo`` runs) boots its guests and ends with the success
summary; ``--in-memory`` still works without guests."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers.paths import SRC
from peers import require_guest

pytestmark = pytest.mark.timeout(180)


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.Popen([sys.executable, "-m", "pyvirtio", "demo", *args], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the demo stops its guests on SIGTERM
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the demo did not finish in time:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def narration(output: str) -> list[str]:
    return [line.removeprefix("pyvirtio demo | ") for line in output.splitlines()
            if line.startswith("pyvirtio demo | ")]


@pytest.mark.integration
def test_the_demo_boots_both_guests_and_ends_with_the_success_summary() -> None:
    require_guest("uml")
    require_guest("qemu")
    done = run_demo()
    assert done.returncode == 0, done.stdout + done.stderr
    said = narration(done.stdout)
    assert said[-1].startswith("SUCCESS: three real Linux kernels used pyvirtio devices"), said
    checks = [line for line in said if line.startswith("  \u2713 ")]
    assert len(checks) == 13 and not [line for line in said if "\u2717" in line], said
    # Each act says which ring format the guest's driver negotiated: UML's virtio_console
    # and virtio_balloon, and QEMU's virtio_rng (attached with packed=on), all on the packed
    # ring pyvirtio offers.
    formats = [line for line in said if "driver negotiated" in line]
    assert [f.split()[1] for f in formats] == ["virtio_console", "virtio_rng",
                                               "virtio_balloon"], formats
    assert all(f.endswith("(packed ring)") for f in formats), formats
    # The guests' own kernels speak, indented under the narration.
    assert "   uml kernel |     virtio0: DRIVER=virtio_console" in done.stdout
    assert "  qemu kernel |     virtio0: DRIVER=virtio_rng" in done.stdout
    assert re.search(r"  qemu kernel \|     pci \S+: \[1af4:1044\]", done.stdout)
    # Act 3: the host-side figure of the memory the guest gave back.
    assert re.search(r"its memory file now holds \d+ MiB: (\d+) MiB back on the host",
                     done.stdout)
    assert done.stderr == ""


def test_the_in_memory_demo_needs_no_guests() -> None:
    done = run_demo("--in-memory", "--bytes", "65536")
    assert done.returncode == 0, done.stdout + done.stderr
    assert narration(done.stdout)[-1] == "SUCCESS: both pairs delivered exactly the served bytes"
