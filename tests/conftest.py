"""Fixtures shared by every test.

Tests marked ``netns`` (link emulator, HOL/congestion/ttfb benchmarks) build real
namespaces and TUN devices. Without root they are skipped with the reason, unless
``QUICMESH_REQUIRE_NETNS=1`` (set by CI), in which case they fail: CI must not pass
by skipping them.
"""

from __future__ import annotations

import os

import pytest

from quicmesh.netem.system import missing_privileges


@pytest.fixture(autouse=True)
def _netns_privileges(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") is None:
        return
    reason = missing_privileges()
    if reason is None:
        return
    if os.environ.get("QUICMESH_REQUIRE_NETNS") == "1":
        pytest.fail(f"QUICMESH_REQUIRE_NETNS=1 but the link emulator {reason}")
    pytest.skip(f"link emulator {reason}; set QUICMESH_REQUIRE_NETNS=1 to make this fail")
