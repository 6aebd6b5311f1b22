"""``pyvirtio serve rng`` and ``pyvirtio serve console`` as a user runs them: a child process
started with ``python -m pyvirtio``, a real guest attached with exactly the arguments the
command printed, data checked end to end, then SIGTERM while the guest is still connected:
exit status 0 and every socket file removed.
"""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.guests import (
    DATA_BYTES,
    DATA_PORT,
    GREETING,
    HWRNG_SCRIPT,
    RING_FEATURES,
    TYPED,
    WAIT,
    CliServer,
    ConsoleClient,
    DataPeer,
    RingFeatures,
    check_console,
    check_hwrng,
    console_files,
    console_script,
    random_payload,
    served_slice,
    socket_gone,
    type_after_greeting,
)
from helpers.paths import SRC
from peers import require_guest
from pyvirtio.guest import QemuGuest, UmlGuest

pytestmark = pytest.mark.timeout(120)


def pyvirtio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyvirtio", *args], capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": SRC})


def negotiated(log: str, device: str) -> set[str]:
    """The feature names of the device's last 'features ...' log line (-v)."""
    found = re.findall(rf"\b{device}: features (\S+)", log)
    assert found, log
    return set(found[-1].split("|"))


def check_logged_ring_features(log: str, device: str, ring: RingFeatures) -> None:
    names = negotiated(log, device)
    assert "VERSION_1" in names
    for name in ("EVENT_IDX", "INDIRECT_DESC"):
        assert (name in names) == ring.on, names


# ---- help and option errors (no guest) -------------------------------------------------------


def test_serve_help_lists_the_devices_and_console_help_explains_ports() -> None:
    serve = pyvirtio("serve", "--help")
    assert serve.returncode == 0
    assert "rng" in serve.stdout and "console" in serve.stdout
    console = pyvirtio("serve", "console", "--help")
    assert console.returncode == 0
    text = " ".join(console.stdout.split())
    for option in ("--socket PATH", "--console WHERE", "--port NAME=WHERE", "--cols N",
                   "--rows N", "--no-multiport", "--no-event-idx", "--no-indirect", "-v"):
        assert option in text, option
    assert "/dev/hvc0" in text and "virtio_uml.device=SOCKET:3" in text
    assert "QEMU 7.2 has no vhost-user front-end for console devices" in text


@pytest.mark.parametrize(("args", "problem"), [
    (["--no-multiport", "--port", "a=pty"], "--port needs MULTIPORT"),
    (["--console", "none"], "--console none needs at least one --port"),
    (["--port", "agent"], "expected NAME=WHERE"),
    (["--port", "a=tcp:1234"], "is not stdio, pty or unix:PATH"),
    (["--port", "a=pty", "--port", "a=pty"], "the name 'a' is already used"),
    (["--console", "stdio", "--port", "a=stdio"], "only one port can use stdio"),
])
def test_serve_console_refuses_contradictory_options(tmp_path: Path, args: list[str],
                                                     problem: str) -> None:
    sock = tmp_path / "con.sock"
    done = pyvirtio("serve", "console", "--socket", str(sock), *args)
    assert done.returncode == 2
    assert problem in done.stderr
    assert not sock.exists()


# ---- real guests -----------------------------------------------------------------------------

PTY_PORT = "org.pyvirtio.pty"
PTY_IN = b"host line typed into the pty\n"
PTY_OUT = b"guest line out of the pty\n"
PTY_SCRIPT = f"""\
for p in /sys/class/virtio-ports/*; do
    [ "$(cat $p/name 2>/dev/null)" = "{PTY_PORT}" ] && PTY=/dev/${{p##*/}}
done
read -r -t 30 line < $PTY
result pty_in "$line"
printf '{PTY_OUT.decode().rstrip()}\\n' > $PTY
"""


def read_line(fd: int, timeout: float = WAIT) -> bytes:
    """One line from ``fd`` (waits at most ``timeout``)."""
    got = b""
    deadline = time.monotonic() + timeout
    while not got.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no line within {timeout}s, got {got!r}")
        got += os.read(fd, 4096)
    return got


@pytest.mark.integration
@RING_FEATURES
def test_serve_rng_feeds_a_qemu_guest_and_exits_cleanly_on_sigterm(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("qemu")
    source = tmp_path / "entropy.bin"
    stream = random_payload(11)
    source.write_bytes(stream)
    sock = tmp_path / "rng.sock"
    server = CliServer(["rng", "--socket", str(sock), "--source", str(source), *ring.cli_args],
                       tmp_path / "serve.log", global_args=["-v"])
    guest = None
    try:
        server.wait_for(r"^pyvirtio: virtio-rng on ")
        device_args = server.qemu_device_args()
        device_args[-1] += ring.qemu_device_props
        guest = QemuGuest(HWRNG_SCRIPT + "sleep 600\n", extra_args=device_args, timeout=WAIT)
        guest.start()
        guest.wait_for("PYVIRTIO-RESULT hwrng_head=", timeout=WAIT)
        results = guest.results
        check_hwrng(results, ring)
        served_slice(stream, results)  # the file is the stream the device served
        check_logged_ring_features(server.log(), "rng", ring)
        assert server.stop() == 0  # the guest is still connected
        assert socket_gone(sock)
        assert "signal SIGTERM, shutting down" in server.log()
        assert "front-end connected" in server.log()
    finally:
        if guest is not None:
            guest.stop()
        server.close()


@pytest.mark.integration
@RING_FEATURES
def test_serve_console_talks_to_a_uml_guest_and_exits_cleanly_on_sigterm(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("uml")
    sock, hvc0, data_sock = tmp_path / "con.sock", tmp_path / "hvc0.sock", tmp_path / "data.sock"
    server = CliServer(["console", "--socket", str(sock), "--console", f"unix:{hvc0}",
                        "--port", f"{DATA_PORT}=unix:{data_sock}", "--port", f"{PTY_PORT}=pty",
                        "--cols", "132", "--rows", "43", "-v", *ring.cli_args],
                       tmp_path / "serve.log")
    guest = console = data = None
    pty = -1
    try:
        server.wait_for(r"^pyvirtio: virtio-console on ")
        server.wait_for(rf"port 1: '{re.escape(DATA_PORT)}', the guest's /dev/vport0p1 .*"
                         rf"unix socket {re.escape(str(data_sock))}")
        pty_path = server.wait_for(rf"port 2: '{re.escape(PTY_PORT)}', .* pseudo-terminal "
                                    r"(/dev/pts/\d+)$").group(1)
        server.wait_for(r"^QEMU: 7\.2 has no vhost-user front-end for console devices")
        kernel_args = server.banner_args("uml")
        assert kernel_args == [f"virtio_uml.device={sock}:3"]
        console = ConsoleClient(str(hvc0))
        data = DataPeer(str(data_sock), random_payload(5), DATA_BYTES)
        pty = os.open(pty_path, os.O_RDWR | os.O_NOCTTY)  # the pty port's host end (raw)
        os.write(pty, PTY_IN)
        guest = UmlGuest(console_script(linger=True, extra=PTY_SCRIPT),
                         extra_files=console_files(), kernel_args=kernel_args, timeout=WAIT)
        guest.start()
        type_after_greeting(console)
        guest.wait_for("PYVIRTIO-RESULT done=yes", timeout=WAIT)
        results = guest.results
        check_console(results, console, data, ring)
        assert results["hvc_size"] == "43 132"
        assert results["pty_in"] == PTY_IN.decode().rstrip("\n")
        assert read_line(pty) == PTY_OUT
        check_logged_ring_features(server.log(), "console", ring)
        assert {"CONSOLE_F_MULTIPORT", "CONSOLE_F_SIZE"} <= negotiated(server.log(), "console")
        assert server.stop() == 0  # the guest is still connected
        for path in (sock, hvc0, data_sock):
            assert socket_gone(path), path
        assert "signal SIGTERM, shutting down" in server.log()
    finally:
        if guest is not None:
            guest.stop()
        for peer in (console, data):
            if peer is not None:
                peer.close()
        if pty >= 0:
            os.close(pty)
        server.close()


SINGLE_PORT_SCRIPT = """\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
result guest_features $(cat /sys/bus/virtio/devices/virtio0/features)
result ports $(ls /sys/class/virtio-ports | wc -l)
result hvc_size $(stty -F /dev/hvc0 size)
exec 3<>/dev/hvc0
stty raw -echo <&3
cat /pyvirtio/greeting >&3
read -r -t 30 line <&3
result typed "$line"
result done yes
sleep 600
"""


@pytest.mark.integration
@RING_FEATURES
def test_serve_console_without_multiport_gives_the_guest_one_sized_console(
        tmp_path: Path, ring: RingFeatures) -> None:
    require_guest("uml")
    sock, hvc0 = tmp_path / "con.sock", tmp_path / "hvc0.sock"
    server = CliServer(["console", "--socket", str(sock), "--console", f"unix:{hvc0}",
                        "--no-multiport", "--cols", "100", "--rows", "30", "-v",
                        *ring.cli_args], tmp_path / "serve.log")
    guest = console = None
    try:
        kernel_args = server.banner_args("uml")
        console = ConsoleClient(str(hvc0))
        guest = UmlGuest(SINGLE_PORT_SCRIPT, extra_files=console_files(),
                         kernel_args=kernel_args, timeout=WAIT)
        guest.start()
        type_after_greeting(console)
        guest.wait_for("PYVIRTIO-RESULT done=yes", timeout=WAIT)
        results = guest.results
        ring.check_guest_view(results["guest_features"])
        assert results["guest_features"][1] == "0"  # VIRTIO_CONSOLE_F_MULTIPORT
        assert results["ports"] == "1"
        assert results["hvc_size"] == "30 100"  # from the config space, announced at once
        assert results["typed"] == TYPED.decode().rstrip("\n")
        assert bytes(console.received) == GREETING
        names = negotiated(server.log(), "console")
        assert "CONSOLE_F_MULTIPORT" not in names and "CONSOLE_F_SIZE" in names
        check_logged_ring_features(server.log(), "console", ring)
        assert server.stop() == 0
        assert socket_gone(sock) and socket_gone(hvc0)
    finally:
        if guest is not None:
            guest.stop()
        if console is not None:
            console.close()
        server.close()


STDIN_SCRIPT = """\
n=0
while [ ! -e /dev/hvc0 ] && [ $n -lt 400 ]; do sleep 0.05; n=$((n+1)); done
exec 3<>/dev/hvc0
stty raw -echo <&3
echo GUEST-SAYS-HELLO >&3
read -r -t 20 line <&3
result typed "$line"
result done yes
sleep 600
"""


@pytest.mark.integration
@pytest.mark.parametrize("stdin", ["dev_null", "regular_file"])
def test_serve_console_on_a_stdin_that_cannot_be_polled_serves_the_guest(
        tmp_path: Path, stdin: str) -> None:
    """``pyvirtio serve console --socket S < /dev/null`` (a background job, systemd) and
    ``< file``: the server serves; a file is the guest's input to its end, /dev/null none."""
    require_guest("uml")
    sock = tmp_path / "con.sock"
    line = "FROM-A-REGULAR-FILE 12345"
    if stdin == "regular_file":
        (tmp_path / "input.txt").write_text(line + "\n")
        fd = os.open(tmp_path / "input.txt", os.O_RDONLY)
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
    try:
        server = CliServer(["console", "--socket", str(sock)], tmp_path / "serve.log",
                           stdin=fd)
    finally:
        os.close(fd)  # the child has its own copy
    guest = None
    try:
        kernel_args = server.banner_args("uml")
        guest = UmlGuest(STDIN_SCRIPT, kernel_args=kernel_args, timeout=WAIT)
        guest.start()
        guest.wait_for("PYVIRTIO-RESULT done=yes", timeout=WAIT)
        server.wait_for("GUEST-SAYS-HELLO", timeout=WAIT)  # guest output reached stdout
        if stdin == "regular_file":
            assert guest.results["typed"] == line
            assert "input is a regular file of 26 bytes" in server.log()
        else:
            assert guest.results["typed"] == ""  # no input: the read timed out
            assert "input is /dev/null: the guest gets no input" in server.log()
        assert server.proc.poll() is None  # still serving
        assert server.stop() == 0
        assert socket_gone(sock)
    finally:
        if guest is not None:
            guest.stop()
        server.close()
