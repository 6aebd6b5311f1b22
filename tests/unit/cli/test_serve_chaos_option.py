"""``pyvirtio serve DEVICE --chaos SEED[:RATE] --chaos-faults ... --chaos-after N|signal``:
the options are checked when parsed and give the device its fault injector."""

from __future__ import annotations

import argparse
import os
import signal

import pytest

from pyvirtio.cli.main import build_parser
from pyvirtio.cli.serve import make_hostile
from pyvirtio.device.chaos import FAULTS
from pyvirtio.device.rng import RngDevice


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "rng", "--socket", "/tmp/x.sock", *argv])


def test_without_chaos_the_device_is_honest() -> None:
    device = RngDevice()
    make_hostile(device, parse())
    assert device.chaos is None


def test_chaos_gives_the_device_a_seeded_injector() -> None:
    device = RngDevice()
    make_hostile(device, parse("--chaos", "7:0.25", "--chaos-faults", "len,bad-id",
                               "--chaos-after", "12"))
    assert device.chaos is not None
    assert (device.chaos.seed, device.chaos.rate, device.chaos.faults, device.chaos.after) \
        == (7, 0.25, ("len", "bad-id"), 12)
    other = RngDevice()
    make_hostile(other, parse("--chaos", "3"))
    assert other.chaos is not None and other.chaos.faults == FAULTS and other.chaos.after == 0


@pytest.mark.parametrize("argv", [
    ("--chaos", "seven"), ("--chaos", "7:1.5"), ("--chaos", "7", "--chaos-faults", "nope"),
    ("--chaos", "7", "--chaos-after", "-3"), ("--chaos", "7", "--chaos-after", "later"),
])
def test_malformed_chaos_options_are_refused_when_parsed(
        argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(*argv)
    assert "--chaos" in capsys.readouterr().err


def test_chaos_after_signal_arms_on_sigusr2() -> None:
    previous = signal.getsignal(signal.SIGUSR2)
    try:
        device = RngDevice()
        make_hostile(device, parse("--chaos", "7:1", "--chaos-after", "signal"))
        assert device.chaos is not None and device.chaos.after is None
        os.kill(os.getpid(), signal.SIGUSR2)
        assert device.chaos.after == 0
        assert device.chaos.injected == ["chaos seed=7: armed after 0 requests (replay with "
                                         "--chaos-after 0)"]
    finally:
        signal.signal(signal.SIGUSR2, previous)
