"""Importing this module registers every built-in driver."""

from pyvirtio.driver import rng  # noqa: F401
