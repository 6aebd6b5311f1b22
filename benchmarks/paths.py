"""The checkout's root and its sources, computed once for every benchmark.

Importing this module puts the checkout's ``src/`` first on ``sys.path``, so a benchmark run
as ``python benchmarks/NAME.py`` measures this checkout's pyvirtio; import it before
``pyvirtio``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
