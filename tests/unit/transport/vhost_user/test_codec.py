"""The vhost-user message codec: framing, payload layouts, per-request rules."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvirtio.spec import vhost_user as V
from pyvirtio.spec.vhost_user import ProtocolFeature as PF
from pyvirtio.spec.vhost_user import Request as R
from pyvirtio.transport.vhost_user import codec as C
from pyvirtio.transport.vhost_user import frontend as FE


def _open_fds(n: int) -> list[int]:
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(n)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_wire_layouts_match_the_specification() -> None:
    assert V.HEADER_SIZE == 12
    assert V.VRING_STATE.size == 8
    assert V.VRING_ADDR.size == 40
    assert V.MEMORY_REGION.size == 32
    assert V.MEM_REG.size == 40
    assert V.CONFIG_HEADER.size == 12
    assert V.INFLIGHT.size == 24  # the unpacked C struct's tail padding travels too
    assert V.MAX_PAYLOAD_SIZE == 268
    assert V.Request.SET_BACKEND_REQ_FD == V.SET_SLAVE_REQ_FD == 21
    assert V.Request.GET_STATUS == 40 and V.BackendRequest.CONFIG_CHANGE_MSG == 2
    assert V.ProtocolFeature.BACKEND_REQ == 5 and V.ProtocolFeature.STATUS == 16
    assert V.VHOST_USER_F_PROTOCOL_FEATURES == 30


def test_vring_addr_payload_puts_used_before_avail() -> None:
    payload = C.vring_addr(3, desc=0x1000, used=0x3000, avail=0x2000, log=7, flags=1)
    assert struct.unpack("=IIQQQQ", payload) == (3, 1, 0x1000, 0x3000, 0x2000, 7)
    addr = C.parse_vring_addr(payload)
    assert (addr.desc, addr.used, addr.avail) == (0x1000, 0x3000, 0x2000)


def test_a_message_round_trips_through_the_decoder_with_its_fds() -> None:
    fds = _open_fds(2)
    regions = [C.MemoryRegionDesc(0, 0x1000, 0x7F00_0000_0000, 0),
               C.MemoryRegionDesc(0x10000, 0x2000, 0x7F00_0001_0000, 0x1000)]
    msg = C.request(R.SET_MEM_TABLE, C.memory_table(regions), need_reply=True)
    decoder = C.Decoder()
    out = decoder.feed(msg.encode(), fds)
    assert len(out) == 1
    got = out[0]
    assert (got.request, got.flags, got.fds) == (R.SET_MEM_TABLE, V.VERSION | V.NEED_REPLY_FLAG,
                                                 fds)
    assert got.need_reply and not got.is_reply
    assert C.parse_memory_table(got.payload) == regions
    got.close_fds()
    assert not any(_is_open(fd) for fd in fds)


def test_the_decoder_asks_for_the_header_then_exactly_the_payload() -> None:
    decoder = C.Decoder()
    assert decoder.wanted == 12
    data = C.request(R.SET_VRING_NUM, C.vring_state(0, 256)).encode()
    assert decoder.feed(data[:5]) == []
    assert decoder.wanted == 7 and decoder.in_progress
    assert decoder.feed(data[5:12]) == []
    assert decoder.wanted == 8
    assert "SET_VRING_NUM with 0 of 8 payload bytes" in decoder.describe_partial()
    (msg,) = decoder.feed(data[12:])
    assert C.parse_vring_state(msg.payload) == C.VringState(0, 256)
    assert decoder.wanted == 12 and not decoder.in_progress


def test_a_payload_less_message_completes_with_its_header() -> None:
    (msg,) = C.Decoder().feed(C.request(R.GET_FEATURES).encode())
    assert msg.request == R.GET_FEATURES and msg.payload == b""


@pytest.mark.parametrize("flags", [0, 2, 3, 0xF2])
def test_a_header_with_another_protocol_version_breaks_the_stream(flags: int) -> None:
    fds = _open_fds(1)
    with pytest.raises(C.FramingError, match="protocol version"):
        C.Decoder().feed(V.HEADER.pack(R.GET_FEATURES, flags, 0), fds)
    assert not _is_open(fds[0])


def test_a_payload_larger_than_any_message_breaks_the_stream_before_it_is_read() -> None:
    with pytest.raises(C.FramingError, match="payload size 269 exceeds the maximum 268"):
        C.Decoder().feed(V.HEADER.pack(R.SET_MEM_TABLE, V.VERSION, 269))


def test_ack_and_reply_carry_the_request_number_and_the_reply_flag() -> None:
    req = C.request(R.SET_VRING_NUM, C.vring_state(0, 8), need_reply=True)
    ack = C.ack(req, 1)
    assert ack.request == R.SET_VRING_NUM and ack.flags == V.VERSION | V.REPLY_FLAG
    assert C.parse_u64(ack.payload) == 1
    with pytest.raises(FE.BackendRefused):
        FE.check_ack(req, ack)
    FE.check_ack(req, C.ack(req, 0))


def test_the_front_end_rejects_replies_that_do_not_answer_the_request() -> None:
    req = C.request(R.GET_FEATURES)
    with pytest.raises(FE.BadReply, match="answered with GET_PROTOCOL_FEATURES"):
        FE.parse_u64_reply(req, C.reply(C.request(R.GET_PROTOCOL_FEATURES), C.u64(1)))
    no_reply_flag = C.Message(R.GET_FEATURES, V.VERSION, C.u64(1))
    with pytest.raises(FE.BadReply, match="flags"):
        FE.parse_u64_reply(req, no_reply_flag)
    with pytest.raises(FE.BadReply, match="4 bytes"):
        FE.parse_u64_reply(req, C.reply(req, b"\0" * 4))


def test_an_empty_get_config_reply_is_the_back_ends_refusal() -> None:
    req = C.request(R.GET_CONFIG, C.config(0, size=4))
    with pytest.raises(FE.BackendRefused):
        FE.parse_config_reply(req, C.reply(req))
    assert FE.parse_config_reply(req, C.reply(req, C.config(0, b"abcd"))) == b"abcd"
    with pytest.raises(FE.BadReply):
        FE.parse_config_reply(req, C.reply(req, C.config(0, b"ab")))


def _problem(req: int, payload: bytes, nfds: int = 0, truncated: bool = False) -> str | None:
    msg = C.Message(req, V.VERSION, payload, list(range(100, 100 + nfds)),
                    fds_truncated=truncated)
    return C.REQUEST_RULES[req].check(msg)


def test_request_rules_check_payload_size_and_fd_count() -> None:
    assert _problem(R.SET_VRING_NUM, C.vring_state(0, 8)) is None
    assert "expected 8" in (_problem(R.SET_VRING_NUM, b"\0" * 4) or "")
    assert _problem(R.SET_VRING_KICK, C.vring_fd(0), 1) is None
    assert "needs 1" in (_problem(R.SET_VRING_KICK, C.vring_fd(0), 0) or "")
    assert _problem(R.SET_VRING_KICK, C.vring_fd(0, nofd=True), 0) is None
    assert "at most 0" in (_problem(R.SET_VRING_CALL, C.vring_fd(0, nofd=True), 1) or "")
    assert "reserved bits" in (_problem(R.SET_VRING_ERR, C.u64(1 << 9), 1) or "")
    assert "more file descriptors" in (_problem(R.SET_OWNER, b"", 8, truncated=True) or "")
    assert _problem(R.REM_MEM_REG, C.mem_reg(C.MemoryRegionDesc(0, 1, 0, 0)), 1) is None
    assert "at most 1" in (_problem(R.REM_MEM_REG, b"\0" * 40, 2) or "")


def test_memory_table_rule_accepts_qemu_and_uml_layouts_only() -> None:
    region = C.MemoryRegionDesc(0, 0x1000, 0, 0)
    qemu = C.memory_table([region])  # exactly the regions present
    uml = qemu + b"\0" * 32  # UML sends its whole two-region struct with num = 1
    assert _problem(R.SET_MEM_TABLE, qemu, 1) is None
    assert _problem(R.SET_MEM_TABLE, uml, 1) is None
    assert "needs 1" in (_problem(R.SET_MEM_TABLE, qemu, 0) or "")
    assert "no regions" in (_problem(R.SET_MEM_TABLE, V.MEMORY_HEADER.pack(0, 0), 0) or "")
    nine = V.MEMORY_HEADER.pack(9, 0) + b"\0" * 32 * 9
    assert "more than the 8" in (_problem(R.SET_MEM_TABLE, nine, 8) or "")
    assert "need 72" in (_problem(R.SET_MEM_TABLE, V.MEMORY_HEADER.pack(2, 0) + b"\0" * 40, 2)
                         or "")


def test_config_rule_needs_the_payload_to_hold_exactly_the_announced_bytes() -> None:
    assert _problem(R.GET_CONFIG, C.config(0, size=60)) is None
    assert "needs 72" in (_problem(R.GET_CONFIG, C.config(0, size=60)[:-4]) or "")
    big = V.CONFIG_HEADER.pack(0, 257, 0)
    assert "exceeds the maximum 256" in (_problem(R.SET_CONFIG, big) or "")


def test_requests_tied_to_protocol_features_say_which() -> None:
    assert C.REQUEST_RULES[R.GET_CONFIG].feature == PF.CONFIG
    assert C.REQUEST_RULES[R.SET_BACKEND_REQ_FD].feature == PF.BACKEND_REQ
    assert C.REQUEST_RULES[R.ADD_MEM_REG].feature == PF.CONFIGURE_MEM_SLOTS
    assert C.REQUEST_RULES[R.SET_VRING_ENABLE].feature is None  # QEMU sends it early


def test_the_front_end_asks_for_acks_only_on_requests_without_a_reply() -> None:
    ack = V.protocol_mask(PF.REPLY_ACK)
    assert FE.wants_ack(R.SET_VRING_NUM, ack)
    assert not FE.wants_ack(R.GET_VRING_BASE, ack)
    assert not FE.wants_ack(R.SET_VRING_NUM, 0)


def test_back_end_config_change_is_acked_only_when_asked() -> None:
    negotiated = V.protocol_mask(PF.CONFIG)
    plain = C.request(V.BackendRequest.CONFIG_CHANGE_MSG, backend=True)
    event = FE.handle_backend_request(plain, negotiated)
    assert event.kind == "config-change" and event.reply is None
    asked = C.request(V.BackendRequest.CONFIG_CHANGE_MSG, need_reply=True, backend=True)
    event = FE.handle_backend_request(asked, negotiated)
    assert event.reply is not None and C.parse_u64(event.reply.payload) == 0
    unknown = C.request(77, need_reply=True, backend=True)
    event = FE.handle_backend_request(unknown, negotiated)
    assert event.kind == "unsupported" and event.reply is not None
    assert C.parse_u64(event.reply.payload) == 1


def test_describe_renders_requests_and_acks_for_traces() -> None:
    req = C.request(R.SET_VRING_ADDR, C.vring_addr(0, 0x10, 0x30, 0x20))
    assert "vring 0" in C.describe(req) and "used 0x30 avail 0x20" in C.describe(req)
    assert C.describe(C.ack(req, 0)).endswith("ack 0")
    assert "request 99" in C.describe(C.request(99, b"\1\2"))


_stream_messages = st.lists(
    st.tuples(st.sampled_from([R.SET_VRING_NUM, R.GET_FEATURES, R.SET_FEATURES, 99]),
              st.binary(max_size=40)),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(_stream_messages, st.lists(st.integers(1, 64), min_size=1, max_size=20))
def test_any_chunking_of_a_stream_decodes_to_the_same_messages(
        messages: list[tuple[int, bytes]], cuts: list[int]) -> None:
    wire = b"".join(C.request(r, p).encode() for r, p in messages)
    decoder = C.Decoder()
    got = []
    pos, i = 0, 0
    while pos < len(wire):
        n = min(cuts[i % len(cuts)], decoder.wanted)
        got += decoder.feed(wire[pos : pos + n])
        pos += n
        i += 1
    assert [(m.request, m.payload) for m in got] == messages
    assert not decoder.in_progress


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_only_ever_yields_messages_or_a_framing_error(data: bytes) -> None:
    decoder = C.Decoder()
    try:
        msgs = decoder.feed(data)
    except C.FramingError:
        return
    for msg in msgs:
        assert msg.version == V.VERSION and len(msg.payload) <= V.MAX_PAYLOAD_SIZE
        C.describe(msg)  # never raises, whatever the payload
