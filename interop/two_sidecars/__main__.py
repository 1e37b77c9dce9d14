"""``python -m interop.two_sidecars``: see :mod:`interop.two_sidecars.run`."""

from __future__ import annotations

import sys

from .run import main

raise SystemExit(main(sys.argv[1:]))
