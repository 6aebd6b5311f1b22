"""Importing this module registers every built-in driver."""

from pyvirtio.driver import (
    balloon,  # noqa: F401
    blk,  # noqa: F401
    console,  # noqa: F401
    net,  # noqa: F401
    rng,  # noqa: F401
)
