"""Our own certificate is held to the rules every peer applies to it.

A certificate with two URI SANs, an extended key usage without serverAuth or
clientAuth, or a SPIFFE ID outside the trust domain its CA serves passed
:func:`own_certificate_problem` (it checked only the dates and the chain): SDS
deliveries of it were ACKed, ``--check`` said ok, ``/ready`` answered 200, and then
every peer refused it. A sidecar is both a server and a client, so both sides' rules
apply.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cert_helpers import BOTH, odd_leaf
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from quicmesh.tls import DevCA
from quicmesh.tls.check import own_certificate_problem

ID = "spiffe://mesh.local/ns/default/sa/a"


REFUSED = {
    "two SPIFFE URI SANs": (
        [ID, "spiffe://mesh.local/ns/default/sa/evil"],
        BOTH,
        "it carries more than one URI SAN",
    ),
    "SPIFFE and https URI SANs": ([ID, "https://example.com/x"], BOTH, "more than one URI SAN"),
    "clientAuth only": ([ID], (ExtendedKeyUsageOID.CLIENT_AUTH,), "no serverAuth usage"),
    "serverAuth only": ([ID], (ExtendedKeyUsageOID.SERVER_AUTH,), "no clientAuth usage"),
    "another trust domain": (
        ["spiffe://other.local/ns/default/sa/a"],
        BOTH,
        "is in trust domain 'other.local', but its CA vouches only for mesh.local",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_certificate_peers_refuse_is_not_usable_as_ours(case: str) -> None:
    ca = DevCA()
    uris, usages, reason = REFUSED[case]
    problem = own_certificate_problem(odd_leaf(ca, uris, usages), ca.trust_bundle)
    assert problem is not None, case
    assert problem.startswith("our certificate (spiffe://") and "refused by peers" in problem
    assert reason in problem
    assert "\n" not in problem


def test_certificates_peers_accept_are_still_usable() -> None:
    ca = DevCA()
    assert own_certificate_problem(ca.issue(ID), ca.trust_bundle) is None
    # No extended key usage at all allows every use (RFC 5280 4.2.1.12).
    assert own_certificate_problem(odd_leaf(ca, [ID], ()), ca.trust_bundle) is None


@pytest.mark.parametrize("case", ["two SPIFFE URI SANs", "clientAuth only"])
def test_check_refuses_a_certificate_peers_refuse(tmp_path: Path, case: str) -> None:
    """``quicmesh sidecar --check``, as a user runs it."""
    ca = DevCA()
    uris, usages, reason = REFUSED[case]
    odd_leaf(ca, uris, usages).save(tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle.pem)
    (tmp_path / "s.yaml").write_text(
        f"node: {{name: a, identity: '{ID}'}}\n"
        "tls: {cert: c.pem, key: k.pem, trust_bundle: ca.pem}\n"
        "admin: {address: '127.0.0.1:15000'}\n"
        "listeners: {inbound: [{name: m, address: '127.0.0.1:15008', transports: [quic],"
        " destinations: ['127.0.0.1:80']}]}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(tmp_path / "s.yaml"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result
    err = result.stderr
    assert reason in err and "our certificate" in err


def test_a_certificate_whose_key_usage_is_a_cas_is_not_usable_as_ours() -> None:
    """Peers refuse a leaf with keyCertSign (X509-SVID 4.3, since 2026-12-07), so ours is
    refused too, said of ours ("its key usage"), not in the peer's words."""
    from cryptography.hazmat.primitives import hashes

    from quicmesh.tls import Identity
    from quicmesh.tls.ca import _key_usage

    ca = DevCA()
    usual = ca.issue(ID)
    builder = x509.CertificateBuilder(
        issuer_name=usual.certificate.issuer,
        subject_name=usual.certificate.subject,
        public_key=usual.private_key.public_key(),  # type: ignore[arg-type]
        serial_number=x509.random_serial_number(),
        not_valid_before=usual.certificate.not_valid_before_utc,
        not_valid_after=usual.certificate.not_valid_after_utc,
        extensions=[
            e for e in usual.certificate.extensions if not isinstance(e.value, x509.KeyUsage)
        ],
    ).add_extension(_key_usage(digital_signature=True, key_cert_sign=True), critical=True)
    leaf = builder.sign(ca.private_key, hashes.SHA256())  # type: ignore[arg-type]
    problem = own_certificate_problem(Identity(leaf, usual.private_key), ca.trust_bundle)
    assert problem is not None
    assert problem.endswith(
        "would be refused by peers: its key usage is a CA's (keyUsage keyCertSign), "
        "not a workload's"
    ), problem
