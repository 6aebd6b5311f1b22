"""Host-side back-ends for devices: where a device's bytes come from and go to.

One module per kind of back-end, named for the device family it serves
(:mod:`pyvirtio.device.backends.console_ports`: stdio, unix socket, pty and in-memory ports
for the console device). Devices talk to back-ends through small interfaces defined next to
them, so a device never opens a file itself and tests can plug in-memory back-ends.
"""
