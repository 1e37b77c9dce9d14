"""The CI subset of the interop matrix: quicmesh and ngtcp2, both roles, handshake and transfer.

Each case runs the real endpoints through :func:`interop.run.run_case`: the
ngtcp2 example client or server (Debian packages ``ngtcp2-client`` and
``ngtcp2-server``), quicmesh's interop endpoint, the relay, and the check of the
decrypted trace. Skipped when the Debian packages are missing, unless
``QUICMESH_REQUIRE_INTEROP`` is set (CI sets it), in which case it fails.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from interop.certs import make_certificates
from interop.peers import APT_PACKAGES, PEERS
from interop.run import PASS, run_case

NGTCP2 = PEERS["ngtcp2"]
QUICMESH = PEERS["quicmesh"]

if not NGTCP2.available() and not os.environ.get("QUICMESH_REQUIRE_INTEROP"):
    pytest.skip(
        "ngtcp2's gtlsclient/gtlsserver are not installed"
        f" (apt-get install {' '.join(APT_PACKAGES['ngtcp2'])});"
        " set QUICMESH_REQUIRE_INTEROP=1 to make this a failure",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.mark.parametrize("testcase", ["handshake", "transfer"])
@pytest.mark.parametrize(
    ("client", "server"), [(QUICMESH, NGTCP2), (NGTCP2, QUICMESH)], ids=["to-ngtcp2", "from-ngtcp2"]
)
def test_quicmesh_with_ngtcp2(
    client: object, server: object, testcase: str, certs: Path, tmp_path: Path
) -> None:
    assert NGTCP2.available(), "QUICMESH_REQUIRE_INTEROP is set but ngtcp2 is not installed"
    result = asyncio.run(
        run_case(client, server, testcase, quick=True, logs=tmp_path, certs=certs)  # type: ignore[arg-type]
    )
    assert result.status == PASS, f"{result.reason} (logs in {tmp_path})"
