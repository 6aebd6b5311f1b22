"""Build tiny busybox initramfs images for UML and QEMU guests, in pure Python, with a cache.

Why: integration tests and demos need a real Linux guest that loads the virtio drivers, runs
a short shell script and powers off, in seconds. Everything comes from installed Debian
packages (``busybox-static``, ``user-mode-linux``, ``linux-image-cloud-amd64``); the archive
is written by :class:`~pyvirtio.guest.cpio.CpioWriter` and gzip-compressed.

The image layout::

    /init                 generated preamble: mounts, insmod, runs the script, powers off
    /pyvirtio/lib.sh      shell helpers for scripts (result, host_mount, host_run)
    /pyvirtio/script.sh   the caller's script body
    /bin/busybox          busybox-static, plus one symlink per applet in /bin
    /lib/modules/VER/...  the virtio modules and their dependencies, decompressed
    /dev/console          so that /init starts with the console as stdin/stdout/stderr
    (extra files)         the caller's, e.g. a host program and its shared libraries
                          (:func:`host_program`), each at its host path

Console protocol (parsed by :mod:`pyvirtio.guest.base`):

* ``PYVIRTIO-READY`` once the modules are loaded and the script starts;
* ``PYVIRTIO-RESULT key=value`` for each ``result key value`` the script calls;
* ``PYVIRTIO-MODULE-ERROR path: message`` for a module that failed to load;
* ``PYVIRTIO-EXIT status=N`` after the script returned with status N (then ``poweroff -f``).

A crash or a hang never prints the ``PYVIRTIO-EXIT`` line, which is how the harness tells a
clean finish from a failure.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pyvirtio.guest.cpio import CpioWriter, Writable
from pyvirtio.guest.errors import ImageError, MissingDependencyError

__all__ = [
    "DEFAULT_MODULES",
    "EXIT_MARKER",
    "MODULE_ERROR_MARKER",
    "READY_MARKER",
    "RESULT_MARKER",
    "ExtraFiles",
    "GuestKind",
    "Initramfs",
    "KernelTree",
    "build_initramfs",
    "default_cache_dir",
    "find_busybox",
    "find_qemu_kernel",
    "find_uml_kernel",
    "host_program",
]

GuestKind = Literal["uml", "qemu"]

#: Extra image files: archive path -> content, or (content, permission bits). A
#: :class:`~pathlib.Path` content is a host file, read when the image is built (the cache
#: key uses its path, size and mtime, not its bytes).
ExtraFiles = Mapping[str, "bytes | str | Path | tuple[bytes | str | Path, int]"]

READY_MARKER = "PYVIRTIO-READY"
RESULT_MARKER = "PYVIRTIO-RESULT"
EXIT_MARKER = "PYVIRTIO-EXIT"
MODULE_ERROR_MARKER = "PYVIRTIO-MODULE-ERROR"

#: Modules loaded by default, in this order (dependencies are added from modules.dep and
#: built-in ones are skipped). UML has virtio, virtio_ring and virtio_uml built in.
DEFAULT_MODULES: dict[GuestKind, tuple[str, ...]] = {
    "uml": (
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio_console",
        "virtio_balloon",
    ),
    "qemu": (
        "virtio_ring",
        "virtio",
        "virtio_pci_legacy_dev",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
        "virtio-rng",
        "virtio_console",
        "virtio_balloon",
    ),
}

UML_MODULES_ROOT = Path("/usr/lib/uml/modules")
BUSYBOX_PATHS = (Path("/bin/busybox"), Path("/usr/bin/busybox"))
HOST_LOADER = Path("/lib64/ld-linux-x86-64.so.2")
HOST_LIBRARY_DIRS = (
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu/ceph",
    "/usr/local/lib",
    "/usr/local/lib/x86_64-linux-gnu",
)

# Bump when the generated layout or preamble changes, so that old cache entries are unused.
_FORMAT_VERSION = 2
#: Cached images unused for this many seconds are deleted when a new image is built.
CACHE_MAX_AGE = 14 * 24 * 3600
_MODULE_SUFFIXES = (".ko.xz", ".ko.zst", ".ko.gz", ".ko")
_IMAGE_DIRS = "bin sbin usr/bin usr/sbin dev proc sys tmp root run host etc pyvirtio".split()


def default_cache_dir() -> Path:
    """``$PYVIRTIO_CACHE`` if set, else ``~/.cache/pyvirtio``."""
    env = os.environ.get("PYVIRTIO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pyvirtio"


def _module_name(path: str) -> str:
    """Canonical module name for a file path: basename without suffix, ``-`` as ``_``.

    The kernel treats ``-`` and ``_`` in module names as the same character.
    """
    base = path.rsplit("/", 1)[-1]
    for suffix in _MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def _strip_compression(relpath: str) -> str:
    for suffix in (".xz", ".zst", ".gz"):
        if relpath.endswith(".ko" + suffix):
            return relpath[: -len(suffix)]
    return relpath


def _version_key(version: str) -> tuple[tuple[int, str], ...]:
    """Sort key that orders ``6.1.0-9`` before ``6.1.0-56`` (numbers compare as numbers)."""
    return tuple(
        (int(part), "") if part.isdigit() else (-1, part)
        for part in re.findall(r"\d+|[^\d.\-+~]+", version)
    )


@dataclass(frozen=True)
class KernelTree:
    """A guest kernel and its module tree.

    ``binary`` is the file to boot: the ``linux.uml`` executable or a ``vmlinuz``.
    ``modules_dir`` is ``.../modules/<version>`` holding ``modules.dep`` and ``kernel/``.
    """

    kind: GuestKind
    version: str
    binary: Path
    modules_dir: Path
    _deps: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False, compare=False)
    _by_name: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    _builtin: frozenset[str] = field(default_factory=frozenset, repr=False, compare=False)

    @classmethod
    def load(cls, kind: GuestKind, version: str, binary: Path, modules_dir: Path) -> KernelTree:
        """Read ``modules.dep`` and ``modules.builtin`` of ``modules_dir``."""
        deps: dict[str, tuple[str, ...]] = {}
        by_name: dict[str, str] = {}
        try:
            dep_text = (modules_dir / "modules.dep").read_text()
        except OSError as exc:
            raise ImageError(f"cannot read modules.dep in {modules_dir}: {exc}") from exc
        for line in dep_text.splitlines():
            module, sep, rest = line.partition(":")
            if not sep:
                continue
            module = module.strip()
            deps[module] = tuple(rest.split())
            by_name[_module_name(module)] = module
        builtin: set[str] = set()
        try:
            builtin_text = (modules_dir / "modules.builtin").read_text()
        except OSError:
            builtin_text = ""
        for line in builtin_text.splitlines():
            if line.strip():
                builtin.add(_module_name(line.strip()))
        return cls(kind, version, binary, modules_dir, deps, by_name, frozenset(builtin))

    def is_builtin(self, name: str) -> bool:
        """True if module ``name`` is compiled into the kernel (nothing to load)."""
        return _module_name(name) in self._builtin

    def resolve(self, names: Iterable[str]) -> list[str]:
        """Module paths (relative to ``modules_dir``) to insmod, in a valid load order.

        Each requested module comes after its dependencies (from ``modules.dep``, followed
        recursively); built-in modules are skipped; each module appears once.
        """
        order: list[str] = []
        seen: set[str] = set()

        def visit(relpath: str) -> None:
            if relpath in seen:
                return
            seen.add(relpath)
            for dep in self._deps.get(relpath, ()):
                visit(dep)
            order.append(relpath)

        for name in names:
            canonical = _module_name(name)
            if canonical in self._builtin:
                continue
            relpath = self._by_name.get(canonical)
            if relpath is None:
                raise ImageError(
                    f"kernel module {name!r} is neither built in nor in "
                    f"{self.modules_dir / 'modules.dep'}"
                )
            visit(relpath)
        return order


def find_uml_kernel(
    modules_root: Path = UML_MODULES_ROOT, binary: str | Path = "linux.uml"
) -> KernelTree:
    """The UML kernel binary and its module tree (``/usr/lib/uml/modules/<version>``).

    With several version directories, the one matching ``linux.uml --version`` wins, else
    the newest.
    """
    exe = shutil.which(str(binary))
    if exe is None:
        raise MissingDependencyError(str(binary), "user-mode-linux")
    versions = sorted(
        (d.name for d in modules_root.glob("*") if (d / "modules.dep").is_file()),
        key=_version_key,
    )
    if not versions:
        raise MissingDependencyError(
            f"UML modules ({modules_root}/<version>/modules.dep)", "user-mode-linux"
        )
    version = versions[-1]
    if len(versions) > 1:
        try:
            out = subprocess.run(
                [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            out = ""
        if out in versions:
            version = out
    return KernelTree.load("uml", version, Path(exe), modules_root / version)


def _kernel_roots() -> list[Path]:
    roots = [Path("/")]
    env = os.environ.get("PYVIRTIO_KERNEL_ROOT")
    if env:
        roots.append(Path(env))
    roots.append(default_cache_dir() / "kernel")
    return roots


def find_qemu_kernel(
    roots: Sequence[Path] | None = None, flavour: str = "cloud-amd64"
) -> KernelTree:
    """The newest ``boot/vmlinuz-*-<flavour>`` with a matching ``lib/modules/<version>``.

    ``roots`` are searched in order, the first with a kernel wins. By default: ``/``, then
    ``$PYVIRTIO_KERNEL_ROOT``, then ``<cache>/kernel``: the latter two are meant for a
    package extracted without installing it::

        apt-get download linux-image-6.1.0-NN-cloud-amd64
        dpkg-deb -x linux-image-*.deb ~/.cache/pyvirtio/kernel
    """
    searched = list(roots) if roots is not None else _kernel_roots()
    for root in searched:
        found: list[tuple[str, Path, Path]] = []
        for vmlinuz in (root / "boot").glob(f"vmlinuz-*-{flavour}"):
            version = vmlinuz.name.removeprefix("vmlinuz-")
            for moddir in (root / "lib/modules" / version, root / "usr/lib/modules" / version):
                if (moddir / "modules.dep").is_file():
                    found.append((version, vmlinuz, moddir))
                    break
        if found:
            version, vmlinuz, moddir = max(found, key=lambda item: _version_key(item[0]))
            if not os.access(vmlinuz, os.R_OK):
                raise ImageError(f"{vmlinuz} is not readable by this user (run as root)")
            return KernelTree.load("qemu", version, vmlinuz, moddir)
    where = ", ".join(str(r / "boot") for r in searched)
    raise MissingDependencyError(
        f"kernel vmlinuz-*-{flavour} with its modules (searched {where})",
        f"linux-image-{flavour}",
    )


def _elf_interpreter(path: Path) -> bool:
    """True if the ELF file at ``path`` has a PT_INTERP header (is dynamically linked)."""
    with path.open("rb") as f:
        ident = f.read(64)
        if len(ident) < 64 or ident[:4] != b"\x7fELF" or ident[4] != 2 or ident[5] != 1:
            return False  # not little-endian ELF64: let the guest tell
        (phoff,) = struct.unpack_from("<Q", ident, 32)
        phentsize, phnum = struct.unpack_from("<HH", ident, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(
        struct.unpack_from("<I", table, i * phentsize)[0] == 3  # PT_INTERP
        for i in range(len(table) // phentsize)
    )


def find_busybox() -> Path:
    """The statically linked busybox from ``busybox-static``."""
    for path in BUSYBOX_PATHS:
        if path.is_file():
            if _elf_interpreter(path):
                raise MissingDependencyError(
                    "statically linked busybox", "busybox-static", f"{path} is dynamic"
                )
            return path
    raise MissingDependencyError("busybox", "busybox-static")


def _busybox_applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run(
            [str(busybox), "--list"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"'{busybox} --list' failed: {exc}") from exc
    return sorted({a for a in out.split() if a and "/" not in a and a != "busybox"})


def _read_source(path: Path) -> bytes:
    """A host file's bytes; a kernel module's decompressed (busybox insmod does not)."""
    data = path.read_bytes()
    name = path.name
    if name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if name.endswith(".ko.zst"):
        zstd = shutil.which("zstd")
        if zstd is None:
            raise MissingDependencyError("zstd (to decompress kernel modules)", "zstd")
        return subprocess.run(
            [zstd, "-dc", str(path)], capture_output=True, timeout=60, check=True
        ).stdout
    return data


_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(\S+|not found)(?: \(0x[0-9a-f]+\))?\s*$")


def host_program(path: str | os.PathLike[str]) -> dict[str, tuple[Path, int]]:
    """Extra files that let a guest run the host executable ``path`` as it is.

    The program goes in at its own path; its ELF interpreter (the loader) at the path its
    ``PT_INTERP`` names, and every shared library the host's loader resolves for it (``ldd``:
    the whole ``DT_NEEDED`` closure, nothing else) at the path the loader found it. The
    guest's loader then finds them by itself: in its system directories
    (``/lib/x86_64-linux-gnu`` ...) or through the ``RUNPATH`` that led the host's loader to
    them. Works for QEMU and UML images alike; pass the result (merged with other extra
    files) as ``extra_files``. A library the host cannot resolve raises :class:`ImageError`.

    Example: ``QemuGuest("fio --version", extra_files=host_program("/usr/bin/fio"))``.
    """
    exe = Path(path)
    if not exe.is_file() or not os.access(exe, os.X_OK):
        raise ImageError(f"{exe} is not an executable file")
    files: dict[str, tuple[Path, int]] = {str(exe): (exe, 0o755)}
    if not _elf_interpreter(exe):
        return files  # statically linked: nothing else to bring
    ldd = shutil.which("ldd")
    if ldd is None:
        raise MissingDependencyError("ldd (to list a program's shared libraries)", "libc-bin")
    try:
        out = subprocess.run(
            [ldd, str(exe)], capture_output=True, text=True, timeout=30, check=True,
            env={**os.environ, "LC_ALL": "C"},
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"'ldd {exe}' failed: {exc}") from exc
    for line in out.splitlines():
        m = _LDD_LINE.match(line)
        if m is None:
            raise ImageError(f"'ldd {exe}': unexpected line {line!r}")
        soname, where = m.groups()
        if where == "not found":
            raise ImageError(f"{exe} needs {soname}, which the host's loader cannot find")
        if not where.startswith("/"):
            continue  # the vDSO: provided by the kernel
        files[where] = (Path(where), 0o755)
    return files


def _host_run_helpers() -> str:
    """Shell helpers (UML only) to run host binaries through a read-only hostfs mount."""
    loader = os.path.realpath(HOST_LOADER)
    libs = []
    for d in HOST_LIBRARY_DIRS:
        real = os.path.realpath(d)
        if os.path.isdir(real) and f"/host{real}" not in libs:
            libs.append(f"/host{real}")
    return f"""
# UML hostfs: the host's / read-only at /host. Run host programs with the host's own
# loader and libraries. NEVER chroot into /host: its /dev is the HOST's /dev.
PYVIRTIO_HOST_LOADER=/host{loader}
PYVIRTIO_HOST_LIBS={":".join(libs)}
host_mount() {{
    grep -q ' /host hostfs ' /proc/mounts && return 0
    mkdir -p /host && mount -r -t hostfs none /host -o /
}}
host_run() {{
    host_mount || return 1
    _pyvirtio_prog=$1
    shift
    "$PYVIRTIO_HOST_LOADER" --library-path "$PYVIRTIO_HOST_LIBS" "/host$_pyvirtio_prog" "$@"
}}
"""


def _render_lib(kind: GuestKind) -> str:
    text = f"""# Generated by pyvirtio.guest.image: helpers sourced before the script.
# result KEY VALUE...: report KEY=VALUE to the harness (GuestResult.results). The value
# is one line: the words are joined by single spaces, so $(cmd) output may be passed as is.
result() {{
    _pyvirtio_key=$1
    shift
    echo "{RESULT_MARKER} $_pyvirtio_key=$*"
}}
"""
    if kind == "uml":
        text += _host_run_helpers()
    return text


def _render_init(module_paths: Sequence[str]) -> str:
    inserts = "\n".join(f"pyvirtio_insmod /{p}" for p in module_paths)
    return f"""#!/bin/sh
# Generated by pyvirtio.guest.image: mount, load modules, run the script, power off.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root TERM=dumb
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /tmp /root /run /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm 2>/dev/null
pyvirtio_insmod() {{
    _out=$(insmod "$1" 2>&1) && return 0
    case "$_out" in *"File exists"*) return 0 ;; esac
    echo "{MODULE_ERROR_MARKER} $1: $_out"
}}
{inserts}
echo "{READY_MARKER}"
/bin/sh -c '. /pyvirtio/lib.sh; . /pyvirtio/script.sh'
status=$?
sync
echo "{EXIT_MARKER} status=$status"
poweroff -f
sleep 10
"""


@dataclass(frozen=True)
class _Member:
    """One archive entry: inline data, or a host file read (and decompressed) at build time."""

    path: str
    type: Literal["dir", "file", "symlink", "chardev"]
    perm: int = 0o644
    data: bytes = b""
    source: Path | None = None

    def key(self) -> bytes:
        parts = [self.type, self.path, oct(self.perm)]
        if self.source is not None:
            st = self.source.stat()
            parts += [str(self.source), str(st.st_size), str(st.st_mtime_ns)]
        else:
            parts.append(hashlib.sha256(self.data).hexdigest())
        return "\0".join(parts).encode() + b"\n"


@dataclass(frozen=True)
class Initramfs:
    """A built (or cached) initramfs image and what it was built for.

    ``cached`` is True when the file already existed and was reused.
    """

    path: Path
    kind: GuestKind
    kernel: KernelTree
    modules: tuple[str, ...]
    cached: bool


def _normalize_extra(extra_files: ExtraFiles | None) -> list[_Member]:
    members = []
    for path, spec in sorted((extra_files or {}).items()):
        data, perm = spec if isinstance(spec, tuple) else (spec, 0o644)
        name = path.strip("/")
        if not name or ".." in name.split("/"):
            raise ImageError(f"invalid extra file path {path!r}")
        if isinstance(data, Path):
            if not data.is_file():
                raise ImageError(f"extra file {path!r}: {data} is not a readable file")
            members.append(_Member(name, "file", perm, source=data))
        else:
            members.append(_Member(name, "file", perm,
                                   data.encode() if isinstance(data, str) else data))
    return members


def _members(
    kind: GuestKind,
    tree: KernelTree,
    module_paths: Sequence[str],
    script: str,
    extra_files: ExtraFiles | None,
) -> Iterator[_Member]:
    busybox = find_busybox()
    for d in _IMAGE_DIRS:
        yield _Member(d, "dir", 0o1777 if d == "tmp" else 0o755)
    yield _Member("dev/console", "chardev", 0o600)
    yield _Member("bin/busybox", "file", 0o755, source=busybox)
    for applet in _busybox_applets(busybox):
        yield _Member(f"bin/{applet}", "symlink", data=b"busybox")
    moddir = f"lib/modules/{tree.version}"
    for rel in module_paths:
        yield _Member(f"{moddir}/{_strip_compression(rel)}", "file", source=tree.modules_dir / rel)
    installed = [f"{moddir}/{_strip_compression(rel)}" for rel in module_paths]
    yield _Member("init", "file", 0o755, _render_init(installed).encode())
    yield _Member("pyvirtio/lib.sh", "file", 0o644, _render_lib(kind).encode())
    yield _Member("pyvirtio/script.sh", "file", 0o755, script.encode())
    yield _Member("etc/passwd", "file", 0o644, b"root:x:0:0:root:/root:/bin/sh\n")
    yield _Member("etc/group", "file", 0o644, b"root:x:0:\n")
    yield from _normalize_extra(extra_files)


def _write_archive(members: Sequence[_Member], out: Writable) -> None:
    writer = CpioWriter(out)
    for m in members:
        if m.type == "dir":
            writer.add_dir(m.path, m.perm)
        elif m.type == "chardev":
            writer.add_char_device(m.path, 5, 1, m.perm)
        elif m.type == "symlink":
            writer.add_symlink(m.path, m.data.decode())
        else:
            data = _read_source(m.source) if m.source is not None else m.data
            writer.add_file(m.path, data, m.perm)
    writer.finish()


def build_initramfs(
    kind: GuestKind,
    script: str = "",
    *,
    extra_files: ExtraFiles | None = None,
    modules: Sequence[str] | None = None,
    kernel: KernelTree | None = None,
    cache_dir: Path | None = None,
    compress: bool = True,
) -> Initramfs:
    """Build (or reuse from the cache) an initramfs that runs ``script`` then powers off.

    ``script`` is a busybox ``sh`` script body; it may call ``result KEY VALUE`` (and, on
    UML, ``host_mount`` / ``host_run /usr/bin/PROG ARGS``). ``extra_files`` maps archive
    paths to content or ``(content, mode)``. ``modules`` overrides :data:`DEFAULT_MODULES`
    (dependencies are still resolved). ``kernel`` defaults to :func:`find_uml_kernel` or
    :func:`find_qemu_kernel`.

    The file is named by a hash of everything that goes in the image (kind, module
    versions, busybox, script, extra files), in ``cache_dir`` (default
    :func:`default_cache_dir`). It is written to a temporary file then renamed, so that
    concurrent builders never see a partial image.
    """
    if kind not in DEFAULT_MODULES:
        raise ImageError(f"unknown guest kind {kind!r}: expected 'uml' or 'qemu'")
    tree = kernel or (find_uml_kernel() if kind == "uml" else find_qemu_kernel())
    if tree.kind != kind:
        raise ImageError(f"a {tree.kind} kernel tree cannot make a {kind} image")
    requested = tuple(modules) if modules is not None else DEFAULT_MODULES[kind]
    module_paths = tree.resolve(requested)
    members = list(_members(kind, tree, module_paths, script, extra_files))
    seen: set[str] = set()
    for m in members:
        if m.path in seen:
            raise ImageError(f"image path {m.path!r} is generated by pyvirtio: choose another")
        seen.add(m.path)

    digest = hashlib.sha256(f"pyvirtio-initramfs {_FORMAT_VERSION} {kind} {compress}\n".encode())
    digest.update(f"{tree.kind} {tree.version} {tree.modules_dir}\n".encode())
    for m in members:
        digest.update(m.key())
    suffix = ".cpio.gz" if compress else ".cpio"
    directory = (cache_dir or default_cache_dir()) / "initramfs"
    path = directory / f"{kind}-{tree.version}-{digest.hexdigest()[:20]}{suffix}"
    names = tuple(_module_name(p) for p in module_paths)
    if path.is_file():
        try:
            os.utime(path)  # marks it used, for _prune_cache
        except OSError:
            pass
        return Initramfs(path, kind, tree, names, cached=True)

    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as raw:
            if compress:
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
                    _write_archive(members, gz)
            else:
                _write_archive(members, raw)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _prune_cache(directory, keep=path)
    return Initramfs(path, kind, tree, names, cached=False)


def _prune_cache(directory: Path, keep: Path) -> None:
    """Remove images (and stale temporary files) unused for :data:`CACHE_MAX_AGE` seconds.

    A reused image has its mtime refreshed, so only images nobody booted lately go; one
    that is still wanted is simply rebuilt.
    """
    cutoff = time.time() - CACHE_MAX_AGE
    for entry in directory.iterdir():
        if entry == keep or not entry.name.endswith((".cpio.gz", ".cpio")):
            continue
        try:
            if entry.stat().st_mtime < cutoff:
                entry.unlink()
        except OSError:
            pass
