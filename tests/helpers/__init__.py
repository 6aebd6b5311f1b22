"""Helpers shared by the unit, fuzz and integration tests: one module per concern.

``tests/`` is on ``sys.path`` (pytest puts it there: it is the first folder above the test
packages without an ``__init__.py``, and the suite's conftest lives in it), so tests import
``helpers.blk``, ``helpers.vhost_user``, ...; a server child process that needs a helper
(a device factory) gets ``tests/`` through PYTHONPATH (:data:`helpers.paths.TESTS`).
"""
