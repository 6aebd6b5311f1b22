"""Work around UML 6.1 dying at once on hosts with Intel AMX (large XSAVE state).

The symptom, on the first user process of the guest::

    userspace - ptrace set fp regs failed, errno = 14
    Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b

Why: UML saves and restores its processes' FPU state with
``ptrace(PTRACE_GETREGSET/PTRACE_SETREGSET, pid, NT_X86_XSTATE, iov)`` using a fixed
2696-byte buffer (the XSAVE layout up to PKRU, enough for AVX-512). The host kernel accepts
a SETREGSET only if the buffer is exactly its own XSAVE size, which is 11008 bytes on CPUs
with AMX tiles (Sapphire Rapids and later), so every SETREGSET fails with EFAULT.

Hiding the XSTATE regset (so that UML falls back to PTRACE_SETFPREGS) is not enough: then
the upper halves of the YMM/ZMM registers are zeroed at each page fault of a guest process
(UML resumes it from a signal handler without sigreturn), which corrupts glibc's AVX memcpy;
busybox then segfaults while copying its TLS image.

The fix: a tiny ``LD_PRELOAD`` library that wraps ``ptrace`` and, for a short XSTATE
SETREGSET, passes a buffer of the host's size instead: UML's bytes, zeros after, and the
feature bits cleared (via CPUID leaf 0xD, asked once) for every state component UML's
buffer does not hold (the AMX tiles, which guest processes cannot enable anyway). Everything
else goes straight to the real ``ptrace``. It is compiled once with the host C compiler and
cached.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pyvirtio.guest.errors import MissingDependencyError

__all__ = ["UML_XSTATE_BYTES", "host_xstate_size", "needs_xstate_shim", "xstate_shim"]

#: Bytes of XSAVE state Debian's UML 6.1 passes to PTRACE_SETREGSET (legacy area, header,
#: AVX, MPX, AVX-512 and PKRU components).
UML_XSTATE_BYTES = 2696

_SHIM_SOURCE = r"""
/* pyvirtio UML XSTATE shim: see pyvirtio/guest/uml_xstate.py for why. */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define PYVIRTIO_NT_X86_XSTATE 0x202
#define PYVIRTIO_XSTATE_BV_OFFSET 512

typedef long (*ptrace_fn)(enum __ptrace_request, ...);

static ptrace_fn real_ptrace;
static size_t host_size;
static unsigned char full[1 << 16] __attribute__((aligned(64)));
/* The state components that fit in a buffer of keep_len bytes. Worked out once: CPUID
   is a VM exit on a virtual machine, and UML sets the regset at every switch to a guest
   process. */
static size_t keep_len;
static uint64_t keep_mask;

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);

    if (!real_ptrace)
        real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    if (request == PTRACE_SETREGSET && (uintptr_t)addr == PYVIRTIO_NT_X86_XSTATE && data) {
        struct iovec *iov = data;
        if (!host_size) {
            struct iovec probe = { full, sizeof(full) };
            if (real_ptrace(PTRACE_GETREGSET, pid, addr, &probe) == 0)
                host_size = probe.iov_len;
        }
        if (host_size > iov->iov_len && host_size <= sizeof(full)
            && iov->iov_len >= PYVIRTIO_XSTATE_BV_OFFSET + 64) {
            uint64_t bv;
            if (keep_len != iov->iov_len) {
                keep_mask = 3; /* x87 and SSE: in the legacy area */
                for (unsigned int i = 2; i < 64; i++) {
                    unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
                    __cpuid_count(0xd, i, eax, ebx, ecx, edx);
                    if ((size_t)ebx + eax <= iov->iov_len)
                        keep_mask |= 1ULL << i;
                }
                keep_len = iov->iov_len;
            }
            memcpy(full, iov->iov_base, iov->iov_len);
            memset(full + iov->iov_len, 0, host_size - iov->iov_len);
            memcpy(&bv, full + PYVIRTIO_XSTATE_BV_OFFSET, sizeof(bv));
            bv &= keep_mask;
            memcpy(full + PYVIRTIO_XSTATE_BV_OFFSET, &bv, sizeof(bv));
            struct iovec whole = { full, host_size };
            return real_ptrace(request, pid, addr, &whole);
        }
    }
    return real_ptrace(request, pid, addr, data);
}
"""

# Run in a child interpreter: fork a tracee, read its XSTATE regset with a large buffer,
# print the size the kernel returned.
_PROBE = r"""
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
libc.ptrace.restype = ctypes.c_long
class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]
pid = os.fork()
if pid == 0:
    libc.ptrace(0, 0, None, None)
    os.kill(os.getpid(), signal.SIGSTOP)
    os._exit(0)
try:
    os.waitpid(pid, os.WUNTRACED)
    buf = ctypes.create_string_buffer(1 << 16)
    iov = Iov(ctypes.cast(buf, ctypes.c_void_p), 1 << 16)
    ok = libc.ptrace(0x4204, pid, ctypes.c_void_p(0x202), ctypes.byref(iov)) == 0
    print(iov.len if ok else 0)
finally:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
"""


@functools.cache
def host_xstate_size() -> int:
    """The host kernel's XSAVE regset size in bytes (0 if it cannot be probed)."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=20, check=True
        ).stdout
        return int(out.strip() or 0)
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0


def needs_xstate_shim() -> bool:
    """True if UML's XSTATE buffer is smaller than the host's (an AMX host)."""
    override = os.environ.get("PYVIRTIO_UML_XSTATE_SHIM")
    if override in ("0", "1"):
        return override == "1"
    return host_xstate_size() > UML_XSTATE_BYTES


def xstate_shim(cache_dir: Path) -> Path:
    """Path of the compiled shim (built once into ``cache_dir`` with the host's C compiler)."""
    digest = hashlib.sha256(_SHIM_SOURCE.encode()).hexdigest()[:16]
    target = cache_dir / f"uml-xstate-shim-{digest}.so"
    if target.is_file():
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise MissingDependencyError(
            "a C compiler (needed once to build the UML XSTATE shim for this AMX host)", "gcc"
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".shim-") as tmp:
        source = Path(tmp) / "shim.c"
        source.write_text(_SHIM_SOURCE)
        built = Path(tmp) / "shim.so"
        proc = subprocess.run(
            [compiler, "-O2", "-shared", "-fPIC", "-o", str(built), str(source), "-ldl"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise MissingDependencyError(
                "a working C compiler for the UML XSTATE shim",
                "gcc",
                f"{compiler} failed: {proc.stderr.strip()[-500:]}",
            )
        os.chmod(built, 0o755)
        os.replace(built, target)
    return target
