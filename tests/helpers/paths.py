"""Where the sources are: the one place the tests compute a path into the checkout.

Both are strings because they go into PYTHONPATH (child processes run the package from the
checkout, not from an installed copy).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: the package's sources, for PYTHONPATH
SRC = str(ROOT / "src")
#: the test tree, for PYTHONPATH of a child that imports ``helpers.*``
TESTS = str(ROOT / "tests")
