"""Host-side ends of virtio-console ports: in-memory, stdio, unix socket and pty.

A port back-end is where the bytes of one console port go on the host. The device and the
back-end meet through two small interfaces:

* the device calls the back-end: :meth:`PortBackend.write` (guest output; never blocks),
  :attr:`PortBackend.output_pending` (bytes accepted but not yet taken by the host peer),
  :meth:`PortBackend.pause_reading` / :meth:`PortBackend.resume_reading` (backpressure: the
  guest is not taking host input fast enough), :attr:`PortBackend.connected`, ``close()``;
* the back-end calls the device through :class:`PortEvents`: ``data_received`` (host input
  for the guest), ``connection_changed`` (a host peer came or went: the device tells the
  guest with PORT_OPEN) and ``output_drained`` (everything written has gone out).

Back-ends on file descriptors need a reactor and never block it: their fds are non-blocking,
output the peer does not take yet is buffered and flushed when the fd turns writable, and a
paused port just stops watching its fd, so the kernel's socket or tty buffer pushes back on
the host writer instead of anything being dropped.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import sys
import termios
import tty
from typing import Any, Protocol

from pyvirtio.core.reactor import Reactor, TimerHandle
from pyvirtio.errors import LocalError

log = logging.getLogger("pyvirtio.device.console.ports")

#: bytes read from a host fd per readable event
READ_SIZE = 65536


class PortEvents(Protocol):
    """What a back-end tells the device (one object per port)."""

    def data_received(self, data: bytes) -> None:
        """Host input for the guest. The device keeps all of it (it pauses reading when
        its backlog is full rather than dropping)."""

    def connection_changed(self, connected: bool) -> None:
        """A host peer connected or went away."""

    def output_drained(self) -> None:
        """Every byte given to :meth:`PortBackend.write` has been taken by the host peer."""


class PortBackend:
    """Base of port back-ends; see the module docstring for the contract."""

    #: whether :meth:`start` needs a reactor (back-ends on file descriptors do)
    needs_reactor = False

    def __init__(self) -> None:
        self.events: PortEvents | None = None
        self.reactor: Reactor | None = None
        self.connected = False
        self.paused = False
        self.label = type(self).__name__
        #: how often the device paused reading (backpressure from the guest side)
        self.pauses = 0

    def start(self, events: PortEvents, reactor: Reactor | None) -> None:
        """Begin serving: report to ``events``, use ``reactor`` for fds and timers."""
        if self.events is not None:
            raise LocalError(f"{self.label} is already serving a port")
        if reactor is None and self.needs_reactor:
            raise LocalError(f"{self.label} needs a reactor (an event loop) to run")
        self.events, self.reactor = events, reactor
        self._started()

    def _started(self) -> None:
        """Hook: :attr:`events` and :attr:`reactor` are set."""

    def write(self, data: bytes) -> None:
        """Queue guest output for the host peer. Never blocks; ignored while disconnected."""
        raise NotImplementedError

    @property
    def output_pending(self) -> int:
        """Bytes accepted by :meth:`write` that the host peer has not taken yet."""
        return 0

    def pause_reading(self) -> None:
        """Stop delivering host input until :meth:`resume_reading`."""
        self.paused = True
        self.pauses += 1
        self._reading_changed()

    def resume_reading(self) -> None:
        self.paused = False
        self._reading_changed()

    def _reading_changed(self) -> None:
        """Hook: :attr:`paused` changed."""

    def close(self) -> None:
        """Release everything the back-end holds (fds, sockets, timers)."""

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self.events is not None:
                self.events.connection_changed(connected)

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<{self.label}: {state}{', paused' if self.paused else ''}>"


class MemoryPort(PortBackend):
    """An in-memory port for tests and embedding: :meth:`feed` is host input, :attr:`output`
    collects guest output.

    It behaves like a socket the device reads: input fed while the port is paused waits
    (:attr:`unread`, like bytes in a kernel buffer) and reaches the device in pieces of
    ``chunk`` bytes once reading resumes. With ``stalled`` set it models a host reader that
    does not read: guest output then accumulates in :attr:`output_pending` until
    :meth:`drain`.
    """

    def __init__(self, *, connected: bool = True, chunk: int = 4096,
                 stalled: bool = False) -> None:
        super().__init__()
        self.connected = connected
        self.chunk = chunk
        self.stalled = stalled
        self.output = bytearray()
        self._unread = bytearray()
        self._held = bytearray()
        self._pumping = False

    def feed(self, data: bytes) -> None:
        """Host input: as if a host peer wrote ``data`` into the port."""
        self._unread += data
        self._pump()

    @property
    def unread(self) -> int:
        """Fed bytes the device has not taken yet (it paused reading)."""
        return len(self._unread)

    def _pump(self) -> None:
        # The device may resume reading from inside data_received (it delivered its backlog
        # synchronously); the outer loop below then simply continues.
        if self._pumping or self.events is None:
            return
        self._pumping = True
        try:
            while self._unread and not self.paused:
                piece = bytes(self._unread[: self.chunk])
                del self._unread[: len(piece)]
                self.events.data_received(piece)
        finally:
            self._pumping = False

    def _started(self) -> None:
        self._pump()

    def _reading_changed(self) -> None:
        self._pump()

    def write(self, data: bytes) -> None:
        if self.connected:
            (self._held if self.stalled else self.output).extend(data)

    @property
    def output_pending(self) -> int:
        return len(self._held)

    def drain(self) -> None:
        """The stalled host reader takes everything and keeps reading from now on."""
        self.stalled = False
        self.output += self._held
        self._held.clear()
        if self.events is not None:
            self.events.output_drained()

    def take_output(self) -> bytes:
        """Guest output received so far (and forget it)."""
        out = bytes(self.output)
        self.output.clear()
        return out

    def connect(self) -> None:
        self._set_connected(True)

    def disconnect(self) -> None:
        """The host peer goes away; output it had not taken is lost with it."""
        self._held.clear()
        self._set_connected(False)


class FdPort(PortBackend):
    """Common machinery of back-ends on file descriptors: non-blocking reads while not
    paused, buffered non-blocking writes, and disconnection on EOF or errors.

    Subclasses open a channel with :meth:`_open_channel` when a host peer appears and
    release its fds in :meth:`_release_fds` when it goes away.
    """

    needs_reactor = True

    def __init__(self) -> None:
        super().__init__()
        self.read_size = READ_SIZE
        self._rfd: int | None = None
        self._wfd: int | None = None
        self._reading: int | None = None  # the fd registered for reading
        self._writing: int | None = None  # the fd registered for writing
        self._input_done = False
        self._out = bytearray()
        #: guest output discarded because the host peer went away before taking it
        self.discarded = 0

    @property
    def _loop(self) -> Reactor:
        assert self.reactor is not None, "FdPort used before start()"
        return self.reactor

    def _open_channel(self, rfd: int, wfd: int) -> None:
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        self._rfd, self._wfd = rfd, wfd
        self._input_done = False
        log.info("%s: host peer connected", self.label)
        self._set_connected(True)
        self._update_reader()

    def _detach(self, why: str) -> None:
        """The host peer is gone (or we are closing): stop watching, drop its output."""
        if self._rfd is None:
            return
        log.info("%s: host peer gone: %s", self.label, why)
        self._rfd = self._wfd = None
        self._update_reader()
        self._update_writer()
        self.discarded += len(self._out)
        self._out.clear()
        self._release_fds()
        self._set_connected(False)

    def _release_fds(self) -> None:
        """Hook: close the channel's fds, listen again, ..."""

    def _update_reader(self) -> None:
        want = None if self.paused or self._input_done else self._rfd
        if want == self._reading:
            return
        if self._reading is not None:
            self._loop.remove_reader(self._reading)
        self._reading = want
        if want is not None:
            # the host's own fd: stdin may be a regular file or /dev/null
            self._loop.add_reader(want, self._on_readable, allow_files=True)

    def _update_writer(self) -> None:
        want = self._wfd if self._out else None
        if want == self._writing:
            return
        if self._writing is not None:
            self._loop.remove_writer(self._writing)
        self._writing = want
        if want is not None:
            self._loop.add_writer(want, self._on_writable, allow_files=True)

    def _reading_changed(self) -> None:
        if self.reactor is not None:
            self._update_reader()

    def _on_readable(self) -> None:
        if self._rfd is None:
            return
        try:
            data = os.read(self._rfd, self.read_size)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._detach(f"read failed: {exc}")
            return
        if not data:
            self._end_of_input()
        elif self.events is not None:
            self.events.data_received(data)

    def _end_of_input(self) -> None:
        """Hook: the host peer closed its writing side. Default: it is gone."""
        self._detach("end of file")

    def write(self, data: bytes) -> None:
        if self._wfd is None:
            return
        if not self._out:
            try:
                n = os.write(self._wfd, data)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError as exc:
                self._detach(f"write failed: {exc}")
                return
            if n == len(data):
                return
            data = data[n:]
        self._out += data
        self._update_writer()

    def _on_writable(self) -> None:
        if self._wfd is None:
            return
        try:
            n = os.write(self._wfd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._detach(f"write failed: {exc}")
            return
        del self._out[:n]
        if not self._out:
            self._update_writer()
            if self.events is not None:
                self.events.output_drained()

    @property
    def output_pending(self) -> int:
        return len(self._out)

    def close(self) -> None:
        self._detach("closed")


class UnixSocketPort(FdPort):
    """A listening unix stream socket at ``path``; one client at a time is the host end.

    Further clients wait in the listen backlog until the current one disconnects (as with
    QEMU's socket chardev). A stale socket file at ``path`` is replaced; any other file
    there is an error.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.label = f"unix socket {path}"
        _remove_stale_socket(path)
        self._listener: socket.socket | None = socket.socket(
            socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        )
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._client: socket.socket | None = None
        self._listening = False
        #: clients accepted so far
        self.clients = 0

    def _started(self) -> None:
        self._listen(True)

    def _listen(self, on: bool) -> None:
        if self._listener is None or on == self._listening:
            return
        self._listening = on
        if on:
            self._loop.add_reader(self._listener.fileno(), self._accept)
        else:
            self._loop.remove_reader(self._listener.fileno())

    def _accept(self) -> None:
        if self._listener is None:
            return
        try:
            conn, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("%s: accept failed: %s", self.label, exc)
            return
        self._listen(False)  # one client at a time: the next waits in the backlog
        self._client = conn
        self.clients += 1
        self._open_channel(conn.fileno(), conn.fileno())

    def _release_fds(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listen(True)

    def close(self) -> None:
        listener, self._listener = self._listener, None
        self._detach("closed")
        if listener is None:
            return
        if self._listening and self.reactor is not None:
            self.reactor.remove_reader(listener.fileno())
        self._listening = False
        listener.close()
        try:
            if stat.S_ISSOCK(os.stat(self.path).st_mode):
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_stale_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise LocalError(f"{path} exists and is not a socket; refusing to replace it")
    os.unlink(path)


class PtyPort(FdPort):
    """A pseudo-terminal; the host end is whoever opens :attr:`path` (screen, minicom, cat).

    The pty is raw (bytes pass unchanged). We keep only the master: while no process has
    the slave open the master reports hang-up, so the port is "disconnected" and the device
    tells the guest so; a timer notices when someone opens the slave (QEMU's pty chardev
    polls the same way). ``announce`` prints the slave path to stderr on start.
    """

    def __init__(self, *, announce: bool = True, poll_interval: float = 0.1) -> None:
        super().__init__()
        master, slave = os.openpty()
        try:
            tty.setraw(slave)
            self.path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        self._master: int | None = master
        os.set_blocking(master, False)
        self.label = f"pty {self.path}"
        self.announce = announce
        self.poll_interval = poll_interval
        self._timer: TimerHandle | None = None

    def _started(self) -> None:
        if self.announce:
            print(f"pyvirtio: console port on {self.path}", file=sys.stderr, flush=True)
        self._check_slave()

    def _check_slave(self) -> None:
        self._timer = None
        if self._master is None or self._rfd is not None:
            return
        poller = select.poll()
        poller.register(self._master, select.POLLIN)
        hung_up = any(ev & select.POLLHUP for _, ev in poller.poll(0))
        if hung_up:
            self._timer = self._loop.call_later(self.poll_interval, self._check_slave)
        else:
            self._open_channel(self._master, self._master)

    def _release_fds(self) -> None:
        # Keep the master (and so the slave path); wait for the next opener.
        if self._master is not None and self._timer is None:
            self._timer = self._loop.call_later(self.poll_interval, self._check_slave)

    def close(self) -> None:
        master, self._master = self._master, None
        self._detach("closed")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if master is not None:
            os.close(master)


def describe_unpollable_input(fd: int) -> str | None:
    """What a port does with an input fd that cannot be polled (the event loop reports such
    fds always ready): a regular file is read to its end, /dev/null is no input. None for
    ordinary pollable inputs (terminals, pipes, sockets)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return (f"input is a regular file of {st.st_size} bytes: the guest reads it to its "
                "end, then gets no more input")
    if stat.S_ISCHR(st.st_mode):
        try:
            null = os.stat(os.devnull)
        except OSError:
            return None
        if st.st_rdev == null.st_rdev:
            return "input is /dev/null: the guest gets no input"
    return None


class StdioPort(FdPort):
    """This process's stdin/stdout (or any two fds) as the host end: always connected.

    End of input stops reading but output continues. Input that cannot be polled is fine: a
    regular file is read to its end, /dev/null is no input (one log line says which). The
    fds are made non-blocking while
    the port runs (this affects whatever shares them, such as the shell) and restored by
    :meth:`close`, as is the terminal mode when ``raw`` put a terminal input in raw mode.
    """

    def __init__(self, in_fd: int = 0, out_fd: int = 1, *, raw: bool = False) -> None:
        super().__init__()
        self.in_fd, self.out_fd = in_fd, out_fd
        self.raw = raw
        self.label = f"stdio fds {in_fd}/{out_fd}"
        self._saved_blocking: list[tuple[int, bool]] = []
        self._saved_termios: list[Any] | None = None

    def _started(self) -> None:
        what = describe_unpollable_input(self.in_fd)
        if what is not None:
            log.warning("%s: %s", self.label, what)
        self._saved_blocking = [(fd, os.get_blocking(fd)) for fd in {self.in_fd, self.out_fd}]
        if self.raw and os.isatty(self.in_fd):
            self._saved_termios = termios.tcgetattr(self.in_fd)
            tty.setraw(self.in_fd)
        self._open_channel(self.in_fd, self.out_fd)

    def _end_of_input(self) -> None:
        log.info("%s: end of input; output continues", self.label)
        self._input_done = True
        self._update_reader()

    def close(self) -> None:
        self._detach("closed")
        for fd, blocking in self._saved_blocking:
            try:
                os.set_blocking(fd, blocking)
            except OSError:
                pass
        self._saved_blocking = []
        if self._saved_termios is not None:
            termios.tcsetattr(self.in_fd, termios.TCSADRAIN, self._saved_termios)
            self._saved_termios = None
