"""A descriptor chain as the device sees it: readable segments, then writable segments.

Segments are zero-copy ``memoryview`` slices of guest memory, already bounds-checked when the
chain was popped. Handlers read requests out of ``readable`` and write replies into
``writable`` (directly, or with :func:`gather` / :func:`scatter`), then push the head back
with the number of bytes they wrote.
"""

from __future__ import annotations

from collections.abc import Sequence


class DescriptorChain:
    """One available buffer: the head descriptor id and its segments."""

    __slots__ = ("head", "readable", "readable_len", "writable", "writable_len")

    def __init__(
        self,
        head: int,
        readable: list[memoryview],
        writable: list[memoryview],
        readable_len: int,
        writable_len: int,
    ) -> None:
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_len = readable_len
        self.writable_len = writable_len

    def read(self, limit: int | None = None) -> bytes:
        """Copy out the readable bytes (up to ``limit``)."""
        return gather(self.readable, limit)

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Copy ``data`` into the writable segments starting ``offset`` bytes in; returns the
        number of bytes written (short if the chain is too small)."""
        return scatter(self.writable, data, offset)

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={len(self.readable)} segs/"
            f"{self.readable_len} B, writable={len(self.writable)} segs/{self.writable_len} B)"
        )


def gather(segments: Sequence[bytes | bytearray | memoryview], limit: int | None = None
           ) -> bytes:
    """Concatenate segments into bytes, stopping after ``limit`` bytes if given."""
    if limit is None:
        if len(segments) == 1:
            return bytes(segments[0])
        return b"".join(segments)
    if segments and len(segments[0]) >= limit:
        return bytes(segments[0][:limit])  # a header in the first segment, or all there is
    out = bytearray()
    for seg in segments:
        need = limit - len(out)
        if need <= 0:
            break
        out += seg[:need]
    return bytes(out)


def scatter(segments: Sequence[memoryview], data: bytes | bytearray | memoryview,
            offset: int = 0) -> int:
    """Copy ``data`` into consecutive segments, skipping the first ``offset`` bytes of them.
    Returns how many bytes of ``data`` were stored."""
    src = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    pos = 0
    total = len(src)
    for seg in segments:
        n = len(seg)
        if offset >= n:
            offset -= n
            continue
        take = min(n - offset, total - pos)
        seg[offset : offset + take] = src[pos : pos + take]
        pos += take
        offset = 0
        if pos >= total:
            break
    return pos


def split_segments(segments: Sequence[memoryview], first: int
                   ) -> tuple[list[memoryview], list[memoryview]]:
    """Split segments after ``first`` bytes: (the first ``first`` bytes, the rest).

    Used to peel a fixed-size header (blk outhdr, net hdr) off the front of a chain without
    copying the payload that follows.
    """
    head: list[memoryview] = []
    rest: list[memoryview] = []
    remaining = first
    for seg in segments:
        if remaining <= 0:
            rest.append(seg)
        elif len(seg) <= remaining:
            head.append(seg)
            remaining -= len(seg)
        else:
            head.append(seg[:remaining])
            rest.append(seg[remaining:])
            remaining = 0
    return head, rest


def split_header(segments: list[memoryview], size: int
                 ) -> tuple[memoryview | bytes, list[memoryview]]:
    """Peel a fixed-size header (blk outhdr, net hdr) off segments holding at least ``size``
    bytes: (a buffer that starts with the header, the segments after it). The header is a
    view when the first segment holds it (the usual case), else a copy; the rest is never
    copied."""
    first = segments[0]
    if len(first) == size:
        return first, segments[1:]
    if len(first) > size:
        return first, [first[size:], *segments[1:]]
    head, rest = split_segments(segments, size)
    return b"".join(head), rest


def transfer(src: Sequence[bytes | bytearray | memoryview], offset: int,
             dst: Sequence[memoryview]) -> int:
    """Copy bytes of the segments ``src``, from ``offset`` bytes in, into the segments
    ``dst`` from their start, until either runs out; returns how many bytes were copied.
    (A joiner's copy from one guest's readable buffers into another's writable ones.)"""
    copied = 0
    segs = iter(dst)
    out = next(segs, None)
    pos = 0
    for seg in src:
        n = len(seg)
        if offset >= n:
            offset -= n
            continue
        view = memoryview(seg)[offset:]
        offset = 0
        while len(view) and out is not None:
            room = len(out) - pos
            if room <= 0:
                out = next(segs, None)
                pos = 0
                continue
            take = min(room, len(view))
            out[pos : pos + take] = view[:take]
            pos += take
            copied += take
            view = view[take:]
        if out is None:
            break
    return copied
