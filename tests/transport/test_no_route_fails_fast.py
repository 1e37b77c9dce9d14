"""A QUIC connect to an address this host has no route to fails at once, on both engines.

The native engine's endpoint socket is unconnected, and quinn-udp drops a datagram whose
``sendmsg`` fails (``ENETUNREACH``, ``EHOSTUNREACH``) with a log line: the handshake
waited out its whole timeout, where the aioquic engine's connected socket failed at once
(a review, 2026-12-07). Run in a network namespace of its own (loopback only, and an
``unreachable`` route), so the host's routes do not matter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.netns

SCRIPT = textwrap.dedent(
    """
    import asyncio
    from quicmesh import ConnectError, DevCA, QuicTransport

    CA = DevCA()
    CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")

    async def main():
        for engine in ("native", "aioquic"):
            for label, address in (("no route", "10.1.2.3"), ("unreachable", "10.9.0.1")):
                transport = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine=engine)
                try:
                    # A timeout far beyond the test's: only an at-once refusal passes.
                    await transport.connect((address, 4433), timeout=600)
                    print(engine, label, "connected")
                except ConnectError as exc:
                    print(engine, label, "refused:", exc)
                finally:
                    await transport.aclose()

    asyncio.run(main())
    """
)


@pytest.fixture
def namespace() -> str:
    name = f"qmtest-noroute-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "route", "add", "unreachable", "10.9.0.0/16"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_connect_without_a_route_is_refused_at_once_on_both_engines(namespace: str) -> None:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.getcwd(),
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4, result.stdout
    for line in lines:
        assert " refused: cannot open a UDP socket to 10." in line, line
    assert "native no route refused:" in result.stdout
    assert "Network is unreachable" in lines[0], lines[0]
    assert "No route to host" in lines[1], lines[1]
