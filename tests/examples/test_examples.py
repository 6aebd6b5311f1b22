"""The examples in examples/ run as a reader of docs/write-a-device.md would run them
(``python examples/run_echo.py``), and do what the tutorial says they do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=EXAMPLES.parent,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_echo_device_and_driver_work_in_process_and_over_vhost_user(tmp_path: Path) -> None:
    out = run_example("run_echo.py", str(tmp_path)).splitlines()
    for where in ("loopback", "vhost-user"):
        # REVERSE was offered and acked: upper-cased and reversed, each request served once
        assert f"{where}: 'hello, virtio' -> 'OITRIV ,OLLEH'" in out
        assert f"{where}: 'both ends of the ring' -> 'GNIR EHT FO SDNE HTOB'" in out
        assert f"{where}: features REVERSE=True, max_len=4096" in out
        assert f"{where}: device served 3 requests" in out
    assert "loopback without REVERSE: PLAIN" in out
    refused = [line for line in out if line.startswith("loopback, bad request refused:")]
    assert len(refused) == 1
    assert "DEVICE_NEEDS_RESET" in refused[0]
    assert "reply buffer of 8 bytes is shorter than the 64-byte request" in refused[0]
    kicks = [line for line in out if line.startswith("vhost-user:") and "kicks" in line]
    assert len(kicks) == 1 and not kicks[0].startswith("vhost-user: 0 kicks")
    assert not (tmp_path / "echo.sock").exists()  # the server removed its socket
