"""The native engine's client against ngtcp2's example server (GnuTLS), an independent stack.

ngtcp2's ``gtlsserver`` speaks HTTP/3 and the native engine does not yet, so this
checks the transport and TLS layers: the QUIC handshake completes with ALPN ``h3``,
the native client verifies the server's dev-CA certificate and SPIFFE ID in rustls,
and the connection carries packets both ways (RTT measured) until closed. Skipped
when gtlsserver is missing, unless ``QUICMESH_REQUIRE_INTEROP`` is set (CI).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from quicmesh.errors import ConnectError
from quicmesh.transport.native import NativeEndpoint

from .test_native_engine import CA, CLIENT, SERVER, run

GTLSSERVER = shutil.which("gtlsserver")


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_native_client_and_ngtcp2_server(tmp_path: Path) -> None:
    if GTLSSERVER is None:
        if os.environ.get("QUICMESH_REQUIRE_INTEROP"):
            pytest.fail("QUICMESH_REQUIRE_INTEROP is set but gtlsserver (ngtcp2-server) is missing")
        pytest.skip("gtlsserver is not installed (apt-get install ngtcp2-server)")
    key, cert = tmp_path / "server.key", tmp_path / "server.pem"
    key.write_bytes(SERVER.private_key_pem())
    cert.write_bytes(SERVER.cert_chain_pem())
    port = _free_udp_port()
    server = subprocess.Popen(
        [GTLSSERVER, "-q", "-d", str(tmp_path), "127.0.0.1", str(port), str(key), str(cert)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )

    async def main() -> None:
        async with await NativeEndpoint.bind(
            "127.0.0.1", 0, CLIENT, CA.trust_bundle, alpn=["h3"]
        ) as client:
            deadline = time.monotonic() + 15
            while True:  # the server binds its socket after it starts: try until it answers
                try:
                    connection = await client.connect("127.0.0.1", port, timeout=1.0)
                    break
                except ConnectError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise
            assert connection.peer_identity == SERVER.spiffe_id
            assert connection.peer_certificates()[0] == SERVER.certificate
            assert connection.stats()["rtt"] > 0
            connection.close()
            await asyncio.wait_for(connection.wait_closed(), 10)

    try:
        run(main())
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=10)
    assert server.returncode in (0, -15), stderr.decode(errors="replace")[-2000:]
