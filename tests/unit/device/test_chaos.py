"""Hostile-device mode (pyvirtio.device.chaos) against our own driver, in memory.

Every fault class is injected into a virtio-blk device serving our BlkDriver, on the split
and on the packed ring. A fault that leaves the ring in a state no correct device produces
must make the driver break the queue with a reason naming the fault; faults a driver
cannot tell from a slow or chatty device (interrupts dropped or spurious, event-index
games) must cost it nothing but time; config faults reach the driver's config callback;
NEEDS_RESET stops it with a clear error. The driver never crashes: every failure is a
PeerError. The same seed and requests replay the same faults.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.blk import SECTOR, GuardedImage, blk_pair, features
from pyvirtio.device.blk import BlkDevice
from pyvirtio.device.chaos import (
    ENTRY_FAULTS,
    FAULTS,
    PACKED_FAULTS,
    SPLIT_FAULTS,
    Chaos,
    parse_faults,
    parse_spec,
)
from pyvirtio.driver.base import DeviceNeedsResetError
from pyvirtio.driver.blk import BlkDriver
from pyvirtio.errors import LocalError, PeerError
from pyvirtio.ring import RingError
from pyvirtio.ring.packed import PackedDriverQueue
from pyvirtio.spec import features as F
from pyvirtio.testing.pair import DevicePair

SEED = 7
LAYOUTS = {"split": features(), "packed": features() | F.bit(F.RING_PACKED)}

#: what our driver says when it breaks the queue, per ring-entry fault
BROKEN_BECAUSE = {
    "bad-id": r"device returned id \d+ in used slot \d+.*which is not an in-flight buffer",
    "id-range": r"device returned id \d+ in used slot \d+.*which is not an in-flight buffer",
    "double": r"device returned id \d+ in used slot \d+.*which is not an in-flight buffer",
    "len": r"device claims \d+ bytes written into buffer \d+.*which has only \d+ writable",
    "idx-ahead": r"device moved used idx to \d+, \d+ entries past \d+, more than the queue",
    "wrap": r"used descriptor at slot \d+ .*wrong wrap counter",
}


@contextmanager
def hostile(tmp_path: Path, layout: str, faults: list[str], *, seed: int = SEED,
            rate: float = 1.0) -> Iterator[tuple[DevicePair, BlkDevice, BlkDriver, Chaos]]:
    """Our driver on a blk device that turns hostile after probe."""
    image = GuardedImage(tmp_path, 256 * SECTOR, seed=1)
    with blk_pair(image.path, features=LAYOUTS[layout]) as (pair, device, driver):
        packed = isinstance(driver.vqs[0].ring, PackedDriverQueue)
        assert packed == (layout == "packed")
        device.chaos = Chaos(seed, rate, faults)
        yield pair, device, driver, device.chaos


def layout_faults() -> list[tuple[str, str]]:
    out = [(layout, f) for layout in LAYOUTS for f in ENTRY_FAULTS]
    out += [("split", f) for f in SPLIT_FAULTS] + [("packed", f) for f in PACKED_FAULTS]
    return out


@pytest.mark.parametrize(("layout", "fault"), layout_faults())
def test_our_driver_breaks_the_queue_naming_every_ring_entry_fault(
        tmp_path: Path, layout: str, fault: str) -> None:
    with hostile(tmp_path, layout, [fault]) as (_pair, _device, driver, chaos):
        with pytest.raises(RingError) as caught:
            driver.read(0, 8, timeout=5.0)
        assert re.search(BROKEN_BECAUSE[fault], str(caught.value)), str(caught.value)
        ring = driver.vqs[0].ring
        assert ring.broken is not None and re.search(BROKEN_BECAUSE[fault], ring.broken)
        assert chaos.injected and chaos.injected[0].startswith(f"chaos seed={SEED} req=1: ")
        # Broken stays broken, with the same reason (no crash, no other error).
        with pytest.raises(RingError, match=re.escape(ring.broken)):
            driver.vqs[0].get_buf()
        assert isinstance(caught.value, PeerError)


def interrupts_during_reads(pair: DevicePair, device: BlkDevice, driver: BlkDriver,
                            first: int) -> int:
    """Queue interrupts sent while 8 reads run (each checked against the image)."""
    before = pair.transport.interrupts
    for sector in range(first, first + 64, 8):
        assert driver.read(sector, 8, timeout=5.0) == device_bytes(device, sector, 8)
    return pair.transport.interrupts - before


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fault", ["irq-drop", "irq-spurious"])
def test_our_driver_shrugs_off_dropped_and_spurious_interrupts(
        tmp_path: Path, layout: str, fault: str) -> None:
    """A driver cannot tell a dropped interrupt from a slow device, nor a spurious one from
    a shared line: it must not break the queue, and ours loses nothing (it looks at the
    ring whenever it waits)."""
    with hostile(tmp_path, layout, [fault]) as (pair, device, driver, chaos):
        device.chaos = None
        honest = interrupts_during_reads(pair, device, driver, 0)
        assert honest > 0
        device.chaos = chaos
        hostile_count = interrupts_during_reads(pair, device, driver, 64)
        assert len(chaos.injected) == 8
        if fault == "irq-drop":
            assert hostile_count == 0
            assert all("interrupt for head" in line for line in chaos.injected)
        else:
            assert hostile_count == honest + 8
        assert driver.vqs[0].ring.broken is None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("game", ["event-never", "event-always"])
def test_event_index_games_change_the_interrupts_not_the_data(
        tmp_path: Path, layout: str, game: str) -> None:
    with hostile(tmp_path, layout, [game]) as (pair, device, driver, chaos):
        device.chaos = None
        driver.read(0, 8, timeout=5.0)  # the device's first interrupt has no reference
        driver.vqs[0].disable_cb()  # we poll: a well-behaved device sends nothing now
        assert interrupts_during_reads(pair, device, driver, 0) == 0
        driver.vqs[0].enable_cb()
        wanted = interrupts_during_reads(pair, device, driver, 0)
        assert wanted == 8
        device.chaos = chaos
        if game == "event-never":
            assert interrupts_during_reads(pair, device, driver, 64) == 0  # wanted, not sent
        else:
            driver.vqs[0].disable_cb()
            assert interrupts_during_reads(pair, device, driver, 64) == 8  # unwanted, sent
        assert chaos.injected[0].startswith(f"chaos seed={SEED} req=1: ")
        assert driver.vqs[0].ring.broken is None


def test_a_config_change_mid_request_reaches_the_driver(tmp_path: Path) -> None:
    with hostile(tmp_path, "split", ["config-change"]) as (_pair, device, driver, chaos):
        seen = driver.config_changes
        driver.read(0, 8, timeout=5.0)
        assert driver.config_changes == seen + 1
        assert re.match(rf"chaos seed={SEED} req=1: config bytes \d+\.\.\d+ changed to ",
                        chaos.injected[0])
        # The driver re-read config space: it follows the device, or says why it cannot.
        if driver.config_problem is None:
            assert driver.capacity == int.from_bytes(device.config[0:8], "little")
        else:
            assert driver.config_problem.startswith("virtio-blk")


def test_config_generation_churn_is_refused_not_looped_on(tmp_path: Path) -> None:
    with hostile(tmp_path, "split", ["config-gen"]) as (_pair, _device, driver, _chaos):
        driver.read(0, 8, timeout=5.0)
        assert driver.config_problem is not None
        assert "config generation kept changing" in driver.config_problem
        with pytest.raises(PeerError, match="config generation kept changing"):
            driver.device.read_config(0, 8)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_needs_reset_stops_our_driver_with_the_reason(tmp_path: Path, layout: str) -> None:
    with hostile(tmp_path, layout, ["needs-reset"]) as (_pair, _device, driver, chaos):
        driver.read(0, 8, timeout=5.0)  # returned, then the device gave up
        with pytest.raises(DeviceNeedsResetError, match="DEVICE_NEEDS_RESET"):
            driver.read(8, 8, timeout=5.0)
        assert re.fullmatch(rf"chaos seed={SEED} req=1: DEVICE_NEEDS_RESET set after head \d+ "
                            r"of \w+ queue 0", chaos.injected[0]), chaos.injected


def run_until_broken(tmp_path: Path, seed: int) -> tuple[list[str], str]:
    """Random faults of every class at 20%: read until the driver gives up."""
    with hostile(tmp_path, "split", list(FAULTS), seed=seed, rate=0.2) as (
            _pair, _device, driver, chaos):
        try:
            for i in range(200):
                driver.read(i % 32 * 8, 8, timeout=2.0)
        except (PeerError, LocalError, TimeoutError) as exc:
            # LocalError: a config change shrank the disk under the reads
            return chaos.injected, f"{type(exc).__name__}: {exc}"
    return chaos.injected, "survived"


def test_the_same_seed_replays_the_same_faults(tmp_path: Path) -> None:
    runs = []
    for i, seed in enumerate((SEED, SEED, SEED + 1)):
        d = tmp_path / str(i)
        d.mkdir()
        runs.append(run_until_broken(d, seed))
    assert runs[0][0], "no fault was injected"
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


def test_faults_wait_until_the_device_is_armed(tmp_path: Path) -> None:
    with hostile(tmp_path, "split", ["bad-id"]) as (_pair, _device, driver, chaos):
        chaos.after = None  # --chaos-after signal
        for sector in range(0, 32, 8):
            driver.read(sector, 8, timeout=5.0)
        chaos.arm()
        assert chaos.injected == [f"chaos seed={SEED}: armed after 4 requests "
                                  "(replay with --chaos-after 4)"]
        with pytest.raises(RingError):
            driver.read(0, 8, timeout=5.0)
        assert chaos.injected[1].startswith(f"chaos seed={SEED} req=5: ")


def test_command_line_forms_are_checked() -> None:
    assert parse_spec("7") == (7, 0.01)
    assert parse_spec("0x10:0.5") == (16, 0.5)
    for bad in ("", "x", "7:2", "7:-1", "7:x"):
        with pytest.raises(LocalError):
            parse_spec(bad)
    assert parse_faults(None) == FAULTS
    assert parse_faults("len, bad-id") == ("len", "bad-id")
    with pytest.raises(LocalError, match="unknown chaos fault class nope"):
        parse_faults("len,nope")


def device_bytes(device: BlkDevice, sector: int, count: int) -> bytes:
    """What the image holds (read through the device's own back-end)."""
    fd = device.backend.fd  # type: ignore[attr-defined]
    return os.pread(fd, count * SECTOR, sector * SECTOR)
