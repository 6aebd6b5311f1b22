"""pyvirtio: the complete virtio system in Python.

Both ends of every ring: the driver side a guest OS runs and the device side a hypervisor
runs, from the pure ABI (:mod:`pyvirtio.spec`) up through guest memory, sans-I/O virtqueues,
devices, drivers, transports and the I/O loop. See docs/architecture.md for the layer map.
"""

__version__ = "0.1.0"
