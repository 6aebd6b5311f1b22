"""Public helpers for testing virtio code; not imported by ``import pyvirtio``.

* :class:`~pyvirtio.testing.pair.DevicePair`: a driver and a device in one process, joined
  directly (loopback) or through a register model on an in-process machine
  (:class:`~pyvirtio.testing.vmm.VmmBus`).
* :class:`~pyvirtio.testing.process_pair.ProcessDevicePair`: the device in a child process
  behind our vhost-user server, driven here through our vhost-user front-end (shared memfd,
  eventfds), for real cross-process visibility.
* :mod:`pyvirtio.testing.server`: a vhost-user server in a thread (:class:`ServerThread`) or
  a child process (:class:`ServerProcess`).
* :mod:`pyvirtio.testing.hostile`: generators of malformed rings for DeviceQueue.
* :mod:`pyvirtio.testing.hostile_regs`: hostile register access sequences for the register
  models.
"""
