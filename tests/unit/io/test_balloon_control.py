"""The balloon's control socket and its command-line client, against a real BalloonDevice on
a real event loop (no guest: every reply must say so)."""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvirtio.cli.balloon import EXIT_NOT_ATTACHED, parse_size
from pyvirtio.cli.main import main
from pyvirtio.device.balloon import BalloonDevice
from pyvirtio.io.balloon_control import ControlServer, request
from pyvirtio.io.loop import EventLoop

MIB = 1 << 20


@pytest.mark.parametrize("text,size", [("64M", 64 * MIB), ("1G", 1 << 30), ("4096", 4096),
                                       ("1.5MiB", 3 * MIB // 2), ("0", 0)])
def test_sizes_read_like_a_human_writes_them(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_size_that_is_not_one_is_refused() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="not a size"):
        parse_size("lots")


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[BalloonDevice, str]]:
    loop = EventLoop()
    device = BalloonDevice()
    device.reactor = loop
    path = str(tmp_path / "ctl")
    server = ControlServer(path, device, loop)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        yield device, path
    finally:
        loop.stop()
        thread.join(5)
        server.close()
        loop.close()


def test_a_target_without_a_guest_is_kept_and_the_reply_says_no_guest(
        control: tuple[BalloonDevice, str]) -> None:
    device, path = control
    reply = request(path, "target", bytes=64 * MIB)
    assert reply["ok"] and reply["attached"] is False and reply["target"] == 64 * MIB
    assert device.target_pages == 64 * MIB // 4096


def test_malformed_requests_get_an_error_reply(control: tuple[BalloonDevice, str]) -> None:
    _, path = control
    assert request(path, "explode") == {"ok": False, "error": "unknown op 'explode' "
                                        "(target, stats)"}
    reply = request(path, "target", bytes=-1)
    assert not reply["ok"] and "non-negative" in reply["error"]


def test_the_cli_says_clearly_that_no_guest_is_attached(
        control: tuple[BalloonDevice, str], capsys: pytest.CaptureFixture[str]) -> None:
    _, path = control
    assert main(["balloon", path, "--target", "32M"]) == EXIT_NOT_ATTACHED
    out = capsys.readouterr()
    assert "no guest is attached; the target is kept for the next guest" in out.err
    assert "target: 32.0 MiB" in out.out


def test_the_cli_fails_cleanly_without_a_server(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["balloon", str(tmp_path / "nothing"), "--stats"]) == 1
    assert "cannot reach the balloon control socket" in capsys.readouterr().err
