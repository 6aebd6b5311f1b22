"""Errors raised by :mod:`pyvirtio.guest`, named for whose fault they are.

A missing host package is the caller's problem (:class:`MissingDependencyError`, a
``LocalError``); a guest that crashes, hangs or prints the wrong thing is the peer's
(:class:`GuestError`, a ``PeerError``).
"""

from __future__ import annotations

from pyvirtio.errors import LocalError, PeerError

__all__ = ["GuestError", "GuestTimeoutError", "ImageError", "MissingDependencyError"]


class MissingDependencyError(LocalError):
    """A host binary or Debian package the guest needs is not installed.

    ``package`` names the Debian package to install (``apt-get install PACKAGE``).
    """

    def __init__(self, what: str, package: str, detail: str = "") -> None:
        self.what = what
        self.package = package
        message = f"{what} not found: install the Debian package {package!r}"
        if detail:
            message += f" ({detail})"
        super().__init__(message)


class ImageError(LocalError):
    """The initramfs cannot be built from what was asked (unknown module, bad path...)."""


class GuestError(PeerError):
    """The guest did not behave: it crashed, hung, or did not print what was expected.

    The message carries the command line and the last console lines, for debugging.
    """


class GuestTimeoutError(GuestError, TimeoutError):
    """Waiting for the guest (a console line, its exit) took longer than the timeout."""
