"""The packed ring's own layout facts (VIRTIO 1.x §2.8), read back from guest memory the way
the other side would read them: flags per lap, ids in the last descriptor, one used
descriptor per buffer (or per IN_ORDER run), event suppression, and the driver refusing a
device that returns what it never got."""

from __future__ import annotations

import struct

import pytest

from helpers.ring import AnyPair, make_any_pair
from pyvirtio.ring import RingError
from pyvirtio.ring.packed import PackedDeviceQueue, PackedDriverQueue, encode

DESC = struct.Struct("<QIHH")
EVT = struct.Struct("<HH")
AVAIL, USED, NEXT, WRITE = 1 << 7, 1 << 15, 1, 2


def packed(size: int = 8, **flags: bool) -> tuple[AnyPair, PackedDriverQueue,
                                                   PackedDeviceQueue]:
    p = make_any_pair("packed", size, **flags)
    assert isinstance(p.driver, PackedDriverQueue)
    assert isinstance(p.device, PackedDeviceQueue)
    return p, p.driver, p.device


def desc(p: AnyPair, slot: int) -> tuple[int, int, int, int]:
    addr, length, buf_id, flags = DESC.unpack(p.memory.read(p.driver.desc_addr + 16 * slot, 16))
    return addr, length, buf_id, flags


def bufs(p: AnyPair, n: int, length: int = 16) -> list[tuple[int, int]]:
    return [(p.alloc.alloc(length, 8), length) for _ in range(n)]


def test_a_chain_occupies_consecutive_slots_with_avail_flags_and_its_id_last() -> None:
    p, drv, dev = packed()
    out, ins = bufs(p, 2), bufs(p, 1)
    buf_id = drv.add_buf(out, ins, "t")
    rows = [desc(p, i) for i in range(3)]
    assert [r[3] for r in rows] == [AVAIL | NEXT, AVAIL | NEXT, AVAIL | WRITE]
    assert rows[2][2] == buf_id
    assert [(r[0], r[1]) for r in rows] == out + ins
    chain = dev.pop()
    assert chain is not None and chain.head == buf_id and chain.writable_len == 16
    dev.push(chain, 5)
    # One used descriptor, at the chain's first slot: AVAIL = USED = wrap counter 1.
    assert desc(p, 0)[1:] == (5, buf_id, AVAIL | USED | WRITE)
    assert desc(p, 1)[3] == AVAIL | NEXT  # the rest are skipped, not rewritten
    assert drv.get_buf() == ("t", 5)
    p.close()


def test_the_second_lap_inverts_the_flags() -> None:
    p, drv, dev = packed(size=2)
    for lap in range(3):
        for slot in range(2):
            drv.add_buf([], bufs(p, 1), (lap, slot))
            wrap = 1 - lap % 2
            assert desc(p, slot)[3] == (AVAIL if wrap else USED) | WRITE
            chain = dev.pop()
            assert chain is not None
            dev.push(chain, 1)
            assert desc(p, slot)[3] & (AVAIL | USED) == (AVAIL | USED if wrap else 0)
            assert drv.get_buf() == ((lap, slot), 1)
    p.close()


def test_out_of_order_completion_writes_used_descriptors_in_completion_order() -> None:
    p, drv, dev = packed()
    ids = [drv.add_buf([], bufs(p, 1), t) for t in "abc"]
    chains = [dev.pop() for _ in ids]
    assert all(c is not None for c in chains)
    dev.push(chains[2], 3)  # type: ignore[arg-type]
    dev.push(chains[0], 1)  # type: ignore[arg-type]
    assert desc(p, 0)[2] == ids[2] and desc(p, 1)[2] == ids[0]
    assert [drv.get_buf(), drv.get_buf(), drv.get_buf()] == [("c", 3), ("a", 1), None]
    p.close()


def test_in_order_run_of_full_buffers_is_one_used_descriptor() -> None:
    p, drv, dev = packed(in_order=True)
    for t in "abcd":
        drv.add_buf(bufs(p, 1), bufs(p, 1), t)  # two descriptors each
    chains = [dev.pop() for _ in range(4)]
    assert all(c is not None for c in chains)
    # Completed backwards; the first three filled completely, the last short.
    done = [(chains[3], 7), (chains[2], 16), (chains[1], 16), (chains[0], 16)]
    assert dev.push_many(done) == 4  # type: ignore[arg-type]
    last_id = chains[3].head  # type: ignore[union-attr]
    assert desc(p, 0)[1:] == (7, last_id, AVAIL | USED | WRITE)
    for slot in range(1, 8):
        assert desc(p, slot)[3] & USED == 0  # nothing else was written
    assert [drv.get_buf() for _ in range(5)] == [("a", 16), ("b", 16), ("c", 16), ("d", 7),
                                                 None]
    assert drv.num_free == 8
    p.close()


def test_split_in_order_run_is_one_used_element_and_moves_idx_by_the_run() -> None:
    p = make_any_pair("split", 8, in_order=True)
    for t in "abc":
        p.driver.add_buf([], bufs(p, 1), t)
    chains = [p.device.pop() for _ in range(3)]
    p.device.push_many([(c, 16) for c in chains])  # type: ignore[misc]
    used = p.driver.used_addr
    assert int.from_bytes(p.memory.read(used + 2, 2), "little") == 3
    head, length = struct.unpack("<II", p.memory.read(used + 4, 8))
    assert (head, length) == (chains[2].head, 16)  # type: ignore[union-attr]
    assert [p.driver.get_buf() for _ in range(4)] == [("a", 16), ("b", 16), ("c", 16), None]
    p.close()


def test_event_suppression_structures() -> None:
    p, drv, dev = packed(event_idx=True)
    driver_evt, device_evt = drv.avail_addr, drv.used_addr
    drv.disable_cb()
    assert EVT.unpack(p.memory.read(driver_evt, 4))[1] == 1  # DISABLE
    drv.add_buf([], bufs(p, 1), "x")
    chain = dev.pop()
    dev.push(chain, 0)  # type: ignore[arg-type]
    assert not dev.needs_notification()
    assert drv.enable_cb() is False  # used in the window: the race is reported
    assert EVT.unpack(p.memory.read(driver_evt, 4)) == (encode(0, 1), 2)  # DESC at slot 0
    assert drv.get_buf() == ("x", 0)
    assert EVT.unpack(p.memory.read(driver_evt, 4))[0] == encode(1, 1)
    dev.disable_notifications()
    assert EVT.unpack(p.memory.read(device_evt, 4))[1] == 1
    drv.add_buf([], bufs(p, 1), "y")
    assert not drv.kick_prepare()
    assert dev.enable_notifications() is True  # a buffer arrived meanwhile
    assert EVT.unpack(p.memory.read(device_evt, 4)) == (encode(1, 1), 2)
    p.close()


def test_driver_breaks_on_a_used_id_it_never_gave_out() -> None:
    p, drv, _ = packed()
    drv.add_buf([], bufs(p, 1), "x")
    p.memory.write(drv.desc_addr + 8, struct.pack("<IHH", 0, 5, AVAIL | USED))
    with pytest.raises(RingError, match=r"returned id 5 in used slot 0 \(0x[0-9a-f]+\)"):
        drv.get_buf()
    p.close()


def test_driver_breaks_on_a_length_beyond_the_buffer() -> None:
    p, drv, _ = packed()
    buf_id = drv.add_buf([], bufs(p, 1), "x")
    p.memory.write(drv.desc_addr + 8, struct.pack("<IHH", 17, buf_id, AVAIL | USED | WRITE))
    with pytest.raises(RingError, match="claims 17 bytes written"):
        drv.get_buf()
    p.close()


@pytest.mark.parametrize("fmt", ["split", "packed"])
@pytest.mark.parametrize("in_order", [False, True])
def test_a_batch_of_used_buffers_becomes_visible_to_the_driver_all_at_once(
        fmt: str, in_order: bool) -> None:
    """A driver polling while the device writes a batch (Linux's virtio_net takes a frame's
    further buffers as soon as it read num_buffers in the first) must see none of it or all
    of it, never the first buffers alone."""
    p = make_any_pair(fmt, 8, in_order=in_order)
    drv, dev = p.driver, p.device
    for token in "abcd":
        drv.add_buf([], bufs(p, 1), token)
    chains = [dev.pop() for _ in range(4)]
    seen_meanwhile = []

    def completions():  # the device writes them one by one; the driver looks in between
        for chain in chains:
            yield chain, 16
            seen_meanwhile.append(drv.has_used())

    assert dev.push_many(completions()) == 4
    assert seen_meanwhile == [False] * 4
    got = []
    while (buf := drv.get_buf()) is not None:
        got.append(buf)
    assert got == [(t, 16) for t in "abcd"]
    p.close()
