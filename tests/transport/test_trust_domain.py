"""Issue 13, finding 6: a trust bundle is per trust domain.

A certificate signed by our CA but naming another trust domain (a CA that issued
outside its domain, or a federated bundle's root vouching for someone else's)
was accepted by the handshake; only a policy stopped it. Now the handshake
refuses it, on both sides and on every transport, on a listener with no policy.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import quicmesh
from quicmesh import DevCA, MeshStream
from quicmesh.tls import verify_peer

TRANSPORT_NAMES = ["quic", "h2", "tcp"]
TARGET = "reviews.default.svc:9080"
CA = DevCA("mesh.local")
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
CLIENT = CA.issue("spiffe://mesh.local/ns/default/sa/client")


def _issue_outside_domain(ca: DevCA, spiffe_id: str) -> quicmesh.Identity:
    """What a misused CA key signs: DevCA.issue() itself refuses another domain."""
    domain = ca._trust_domain
    ca._trust_domain = spiffe_id.split("/")[2]
    try:
        return ca.issue(spiffe_id)
    finally:
        ca._trust_domain = domain


FOREIGN = _issue_outside_domain(CA, "spiffe://other.example/ns/default/sa/client")
FOREIGN_SERVER = _issue_outside_domain(CA, "spiffe://other.example/ns/default/sa/server")


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
    stream.write_eof()


def test_verify_peer_names_both_trust_domains() -> None:
    with pytest.raises(quicmesh.PeerVerificationError) as refused:
        verify_peer(FOREIGN.certificate, FOREIGN.chain, CA.trust_bundle)
    assert "'other.example'" in str(refused.value) and "mesh.local" in str(refused.value)
    assert verify_peer(CLIENT.certificate, CLIENT.chain, CA.trust_bundle) == CLIENT.spiffe_id


def test_a_bundle_of_two_domains_binds_each_root_to_its_own() -> None:
    other = DevCA("other.example")
    both = quicmesh.TrustBundle([CA.certificate, other.certificate])
    legit = other.issue("spiffe://other.example/ns/default/sa/client")
    assert verify_peer(legit.certificate, legit.chain, both) == legit.spiffe_id
    assert verify_peer(CLIENT.certificate, CLIENT.chain, both) == CLIENT.spiffe_id
    # Our CA's key signing for other.example is refused even though other.example is trusted.
    with pytest.raises(quicmesh.PeerVerificationError):
        verify_peer(FOREIGN.certificate, FOREIGN.chain, both)


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_client_of_another_trust_domain_is_refused_without_policy(name: str) -> None:
    async def main() -> None:
        server = quicmesh.TRANSPORTS[name](identity=SERVER, trust=CA.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)  # no authorize: no policy
        client = quicmesh.TRANSPORTS[name](identity=FOREIGN, trust=CA.trust_bundle)
        with pytest.raises(quicmesh.TunnelError):
            conn = await client.connect(listener.address, timeout=5)
            # TLS 1.3: the client may finish its handshake before the server refuses.
            stream = await conn.open_stream(TARGET)
            await stream.read()
        # Counted as the client's invalid certificate on every transport (h2 and tcp
        # counted "other": their SPIFFE checks' text named no certificate).
        for _ in range(500):  # (h2, tcp: counted when the server's side has closed)
            if server.handshake_failures:
                break
            await asyncio.sleep(0.01)
        assert set(server.handshake_failures) == {"peer_certificate_invalid"}
        # A client of our own domain still gets through.
        good = quicmesh.TRANSPORTS[name](identity=CLIENT, trust=CA.trust_bundle)
        conn = await good.connect(listener.address, timeout=5)
        stream = await conn.open_stream(TARGET)
        stream.write(b"in domain")
        stream.write_eof()
        assert await stream.read() == b"in domain"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_server_of_another_trust_domain_is_refused(name: str) -> None:
    async def main() -> None:
        server = quicmesh.TRANSPORTS[name](identity=FOREIGN_SERVER, trust=CA.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), echo)
        client = quicmesh.TRANSPORTS[name](identity=CLIENT, trust=CA.trust_bundle)
        with pytest.raises(quicmesh.PeerVerificationError) as refused:
            await client.connect(listener.address, timeout=5)
        assert "other.example" in str(refused.value)
        listener.close()
        await listener.wait_closed()

    run(main())
