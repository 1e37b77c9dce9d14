"""SDS certificates on a running sidecar: all or nothing, and the control plane's once given.

Real sidecar processes on loopback, driven by the test ADS server. An identity that a
QUIC engine in use cannot load is NACKed with nothing changed (the same secret pushed
again is NACKed again); an identity or trust bundle SDS delivered is not replaced by the
dev CA's renewal (``tls.ca_dir``). Synchronisation is on what the server received, the
sidecars' admin endpoints and log lines, with deadlines; never on sleeps.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from quic_helpers import require_engine
from sidecar.conftest import echo_flow, wait_until  # tests/sidecar/conftest.py
from sidecar.test_sidecar_certificates import ed448_identity

from quicmesh.sidecar.launch import SidecarProcess, free_port, metric
from quicmesh.tls import DevCA, Identity, TrustBundle
from quicmesh.tls.context import client_ssl_context
from quicmesh.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE
from quicmesh.xds.testing import AdsServer
from quicmesh.xds.testing import documents as docs
from quicmesh.xds.testing.server import ReceivedRequest

from .conftest import IDENTITY_A, IDENTITY_B, addr, inbound_resources, push_echo, xds_sidecar

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
"""The client connection preface and an empty SETTINGS frame."""


def _push_secrets(
    ads: AdsServer,
    version: str,
    identity: Identity | None,
    trust: TrustBundle | None,
    node: str = "a",
) -> None:
    """SDS for ``node``: ``default`` if ``identity``, ``ROOTCA`` if ``trust``."""
    chain = identity.cert_chain_pem() if identity is not None else b""
    key = identity.private_key_pem() if identity is not None else b""
    default, rootca = docs.secret_docs(chain, key, trust.pem if trust is not None else b"")
    chosen = ([default] if identity is not None else []) + ([rootca] if trust is not None else [])
    ads.set_resources(SECRET_TYPE, [docs.secret(doc) for doc in chosen], version, node=node)


def _answer(ads: AdsServer, version: str, after: int) -> ReceivedRequest:
    """The sidecar's answer (ACK or NACK) to SDS ``version``, among the SDS requests
    received after the first ``after``. Only sidecar A is pushed secrets."""

    def answered(requests: list[ReceivedRequest]) -> bool:
        return any(
            r.is_nack or r.version_info == version
            for r in [r for r in requests if r.type_url == SECRET_TYPE][after:]
        )

    ads.wait_for(answered)
    return next(
        r for r in ads.requests_of(SECRET_TYPE)[after:] if r.is_nack or r.version_info == version
    )


def _flow_ok(port: int) -> bool:
    payload = os.urandom(20000)
    return asyncio.run(echo_flow(port, payload)) == payload


def _serial(identity: Identity) -> str:
    return format(identity.certificate.serial_number, "x")


@pytest.fixture
def native(monkeypatch: pytest.MonkeyPatch) -> None:
    """QUIC clusters and listeners without ``engine`` run on the native engine."""
    require_engine("native")
    monkeypatch.setenv("QUICMESH_QUIC_ENGINE", "native")


@pytest.fixture
def a_and_b(
    native: None, ads: AdsServer, ca_dir: Path, tmp_path: Path
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, int]]]:
    """Sidecars A and B on the native QUIC engine, driven only by ``ads`` (not started)."""
    ports = {"b": free_port(), "out": free_port(), "a_in": free_port()}
    ads.set_resources(CLUSTER_TYPE, [], "b1", node="b")
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads)
    b = xds_sidecar("b", IDENTITY_B, ca_dir, tmp_path, ads)
    yield a, b, ports
    try:
        assert a.stop() == 0
    finally:
        assert b.stop() == 0


@pytest.mark.parametrize("a_listens", [False, True], ids=["dialling", "dialling_and_listening"])
def test_an_sds_certificate_the_quic_engine_cannot_load_is_nacked_and_changes_nothing(
    ads: AdsServer,
    a_and_b: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    ca_dir: Path,
    echo_port: int,
    a_listens: bool,
) -> None:
    """An Ed448 certificate (Python loads it, rustls cannot). It was stored as the
    sidecar's identity before a transport refused it: NACKed, yet /stats showed it, the
    pooled QUIC connection was replaced and every new flow was reset while /ready said
    200; pushed again, it was ACKed as "already in use". A sidecar that only dials over
    QUIC ACKed it at once (its client endpoint reads the key when it dials)."""
    a, b, ports = a_and_b
    ads.set_resources(
        LISTENER_TYPE, inbound_resources(ports["b"], [addr(echo_port)]), "b1", node="b"
    )
    push_echo(ads, "1", ports, echo_port)  # A: out -> cluster echo (quic) -> B
    if a_listens:
        ads.set_resources(
            LISTENER_TYPE,
            [
                docs.listener(
                    docs.outbound_listener_doc("out", ports["out"], "echo", addr(echo_port))
                ),
                docs.listener(
                    docs.inbound_listener_doc("a-in", ports["a_in"], "UDP", [addr(echo_port)])
                ),
            ],
            "1",
            node="a",
        )
    b.start()
    a.start()
    b.wait_ready()
    a.wait_ready()
    assert _flow_ok(ports["out"])
    before = a.stats()["certificate"]
    connections = metric(a.metrics(), "quicmesh_cluster_connections_total", cluster="echo")
    ca = DevCA.load(ca_dir)
    unloadable = ed448_identity(ca, IDENTITY_A)

    for version in ("s1", "s2"):  # the same secret again: refused again
        seen = len(ads.requests_of(SECRET_TYPE))
        _push_secrets(ads, version, unloadable, ca.trust_bundle)
        answer = _answer(ads, version, seen)
        assert answer.is_nack, answer
        assert answer.version_info == ""  # the last accepted: none
        certificate = a.stats()["certificate"]
        assert (certificate["serial"], certificate["rotations"]) == (before["serial"], 0)
        assert "the native QUIC engine cannot use the new certificate" in answer.error_detail
        assert "Ed448 keys are not supported" in answer.error_detail  # the key named
        assert a.request("GET", "/ready") == (200, b"ready\n")
        assert _flow_ok(ports["out"])
        # The pooled connection (made with the running certificate) still carries flows.
        samples = a.metrics()
        assert metric(samples, "quicmesh_cluster_connections_total", cluster="echo") == connections
    xds = a.stats()["xds"]
    assert (xds["versions"]["SDS"], xds["nacks"]) == ("", 2)
    assert "Traceback" not in a.stderr()

    # A certificate every engine can load is taken.
    seen = len(ads.requests_of(SECRET_TYPE))
    good = ca.issue(IDENTITY_A)
    _push_secrets(ads, "s3", good, ca.trust_bundle)
    answer = _answer(ads, "s3", seen)
    assert not answer.is_nack, answer
    certificate = a.stats()["certificate"]
    assert (certificate["serial"], certificate["rotations"]) == (_serial(good), 1)
    assert _flow_ok(ports["out"])
    assert a.stats()["xds"]["versions"]["SDS"] == "s3"


# -- the dev CA leaves alone what SDS delivered ----------------------------------------------


def _handshake(port: int, client: Identity, trust: TrustBundle) -> tuple[x509.Certificate, bool]:
    """A TLS handshake with the h2 listener on ``port``, presenting ``client``: the
    certificate the sidecar presented, and whether it accepted ours (TLS 1.3: a refused
    client certificate is an alert at the first read)."""
    context = client_ssl_context(client, trust, ["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        presented = x509.load_der_x509_certificate(der)
        tls.sendall(H2_PREFACE)
        try:
            accepted = bool(tls.recv(100))  # the server's SETTINGS
        except (ssl.SSLError, ConnectionError):
            accepted = False
    return presented, accepted


@pytest.fixture
def renewing(ads: AdsServer, ca_dir: Path, tmp_path: Path) -> Iterator[tuple[SidecarProcess, int]]:
    """Sidecar A on ``tls.ca_dir`` with 1 s certificates (a renewal every second or so),
    an h2 tunnel listener from LDS; started and ready."""
    port = free_port()
    ads.set_resources(CLUSTER_TYPE, [], "1", node="a")
    ads.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.inbound_listener_doc("in-h2", port, "TCP", ["127.0.0.1:9"]))],
        "1",
        node="a",
    )
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads, certificate_lifetime="1s")
    a.start()
    try:
        a.wait_ready()
        # The dev CA renews on its own before SDS says anything.
        wait_until(lambda: a.stats()["certificate"]["rotations"] >= 1, what="a dev CA renewal")
        yield a, port
    finally:
        assert a.stop() == 0


def test_the_dev_ca_stops_renewing_an_identity_sds_delivered(
    ads: AdsServer, renewing: tuple[SidecarProcess, int], ca_dir: Path
) -> None:
    """With ``tls.ca_dir`` and a short ``certificate_lifetime``, the dev CA's next renewal
    replaced the identity and trust bundle SDS had delivered (from another CA) with its
    own, while xDS still reported the SDS version: peers of the SDS CA were refused."""
    a, port = renewing
    ours, theirs = DevCA.load(ca_dir), DevCA()
    delivered = theirs.issue(IDENTITY_A)
    seen = len(ads.requests_of(SECRET_TYPE))
    _push_secrets(ads, "s1", delivered, theirs.trust_bundle)
    assert not _answer(ads, "s1", seen).is_nack
    # The renewal that was due comes, and leaves it.
    wait_until(
        lambda: "not renewing the certificate from" in a.stderr(),
        what="the dev CA's renewal skipped",
    )
    rotations = a.stats()["certificate"]["rotations"]
    both = TrustBundle.from_pem(ours.trust_bundle.pem + theirs.trust_bundle.pem)
    presented, accepted = _handshake(port, theirs.issue(IDENTITY_B), both)
    assert presented.serial_number == delivered.certificate.serial_number
    assert accepted, "a peer of the SDS trust bundle was refused"
    certificate = a.stats()["certificate"]
    assert (certificate["serial"], certificate["rotations"]) == (_serial(delivered), rotations)
    assert a.stats()["xds"]["versions"]["SDS"] == "s1"
    assert a.request("GET", "/ready") == (200, b"ready\n")


def test_the_dev_ca_renews_the_identity_but_keeps_the_trust_bundle_sds_delivered(
    ads: AdsServer, renewing: tuple[SidecarProcess, int], ca_dir: Path
) -> None:
    """SDS delivered only ``ROOTCA`` (the dev CA's root and another): the dev CA goes on
    issuing the identity, and each renewal keeps that trust bundle (it installed its own,
    and peers of the other CA were refused from the next renewal on)."""
    a, port = renewing
    ours, theirs = DevCA.load(ca_dir), DevCA()
    both = TrustBundle.from_pem(ours.trust_bundle.pem + theirs.trust_bundle.pem)
    seen = len(ads.requests_of(SECRET_TYPE))
    _push_secrets(ads, "s1", None, both)
    assert not _answer(ads, "s1", seen).is_nack
    rotations = a.stats()["certificate"]["rotations"]
    wait_until(
        lambda: a.stats()["certificate"]["rotations"] >= rotations + 2,
        what="two more dev CA renewals",
    )
    presented, accepted = _handshake(port, theirs.issue(IDENTITY_B), both)
    presented.verify_directly_issued_by(ours.certificate)  # (the dev CA's, renewed)
    assert accepted, "a peer of the CA SDS added to the trust bundle was refused"
    assert a.stats()["xds"]["versions"]["SDS"] == "s1"
    assert a.request("GET", "/ready") == (200, b"ready\n")
    assert "not renewing" not in a.stderr()


@pytest.mark.parametrize("first", ["ROOTCA", "default"])
def test_a_ca_change_sent_as_two_responses_is_applied_with_the_second(
    ads: AdsServer, ca_dir: Path, tmp_path: Path, first: str
) -> None:
    """State-of-the-world SDS may send only the secret that changed. A new CA's bundle
    alone fails the certificate in use, and the new certificate alone fails the bundle
    in use: the first is NACKed, and the second is applied with it (both were NACKed,
    and the sidecar could never take the new CA)."""
    a = xds_sidecar("a", IDENTITY_A, ca_dir, tmp_path, ads)
    ads.set_resources(CLUSTER_TYPE, [], "1", node="a")
    ads.set_resources(LISTENER_TYPE, [], "1", node="a")
    old, new = DevCA(), DevCA()
    a.start()
    try:
        a.wait_ready()
        seen = len(ads.requests_of(SECRET_TYPE))
        _push_secrets(ads, "s1", old.issue(IDENTITY_A), old.trust_bundle)
        assert not _answer(ads, "s1", seen).is_nack
        identity = new.issue(IDENTITY_A)
        halves = {"default": (identity, None), "ROOTCA": (None, new.trust_bundle)}
        second = "default" if first == "ROOTCA" else "ROOTCA"
        seen = len(ads.requests_of(SECRET_TYPE))
        _push_secrets(ads, "s2", *halves[first])
        refused = _answer(ads, "s2", seen)
        assert refused.is_nack and refused.version_info == "s1"
        seen = len(ads.requests_of(SECRET_TYPE))
        _push_secrets(ads, "s3", *halves[second])
        assert not _answer(ads, "s3", seen).is_nack
        assert a.stats()["certificate"]["serial"] == _serial(identity)
        assert a.stats()["xds"]["versions"]["SDS"] == "s3"
        assert a.request("GET", "/ready") == (200, b"ready\n")
    finally:
        assert a.stop() == 0
