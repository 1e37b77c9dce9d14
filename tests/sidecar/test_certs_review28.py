"""The sidecar's certificate paths (SDS, watched files, ``--check``) and its trust.

- A certificate every peer would refuse (two URI SANs, clientAuth only, another
  trust domain) is refused by SDS and by watched files, the running one kept.
- ``--check`` loads the key as every transport in use does: a key the native QUIC
  engine or OpenSSL cannot use is refused there, not at the start.
- A CA taken out of the trust bundle stops being trusted on the connections peers
  made with it, not only in new handshakes.
- A control plane that reconnects and re-sends the SDS secret it sent before does not
  put it back over newer watched files (the newest change wins).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cert_helpers import BOTH, odd_leaf
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from quic_helpers import require_engine

from quicmesh.errors import ConfigError, QuicmeshError
from quicmesh.sidecar.certs import CertificateSource, load_identity
from quicmesh.sidecar.config import SidecarConfig, parse_config
from quicmesh.sidecar.launch import LOOPBACK, free_port
from quicmesh.sidecar.runtime import Sidecar
from quicmesh.tls import DevCA, Identity, TrustBundle
from quicmesh.transport.base import PeerConnection, transport_registry

from .conftest import IDENTITY_A, IDENTITY_B

PEERS_REFUSE = {
    "two URI SANs": ([IDENTITY_A, "spiffe://mesh.local/ns/default/sa/evil"], BOTH),
    "clientAuth only": ([IDENTITY_A], (ExtendedKeyUsageOID.CLIENT_AUTH,)),
}


def _files_config(directory: Path) -> SidecarConfig:
    return parse_config(
        f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
        "tls: {cert: a.crt, key: a.key, trust_bundle: bundle.pem}\n"
        "admin: {address: '127.0.0.1:15000'}\n"
        "listeners: {inbound: [{name: m, address: '127.0.0.1:15008', transports: [quic],"
        " destinations: ['127.0.0.1:80']}]}\n",
        source="a.yaml",
        base_dir=directory,
    )


def _write(directory: Path, identity: Identity) -> None:
    """Replace the watched files as an agent does (each file renamed into place)."""
    identity.save(directory / ".a.crt", directory / ".a.key")
    os.replace(directory / ".a.key", directory / "a.key")
    os.replace(directory / ".a.crt", directory / "a.crt")


def _source_on_files(directory: Path, ca: DevCA) -> CertificateSource:
    (directory / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    _write(directory, ca.issue(IDENTITY_A))
    config = _files_config(directory)
    return CertificateSource(config, *load_identity(config))


def _serial(source: CertificateSource) -> int:
    return source.identity.certificate.serial_number


@pytest.mark.parametrize("case", sorted(PEERS_REFUSE))
def test_sds_refuses_a_certificate_peers_refuse_and_keeps_the_running_one(
    tmp_path: Path, case: str
) -> None:
    ca = DevCA()
    source = _source_on_files(tmp_path, ca)
    running = _serial(source)
    uris, usages = PEERS_REFUSE[case]
    odd = odd_leaf(ca, uris, usages)
    with pytest.raises(ConfigError, match="would be refused by peers"):
        source.deliver(odd, ca.trust_bundle)
    assert _serial(source) == running
    assert source.problem() is None
    assert "identity" not in source.delivered


@pytest.mark.parametrize("case", sorted(PEERS_REFUSE))
def test_watched_files_peers_refuse_are_not_taken(tmp_path: Path, case: str) -> None:
    ca = DevCA()
    source = _source_on_files(tmp_path, ca)
    running = _serial(source)
    uris, usages = PEERS_REFUSE[case]
    _write(tmp_path, odd_leaf(ca, uris, usages))
    source._reload_files_if_changed()
    assert _serial(source) == running
    assert source.problem() is None


def test_a_resent_sds_secret_does_not_replace_newer_files(tmp_path: Path) -> None:
    ca = DevCA()
    source = _source_on_files(tmp_path, ca)
    from_sds = ca.issue(IDENTITY_A)
    source.deliver(from_sds, ca.trust_bundle)
    assert _serial(source) == from_sds.certificate.serial_number
    newer = ca.issue(IDENTITY_A)
    _write(tmp_path, newer)
    source._reload_files_if_changed()
    assert _serial(source) == newer.certificate.serial_number
    rotations = source.rotations
    # The control plane restarted and sends the same secret again: no change.
    source.deliver(from_sds, ca.trust_bundle)
    assert _serial(source) == newer.certificate.serial_number
    assert source.rotations == rotations
    # A secret that did change is taken (the newest change wins).
    newest = ca.issue(IDENTITY_A)
    source.deliver(newest, ca.trust_bundle)
    assert _serial(source) == newest.certificate.serial_number


def _config_with(directory: Path, ca: DevCA, key: object, transport: str) -> Path:
    """A sidecar configuration on PEM files whose key is ``key``, with one inbound
    listener on ``transport`` (QUIC on the native engine)."""
    identity = odd_leaf(ca, [IDENTITY_A], BOTH, key=key)
    identity.save(directory / "a.crt", directory / "a.key")
    (directory / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    path = directory / f"{transport}.yaml"
    engine = " engine: native," if transport == "quic" else ""
    path.write_text(
        f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
        "tls: {cert: a.crt, key: a.key, trust_bundle: bundle.pem}\n"
        "admin: {address: '127.0.0.1:15000'}\n"
        "listeners: {inbound: [{name: m, address: '127.0.0.1:15008',"
        f" transports: [{transport}],{engine} destinations: ['127.0.0.1:80']}}]}}\n"
    )
    return path


KEYS = {
    "P-521 on native QUIC": (
        lambda: ec.generate_private_key(ec.SECP521R1()),
        "quic",
        "the native QUIC engine cannot use this key: ECDSA P-521 keys are not supported",
    ),
    "RSA-1024 on native QUIC": (
        lambda: rsa.generate_private_key(65537, 1024),
        "quic",
        "the native QUIC engine cannot use this key: RSA-1024 keys are not supported",
    ),
    "RSA-1024 on h2": (
        lambda: rsa.generate_private_key(65537, 1024),
        "h2",
        "the h2 transport (OpenSSL) cannot use this key: RSA-1024 keys are too small",
    ),
}


@pytest.mark.parametrize("case", sorted(KEYS))
def test_check_refuses_a_key_a_transport_in_use_cannot_load(tmp_path: Path, case: str) -> None:
    """``--check`` said ok, and the start then failed to listen ("failed to parse
    private key as RSA, ECDSA, or EdDSA", "EE_KEY_TOO_SMALL")."""
    make_key, transport, reason = KEYS[case]
    if transport == "quic":
        require_engine("native")
    path = _config_with(tmp_path, DevCA(), make_key(), transport)
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result
    err = result.stderr
    assert reason in err and f"{transport}.yaml" in err
    assert len(err.strip().splitlines()) == 1


def test_check_passes_a_key_every_transport_in_use_can_load(tmp_path: Path) -> None:
    require_engine("native")
    path = _config_with(tmp_path, DevCA(), ec.generate_private_key(ec.SECP384R1()), "quic")
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(path), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result
    assert result.stdout.strip().endswith(": ok")


async def _until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Wait for ``predicate()`` (checked at every turn of the loop, so no event is
    missed between checks); fail after a generous ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"not {what} in {timeout} s"
        await asyncio.sleep(0.01)


async def _echoed(connection: PeerConnection, target: str, data: bytes) -> bytes:
    stream = await connection.open_stream(target)
    stream.write(data)
    stream.write_eof()
    return await asyncio.wait_for(stream.read(), 10)


@pytest.mark.parametrize(
    ("transport", "engine"), [("quic", "native"), ("quic", "aioquic"), ("h2", "")]
)
def test_a_ca_taken_out_of_the_trust_bundle_refuses_peers_connected_with_it(
    tmp_path: Path, transport: str, engine: str, caplog: pytest.LogCaptureFixture
) -> None:
    """docs/config.md: "a CA taken out of it stops being trusted then". A peer connected
    with a certificate of the removed CA kept opening flows on its open connection; now
    the sidecar (rotating through its watched files, as the runtime does) tells it to
    go away and closes it, while a peer the new bundle still trusts keeps its own."""
    if engine:
        require_engine(engine)
    removed, kept = DevCA(), DevCA()
    both = TrustBundle(removed.trust_bundle.certificates + kept.trust_bundle.certificates)
    kept.issue(IDENTITY_B).save(tmp_path / "b.crt", tmp_path / "b.key")
    (tmp_path / "bundle.pem").write_bytes(both.pem)
    port = free_port()
    engine_key = f" engine: {engine}," if engine else ""

    async def main() -> None:
        echo = await asyncio.start_server(_echo, LOOPBACK, 0)
        target = f"{LOOPBACK}:{echo.sockets[0].getsockname()[1]}"
        text = (
            f"node: {{name: b, identity: '{IDENTITY_B}'}}\n"
            "tls: {cert: b.crt, key: b.key, trust_bundle: bundle.pem}\n"
            f"admin: {{address: '{LOOPBACK}:{free_port()}'}}\n"
            f"listeners: {{inbound: [{{name: mesh, address: '{LOOPBACK}:{port}',"
            f" transports: [{transport}],{engine_key} destinations: ['{target}']}}]}}\n"
        )
        sidecar = Sidecar(parse_config(text, source="b.yaml", base_dir=tmp_path), None)
        await sidecar.start()
        options: dict[str, Any] = {"engine": engine} if engine else {}
        registry = transport_registry()
        revoked = registry.build(
            transport, identity=removed.issue(IDENTITY_A), trust=both, options=options
        )
        trusted = registry.build(
            transport, identity=kept.issue(IDENTITY_A), trust=both, options=options
        )
        try:
            old = await revoked.connect((LOOPBACK, port))
            good = await trusted.connect((LOOPBACK, port))
            assert await _echoed(old, target, b"before") == b"before"
            assert await _echoed(good, target, b"before") == b"before"
            # The agent takes the removed CA out of the watched bundle.
            (tmp_path / ".bundle.pem").write_bytes(kept.trust_bundle.pem)
            os.replace(tmp_path / ".bundle.pem", tmp_path / "bundle.pem")
            await _until(lambda: sidecar.trust.pem == kept.trust_bundle.pem, "rotated")
            await _until(lambda: old.going_away or old.is_closed, "told to go away")
            with pytest.raises(QuicmeshError):
                await _echoed(old, target, b"after")
            assert not good.going_away and not good.is_closed
            assert await _echoed(good, target, b"after") == b"after"
        finally:
            await revoked.aclose()
            await trusted.aclose()
            sidecar.begin_drain()
            sidecar.end_grace_period()
            await sidecar.wait_drained()
            echo.close()

    with caplog.at_level(logging.WARNING, logger="quicmesh.sidecar.inbound"):
        asyncio.run(main())
    refused = [r.getMessage() for r in caplog.records if "no longer trusted" in r.getMessage()]
    assert len(refused) == 1 and IDENTITY_A in refused[0], refused
    assert "not signed by a trusted CA" in refused[0]


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.read())
    await writer.drain()
    writer.close()
