"""``pyvirtio demo``: the main job on an embedded default, narrated.

For now: the in-memory entropy demo. A pyvirtio entropy driver probes a pyvirtio entropy
device, first in one process (loopback transport), then with the device in a child process
sharing a memfd and eventfds, and shows that the bytes the driver read are the bytes the
device served.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from typing import Any

from pyvirtio.core.features import describe
from pyvirtio.device.rng import RngDevice
from pyvirtio.driver.rng import RngDriver
from pyvirtio.testing.pair import DevicePair
from pyvirtio.testing.process_pair import ProcessDevicePair


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the narrated demo (entropy device and driver)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", type=int, default=1 << 20, help="entropy to read (default 1 MiB)")
    p.set_defaults(func=run)


def say(text: str) -> None:
    print(f"pyvirtio demo | {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    n = args.bytes
    say("in one process: a pyvirtio rng driver probes a pyvirtio rng device over loopback")
    device = RngDevice()
    with DevicePair(device) as pair:
        driver = pair.probe()
        assert isinstance(driver, RngDriver)
        say(f"negotiated features: {describe(driver.device.features)}")
        start = time.perf_counter()
        data = driver.read(n)
        elapsed = time.perf_counter() - start
        same = hashlib.sha256(data).hexdigest() == device.digest.hexdigest()
        say(f"read {len(data)} bytes in {elapsed * 1000:.1f} ms "
            f"({len(data) / elapsed / 1e6:.1f} MB/s), {pair.transport.kicks} kicks, "
            f"{pair.transport.interrupts} interrupts; digest matches what the device served: "
            f"{same}")
        ok1 = same and len(data) == n
    say("across two processes: the device runs in a child, sharing a memfd and eventfds")
    with ProcessDevicePair("pyvirtio.device.rng:RngDevice") as ppair:
        driver = ppair.probe()
        assert isinstance(driver, RngDriver)
        start = time.perf_counter()
        data = driver.read(n)
        elapsed = time.perf_counter() - start
        served = ppair.transport.device_attr("digest")
        same = hashlib.sha256(data).hexdigest() == served
        say(f"device pid {ppair.pid}: read {len(data)} bytes in {elapsed * 1000:.1f} ms; "
            f"digest matches the child's: {same}")
        ok2 = same and len(data) == n
    ok = ok1 and ok2
    say("SUCCESS: both pairs delivered exactly the served bytes" if ok else "FAILURE")
    return 0 if ok else 1
