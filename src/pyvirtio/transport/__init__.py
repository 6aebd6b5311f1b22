"""How a driver reaches a device: loopback (in-process), vhost-user, PCI, MMIO, qtest.

Register and message semantics live here, sans-I/O; sockets and fds live in :mod:`pyvirtio.io`.
"""
