"""H2Transport's CONNECT tunnels through nghttpx (Debian ``nghttp2-proxy``), HTTP/2 forward proxy.

Runs the checks of :mod:`interop.h2_nghttpx` against one nghttpx on loopback.
Skipped when nghttpx is missing, unless ``QUICMESH_REQUIRE_INTEROP`` is set
(CI sets it), in which case it fails.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from interop.h2_nghttpx import APT_PACKAGE, nghttpx_path, run_checks

NGHTTPX = nghttpx_path()

if NGHTTPX is None and not os.environ.get("QUICMESH_REQUIRE_INTEROP"):
    pytest.skip(
        f"nghttpx is not installed (apt-get install {APT_PACKAGE});"
        " set QUICMESH_REQUIRE_INTEROP=1 to make this a failure",
        allow_module_level=True,
    )


def test_h2_connect_through_nghttpx(tmp_path: Path) -> None:
    assert NGHTTPX is not None, f"QUICMESH_REQUIRE_INTEROP is set but {APT_PACKAGE} is missing"
    results, _notes = asyncio.run(run_checks(NGHTTPX, tmp_path))
    failed = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    assert len(results) == 9
    assert not failed, f"{failed} (nghttpx log: {tmp_path / 'nghttpx.log'})"
