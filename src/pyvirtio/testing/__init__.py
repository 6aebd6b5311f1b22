"""Public helpers for testing virtio code; not imported by ``import pyvirtio``.

* :class:`~pyvirtio.testing.pair.DevicePair`: a driver and a device in one process.
* :class:`~pyvirtio.testing.process_pair.ProcessDevicePair`: the device in a child process,
  sharing a memfd and eventfds, for real cross-process visibility.
* :mod:`pyvirtio.testing.hostile`: generators of malformed rings for DeviceQueue.
"""
