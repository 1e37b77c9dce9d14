"""docs/api.md's example runs as written (its code is kept verbatim in docs/api_example.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_api_example_matches_the_doc() -> None:
    block = re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S)
    assert block is not None
    assert block.group(1) in (DOCS / "api_example.py").read_text()


def test_api_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "api_example.py")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "you asked for reviews.default.svc:9080: ratings" in result.stdout
    assert "403" in result.stdout
