"""The command line: both entry points answer --help, and the in-memory demo succeeds."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import SRC


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def test_python_dash_m_pyvirtio_help_lists_the_subcommands() -> None:
    result = run(sys.executable, "-m", "pyvirtio", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: pyvirtio" in result.stdout
    for command in ("demo", "serve"):
        assert command in result.stdout


def test_console_script_help_matches_python_dash_m() -> None:
    script = Path(sys.executable).with_name("pyvirtio")
    if not script.exists():
        found = shutil.which("pyvirtio")
        if found is None:
            pytest.skip("the pyvirtio console script is not installed (pip install -e .)")
        script = Path(found)
    result = run(str(script), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout == run(sys.executable, "-m", "pyvirtio", "--help").stdout


def test_serve_help_explains_every_device_kind() -> None:
    result = run(sys.executable, "-m", "pyvirtio", "serve", "--help")
    assert result.returncode == 0, result.stderr
    assert "rng" in result.stdout


def test_in_memory_demo_delivers_the_served_bytes() -> None:
    result = run(sys.executable, "-m", "pyvirtio", "demo", "--in-memory", "--bytes", "65536")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_join_help_explains_kinds_routes_and_negotiation() -> None:
    result = run(sys.executable, "-m", "pyvirtio", "join", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    for needed in ("net", "console", "--map", "--withhold", "--multi-round", "used length",
                   "dropped and counted", "nothing is dropped", "TSO", "multi-round bit"):
        assert needed in text, needed


def test_join_refuses_bad_options_before_binding(tmp_path: Path) -> None:
    socks = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    args = [a for s in socks for a in ("--socket", s)]
    cases = {
        ("net", *args, "--withhold", "1:guest_tso9"): "unknown feature",
        ("net", *args, "--withhold", "x:csum"): "SIDE:FEATURES",
        ("console", *args, "--map", "0:7>1:0"): "no queue 7",
        ("net", *args, "--socket", str(tmp_path / "c.sock")): "exactly 2 sides",
        ("net", *args, "--mac", "02:00:00:00:00:01"): "once per --socket",
    }
    for argv, reason in cases.items():
        result = run(sys.executable, "-m", "pyvirtio", "join", *argv)
        assert result.returncode == 2, (argv, result.stderr)
        assert reason in result.stderr, (argv, result.stderr)
    assert not any(Path(s).exists() for s in socks)
