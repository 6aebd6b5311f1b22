"""``pyvirtio demo``, act 3: a User-Mode Linux guest gives memory back to the host through
pyvirtio's balloon, and the host sees it in the guest's own memory file."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

from pyvirtio.cli.demo import STEP_TIMEOUT, DemoFailure, booted, expect, mark, say, serving
from pyvirtio.core.features import describe, ring_format
from pyvirtio.device.balloon import DEFAULT_FEATURES, BalloonDevice
from pyvirtio.guest import UmlGuest, VhostUserDevice, uml_args
from pyvirtio.io.balloon_control import ControlServer, request
from pyvirtio.io.vhost_user_server import VhostUserServer
from pyvirtio.spec import balloon as B
from pyvirtio.spec import ids
from pyvirtio.testing.guests import memory_pattern_md5, memory_pattern_shell

MIB = 1 << 20
TOUCH_MIB, TARGET_MIB, VERIFY_MIB = 200, 192, 150
TAG = "pyvirtio-demo"

BALLOON_SCRIPT = memory_pattern_shell(TAG) + f"""\
fill touch {TOUCH_MIB}; rm /dev/shm/touch
result touched $(awk '$1 == "MemFree:" {{print $2}}' /proc/meminfo)
read line
result inflated $(awk '$1 == "MemFree:" {{print $2}}' /proc/meminfo)
read line
fill big {VERIFY_MIB}; result md5 $(digest big)
"""


def balloon_part(workdir: Path, checks: list[tuple[str, bool]]) -> None:
    say("")
    say("3/3  User-Mode Linux 6.1 gives memory back to the host through a pyvirtio "
        "virtio-balloon")
    vu, ctl = str(workdir / "balloon.sock"), str(workdir / "balloon.ctl")
    # Free page reporting off, so that what the guest touched stays on the host until the
    # balloon takes it (the tests show reporting on its own).
    device = BalloonDevice(features=DEFAULT_FEATURES & ~(1 << B.VIRTIO_BALLOON_F_REPORTING))
    server = VhostUserServer(vu, lambda: device)
    device.reactor = server.loop
    control = ControlServer(ctl, device, server.loop)
    try:
        with serving(server):
            say(f"serving virtio-balloon on {vu}; control socket {ctl} "
                f"(`pyvirtio balloon {ctl} --target 64M`)")
            say(f"booting  linux.uml mem=256M ... {shlex.join(uml_args(server.path, ids.BALLOON))}")
            guest = UmlGuest(BALLOON_SCRIPT, mem="256M", timeout=STEP_TIMEOUT * 2,
                             devices=[VhostUserDevice(vu, ids.BALLOON)])
            with booted(guest):
                expect(guest, r"PYVIRTIO-RESULT touched=")
                features = device.driver_features
                say(f"its virtio_balloon driver negotiated "
                    f"{describe(features, BalloonDevice.feature_names)} "
                    f"({ring_format(features)})")
                before = request(ctl, "stats")
                say(f"the guest wrote {TOUCH_MIB} MiB and freed it: its memory file holds "
                    f"{before['host_allocated'] / MIB:.0f} MiB of host memory")
                start = time.monotonic()
                reply = request(ctl, "target", bytes=TARGET_MIB * MIB)
                while reply["actual"] != TARGET_MIB * MIB:
                    if time.monotonic() - start > STEP_TIMEOUT:
                        raise DemoFailure(f"the balloon stopped at "
                                          f"{reply['actual'] / MIB:.0f} MiB")
                    time.sleep(0.05)
                    reply = request(ctl, "stats")
                took = time.monotonic() - start
                reclaimed = before["host_allocated"] - reply["host_allocated"]
                say(f"target {TARGET_MIB} MiB: the guest's virtio_balloon reached it in "
                    f"{took:.1f} s; its memory file now holds "
                    f"{reply['host_allocated'] / MIB:.0f} MiB: {reclaimed / MIB:.0f} MiB back "
                    f"on the host {mark(reclaimed >= 180 * MIB)}")
                checks.append((f"UML: the guest's balloon reached the {TARGET_MIB} MiB target",
                               reply["actual"] == TARGET_MIB * MIB))
                checks.append(("UML: the host got >= 180 MiB of the guest's memory back",
                               reclaimed >= 180 * MIB))
                guest.write("go\n")
                free = int(expect(guest, r"PYVIRTIO-RESULT inflated=(\d+)").group(1))
                say(f"inside the guest, MemFree is now {free / 1024:.0f} MiB")
                request(ctl, "target", bytes=0)
                start = time.monotonic()
                while request(ctl, "stats")["actual"] != 0:
                    if time.monotonic() - start > STEP_TIMEOUT:
                        raise DemoFailure("the balloon did not deflate")
                    time.sleep(0.05)
                say(f"target 0: deflated in {time.monotonic() - start:.1f} s; the guest writes "
                    f"and checks {VERIFY_MIB} MiB")
                guest.write("go\n")
                digest = expect(guest, r"PYVIRTIO-RESULT md5=(\S+)").group(1)
                checks.append((f"UML: memory back in the guest, {VERIFY_MIB} MiB written and "
                               "read back intact",
                               digest == memory_pattern_md5(TAG, "big", VERIFY_MIB)))
                result = guest.wait(timeout=STEP_TIMEOUT)
                if not result.ok:
                    raise DemoFailure(result.describe())
            checks.append(("UML: the balloon device saw no problems", not device.problems))
    finally:
        control.close()
