"""Importing this module registers every built-in driver."""

from pyvirtio.driver import (
    blk,  # noqa: F401
    console,  # noqa: F401
    net,  # noqa: F401
    rng,  # noqa: F401
)
