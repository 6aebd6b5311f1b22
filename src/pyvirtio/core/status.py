"""The device status state machine (VIRTIO 1.x §3.1), used by devices to judge what a driver
writes and by drivers to walk the initialisation sequence.

The driver moves a device through ACKNOWLEDGE -> DRIVER -> FEATURES_OK -> DRIVER_OK by
writing the status with one more bit each time; writing 0 resets; FAILED may be set at any
time; DEVICE_NEEDS_RESET is set only by the device. A legacy driver (no VERSION_1) skips
FEATURES_OK.

Multi-round negotiation (experimental, docs/multi-round.md) adds one move: after a round
whose answer acked MULTI_ROUND was accepted, the driver clears FEATURES_OK (and nothing else)
to open the next round; DRIVER_OK waits for the final round.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyvirtio.spec import status as S

# The order in which the driver sets the initialisation bits.
INIT_SEQUENCE = (S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK)


@dataclass(frozen=True)
class Transition:
    """The device's judgement of a status write.

    ``accepted`` is the status the device now holds (a refused FEATURES_OK is simply not
    set, which is how the spec tells a driver "these features are not acceptable").
    ``problems`` explain every bit that was refused or every rule the driver broke.
    """

    accepted: int
    reset: bool = False
    features_ok: bool = False  # FEATURES_OK newly accepted
    driver_ok: bool = False  # DRIVER_OK newly accepted
    failed: bool = False  # FAILED newly set
    reopened: bool = False  # FEATURES_OK cleared to open the next multi-round round
    problems: tuple[str, ...] = ()


def judge(old: int, new: int, *, modern: bool, features_acceptable: str | None,
          round_open: bool = False) -> Transition:
    """Decide what a device does when the driver writes ``new`` over ``old``.

    ``modern``: VERSION_1 was negotiated (FEATURES_OK is then mandatory before DRIVER_OK).
    ``features_acceptable``: None if the acked features are fine, else the reason they are
    not (FEATURES_OK is then refused).
    ``round_open``: the acked features hold MULTI_ROUND, so they are not final: the driver
    may clear FEATURES_OK alone (before DRIVER_OK) to open the next round, and DRIVER_OK is
    refused.
    """
    if new == 0:
        return Transition(accepted=0, reset=True)
    problems: list[str] = []
    if S.DEVICE_NEEDS_RESET & new & ~old:
        problems.append("driver set DEVICE_NEEDS_RESET, which only the device may set")
    new &= ~S.DEVICE_NEEDS_RESET
    new |= old & S.DEVICE_NEEDS_RESET
    cleared = old & ~new & ~S.DEVICE_NEEDS_RESET
    reopened = (round_open and cleared == S.FEATURES_OK and not (old | new) & S.DRIVER_OK
                and not new & ~old)
    if cleared and not reopened:
        problems.append(f"driver cleared {S.describe(cleared)} without a reset")
        new |= cleared
    accepted = new
    added = new & ~old
    features_ok = driver_ok = False
    if added & S.DRIVER and not new & S.ACKNOWLEDGE:
        problems.append("DRIVER set before ACKNOWLEDGE")
    if added & S.FEATURES_OK:
        if not new & S.DRIVER:
            problems.append("FEATURES_OK set before DRIVER")
            accepted &= ~S.FEATURES_OK
        elif features_acceptable is not None:
            problems.append(f"FEATURES_OK refused: {features_acceptable}")
            accepted &= ~S.FEATURES_OK
        else:
            features_ok = True
    if added & S.DRIVER_OK:
        if modern and not accepted & S.FEATURES_OK:
            problems.append("DRIVER_OK set before FEATURES_OK was accepted")
            accepted &= ~S.DRIVER_OK
        elif round_open:
            problems.append("DRIVER_OK set before multi-round feature negotiation ended "
                            "(the accepted features still hold MULTI_ROUND)")
            accepted &= ~S.DRIVER_OK
        elif not accepted & S.DRIVER:
            problems.append("DRIVER_OK set before DRIVER")
            accepted &= ~S.DRIVER_OK
        elif not modern and features_acceptable is not None:
            problems.append(f"DRIVER_OK refused: {features_acceptable}")
            accepted &= ~S.DRIVER_OK
        else:
            driver_ok = True
    return Transition(
        accepted=accepted,
        features_ok=features_ok,
        driver_ok=driver_ok,
        failed=bool(added & S.FAILED),
        reopened=reopened,
        problems=tuple(problems),
    )
