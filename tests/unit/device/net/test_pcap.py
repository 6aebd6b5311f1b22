"""pcap capture: files that dpkt (and so tcpdump/wireshark) read back frame for frame."""

from __future__ import annotations

import io
from pathlib import Path

import dpkt

from helpers.net import BROADCAST, arp_request, mac, probe, udp_frame
from pyvirtio.device.net import NetDevice, link
from pyvirtio.device.net.pcap import LINKTYPE_ETHERNET, PcapWriter
from pyvirtio.device.net.switch import Switch
from pyvirtio.testing.pair import DevicePair


def read_pcap(path: Path) -> tuple[dpkt.pcap.Reader, list[tuple[float, bytes]]]:
    with open(path, "rb") as f:
        reader = dpkt.pcap.Reader(f)
        return reader, list(reader)


def test_written_frames_read_back_with_timestamps_and_ethernet_link_type(
        tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    stamps = iter([1700000000.25, 1700000001.5])
    frames = [arp_request(mac(1), "10.0.0.1", "10.0.0.2"), b"\x01" * 1514]
    with PcapWriter(path, clock=lambda: next(stamps)) as w:
        w.write(frames[0])
        w.write_frame([memoryview(frames[1])[:700], frames[1][700:]], 1514)
    reader, records = read_pcap(path)
    assert reader.datalink() == LINKTYPE_ETHERNET
    assert [buf for _, buf in records] == frames
    assert [ts for ts, _ in records] == [1700000000.25, 1700000001.5]
    eth = dpkt.ethernet.Ethernet(records[0][1])
    assert isinstance(eth.data, dpkt.arp.ARP)


def test_frames_longer_than_snaplen_are_truncated_with_their_original_length() -> None:
    out = io.BytesIO()
    w = PcapWriter(out, snaplen=100)
    w.write(b"\x02" * 3000)
    w.close()
    out.seek(0)
    reader = dpkt.pcap.Reader(out)
    assert reader.snaplen == 100
    (rec,) = list(reader)
    assert rec[1] == b"\x02" * 100
    hdr = out.getvalue()[24:40]
    assert int.from_bytes(hdr[12:16], "little") == 3000  # orig_len keeps the wire size


def test_switch_port_capture_holds_both_directions(tmp_path: Path) -> None:
    path = tmp_path / "port-a.pcap"
    sw = Switch()
    a = DevicePair(NetDevice(mac(1), name="a"))
    b = DevicePair(NetDevice(mac(2), name="b"))
    try:
        with PcapWriter(path) as cap:
            sw.add_port(a.device, "a", capture=cap)
            sw.add_port(b.device, "b")
            da, db = probe(a), probe(b)
            request = arp_request(mac(1), "10.0.0.1", "10.0.0.2")
            reply, _ = udp_frame(mac(2), mac(1), "10.0.0.2", "10.0.0.1", 53, 4000, b"answer")
            da.send(request)
            db.send(reply)
            assert [f.data for f in da.recv_all()] == [reply]
        _, records = read_pcap(path)
        assert [buf for _, buf in records] == [request, reply]
        udp = dpkt.ethernet.Ethernet(records[1][1]).data.data
        assert isinstance(udp, dpkt.udp.UDP) and udp.data == b"answer"
    finally:
        a.close()
        b.close()


def test_device_capture_records_what_its_guest_sent_and_received(tmp_path: Path) -> None:
    path = tmp_path / "dev.pcap"
    cap = PcapWriter(path)
    a = DevicePair(NetDevice(mac(1), name="a", capture=cap))
    b = DevicePair(NetDevice(mac(2), name="b"))
    try:
        link(a.device, b.device)
        da, db = probe(a), probe(b)
        out = BROADCAST + mac(1) + b"\x88\xb5" + b"o" * 50
        back = mac(1) + mac(2) + b"\x88\xb5" + b"i" * 50
        da.send(out)
        db.send(back)
        assert len(da.recv_all()) == 1
        cap.close()
        _, records = read_pcap(path)
        assert [buf for _, buf in records] == [out, back]
        assert cap.frames == 2
    finally:
        a.close()
        b.close()
