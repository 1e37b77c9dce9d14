"""One conformance suite for every :class:`~quicmesh.tunnel.session.TunnelSession`.

In the manner of trio's ``_check_streams``: each check states one part of the
contract the asyncio layer relies on, and runs against a client and a server
session of each protocol wired back to back in memory (sans-IO, no sockets):
HTTP/2 (bytes), HTTP/3 (QUIC datagrams between two aioquic connections, time a
number the pair advances) and HTTP/1.1 (bytes, one flow per connection).

The pair plays the application and the I/O layer: it moves bytes or datagrams
until both sides are quiet, reads every byte delivered (``data_consumed``), hands
an HTTP/1.1 side's end of output to its peer as the TLS close_notify
(``receive_eof``) and collects the events each side returned. What HTTP/1.1
cannot say in band (an abort is a TCP reset of the connection, done by the I/O
layer) is checked as the session's request to the I/O layer instead
(``abort_requested``); the socket half is in tests/transport/test_contract.py.
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod
from collections.abc import Callable

import pytest
from aioquic.h3.connection import ErrorCode as H3ErrorCode
from aioquic.quic.configuration import QuicConfiguration
from h2.errors import ErrorCodes as H2ErrorCodes

from quicmesh._aioquic import MeshQuicConnection
from quicmesh.tls import DevCA
from quicmesh.tunnel import events
from quicmesh.tunnel.connect import Target, parse_target
from quicmesh.tunnel.h2 import H2TunnelSession
from quicmesh.tunnel.h3 import H3TunnelSession
from quicmesh.tunnel.http1 import Http1TunnelSession
from quicmesh.tunnel.session import ResetReason, TunnelSession

TARGET = parse_target("reviews.default.svc:9080")
CA = DevCA()
SERVER_IDENTITY = CA.issue("spiffe://mesh.local/ns/default/sa/server")

Events = list[events.TunnelEvent]


class Pair(ABC):
    """A client and a server session of one protocol, connected in memory."""

    multiplexed = True
    """Whether one connection carries several streams (not HTTP/1.1)."""
    in_band_reset = True
    """Whether an abort reaches the peer session as a StreamReset (not HTTP/1.1)."""
    reset_codes: dict[ResetReason, int]

    client: TunnelSession
    server: TunnelSession

    def __init__(self) -> None:
        self.client_events: Events = []
        self.server_events: Events = []

    @abstractmethod
    def _move(self) -> tuple[Events, Events, bool]:
        """Move what each side has for the other once: (client, server events, moved)."""

    def exchange(self) -> tuple[Events, Events]:
        """Move input both ways until both sides are quiet; the events of this call.

        Every byte delivered is read at once: the application keeps up.
        """
        client_events: Events = []
        server_events: Events = []
        quiet = 0
        while quiet < 3:
            to_client, to_server, moved = self._move()
            for session, got in ((self.client, to_client), (self.server, to_server)):
                for event in got:
                    if isinstance(event, events.DataReceived) and event.data:
                        session.data_consumed(event.stream_id, len(event.data))
            client_events += to_client
            server_events += to_server
            quiet = 0 if moved or to_client or to_server else quiet + 1
        self.client_events += client_events
        self.server_events += server_events
        return client_events, server_events

    def open(self, target: Target = TARGET, headers: dict[str, str] | None = None) -> int:
        """Open a stream the server accepts; its ID."""
        stream_id = self.client.open_stream(target, headers or {})
        _, server_events = self.exchange()
        assert [e for e in server_events if isinstance(e, events.StreamRequested)] == [
            events.StreamRequested(stream_id, target, headers or {})
        ]
        self.server.respond(stream_id, 200)
        client_events, _ = self.exchange()
        assert events.ResponseReceived(stream_id, 200, "") in client_events
        return stream_id


class H2Pair(Pair):
    reset_codes = {
        ResetReason.CANCELLED: H2ErrorCodes.CANCEL,
        ResetReason.CONNECT_ERROR: H2ErrorCodes.CONNECT_ERROR,
    }

    def __init__(self, max_streams: int = 128) -> None:
        super().__init__()
        self.client = self.h2_client = H2TunnelSession(is_client=True)
        self.server = self.h2_server = H2TunnelSession(is_client=False, max_streams=max_streams)
        self.exchange()

    def _move(self) -> tuple[Events, Events, bool]:
        to_server = self.h2_client.data_to_send()
        to_client = self.h2_server.data_to_send()
        server_events = self.h2_server.receive_data(to_server) if to_server else []
        client_events = self.h2_client.receive_data(to_client) if to_client else []
        return client_events, server_events, bool(to_server or to_client)


class Http1Pair(Pair):
    multiplexed = False
    in_band_reset = False
    reset_codes: dict[ResetReason, int] = {}

    def __init__(self, max_streams: int = 1) -> None:
        super().__init__()
        self.client = self.h1_client = Http1TunnelSession(is_client=True)
        self.server = self.h1_server = Http1TunnelSession(is_client=False)
        self._eof_delivered: set[Http1TunnelSession] = set()

    def _move(self) -> tuple[Events, Events, bool]:
        got: dict[Http1TunnelSession, Events] = {self.h1_client: [], self.h1_server: []}
        moved = False
        for side, peer in ((self.h1_client, self.h1_server), (self.h1_server, self.h1_client)):
            got[side] += side.pending_events()
            data = side.data_to_send()
            if data:
                got[peer] += peer.receive_data(data)
                moved = True
            if side.output_ended and side not in self._eof_delivered:
                # The I/O layer's TLS close_notify and TCP write shutdown.
                self._eof_delivered.add(side)
                got[peer] += peer.receive_eof()
                moved = True
        return got[self.h1_client], got[self.h1_server], moved


class H3Pair(Pair):
    reset_codes = {
        ResetReason.CANCELLED: H3ErrorCode.H3_REQUEST_CANCELLED,
        ResetReason.CONNECT_ERROR: H3ErrorCode.H3_CONNECT_ERROR,
    }
    CLIENT_ADDR = ("10.0.0.1", 1234)
    SERVER_ADDR = ("10.0.0.2", 4433)

    def __init__(self, max_streams: int = 128) -> None:
        super().__init__()
        self.now = 1000.0
        client_quic = MeshQuicConnection(configuration=self._configuration(is_client=True))
        server_quic = MeshQuicConnection(
            configuration=self._configuration(is_client=False),
            original_destination_connection_id=client_quic.original_destination_connection_id,
            max_streams=max_streams,
        )
        self.client = self.h3_client = H3TunnelSession(client_quic)
        self.server = self.h3_server = H3TunnelSession(server_quic)
        client_quic.connect(self.SERVER_ADDR, now=self.now)
        self.exchange()
        assert self.h3_client.h3 is not None and self.h3_server.h3 is not None

    @staticmethod
    def _configuration(*, is_client: bool) -> QuicConfiguration:
        config = QuicConfiguration(alpn_protocols=["h3"], is_client=is_client)
        if is_client:
            config.verify_mode = ssl.CERT_NONE  # identities are not this suite's subject
        else:
            config.certificate = SERVER_IDENTITY.certificate
            config.private_key = SERVER_IDENTITY.private_key
        return config

    def _move(self) -> tuple[Events, Events, bool]:
        self.now += 0.002
        got: dict[H3TunnelSession, Events] = {self.h3_client: [], self.h3_server: []}
        moved = False
        sides = ((self.h3_client, self.h3_server), (self.h3_server, self.h3_client))
        for side, peer in sides:
            timer = side.quic.get_timer()
            if timer is not None and timer <= self.now:
                side.quic.handle_timer(self.now)
            address = self.CLIENT_ADDR if side is self.h3_client else self.SERVER_ADDR
            for data, _ in side.quic.datagrams_to_send(now=self.now):
                peer.quic.receive_datagram(data, address, now=self.now)
                moved = True
            for session in (side, peer):
                while (event := session.quic.next_event()) is not None:
                    got[session] += session.handle_quic_event(event)
        return got[self.h3_client], got[self.h3_server], moved


PAIRS: dict[str, Callable[..., Pair]] = {"h2": H2Pair, "h3": H3Pair, "http1": Http1Pair}


@pytest.fixture(params=sorted(PAIRS))
def make_pair(request: pytest.FixtureRequest) -> Callable[..., Pair]:
    return PAIRS[request.param]


def payload(evs: Events, stream_id: int) -> bytes:
    return b"".join(
        e.data for e in evs if isinstance(e, events.DataReceived) and e.stream_id == stream_id
    )


def ended(evs: Events, stream_id: int) -> bool:
    return any(
        isinstance(e, events.DataReceived) and e.stream_id == stream_id and e.stream_ended
        for e in evs
    )


def resets(evs: Events, stream_id: int) -> list[events.StreamReset]:
    return [e for e in evs if isinstance(e, events.StreamReset) and e.stream_id == stream_id]


# -- the contract ---------------------------------------------------------------------


def test_open_carries_the_parsed_target_and_headers(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    stream_id = pair.client.open_stream(TARGET, {"x-request-id": "7"})
    _, server_events = pair.exchange()
    [requested] = server_events
    assert requested == events.StreamRequested(stream_id, TARGET, {"x-request-id": "7"})
    assert isinstance(requested, events.StreamRequested)
    assert isinstance(requested.target, Target)
    assert (requested.target.host, requested.target.port) == ("reviews.default.svc", 9080)
    pair.server.respond(stream_id, 200)
    client_events, _ = pair.exchange()
    assert client_events == [events.ResponseReceived(stream_id, 200, "")]


def test_data_flows_both_ways_intact(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    stream_id = pair.open()
    upstream = bytes(range(256)) * 1200  # 300 KiB: many frames, several windows' worth
    downstream = b"".join(i.to_bytes(4, "big") for i in range(50_000))
    for offset in range(0, len(upstream), 10_000):
        pair.client.send_data(stream_id, upstream[offset : offset + 10_000])
        pair.exchange()
    pair.server.send_data(stream_id, downstream)
    pair.exchange()
    assert payload(pair.server_events, stream_id) == upstream
    assert payload(pair.client_events, stream_id) == downstream
    assert pair.client.unsent_bytes(stream_id) == pair.server.unsent_bytes(stream_id) == 0


def test_half_close_leaves_the_other_direction_open(make_pair: Callable[..., Pair]) -> None:
    pair = make_pair()
    stream_id = pair.open()
    pair.client.send_data(stream_id, b"request", end_stream=True)
    client_events, server_events = pair.exchange()
    assert payload(server_events, stream_id) == b"request" and ended(server_events, stream_id)
    assert not ended(client_events, stream_id) and not resets(client_events, stream_id)
    pair.server.send_data(stream_id, b"response")
    client_events, _ = pair.exchange()
    assert payload(client_events, stream_id) == b"response"
    assert not ended(client_events, stream_id)
    pair.server.send_data(stream_id, b"", end_stream=True)
    client_events, _ = pair.exchange()
    assert ended(client_events, stream_id)
    assert not resets(pair.client_events, stream_id) and not resets(pair.server_events, stream_id)
    assert pair.client.is_idle() and pair.server.is_idle()


@pytest.mark.parametrize("reason", list(ResetReason))
@pytest.mark.parametrize("by_client", [True, False], ids=["client-resets", "server-resets"])
def test_reset_aborts_only_that_stream_and_reaches_the_peer(
    make_pair: Callable[..., Pair], reason: ResetReason, by_client: bool
) -> None:
    pair = make_pair()
    stream_id = pair.open()
    other = pair.open(parse_target("ratings.default.svc:80")) if pair.multiplexed else None
    resetter = pair.client if by_client else pair.server
    resetter.reset_stream(stream_id, reason)
    client_events, server_events = pair.exchange()
    peer_events = server_events if by_client else client_events
    if pair.in_band_reset:
        [reset] = resets(peer_events, stream_id)
        assert reset.error_code == pair.reset_codes[reason]
        assert reset.connect_error is (reason is ResetReason.CONNECT_ERROR)
    else:
        # HTTP/1.1: the I/O layer resets the connection, which is the flow.
        assert isinstance(resetter, Http1TunnelSession) and resetter.abort_requested
    resetter.send_data(stream_id, b"too late")
    pair.exchange()
    assert b"too late" not in payload(pair.client_events + pair.server_events, stream_id)
    if other is not None:
        pair.client.send_data(other, b"still here", end_stream=True)
        pair.server.send_data(other, b"me too", end_stream=True)
        client_events, server_events = pair.exchange()
        assert payload(server_events, other) == b"still here" and ended(server_events, other)
        assert payload(client_events, other) == b"me too" and ended(client_events, other)
        assert pair.client.is_idle() and pair.server.is_idle()


@pytest.mark.parametrize(
    ("target", "headers", "reason"),
    [
        (Target("10.0.0.999", 80), {}, "target '10.0.0.999:80': "),
        (Target("under_score.svc", 80), {}, "target 'under_score.svc:80': "),
        (TARGET, {"proxy-status": "forged"}, "header 'proxy-status' is reserved"),
        (TARGET, {"x-a": "line\x01break"}, "header 'x-a' has control"),
    ],
    ids=["bad-ipv4", "bad-name", "reserved-header", "control-character"],
)
def test_a_bad_request_is_refused_with_400_and_its_reason(
    make_pair: Callable[..., Pair], target: Target, headers: dict[str, str], reason: str
) -> None:
    # A Target built from unchecked parts gets the bad request onto the wire, as a
    # peer that skips validation would send it.
    pair = make_pair()
    stream_id = pair.client.open_stream(target, headers)
    client_events, server_events = pair.exchange()
    [rejected] = server_events
    assert isinstance(rejected, events.RequestRejected)
    assert (rejected.stream_id, rejected.status) == (stream_id, 400)
    assert rejected.reason.startswith(reason), rejected.reason
    [response] = [e for e in client_events if isinstance(e, events.ResponseReceived)]
    assert response == events.ResponseReceived(stream_id, 400, rejected.reason)
    if pair.multiplexed:
        pair.open()  # the connection carries on
    assert pair.server.is_idle() or pair.multiplexed


def test_the_stream_limit_holds_and_frees_up(make_pair: Callable[..., Pair]) -> None:
    limit = 3
    pair = make_pair(max_streams=limit)
    if not pair.multiplexed:
        limit = 1  # one flow per HTTP/1.1 connection, whatever is asked
    opened = []
    for _ in range(limit):
        assert pair.client.can_open_stream()
        opened.append(pair.open())
    assert not pair.client.can_open_stream()
    pair.client.reset_stream(opened[0], ResetReason.CANCELLED)
    pair.exchange()
    if pair.multiplexed:
        assert pair.client.can_open_stream()
        pair.open()
        assert not pair.client.can_open_stream()
    else:
        with pytest.raises(RuntimeError, match="exactly one stream"):
            pair.client.open_stream(TARGET, {})


@pytest.mark.parametrize("status", [200, 403])
def test_answering_a_stream_the_peer_already_reset_is_dropped(
    make_pair: Callable[..., Pair], status: int
) -> None:
    # Rapid reset (issue 13): the peer resets a stream before the server's
    # handler answers it. The late answer is dropped, as data written after a
    # reset is, instead of raising out of the session (aioquic raised
    # RuntimeError, a traceback per churned stream in the sidecar's log).
    pair = make_pair()
    other = pair.open(parse_target("ratings.default.svc:80")) if pair.multiplexed else None
    stream_id = pair.client.open_stream(TARGET, {})
    _, server_events = pair.exchange()
    assert [e.stream_id for e in server_events if isinstance(e, events.StreamRequested)] == [
        stream_id
    ]
    pair.client.reset_stream(stream_id, ResetReason.CANCELLED)
    # One move, not until quiet: the handler answers before the resets are acknowledged.
    _, server_events, _ = pair._move()
    if pair.in_band_reset:
        assert len(resets(server_events, stream_id)) == 1
    pair.server.respond(stream_id, status, "too late")
    client_events, _ = pair.exchange()
    assert not [e for e in client_events if isinstance(e, events.ResponseReceived)]
    if other is not None:
        pair.client.send_data(other, b"still here", end_stream=True)
        pair.server.send_data(other, b"me too", end_stream=True)
        client_events, server_events = pair.exchange()
        assert payload(server_events, other) == b"still here" and ended(server_events, other)
        assert payload(client_events, other) == b"me too" and ended(client_events, other)
