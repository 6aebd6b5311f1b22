"""The batch pop of short buffers (blk's fast lane: header, data, status), on both ring
formats: what a Linux block request looks like comes back as tuples, in flight as if
popped, in order and across the packed ring's laps; anything else stops the batch and is
left for pop(); chain() gives the same chain pop() would have."""

from __future__ import annotations

import pytest

from helpers.ring import AnyPair, make_any_pair


def request(p: AnyPair, token: int, write: bool = False) -> tuple[int, int, int]:
    """Post a Linux-like block request: 16-byte header, 512 data bytes, 1 status byte."""
    hdr, data, status = (p.alloc.alloc(n, 8) for n in (16, 512, 1))
    p.memory.write(hdr, bytes([token]) * 16)
    outs = [(hdr, 16)] + ([(data, 512)] if write else [])
    ins = ([] if write else [(data, 512)]) + [(status, 1)]
    p.driver.add_buf(outs, ins, token)
    return hdr, data, status


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("indirect", [False, True])
def test_linux_block_requests_come_back_as_tuples_across_laps(fmt: str,
                                                              indirect: bool) -> None:
    p = make_any_pair(fmt, 8, indirect=indirect, event_idx=True)
    try:
        for lap in range(4):  # with 3 descriptors each, the packed ring wraps mid-run
            posted = {10 * lap + i: request(p, 10 * lap + i, write=bool(i % 2))
                      for i in range(2)}
            p.driver.kick_prepare()
            got: list[tuple[int, int, int, int]] = []  # token, head, status offset, written
            while len(got) < len(posted):
                batch = p.device.pop_short()
                if not batch:
                    # only a direct packed chain that crosses the ring's end is left to pop()
                    assert fmt == "packed" and not indirect
                    chain = p.device.pop()
                    assert chain is not None
                    token = bytes(chain.readable[0])[0]
                    chain.writable[-1][0] = 0
                    got.append((token, chain.head, -1, 1))
                    continue
                for head, buf, o0, l0, _o1, l1, w1, o2, l2 in batch:
                    assert (l0, l1, l2) == (16, 512, 1)
                    token = bytes(buf[o0 : o0 + 16])[0]
                    assert bytes(buf[o0 : o0 + 16]) == p.memory.read(posted[token][0], 16)
                    assert w1 == (not token % 2)  # reads: the data is device-writable
                    buf[o2] = 0
                    chain = p.device.chain(head)
                    assert (chain.readable_len, chain.writable_len) == (
                        (16, 513) if w1 else (528, 1))
                    got.append((token, head, o2, 1))
            assert sorted(t for t, *_ in got) == sorted(posted)
            assert all(p.memory.read(posted[t][2], 1) == b"\0" for t, *_ in got)
            p.device.push_many([(head, n) for _, head, _, n in got])
            assert sorted(p.driver.get_buf()[0] for _ in got) == sorted(posted)  # type: ignore[index]
            assert p.device.in_flight() == []
    finally:
        p.memory.close()


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_anything_else_stops_the_batch_and_is_left_for_pop(fmt: str) -> None:
    p = make_any_pair(fmt, 8, indirect=False)
    try:
        request(p, 1)
        two = p.alloc.alloc(64, 8)
        p.driver.add_buf([(two, 16)], [(two + 16, 1)], 2)  # two descriptors: not short
        request(p, 3)
        p.driver.kick_prepare()
        got = p.device.pop_short()
        assert len(got) == 1
        assert p.device.pop_short() == []  # the two-descriptor buffer stops it
        chain = p.device.pop()
        assert chain is not None and (chain.readable_len, chain.writable_len) == (16, 1)
        assert len(p.device.pop_short()) == 1  # and the one after it is short again
    finally:
        p.memory.close()


@pytest.mark.parametrize("fmt", ["split", "packed"])
def test_rewind_offers_short_buffers_again(fmt: str) -> None:
    p = make_any_pair(fmt, 8, indirect=True)
    try:
        for i in range(3):
            request(p, i)
        p.driver.kick_prepare()
        first = p.device.pop_short()
        p.device.rewind(2)
        again = p.device.pop_short()
        assert [t[0] for t in again] == [t[0] for t in first[1:]]
    finally:
        p.memory.close()
