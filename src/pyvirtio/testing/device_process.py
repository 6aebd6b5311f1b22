"""Child side of :class:`~pyvirtio.testing.process_pair.ProcessDevicePair`: host one device
on shared memory and serve config messages until the parent closes the socket."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import socket
from typing import Any

from pyvirtio.device.base import VirtioDevice
from pyvirtio.errors import PeerError
from pyvirtio.io.eventfd import EventFd
from pyvirtio.io.loop import EventLoop
from pyvirtio.memory import GuestMemory, region_from_fd

log = logging.getLogger("pyvirtio.testing.device_process")


def load_device(spec: str, kwargs: dict[str, Any]) -> VirtioDevice:
    module, _, name = spec.partition(":")
    cls = getattr(importlib.import_module(module), name)
    device = cls(**kwargs)
    if not isinstance(device, VirtioDevice):
        raise TypeError(f"{spec} is not a VirtioDevice")
    return device


class DeviceServer:
    def __init__(self, device: VirtioDevice, memory: GuestMemory, sock: socket.socket,
                 loop: EventLoop) -> None:
        self.device, self.sock, self.loop = device, sock, loop
        device.memory = memory
        device.reactor = loop
        device.notify_queue = self._interrupt
        self.kicks: dict[int, EventFd] = {}
        self.calls: dict[int, EventFd] = {}
        self.config_irq: EventFd | None = None
        loop.add_reader(sock.fileno(), self._on_message)

    def _interrupt(self, index: int) -> None:
        call = self.calls.get(index)
        if call is not None:
            call.signal()

    def _on_kick(self, index: int) -> None:
        kick = self.kicks.get(index)
        if kick is not None and kick.drain():
            self.device.kick(index)

    def _on_message(self) -> None:
        msg, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 4)
        if not msg:
            self.loop.stop("parent closed the control socket")
            return
        try:
            reply = {"ok": self._dispatch(json.loads(msg), fds)}
        except PeerError as exc:
            reply = {"error": str(exc), "kind": "peer"}
        except Exception as exc:  # report, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}", "kind": "local"}
        self.sock.send(json.dumps(reply).encode())

    def _dispatch(self, req: dict[str, Any], fds: list[int]) -> Any:
        d = self.device
        op = req["op"]
        if op == "hello":
            return {"device_id": d.device_id, "vendor_id": d.vendor_id}
        if op == "get_features":
            return d.get_features()
        if op == "set_features":
            return d.set_driver_features(int(req["value"]))
        if op == "get_status":
            return d.get_status()
        if op == "set_status":
            d.set_status(int(req["value"]))
            if req["value"] == 0:
                self._drop_queues()
            return None
        if op == "read_config":
            return d.read_config(int(req["offset"]), int(req["length"])).hex()
        if op == "write_config":
            return d.write_config(int(req["offset"]), bytes.fromhex(req["data"]))
        if op == "generation":
            return d.config_generation
        if op == "queue_max_size":
            i = int(req["index"])
            return d.queues[i].max_size if 0 <= i < d.num_queues else 0
        if op == "start_queue":
            index = int(req["index"])
            kick, call = EventFd(fds[0]), EventFd(fds[1])
            d.start_queue(index, int(req["size"]), int(req["desc"]), int(req["avail"]),
                          int(req["used"]))
            self.kicks[index], self.calls[index] = kick, call
            self.loop.add_reader(kick.fd, lambda: self._on_kick(index))
            return None
        if op == "config_irq":
            config = EventFd(fds[0])
            self.config_irq = config
            d.notify_config = config.signal
            return None
        if op == "queue_broken":
            i = int(req["index"])
            ring = d.queues[i].ring if 0 <= i < d.num_queues else None
            return None if ring is None else ring.broken
        if op == "attr":
            value = getattr(d, str(req["name"]))
            return value.hexdigest() if hasattr(value, "hexdigest") else value
        raise ValueError(f"unknown op {op!r}")

    def _drop_queues(self) -> None:
        for index, kick in self.kicks.items():
            self.loop.remove_reader(kick.fd)
            kick.close()
            self.calls[index].close()
        self.kicks.clear()
        self.calls.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", required=True, help="module:Class of a VirtioDevice")
    parser.add_argument("--kwargs", default="{}", help="JSON keyword arguments")
    parser.add_argument("--ctrl-fd", type=int, required=True)
    parser.add_argument("--mem-fd", type=int, required=True)
    parser.add_argument("--mem-size", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    memory = GuestMemory([region_from_fd(args.mem_fd, 0, args.mem_size, 0)])
    sock = socket.socket(fileno=args.ctrl_fd)
    loop = EventLoop()
    DeviceServer(load_device(args.device, json.loads(args.kwargs)), memory, sock, loop)
    loop.run()
    loop.close()


if __name__ == "__main__":
    main()
