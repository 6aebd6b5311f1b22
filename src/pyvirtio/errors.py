"""The two kinds of failure, named for whose fault they are (the h11 convention).

``LocalError``: you, the caller, misused the API (wrong state, bad argument). Fix your code.
``PeerError``: the other side of the ring or socket misbehaved (a hostile or buggy guest,
driver, device or front-end). The object that detected it is marked broken/closed with the
message; the process keeps running.
"""


class VirtioError(Exception):
    """Base of every pyvirtio error."""


class LocalError(VirtioError):
    """The caller misused the API."""


class PeerError(VirtioError):
    """The peer (guest, driver, device, front-end) sent something invalid."""
