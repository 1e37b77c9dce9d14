"""The native engine's tests run only where the extension is built; CI requires it.

With ``QUICMESH_REQUIRE_NATIVE=1`` (set by .ci/run) a missing extension fails every
test here instead of skipping it.
"""

from __future__ import annotations

import os

import pytest

from quicmesh.transport.native import native_available

REASON = (
    "the native QUIC extension quicmesh._native is not built "
    "(pip install -e . on a machine with Rust and cargo builds it)"
)


@pytest.fixture(autouse=True)
def _native_built() -> None:
    if native_available():
        return
    if os.environ.get("QUICMESH_REQUIRE_NATIVE") == "1":
        pytest.fail(f"{REASON}; QUICMESH_REQUIRE_NATIVE=1 requires it")
    pytest.skip(REASON)
