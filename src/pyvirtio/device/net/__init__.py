"""virtio-net: the device (:mod:`.device`), software offloads (:mod:`.offload`), the
endpoint interface every frame source and sink shares (:mod:`.endpoint`), the L2 switch
(:mod:`.switch`), the tap back-end (:mod:`.tap`) and pcap capture (:mod:`.pcap`)."""

from pyvirtio.device.net.device import NetDevice, NetStats, RxFilter
from pyvirtio.device.net.endpoint import (
    Delivery,
    Frame,
    FrameSink,
    NetEndpoint,
    Offload,
    format_mac,
    frame_bytes,
    link,
    parse_mac,
)
from pyvirtio.spec.net import NetHdr

__all__ = [
    "Delivery",
    "Frame",
    "FrameSink",
    "NetDevice",
    "NetEndpoint",
    "NetHdr",
    "NetStats",
    "Offload",
    "RxFilter",
    "format_mac",
    "frame_bytes",
    "link",
    "parse_mac",
]
