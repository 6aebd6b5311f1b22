"""Helpers for proving what a real guest did with a pyvirtio device, shared by the demo and
the integration tests.

* :class:`RecordedStream`: a deterministic entropy source that keeps every byte it served.
* :func:`hwrng_script` and :func:`find_served_slice`: a guest reads /dev/hwrng and reports
  enough for the host to show its bytes are exactly one contiguous slice of what was served.
* :func:`memory_pattern_shell` and :func:`memory_pattern_md5`: a guest fills tmpfs with a
  known stream and reports its md5, fast enough for User-Mode Linux; the host computes the
  md5 it must be.
* :class:`ConsoleClient`: the host end of a console port's unix socket, collecting what the
  guest writes in a thread and sending what the host types.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import threading
import time
from collections.abc import Callable

from pyvirtio.io import unixsock

HWRNG_BYTES = 65536
MIB = 1 << 20


class RecordedStream:
    """A seeded entropy source (``source(n) -> bytes``) that keeps every byte it handed
    out, in order, so a guest's reads can be located in it."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self.stream = bytearray()
        self.requests = 0

    def __call__(self, n: int) -> bytes:
        data = self._random.randbytes(n)
        self.stream += data
        self.requests += 1
        return data


def hwrng_script(nbytes: int = HWRNG_BYTES) -> str:
    """Guest shell that reads ``nbytes`` from /dev/hwrng into /tmp/hwrng and reports
    ``hwrng_bytes``, ``hwrng_sha``, ``hwrng_head`` (first 32 bytes, hex), ``hwrng_attempts``
    and ``hwrng_thread``.

    The hwrng core's own thread ([hwrng], feeding the entropy pool) reads the device too,
    64 bytes about once a second early in boot, whatever rng_quality says (Debian 6.1): had it
    run during our read, our bytes would have a hole. So the script samples the thread's
    state and voluntary context switches around the read and reads again if it woke up
    (asleep before and after with the same count means it did not run). ``head -c`` reads in
    multiples of 64 bytes, which keeps the core's buffer in order.
    """
    return f"""\
P=
for d in /proc/[0-9]*; do [ "$(cat $d/comm 2>/dev/null)" = hwrng ] && P=${{d#/proc/}}; done
hwrng_thread() {{
    if [ -n "$P" ] && [ -e /proc/$P/stat ]; then
        echo "$(cut -d' ' -f3 /proc/$P/stat) $(grep '^voluntary_ctxt' /proc/$P/status | tr -dc 0-9)"
    else
        echo "S none"
    fi
}}
attempt=0
while [ $attempt -lt 10 ]; do
    attempt=$((attempt+1))
    before=$(hwrng_thread)
    head -c {nbytes} /dev/hwrng > /tmp/hwrng
    after=$(hwrng_thread)
    [ "$before" = "$after" ] && [ "${{before%% *}}" = S ] && break
done
result hwrng_attempts $attempt
result hwrng_thread $P $before $after
result hwrng_bytes $(wc -c < /tmp/hwrng)
result hwrng_sha $(sha256sum /tmp/hwrng | cut -d' ' -f1)
result hwrng_head $(head -c 32 /tmp/hwrng | od -An -tx1 | tr -d ' \\n')
"""


def memory_pattern_shell(tag: str) -> str:
    """Guest shell functions ``fill NAME MIB`` (write MIB MiB of a stream named NAME to
    /dev/shm/NAME) and ``digest NAME`` (print the file's md5, to compare with
    :func:`memory_pattern_md5` on the host), plus a remount that lets /dev/shm hold 240 MiB.

    Why not ``yes | head -c``: every system call of a UML guest costs a round trip through
    ptrace (about 0.15-0.25 ms here), and busybox's ``yes`` and ``head`` move 4 KiB or less
    per call: 150 MiB took 40 s on an idle machine, over a minute under load. Here four
    different 256 KiB units are made once and one ``cat`` copies them in turn with large
    calls (a process costs about 70 ms to start in UML, so one per unit would be slow too):
    150 MiB in about a second. The units are small because the guest's memory is nearly
    all spoken for (the balloon tests fill 200 MiB of 245: eight 1 MiB units on top of that
    made the OOM killer panic UML under load). Reading back is the dear part (``md5sum``
    reads 4 KiB at a time, about 6 s for 150 MiB), so the guest reads once and the host
    knows the answer.
    """
    return f"""\
mount -o remount,size=240M /dev/shm
fill() {{
    u=0; while [ $u -lt {_UNITS} ]; do
        yes {tag}-$1-$u | head -c {_UNIT} > /tmp/pattern-$1-$u; u=$((u+1))
    done
    cat $(i=0; while [ $i -lt $(($2 * {MIB // _UNIT})) ]; do
        echo /tmp/pattern-$1-$((i % {_UNITS})); i=$((i+1)); done) > /dev/shm/$1
    rm -f /tmp/pattern-$1-*
}}
digest() {{ md5sum < /dev/shm/$1 | cut -d' ' -f1; }}
"""


_UNITS, _UNIT = 4, 256 << 10


def memory_pattern_md5(tag: str, name: str, mib: int) -> str:
    """The md5 (hex) of what ``fill NAME MIB`` of :func:`memory_pattern_shell` writes:
    256 KiB unit ``k`` is ``TAG-NAME-u`` lines cut at 256 KiB, with ``u = k % 4``."""
    units = []
    for u in range(_UNITS):
        line = f"{tag}-{name}-{u}\n".encode()
        units.append((line * (_UNIT // len(line) + 1))[:_UNIT])
    digest = hashlib.md5()
    for k in range(mib * (MIB // _UNIT)):
        digest.update(units[k % _UNITS])
    return digest.hexdigest()


class NotServed(Exception):
    """The guest's bytes are not one contiguous slice of the served stream."""


def find_served_slice(stream: bytes, results: dict[str, str],
                      nbytes: int = HWRNG_BYTES) -> int:
    """Where the guest's bytes (reported by :func:`hwrng_script`) lie in ``stream``.

    The slice is located by the guest's first 32 bytes, which must occur exactly once; then
    the whole slice must hash to the guest's sha256. Raises :class:`NotServed` otherwise.
    """
    if results.get("hwrng_bytes") != str(nbytes):
        raise NotServed(f"the guest read {results.get('hwrng_bytes')} bytes, not {nbytes}")
    head = bytes.fromhex(results["hwrng_head"])
    offset = stream.find(head)
    if len(head) != 32 or offset < 0:
        raise NotServed("the guest's first bytes are nowhere in what the device served")
    if stream.find(head, offset + 1) != -1:
        raise NotServed("ambiguous: the guest's first bytes occur twice in the stream")
    piece = stream[offset : offset + nbytes]
    if len(piece) != nbytes:
        raise NotServed(f"the device served only {len(stream) - offset} bytes from {offset}")
    if hashlib.sha256(piece).hexdigest() != results["hwrng_sha"]:
        raise NotServed(f"the guest's bytes differ from the served stream at offset {offset}")
    return offset


class ConsoleClient:
    """A client of a console port's unix socket (the host end of hvc0 or a named port).

    A thread collects everything the guest writes into :attr:`received`; every wait has a
    timeout. Call :meth:`close` when done (it unblocks and joins the thread).
    """

    def __init__(self, path: str, timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.sock = unixsock.connect(path, timeout=timeout)
        self.received = bytearray()
        self._cond = threading.Condition()
        self.closed = False
        self._thread = threading.Thread(target=self._read, daemon=True,
                                        name=f"console client {path}")
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(0.2)
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            with self._cond:
                self.received += data
                self._cond.notify_all()
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def wait_until(self, done: Callable[[bytearray], bool], what: str,
                   timeout: float | None = None) -> bytes:
        """Wait until ``done(received)``; returns everything received. Raises TimeoutError
        naming ``what`` (and showing the start of what did arrive)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        with self._cond:
            while not done(self.received):
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise TimeoutError(f"the guest never sent {what} "
                                       f"(got {bytes(self.received[:200])!r})")
                self._cond.wait(min(left, 0.5))
            return bytes(self.received)

    def wait_bytes(self, count: int, timeout: float | None = None) -> bytes:
        """The first ``count`` bytes the guest wrote, or fewer if it stopped or the time ran
        out (the caller compares)."""
        with contextlib.suppress(TimeoutError):
            self.wait_until(lambda b: len(b) >= count, f"{count} bytes", timeout)
        with self._cond:
            return bytes(self.received[:count])

    def take(self) -> bytes:
        """Everything received so far, clearing it."""
        with self._cond:
            data = bytes(self.received)
            self.received.clear()
            return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_in_background(self, data: bytes) -> threading.Thread:
        """Send ``data`` from a thread (the guest may read it only while it also writes)."""
        def send() -> None:
            with contextlib.suppress(OSError):  # a short transfer shows in the checksums
                self.sock.settimeout(self.timeout)
                self.sock.sendall(data)

        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self.closed = True
        # shutdown first: a thread blocked in recv() keeps a merely closed socket alive
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)
