"""A malformed HTTP/3 request (RFC 9114 4.1.2: a pseudo-header twice or after a regular
one, no ``:authority``, an upper-case name, CR/LF in a value) is a stream error: that
stream is reset with H3_MESSAGE_ERROR and the connection's other flows carry on. aioquic
made it a connection error (found by a security review: one bad CONNECT closed every flow
of the connection)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import pytest
from quic_helpers import (
    CLIENT,
    client_transport,
    close_both,
    only_connection,
    require_engine,
    round_trip,
    run,
    server_transport,
)

import quicmesh
import quicmesh.transport.quic.connection as quic_connection
import quicmesh.tunnel.h3 as h3_session
from quicmesh import DevCA, H2Transport
from quicmesh.errors import StreamReset
from quicmesh.logs import RateLimitedLog
from quicmesh.transport.stream import MeshStream

H3_MESSAGE_ERROR = 0x10E
GOOD = [(b":method", b"CONNECT"), (b":authority", b"x.svc:80")]
MALFORMED = {
    "a pseudo-header twice": [*GOOD, (b":authority", b"y.svc:80")],
    "a pseudo-header after a regular one": [
        (b":method", b"CONNECT"), (b"x-a", b"1"), (b":authority", b"x.svc:80"),
    ],
    "no :authority": [(b":method", b"CONNECT")],
    "an upper-case name": [*GOOD, (b"X-Up", b"1")],
    "CR LF in a value": [*GOOD, (b"x-a", b"1\r\nx-b: 2")],
}  # fmt: skip


async def _a_held_flow(engine: str, handler: Any) -> tuple[Any, Any, MeshStream]:
    """A listener on ``engine`` serving ``handler`` (an echo), an aioquic client's
    connection to it, and a flow on that connection that echoed ``before`` and is held
    open."""
    listener = await server_transport(engine=engine).listen(("127.0.0.1", 0), handler)
    connection = await client_transport(engine="aioquic").connect(listener.address)
    held = await connection.open_stream("x.svc:80")
    held.write(b"before")
    assert await asyncio.wait_for(held.read(6), 5) == b"before"
    return listener, connection, held


class _Echo:
    """An echo handler, with the hook a transport calls for a request it refused itself
    (``Transport.listen``); ``refused`` holds their (status, reason)."""

    def __init__(self) -> None:
        self.refused: list[tuple[int, str]] = []
        self.reset: list[str] = []
        """Why the flows the peer reset ended."""

    async def __call__(self, stream: MeshStream) -> None:
        try:
            while data := await stream.read(65536):
                stream.write(data)
        except StreamReset as exc:
            self.reset.append(str(exc))
            return
        stream.write_eof()

    def rejected(self, connection: Any, status: int, reason: str) -> None:
        self.refused.append((status, reason))


def _crafted_requests(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[bytes, bytes]]]:
    """A list whose field sections the next requests send instead of quicmesh's own."""
    crafted: list[list[tuple[bytes, bytes]]] = []
    original = h3_session.connect_request_fields

    def fields(target: object, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
        return crafted.pop() if crafted else original(target, headers)  # type: ignore[arg-type]

    monkeypatch.setattr(h3_session, "connect_request_fields", fields)
    return crafted


@pytest.mark.parametrize("engine", ["native", "aioquic"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_request_resets_its_stream_only(
    engine: str, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_engine(engine)
    crafted = _crafted_requests(monkeypatch)

    echo = _Echo()

    async def main() -> None:
        listener, connection, held = await _a_held_flow(engine, echo)
        crafted.append(MALFORMED[case])
        with pytest.raises(StreamReset) as caught:
            bad = await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
            await asyncio.wait_for(bad.read(), 5)
        assert caught.value.error_code == H3_MESSAGE_ERROR
        # The handler's hook heard of it (the sidecar's access log: a refused flow).
        ((status, reason),) = echo.refused
        assert status == 400 and reason.startswith("malformed request (reset): "), reason
        # The connection and its other flows carry on.
        assert await round_trip(held, b"after", 5) == b"after"
        fresh = await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
        assert await round_trip(fresh, b"new", 5) == b"new"
        assert not connection.is_closed
        await connection.aclose()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_malformed_trailers_end_their_flow_with_the_reason(engine: str) -> None:
    """Trailers with a pseudo-header on a flow under way: the flow is reset and its
    handler hears why (it heard nothing and the stream stayed, its slots held); no
    refused request is reported for it."""
    require_engine(engine)
    echo = _Echo()

    async def main() -> None:
        listener, connection, held = await _a_held_flow(engine, echo)
        session: Any = connection.session  # type: ignore[attr-defined]
        stream_id = held.stream_id  # type: ignore[attr-defined]
        session.h3.send_headers(stream_id, [(b":authority", b"y")], end_stream=True)
        session.scheduler.activate(stream_id)
        connection.transmit()  # type: ignore[attr-defined]
        while not echo.reset:
            await asyncio.sleep(0.01)
        accepted = await only_connection(listener)
        while accepted._streams:
            await asyncio.sleep(0.01)
        fresh = await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
        assert await round_trip(fresh, b"new", 5) == b"new"
        await connection.aclose()
        listener.close()
        await listener.wait_closed()

    run(main(), timeout=20)
    (reason,) = echo.reset
    assert "the peer's trailers are malformed" in reason, reason
    assert echo.refused == []


def _h2_server_and_raw_client(tmp_path: Path, client: str) -> tuple[H2Transport, ssl.SSLContext]:
    """An HTTP/2 transport to listen with, and an ``ssl`` client context presenting
    ``client`` (a SPIFFE ID of the same CA) for a raw h2 client to send what quicmesh's
    own would not."""
    ca = DevCA()
    server = H2Transport(
        identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
    )
    ca.issue(client).save(tmp_path / "c.pem", tmp_path / "k.pem")
    (tmp_path / "ca.pem").write_bytes(ca.trust_bundle.pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(tmp_path / "ca.pem")
    context.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    context.set_alpn_protocols(["h2"])
    return server, context


def test_a_malformed_h2_request_resets_its_stream_only(tmp_path: Path) -> None:
    """The same on HTTP/2 (RFC 9113 8.1.1): h2 made it a connection error (GOAWAY).
    The handler's hook hears of it, as on HTTP/3."""
    server, context = _h2_server_and_raw_client(tmp_path, "spiffe://mesh.local/ns/default/sa/a")

    echo = _Echo()

    async def main() -> list[Any]:
        listener = await server.listen(("127.0.0.1", 0), echo)
        reader, writer = await asyncio.open_connection(*listener.address, ssl=context)
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, header_encoding=None, validate_outbound_headers=False
            )
        )
        client.initiate_connection()
        client.send_headers(1, GOOD)
        client.send_headers(3, MALFORMED["a pseudo-header twice"])
        client.send_data(1, b"after", end_stream=True)
        writer.write(client.data_to_send())
        seen: list[Any] = []
        while not any(isinstance(e, h2.events.StreamEnded) for e in seen):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, seen
            for event in client.receive_data(data):
                seen.append(event)
                if isinstance(event, h2.events.DataReceived):
                    client.acknowledge_received_data(len(event.data), event.stream_id)
            writer.write(client.data_to_send())
        writer.close()
        listener.close()
        await listener.wait_closed()
        return seen

    seen = run(main())
    resets = [e for e in seen if isinstance(e, h2.events.StreamReset)]
    assert [(e.stream_id, e.error_code) for e in resets] == [
        (3, h2.errors.ErrorCodes.PROTOCOL_ERROR)
    ]
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in seen)
    echoed = b"".join(e.data for e in seen if isinstance(e, h2.events.DataReceived))
    assert echoed == b"after"
    ((status, reason),) = echo.refused  # (the sidecar's access log: a refused flow)
    assert status == 400 and "duplicate pseudo-header" in reason, reason


@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_peer_that_breaks_http3_is_named_in_one_warning(
    engine: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DATA before HEADERS on a request stream is a connection error (RFC 9114 4.1,
    H3_FRAME_UNEXPECTED): the server closes the connection and says so once, naming the
    peer, its address and what it did; its flows end with that reason (the native engine
    said only "closed")."""
    require_engine(engine)
    monkeypatch.setattr(
        quic_connection, "PEER_VIOLATION_LOG", RateLimitedLog(quic_connection.logger)
    )
    ended: list[BaseException] = []

    async def echo(stream: MeshStream) -> None:
        try:
            while data := await stream.read(65536):
                stream.write(data)
        except StreamReset as exc:
            ended.append(exc)
            raise

    async def main() -> None:
        listener, connection, held = await _a_held_flow(engine, echo)
        accepted = await only_connection(listener)
        quic: Any = connection.quic  # type: ignore[attr-defined]
        quic.send_stream_data(quic.get_next_available_stream_id(), b"\x00\x03abc")
        connection.transmit()  # type: ignore[attr-defined]
        with pytest.raises(StreamReset, match="DATA frame is not allowed"):
            await asyncio.wait_for(held.read(), 5)
        await connection.wait_closed()
        await accepted.wait_closed()  # (aioquic: once its closing period is over)
        listener.close()
        await listener.wait_closed()

    with caplog.at_level("INFO"):
        run(main())
    warnings = [r.getMessage() for r in caplog.records if "broke HTTP/3" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert CLIENT.spiffe_id in warnings[0] and " at 127.0.0.1:" in warnings[0], warnings[0]
    assert (
        "DATA frame is not allowed" in warnings[0] and "(H3_FRAME_UNEXPECTED, 0x105)" in warnings[0]
    )
    assert len(ended) == 1 and "DATA frame is not allowed" in str(ended[0]), ended


@pytest.mark.parametrize("hook_fails", [False, True])
@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_a_handler_with_a_rejected_hook_hears_of_each_refused_request(
    engine: str, hook_fails: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request refused before the handler (its target has no port: 400) is told to the
    handler's ``rejected`` hook, with its connection: a sidecar logs it as a flow. A hook
    that raises is the handler's bug: the connection's other flows carry on."""
    require_engine(engine)
    crafted = _crafted_requests(monkeypatch)
    heard: list[tuple[object, int, str]] = []

    class Echo:
        async def __call__(self, stream: MeshStream) -> None:
            while data := await stream.read(65536):
                stream.write(data)
            stream.write_eof()

        def rejected(self, connection: object, status: int, reason: str) -> None:
            heard.append((connection, status, reason))
            if hook_fails:
                raise RuntimeError("a bug in the hook")

    async def main() -> None:
        listener, connection, held = await _a_held_flow(engine, Echo())
        crafted.append([(b":method", b"CONNECT"), (b":authority", b"x.svc")])
        with pytest.raises(quicmesh.StreamRefused) as refused:
            await asyncio.wait_for(connection.open_stream("x.svc:80"), 5)
        assert refused.value.status == 400
        accepted = await only_connection(listener)
        assert [(c, s) for c, s, _ in heard] == [(accepted, 400)]
        assert "x.svc" in heard[0][2]
        assert await round_trip(held, b"after", 5) == b"after"
        await close_both(connection, listener)

    run(main())


def test_an_h2_peer_over_the_header_list_limit_is_named_in_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header list over 60 KiB closes the HTTP/2 connection (GOAWAY, h2's
    ENHANCE_YOUR_CALM): the server says so once, naming the peer, its address and the
    code, as QUIC's servers do; it said nothing, and its flows read "closed by peer"."""
    import quicmesh.transport._session as session_module

    monkeypatch.setattr(session_module, "PEER_VIOLATION_LOG", RateLimitedLog(session_module.logger))
    server, context = _h2_server_and_raw_client(tmp_path, "spiffe://mesh.local/ns/default/sa/big")

    async def main() -> tuple[list[Any], str]:
        listener = await server.listen(("127.0.0.1", 0), _Echo())
        reader, writer = await asyncio.open_connection(*listener.address, ssl=context)
        local = "{}:{}".format(*writer.get_extra_info("sockname")[:2])
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        client.send_headers(1, [*GOOD, *((f"x-{i}".encode(), b"v" * 4096) for i in range(20))])
        writer.write(client.data_to_send())
        seen: list[Any] = []
        while data := await asyncio.wait_for(reader.read(65536), 5):
            seen += client.receive_data(data)
        writer.close()
        listener.close()
        await listener.wait_closed()
        return seen, local

    with caplog.at_level("WARNING", logger="quicmesh.transport"):
        seen, local = run(main())
    (terminated,) = [e for e in seen if isinstance(e, h2.events.ConnectionTerminated)]
    assert terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    said = [
        r.getMessage().split("] ", 1)[1]  # (after the connection's log id, "[h2-N]")
        for r in caplog.records
        if "closed the connection with" in r.getMessage()
    ]
    assert said == [
        f"closed the connection with spiffe://mesh.local/ns/default/sa/big at {local}:"
        " HTTP/2 protocol error: Oversized header block: A header list larger than 61440 has"
        " been received (error code 0xb)"
    ], said
