"""Survive a peer that shrinks a file we map shared.

Guest memory received from a vhost-user front-end is an ``mmap`` of the front-end's file. If
the front-end truncates that file afterwards, touching the pages past the new end raises
SIGBUS, which would kill the whole process (every other connection with it). memfds that
allow sealing are sealed against shrinking when mapped; UML's tmpfs files and
``memory-backend-file`` cannot be sealed, hence this guard.

:func:`protect` registers a mapping. The first call installs a SIGBUS handler (through
ctypes, ``SA_SIGINFO``): a fault inside a protected mapping replaces the mapping from the
faulting page to its end with private zero pages (``MAP_FIXED`` anonymous memory), counts
the fault on the :class:`Guard` and in :data:`faults`, and returns, so the access completes
(reading zeros, writing into memory nobody else sees). A fault anywhere else goes to the
handler installed before ours (faulthandler, or the default action: the process dies as it
would have). The owner of the memory checks :attr:`Guard.faulted` and stops using it.

Linux x86-64 (and other 64-bit Linux ABIs with glibc's ``struct sigaction`` layout) only;
elsewhere :func:`protect` returns None and nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import signal
import sys
from dataclasses import dataclass

log = logging.getLogger("pyvirtio.memory")

PAGE = mmap.PAGESIZE
_SA_SIGINFO = 4
_MAP_FIXED = 0x10
_SI_ADDR_OFFSET = 16  # siginfo_t: si_signo, si_errno, si_code, padding, then si_addr

#: faults handled so far, over every guard (cheap to poll: compare with a saved value)
faults = 0


@dataclass(eq=False)
class Guard:
    """One protected mapping: ``start``..``end`` in our address space."""

    start: int
    end: int
    what: str
    faulted: int = 0  # faults handled in it


class _Sigaction(ctypes.Structure):
    _fields_ = [("handler", ctypes.c_void_p), ("mask", ctypes.c_ubyte * 128),
                ("flags", ctypes.c_int), ("restorer", ctypes.c_void_p)]


_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)

_guards: list[Guard] = []
_installed = False
_unavailable = False
_previous = _Sigaction()
_callback: object = None  # keeps the ctypes callback alive
_libc: ctypes.CDLL | None = None


def _on_sigbus(signo: int, info: int | None, context: int | None) -> None:
    global faults
    addr = ctypes.c_void_p.from_address(info + _SI_ADDR_OFFSET).value if info else None
    if addr is not None and _libc is not None:
        for guard in _guards:
            if guard.start <= addr < guard.end:
                page = addr - addr % PAGE
                _libc.mmap(page, guard.end - page, mmap.PROT_READ | mmap.PROT_WRITE,
                           mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0)
                guard.faulted += 1
                faults += 1
                return
    # Not ours: put the previous action back; the access faults again and gets it.
    if _libc is not None:
        _libc.sigaction(signal.SIGBUS, ctypes.byref(_previous), None)


def _install() -> bool:
    global _installed, _unavailable, _callback, _libc
    if _installed or _unavailable:
        return _installed
    if not sys.platform.startswith("linux") or ctypes.sizeof(ctypes.c_void_p) != 8:
        _unavailable = True
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        callback = _HANDLER(_on_sigbus)
        action = _Sigaction()
        action.handler = ctypes.cast(callback, ctypes.c_void_p).value
        action.flags = _SA_SIGINFO
        if libc.sigaction(signal.SIGBUS, ctypes.byref(action), ctypes.byref(_previous)) != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGBUS) failed")
    except (OSError, AttributeError) as exc:
        log.warning("cannot guard shared mappings against SIGBUS: %s", exc)
        _unavailable = True
        return False
    _libc, _callback, _installed = libc, callback, True
    return True


def protect(mm: mmap.mmap, what: str) -> Guard | None:
    """Guard the whole of ``mm`` (describe it as ``what`` in logs); None if unsupported."""
    if not _install():
        return None
    probe = ctypes.c_char.from_buffer(mm)
    start = ctypes.addressof(probe)
    del probe  # its export of ``mm`` must go, or ``mm`` could never be closed
    guard = Guard(start, start + len(mm), what)
    # A stale guard (its mapping released late, by the garbage collector) may cover the
    # same addresses: the new mapping owns them now.
    _guards[:] = [g for g in _guards if g.end <= guard.start or guard.end <= g.start]
    _guards.append(guard)
    return guard


def release(guard: Guard | None) -> None:
    """Forget ``guard`` (call once its mapping is unmapped)."""
    if guard is not None and guard in _guards:
        _guards.remove(guard)
