"""``pyvirtio serve blk TARGET``: the target forms are explained, and each form reaches its
back-end (a path a file, an NBD URI libnbd; a server that is not there is an error that
names it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.nbd import Nbdkit, event_loop, require_nbd
from helpers.paths import SRC
from pyvirtio.cli.main import build_parser
from pyvirtio.cli.serve_blk import open_target
from pyvirtio.device.blk.nbd import NbdBackend


def serve_blk(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio", "serve", "blk", *argv],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=SRC))


def test_help_explains_the_target_forms() -> None:
    result = serve_blk("--help")
    assert result.returncode == 0, result.stderr
    for form in ("nbd://HOST[:PORT]/EXPORT", "nbd+unix:///EXPORT?socket=PATH", "PATH",
                 "--reconnect-timeout"):
        assert form in result.stdout, form


def test_a_path_stays_a_path_and_an_nbd_uri_becomes_the_nbd_back_end(tmp_path: Path) -> None:
    require_nbd()
    parser = build_parser()
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    with event_loop() as loop:
        args = parser.parse_args(["serve", "blk", str(image), "--socket", "s"])
        assert open_target(args.image, args, loop) == str(image)
        server = Nbdkit(["file", f"file={image}"], unix=tmp_path / "nbd.sock",
                        log_path=tmp_path / "nbdkit.log")
        try:
            args = parser.parse_args(["serve", "blk", server.uri, "--socket", "s",
                                      "--readonly"])
            backend = open_target(args.image, args, loop)
            assert isinstance(backend, NbdBackend)
            assert backend.read_only and backend.size == 1 << 20
            backend.close()
        finally:
            server.close()


def test_an_nbd_server_that_is_not_there_is_named(tmp_path: Path) -> None:
    require_nbd()
    uri = f"nbd+unix:///?socket={tmp_path / 'absent.sock'}"
    result = serve_blk(uri, "--socket", str(tmp_path / "blk.sock"))
    assert result.returncode != 0
    assert "cannot connect to nbd+unix" in result.stderr, result.stderr
    assert not (tmp_path / "blk.sock").exists()
