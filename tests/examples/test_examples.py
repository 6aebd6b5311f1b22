"""The examples in examples/ run as a reader of docs/write-a-device.md would run them
(``python examples/run_echo.py``), and do what the tutorial says they do."""

from __future__ import annotations

import os
import re
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


TUTORIAL = EXAMPLES.parent / "docs" / "write-a-device.md"


def tutorial_blocks() -> list[tuple[str | None, str]]:
    """The tutorial's python blocks as (the examples/ file it shows, or None; its code)."""
    text = TUTORIAL.read_text()
    found = re.findall(r"(?:<!-- listing: (\S+) -->\n)?```python\n(.*?)^```", text,
                       flags=re.S | re.M)
    return [(listing or None, code) for listing, code in found]


def test_the_tutorial_shows_the_example_files_as_they_are() -> None:
    listings = [(name, code) for name, code in tutorial_blocks() if name is not None]
    assert [name for name, _ in listings] == [
        "examples/echo_spec.py", "examples/echo_device.py", "examples/echo_driver.py"]
    for name, code in listings:
        assert code == (EXAMPLES.parent / name).read_text(), f"{name} differs from the tutorial"
    for name in ("echo_device.py", "echo_driver.py"):  # the promise of the tutorial
        assert len((EXAMPLES / name).read_text().splitlines()) <= 40


def test_the_tutorial_snippets_run_and_print_what_they_say(tmp_path: Path) -> None:
    snippets = [code for name, code in tutorial_blocks() if name is None]
    assert len(snippets) == 2
    outputs = []
    for i, code in enumerate(snippets):
        script = tmp_path / f"snippet_{i}.py"
        script.write_text(code)
        env = dict(os.environ, PYTHONPATH=str(EXAMPLES))
        proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"snippet {i} failed:\n{code}\n{proc.stderr}"
        outputs.append(proc.stdout)
    assert outputs == ["b'OITRIV ,OLLEH'\n", "b'GNIR EHT FO SDNE HTOB'\n"]
    assert not (tmp_path / "echo.sock").exists()
