"""No TLS session is resumed on h2 or TLS-over-TCP listeners: a resumed session presents
no certificate, so it would let in a client whose certificate has expired, or whose CA
was taken out of the trust bundle, since its ticket was issued.

Found by a security review (until 2026-12-07 both listeners served resumed sessions, the
same ticket any number of times). Real loopback sockets; the client is Python's ``ssl``,
which resumes where quicmesh's own clients never do.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from cert_helpers import odd_leaf

import quicmesh
from quicmesh import DevCA

CLIENT = "spiffe://mesh.local/ns/default/sa/client"
SERVER = "spiffe://mesh.local/ns/default/sa/server"
ALPN = {"h2": "h2", "tcp": "http/1.1"}


def _client_context(ca: DevCA, directory: Path, kind: str) -> ssl.SSLContext:
    cert, key = directory / "client.pem", directory / "client.key"
    ca.issue(CLIENT).save(cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=ca.trust_bundle.pem.decode("ascii"))
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols([ALPN[kind]])
    return context


def _flow(
    context: ssl.SSLContext, kind: str, port: int, session: ssl.SSLSession | None = None
) -> tuple[bool, ssl.SSLSession | None, bytes]:
    """One CONNECT over a new TLS connection (blocking): whether the session was
    resumed, the session (for a later resumption) and what the server answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        tls = context.wrap_socket(raw, session=session)
        answer = b""
        try:
            if kind == "tcp":
                tls.sendall(b"CONNECT x.svc:80 HTTP/1.1\r\nHost: x.svc:80\r\n\r\n")
                while b"served" not in answer and (data := tls.recv(4096)):
                    answer += data
                answer = answer.partition(b"\r\n\r\n")[2]  # (after the 200 response)
            else:
                connection = h2.connection.H2Connection(h2.config.H2Configuration())
                connection.initiate_connection()
                connection.send_headers(1, [(":method", "CONNECT"), (":authority", "x.svc:80")])
                tls.sendall(connection.data_to_send())
                while b"served" not in answer and (data := tls.recv(65536)):
                    for event in connection.receive_data(data):
                        if isinstance(event, h2.events.DataReceived):
                            answer += event.data
                    tls.sendall(connection.data_to_send())
        except OSError:  # (ssl.SSLError too) the server reset or closed the connection
            pass
        reused, resumable = tls.session_reused, tls.session
        tls.close()
    return reused, resumable, answer


async def _listen(kind: str, ca: DevCA, seen: list[str], *, tickets: int | None = None) -> Any:
    make = quicmesh.H2Transport if kind == "h2" else quicmesh.TcpTransport
    transport = make(identity=ca.issue(SERVER), trust=ca.trust_bundle)
    if tickets is not None:
        transport.ssl_context(server_side=True).num_tickets = tickets

    async def handler(stream: quicmesh.MeshStream) -> None:
        seen.append(stream.peer_identity)
        stream.write(b"served")
        await stream.drain()
        stream.write_eof()

    return transport, await transport.listen(("127.0.0.1", 0), handler)


async def _resume_after_full(
    kind: str, tmp_path: Path, *, tickets: int | None = None
) -> tuple[list[tuple[bool, bytes]], list[str]]:
    """A full handshake, then two resumptions with its session, then a full handshake."""
    ca = DevCA()
    seen: list[str] = []
    transport, listener = await _listen(kind, ca, seen, tickets=tickets)
    context = _client_context(ca, tmp_path, kind)
    port = listener.address[1]
    try:
        reused, session, answer = await asyncio.to_thread(_flow, context, kind, port)
        outcomes = [(reused, answer)]
        assert session is not None and session.has_ticket, "the server sent no ticket"
        for _ in range(2):
            reused, _, answer = await asyncio.to_thread(_flow, context, kind, port, session)
            outcomes.append((reused, answer))
        reused, _, answer = await asyncio.to_thread(_flow, context, kind, port)
        outcomes.append((reused, answer))
    finally:
        listener.close()
        await listener.wait_closed()
        await transport.aclose()
    return outcomes, seen


@pytest.mark.parametrize(
    ("kind", "tickets"),
    [("tcp", None), ("h2", 2)],
    ids=["tcp", "h2-with-tickets-forced-on"],
)
def test_a_resumed_session_is_refused(
    kind: str, tickets: int | None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="quicmesh.transport.tls"):
        outcomes, seen = asyncio.run(_resume_after_full(kind, tmp_path, tickets=tickets))
    full, *resumed, full_again = outcomes
    assert full == (False, b"served")
    for was_reused, answer in resumed:
        assert was_reused  # (the TLS handshake itself resumes; the listener then refuses)
        assert answer == b"", answer
    assert full_again == (False, b"served")
    assert seen == [CLIENT, CLIENT]  # only the full handshakes' flows reached the handler
    refusals = [r.getMessage() for r in caplog.records if "resumption" in r.getMessage()]
    assert len(refusals) == 2, refusals
    why = "TLS session resumption is not accepted (every peer's certificate is verified)"
    assert all("refused a client at 127.0.0.1:" in line and why in line for line in refusals), (
        refusals
    )


def test_an_h2_listener_sends_no_session_ticket(tmp_path: Path) -> None:
    async def run() -> tuple[bool, ssl.SSLSession | None, bytes]:
        ca = DevCA()
        transport, listener = await _listen("h2", ca, [])
        try:
            context = _client_context(ca, tmp_path, "h2")
            return await asyncio.to_thread(_flow, context, "h2", listener.address[1])
        finally:
            listener.close()
            await listener.wait_closed()
            await transport.aclose()

    _, session, answer = asyncio.run(run())
    assert answer == b"served"
    assert session is not None and not session.has_ticket


def test_a_tcp_transport_still_connects_on_its_ticket() -> None:
    """TcpTransport.connect waits for the server's one ticket (its sign that our
    certificate was accepted), which is still sent; the ticket resumes nothing."""

    async def run() -> bytes:
        ca = DevCA()
        server, listener = await _listen("tcp", ca, [])
        client = quicmesh.TcpTransport(identity=ca.issue(CLIENT), trust=ca.trust_bundle)
        try:
            connection = await client.connect(listener.address, timeout=5)
            answers = []
            for _ in range(2):  # the connect()'s connection, then a new one
                stream = await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
                stream.write_eof()
                answers.append(await asyncio.wait_for(stream.read(), 5))
            await connection.aclose()
            return b" ".join(answers)
        finally:
            await client.aclose()
            listener.close()
            await listener.wait_closed()
            await server.aclose()

    assert asyncio.run(run()) == b"served served"


def test_a_tcp_client_the_spiffe_checks_refuse_gets_no_ticket() -> None:
    """The ticket goes out only once the listener's own checks accepted the client (until
    2026-12-07 it left with the handshake, before them: connect() returned, as if
    accepted, and the first flow was reset)."""

    async def run() -> str:
        ca = DevCA()
        server, listener = await _listen("tcp", ca, [])
        other_domain = odd_leaf(ca, ["spiffe://evil.local/ns/default/sa/client"])
        client = quicmesh.TcpTransport(identity=other_domain, trust=ca.trust_bundle)
        try:
            connection = await client.connect(listener.address, timeout=5)
            await connection.aclose()
            return "connected"
        except quicmesh.QuicmeshError as exc:
            return f"{type(exc).__name__}: {exc}"
        finally:
            await client.aclose()
            listener.close()
            await listener.wait_closed()
            await server.aclose()

    outcome = asyncio.run(run())
    assert outcome.startswith("ConnectionLost: "), outcome
