"""The CI subset of the interop matrix: quicmesh on both engines against ngtcp2, both roles.

Each case runs the real endpoints through :func:`interop.run.run_case`: the
ngtcp2 example client or server (Debian packages ``ngtcp2-client`` and
``ngtcp2-server``), quicmesh's interop endpoint on aioquic or on the native
engine (quinn + rustls, ``quicmesh._native``), the relay, and the check of the
decrypted trace; and the two engines against each other. Skipped when the
Debian packages are missing, unless ``QUICMESH_REQUIRE_INTEROP`` is set (CI sets
it), in which case it fails; the native cases are skipped when the extension is
not built, unless ``QUICMESH_REQUIRE_INTEROP`` or ``QUICMESH_REQUIRE_NATIVE`` is set.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from interop.certs import make_certificates
from interop.peers import APT_PACKAGES, PEERS, Peer
from interop.run import PASS, UNSUPPORTED, run_case

NGTCP2 = PEERS["ngtcp2"]
QUICMESH = PEERS["quicmesh"]
NATIVE = PEERS["quicmesh-native"]

if not NGTCP2.available() and not os.environ.get("QUICMESH_REQUIRE_INTEROP"):
    pytest.skip(
        "ngtcp2's gtlsclient/gtlsserver are not installed"
        f" (apt-get install {' '.join(APT_PACKAGES['ngtcp2'])});"
        " set QUICMESH_REQUIRE_INTEROP=1 to make this a failure",
        allow_module_level=True,
    )


def _require(*peers: Peer) -> None:
    assert NGTCP2.available(), "QUICMESH_REQUIRE_INTEROP is set but ngtcp2 is not installed"
    if NATIVE in peers and not NATIVE.available():
        required = [
            name
            for name in ("QUICMESH_REQUIRE_INTEROP", "QUICMESH_REQUIRE_NATIVE")
            if os.environ.get(name)
        ]
        if required:
            pytest.fail(f"{NATIVE.not_available}; {' and '.join(required)} require it")
        pytest.skip(NATIVE.not_available)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


def _play(client: Peer, server: Peer, testcase: str, certs: Path, logs: Path) -> None:
    _require(client, server)
    result = asyncio.run(run_case(client, server, testcase, quick=True, logs=logs, certs=certs))
    assert result.status == PASS, f"{result.reason} (logs in {logs})"


@pytest.mark.parametrize("testcase", ["handshake", "transfer"])
@pytest.mark.parametrize(
    ("client", "server"), [(QUICMESH, NGTCP2), (NGTCP2, QUICMESH)], ids=["to-ngtcp2", "from-ngtcp2"]
)
def test_quicmesh_with_ngtcp2(
    client: Peer, server: Peer, testcase: str, certs: Path, tmp_path: Path
) -> None:
    _play(client, server, testcase, certs, tmp_path)


@pytest.mark.parametrize(
    ("client", "server"), [(NATIVE, NGTCP2), (NGTCP2, NATIVE)], ids=["to-ngtcp2", "from-ngtcp2"]
)
def test_native_engine_with_ngtcp2(client: Peer, server: Peer, certs: Path, tmp_path: Path) -> None:
    """transfer (handshake, both roles, is in test_interop_cli.py's matrix run)."""
    _play(client, server, "transfer", certs, tmp_path)


@pytest.mark.parametrize(
    ("client", "server"),
    [(NATIVE, QUICMESH), (QUICMESH, NATIVE)],
    ids=["native-to-aioquic", "aioquic-to-native"],
)
def test_quicmesh_engines_with_each_other(
    client: Peer, server: Peer, certs: Path, tmp_path: Path
) -> None:
    _play(client, server, "transfer", certs, tmp_path)


@pytest.mark.parametrize("attempt", range(4))
def test_the_native_clients_requests_go_in_0rtt(attempt: int, certs: Path, tmp_path: Path) -> None:
    """zerortt, native client to aioquic server, four times: the requests must be in 0-RTT
    packets on the decrypted trace. The client's first flight left as the connection was
    made, before the requests existed, and a resumed handshake on loopback answers within
    about a millisecond, so they went in 1-RTT in about half the runs; the engine now
    holds the first flight until the turn's requests are queued (native/src/hold.rs)."""
    _play(NATIVE, QUICMESH, "zerortt", certs, tmp_path)


@pytest.mark.parametrize("testcase", ["keyupdate", "retry"])
def test_the_native_server_with_ngtcp2(testcase: str, certs: Path, tmp_path: Path) -> None:
    """keyupdate: key phases change both ways on the decrypted trace. quinn and
    ngtcp2 grease the QUIC bit (RFC 9287) once both announced it, so this also
    checks that the runner reads such packets (before, it saw none of them and
    failed the case). retry: the native listener's Retry (admission
    ``retry="always"``) and ngtcp2's token echo are on the trace."""
    _play(NGTCP2, NATIVE, testcase, certs, tmp_path)


def test_a_case_the_native_engine_cannot_play_is_unsupported_with_its_reason(
    certs: Path, tmp_path: Path
) -> None:
    """ngtcp2 would have to follow a server's preferred address; the native
    listener cannot announce one: the runner says so without starting anything,
    and counts it neither as a pass nor as a failure."""
    result = asyncio.run(
        run_case(NGTCP2, NATIVE, "connectionmigration", quick=True, logs=tmp_path, certs=certs)
    )
    assert result.status == UNSUPPORTED
    assert "preferred_address" in result.reason
