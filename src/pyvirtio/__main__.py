"""``python -m pyvirtio`` is the ``pyvirtio`` console script."""

from pyvirtio.cli.main import main

raise SystemExit(main())
