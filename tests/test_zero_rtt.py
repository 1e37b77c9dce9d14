"""0-RTT resumption over real loopback sockets: accepted, rejected, replayed, refused tickets.

A :class:`~quicmesh.bench.relay.UdpRelay` sits between client and server where a
test needs to see or replay what went over the wire.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import random
from pathlib import Path
from typing import Any

import pytest
import quic_helpers
from aioquic.tls import CipherSuite, SessionTicket
from quic_helpers import (
    CA,
    SERVER,
    Recorder,
    exchange,
    first_flight,
    run,
    until,
    zero_rtt_bytes,
)

from quicmesh import ConfigError, QuicTransport, TrustBundle, TunnelError
from quicmesh.bench.relay import UdpRelay
from quicmesh.transport import tickets
from quicmesh.transport.quic import EARLY_DATA_OVERHEAD
from quicmesh.transport.stream import MeshStream
from quicmesh.transport.tickets import IssuedTicket, TicketCache, TicketStore

RNG = random.Random(6)


# These tests drive aioquic's 0-RTT: the transport's TicketCache and TicketStore
# (which the native engine does not use: rustls keeps its tickets), aioquic's
# SessionTicket and its 0-RTT packets. They run on aioquic whatever the default
# engine; the native engine's 0-RTT is tested in tests/native and
# tests/transport/test_quic_engines.py.
def client_transport(**kwargs: Any) -> QuicTransport:
    return quic_helpers.client_transport(engine="aioquic", **kwargs)


def server_transport(identity: Any = SERVER, **kwargs: Any) -> QuicTransport:
    return quic_helpers.server_transport(identity, engine="aioquic", **kwargs)


async def prime(client: QuicTransport, address: tuple[str, int]) -> None:
    """One full handshake, so that the client holds a ticket for ``address``."""
    conn = await client.connect(address)
    assert conn.early_data == "none"
    assert await exchange(conn, b"prime", "prime") == b"prime"
    await until(lambda: client.ticket_cache.count(address) > 0)
    conn.close()
    await conn.wait_closed()


async def early_exchange(
    client: QuicTransport, address: tuple[str, int], payloads: list[bytes]
) -> tuple[Any, list[bytes]]:
    """Connect with early data and run one stream per payload, opened before the handshake."""
    conn = await client.connect(address, early_data=True)
    assert conn.early_data == "attempted"
    streams = []
    for index, payload in enumerate(payloads):
        stream = await conn.open_stream(
            "reviews.default.svc:9080", headers={"x-request-id": str(index)}, wait_response=False
        )
        stream.write(payload)
        stream.write_eof()
        streams.append(stream)
    results = [await stream.read() for stream in streams]
    return conn, results


# -- accepted ---------------------------------------------------------------------


def test_accepted_0rtt_carries_the_data_in_0rtt_packets() -> None:
    payload = RNG.randbytes(8000)
    recorder = Recorder()

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), recorder)
        relay = await UdpRelay(listener.address, record=True).start()
        client = client_transport()
        await prime(client, relay.address)
        relay.captured.clear()

        conn, results = await early_exchange(client, relay.address, [payload])
        assert results == [payload]
        assert conn.early_data == "accepted"
        assert conn.peer_identity == SERVER.spiffe_id
        stats = conn.stats()
        assert stats["zero_rtt_packets_sent"] > 0
        assert stats["zero_rtt_accepted"] == 1
        # The CONNECT and the whole payload went in 0-RTT packets, as seen on the wire.
        assert zero_rtt_bytes(relay.captured) > len(payload)
        assert client.counters["zero_rtt_attempted"] == client.counters["zero_rtt_accepted"] == 1
        assert server.counters["tickets_redeemed"] == 1
        assert recorder.received["0"] == [payload]
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_connect_sent_while_the_servers_answer_already_waits_still_goes_as_0rtt(
    loop: str,
) -> None:
    """A client paused between its ClientHello and its first stream (a busy machine
    preempting it) finds the server's answer waiting when it opens the stream. The
    CONNECT used to be sent at the loop's next turn, and uvloop runs the callbacks of
    waiting I/O first: the answer finished the handshake and the CONNECT left in 1-RTT
    packets (a sidecar's 0-RTT test failed so under load). A stream opened with
    ``wait_response=False`` is sent at once. The server runs in a thread of its own so
    that it answers while the client waits, in ``select``, for the answer to arrive."""
    import select
    import threading

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop", reason="uvloop is an optional extra")
        loop_factory = uvloop.new_event_loop
    else:
        loop_factory = asyncio.new_event_loop
    server_ready = threading.Event()
    server_state: dict[str, Any] = {}

    async def serve() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        stop = asyncio.get_running_loop().create_future()
        server_state.update(address=listener.address, stop=stop, loop=asyncio.get_running_loop())
        server_ready.set()
        await stop
        listener.close()
        await listener.wait_closed()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()

    async def main() -> None:
        address = server_state["address"]
        client = client_transport()
        await prime(client, address)
        conn = await client.connect(address, early_data=True)
        assert conn.early_data == "attempted"
        sock = conn.connected_socket.get_extra_info("socket")
        readable, _, _ = select.select([sock.fileno()], [], [], 10)
        assert readable, "no answer from the server"
        stream = await conn.open_stream("reviews.default.svc:9080", wait_response=False)
        stream.write(b"early")
        stream.write_eof()
        assert await stream.read() == b"early"
        assert conn.early_data == "accepted"
        assert conn.stats()["zero_rtt_packets_sent"] > 0
        conn.close()
        await conn.wait_closed()

    try:
        assert server_ready.wait(10)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(asyncio.wait_for(main(), 30))
    finally:
        if "stop" in server_state:
            server_state["loop"].call_soon_threadsafe(server_state["stop"].set_result, None)
        thread.join(10)


def test_server_sees_the_client_identity_from_the_ticket() -> None:
    seen: list[str] = []

    async def handler(stream: Any) -> None:
        seen.append(stream.peer_identity)
        stream.write(await stream.read())
        stream.write_eof()

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), handler)
        client = client_transport()
        await prime(client, listener.address)
        conn, results = await early_exchange(client, listener.address, [b"who"])
        assert results == [b"who"] and conn.early_data == "accepted"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())
    assert seen == ["spiffe://mesh.local/ns/default/sa/client"] * 2


def test_payload_beyond_max_early_data_waits_for_the_handshake() -> None:
    budget = 4096
    payloads = [RNG.randbytes(900) for _ in range(4)] + [RNG.randbytes(50_000)]

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        relay = await UdpRelay(listener.address, record=True).start()
        client = client_transport(max_early_data=budget)
        await prime(client, relay.address)
        relay.captured.clear()
        conn, results = await early_exchange(client, relay.address, payloads)
        assert results == payloads
        assert conn.early_data == "accepted"
        early = zero_rtt_bytes(relay.captured)
        assert 3600 < early < budget + EARLY_DATA_OVERHEAD
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_server_closes_a_connection_sending_too_much_0rtt() -> None:
    async def main() -> None:
        server = server_transport(max_early_data=1000)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        # A client that bursts its first flight (Cubic; BBR, the default on BBR hosts,
        # paces it and sends only a few 0-RTT packets before the handshake completes).
        client = client_transport(max_early_data=1_000_000, congestion_control="cubic")
        await prime(client, listener.address)
        conn = await client.connect(listener.address, early_data=True)
        stream = await conn.open_stream("a.svc:1", wait_response=False)
        stream.write(b"x" * 100_000)
        with pytest.raises(TunnelError, match="0-RTT"):
            await stream.read()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


# -- rejected -------------------------------------------------------------------------


def test_rejected_0rtt_loses_nothing() -> None:
    payloads = [RNG.randbytes(n) for n in (0, 1, 1500, 6000, 40_000)]
    recorder = Recorder()

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), recorder, early_data=False)
        client = client_transport()
        await prime(client, listener.address)
        conn, results = await early_exchange(client, listener.address, payloads)
        assert results == payloads
        assert conn.early_data == "rejected"
        stats = conn.stats()
        assert stats["zero_rtt_packets_sent"] > 0
        assert stats["zero_rtt_rejected"] == 1
        # Resumed (no certificate exchanged), identity from the ticket, 0-RTT refused.
        assert conn.peer_identity == SERVER.spiffe_id
        assert server.counters["tickets_redeemed"] == 1
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())
    # Every stream reached the application exactly once, byte for byte.
    assert {k: v for k, v in recorder.received.items() if k != "prime"} == {
        str(i): [p] for i, p in enumerate(payloads)
    }


def test_expired_ticket_falls_back_to_a_full_handshake() -> None:
    now = [1000.0]
    store = TicketStore(lifetime=60, clock=lambda: now[0])
    recorder = Recorder()

    async def main() -> None:
        server = server_transport(ticket_store=store)
        listener = await server.listen(("127.0.0.1", 0), recorder)
        client = client_transport()
        await prime(client, listener.address)
        now[0] += 61
        conn, results = await early_exchange(client, listener.address, [b"late"])
        assert results == [b"late"]
        assert conn.early_data == "rejected"
        assert store.refused == 1 and server.counters["tickets_refused"] == 1
        assert conn.peer_identity == SERVER.spiffe_id
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())
    assert recorder.received["0"] == [b"late"]


def test_unknown_ticket_falls_back_to_a_full_handshake() -> None:
    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = client_transport()
        await prime(client, listener.address)
        server.ticket_store = TicketStore()  # a restarted server knows no ticket
        conn, results = await early_exchange(client, listener.address, [b"new"])
        assert results == [b"new"]
        assert conn.early_data == "rejected"
        assert server.counters["tickets_refused"] == 1
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_new_trust_bundle_forgets_the_tickets_issued() -> None:
    """A review (2026-12-07): a client whose CA was taken out of the server's trust
    bundle could still resume with a ticket issued before (no certificate is checked on
    resumption). The server forgets its tickets when its trust bundle drops a CA, as the
    native engine's store is replaced with new roots; adding one (a CA rotation's first
    step) keeps them (review 28)."""
    other_ca = quic_helpers.DevCA()

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = client_transport()
        await prime(client, listener.address)
        assert len(server.ticket_store) > 0
        server.set_identity(SERVER, CA.trust_bundle)  # the same bundle: the tickets stay
        assert len(server.ticket_store) > 0
        both = TrustBundle.from_pem(CA.trust_bundle.pem + other_ca.trust_bundle.pem)
        server.set_identity(SERVER, both)  # a CA added: the tickets stay
        assert len(server.ticket_store) > 0
        server.set_identity(SERVER, CA.trust_bundle)  # a CA removed: they go
        assert len(server.ticket_store) == 0
        conn, results = await early_exchange(client, listener.address, [b"again"])
        assert results == [b"again"]
        assert conn.early_data == "rejected"  # a full handshake: the client verified anew
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_ticket_resumes_only_the_client_identity_it_was_issued_to(tmp_path: Path) -> None:
    """Another client identity loading the same ticket file (a sidecar restarted under a
    new node.identity) makes a full handshake: the server sees its own certificate, not
    the identity the ticket recorded (it saw that one, and authorized as it)."""
    seen: list[str] = []

    async def handler(stream: MeshStream) -> None:
        seen.append(stream.peer_identity)
        stream.write(await stream.read())
        stream.write_eof()

    async def main() -> None:
        listener = await server_transport().listen(("127.0.0.1", 0), handler)
        path = tmp_path / "tickets.json"
        first = client_transport(ticket_cache=TicketCache(path))
        await prime(first, listener.address)
        guest = CA.issue("spiffe://mesh.local/ns/default/sa/guest")
        second = QuicTransport(
            identity=guest, trust=CA.trust_bundle, ticket_cache=TicketCache(path), engine="aioquic"
        )
        assert second.ticket_cache.count(listener.address, guest.spiffe_id) == 0
        conn = await second.connect(listener.address, early_data=True)
        stream = await conn.open_stream("a.svc:1")
        stream.write(b"x")
        stream.write_eof()
        assert await stream.read() == b"x"
        assert conn.early_data == "none"  # (no ticket of its own: a full handshake)
        await conn.aclose()
        listener.close()
        await listener.wait_closed()

    run(main())
    assert seen[-1] == "spiffe://mesh.local/ns/default/sa/guest"


def test_a_different_server_behind_the_address_fails_the_streams() -> None:
    other = CA.issue("spiffe://mesh.local/ns/default/sa/other")
    recorder = Recorder()

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        impostor = server_transport(identity=other)
        impostor_listener = await impostor.listen(("127.0.0.1", 0), recorder)
        client = client_transport()
        await prime(client, listener.address)
        own = client.identity.spiffe_id
        cached = client.ticket_cache.take(listener.address, own)
        assert cached is not None
        client.ticket_cache.store(impostor_listener.address, cached.ticket, cached.identity, own)
        conn = await client.connect(impostor_listener.address, early_data=True)
        stream = await conn.open_stream("a.svc:1", wait_response=False)
        stream.write(b"secret")
        with pytest.raises(TunnelError, match="ticket was issued by"):
            await stream.read()
        assert conn.is_closed
        await conn.wait_closed()
        for item in (listener, impostor_listener):
            item.close()
            await item.wait_closed()

    run(main())
    assert recorder.received == {}


# -- replay ------------------------------------------------------------------------


class ReusableTicketStore(TicketStore):
    """A store that forgets to make tickets single use (the mistake replays exploit)."""

    def redeem(self, label: bytes) -> IssuedTicket | None:
        record = self._tickets.get(label)
        if record is not None:
            self.redeemed += 1
        return record


@pytest.mark.parametrize("single_use", [True, False])
def test_replayed_first_flight_is_not_delivered_twice(single_use: bool) -> None:
    recorder = Recorder()
    store = TicketStore() if single_use else ReusableTicketStore()

    async def main() -> None:
        server = server_transport(ticket_store=store)
        listener = await server.listen(("127.0.0.1", 0), recorder)
        relay = await UdpRelay(listener.address, record=True).start()
        # The replayed "first flight" is the first three datagrams: a client that sends
        # its flight at once (Cubic; BBR, the default on BBR hosts, paces it).
        client = client_transport(congestion_control="cubic")
        await prime(client, relay.address)
        relay.captured.clear()
        conn, results = await early_exchange(client, relay.address, [b"transfer 100 coins"])
        assert results == [b"transfer 100 coins"] and conn.early_data == "accepted"
        flight = first_flight(relay.captured)
        assert zero_rtt_bytes(flight) > 0

        # Replayed while the connection lives (same connection IDs) ...
        during = await relay.replay(flight)
        # ... and after it is gone, as a new connection.
        conn.close()
        await conn.wait_closed()
        await until(lambda: not listener._server._protocols)  # type: ignore[attr-defined]
        after = await relay.replay(flight)
        await until(lambda: relay.stats.spoof_replies[after] > 0)
        # A full round trip on a fresh connection: the replays were processed before it.
        barrier = await client.connect(listener.address)
        assert await exchange(barrier, b"barrier", "barrier") == b"barrier"
        barrier.close()
        await barrier.wait_closed()
        # The server answered the replays from the relay's fresh sockets, no more than
        # three times what it received there (anti-amplification).
        size = sum(len(d) for d in flight)
        assert relay.stats.spoof_replies[during] <= 3 * size
        assert relay.stats.spoof_replies[after] <= 3 * size
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())
    deliveries = recorder.received["0"]
    if single_use:
        assert deliveries == [b"transfer 100 coins"]
    else:
        # Without single-use tickets the replay reaches the application again: the
        # test does see replays.
        assert len(deliveries) >= 2


# -- ticket bookkeeping ---------------------------------------------------------------


def _ticket(label: bytes, lifetime: float = 3600) -> SessionTicket:
    now = datetime.datetime.now(datetime.UTC)
    return SessionTicket(
        age_add=7,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=now + datetime.timedelta(seconds=lifetime),
        not_valid_before=now,
        resumption_secret=b"s" * 32,
        server_name="",
        ticket=label,
        max_early_data_size=0xFFFFFFFF,
        other_extensions=[(0x39, b"\x01\x02")],
    )


def test_ticket_store_is_single_use_and_expires() -> None:
    now = [0.0]
    store = TicketStore(lifetime=10, capacity=2, clock=lambda: now[0])
    store.add(_ticket(b"a"), "spiffe://x/a")
    store.add(_ticket(b"b"), "spiffe://x/b")
    record = store.redeem(b"a")
    assert record is not None and record.identity == "spiffe://x/a"
    assert store.redeem(b"a") is None  # used
    assert store.redeem(b"zz") is None  # unknown
    now[0] = 11
    assert store.redeem(b"b") is None  # expired
    store.add(_ticket(b"c"), "c")
    store.add(_ticket(b"d"), "d")
    store.add(_ticket(b"e"), "e")
    assert len(store) == 2 and store.redeem(b"c") is None  # evicted
    assert (store.issued, store.redeemed, store.refused) == (5, 1, 4)


def test_ticket_cache_persists_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"
    cache = TicketCache(path)
    cache.store(("10.0.0.1", 443), _ticket(b"one"), "spiffe://x/server")
    cache.store(("10.0.0.1", 443), _ticket(b"expired", lifetime=-1), "spiffe://x/server")
    assert path.stat().st_mode & 0o777 == 0o600
    restored = TicketCache(path)
    assert restored.count(("10.0.0.1", 443)) == 2
    taken = restored.take(("10.0.0.1", 443))  # the expired one is skipped
    assert taken is not None
    assert taken.ticket.ticket == b"one" and taken.identity == "spiffe://x/server"
    assert taken.ticket.other_extensions == [(0x39, b"\x01\x02")]
    assert TicketCache(path).count(("10.0.0.1", 443)) == 0
    path.write_text('{"10.0.0.1:443": [{"format": "of another version"}]}')
    assert TicketCache(path).count(("10.0.0.1", 443)) == 0  # only costs a full handshake
    path.write_text("")
    assert TicketCache(path).count(("10.0.0.1", 443)) == 0
    # Entries a hand (or another version) wrote wrong are dropped the same way, not
    # raised at start (an AssertionError) or at the first flow (a time without offset).
    good = tickets._ticket_to_json(tickets.CachedTicket(_ticket(b"one"), "spiffe://x/server"))
    path.write_text(json.dumps({"10.0.0.1:443": [good]}))
    assert TicketCache(path).count(("10.0.0.1", 443)) == 1
    saved = {"10.0.0.1:443": [good]}
    for key, wrong in [
        ("other_extensions", "x"),
        ("not_valid_after", "2030-01-01T00:00:00"),
        ("server_name", 7),
        ("max_early_data_size", "lots"),
    ]:
        entry = {**saved["10.0.0.1:443"][0], key: wrong}
        path.write_text(json.dumps({"10.0.0.1:443": [entry]}))
        cache = TicketCache(path)
        assert cache.count(("10.0.0.1", 443)) == 0, key
        assert cache.take(("10.0.0.1", 443)) is None


def test_a_file_that_is_not_a_ticket_cache_is_refused_not_overwritten(tmp_path: Path) -> None:
    """The cache rewrites its file whole; it took any file it could not read for a
    damaged cache and replaced it at its first ticket (a wrong ``ticket_cache`` path, as
    root, could have replaced any file)."""
    path = tmp_path / "notes.txt"
    path.write_text("someone's notes, not JSON")
    with pytest.raises(ConfigError, match=r"notes\.txt: not a ticket cache .*not overwritten"):
        TicketCache(path)
    assert path.read_text() == "someone's notes, not JSON"
    # Found by a review: nested too deep for json (RecursionError, a traceback), and a
    # file without end (read until memory ran out).
    path.write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match=r"not a ticket cache .*not overwritten"):
        TicketCache(path)
    with pytest.raises(ConfigError, match=r"/dev/zero: larger than 16 MiB: not overwritten"):
        TicketCache(Path("/dev/zero"))


def test_restarted_client_resumes_from_its_ticket_file(tmp_path: Path) -> None:
    path = tmp_path / "tickets.json"

    async def main() -> None:
        server = server_transport()
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        await prime(client_transport(ticket_cache=TicketCache(path)), listener.address)
        restarted = client_transport(ticket_cache=TicketCache(path))
        conn, results = await early_exchange(restarted, listener.address, [b"again"])
        assert results == [b"again"] and conn.early_data == "accepted"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_without_a_ticket_early_data_is_an_ordinary_connect() -> None:
    async def main() -> None:
        listener = await server_transport().listen(("127.0.0.1", 0), Recorder())
        conn = await client_transport().connect(listener.address, early_data=True)
        assert conn.early_data == "none"
        assert await exchange(conn, b"plain") == b"plain"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_the_ticket_cache_keys_tickets_by_client_identity(tmp_path: Path) -> None:
    """Stored under one client identity, a ticket is handed to that identity only (or to a
    caller that asks for any); the file keeps the binding across a restart."""
    path = tmp_path / "tickets.json"
    cache = TicketCache(path)
    ticket = SessionTicket(
        age_add=1,
        cipher_suite=CipherSuite.AES_128_GCM_SHA256,
        not_valid_after=datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1),
        not_valid_before=datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1),
        resumption_secret=b"s" * 32,
        server_name="127.0.0.1",
        ticket=b"t" * 16,
    )
    server, admin, guest = ("127.0.0.1", 4433), "spiffe://a/sa/admin", "spiffe://a/sa/guest"
    cache.store(server, ticket, "spiffe://a/sa/server", admin)
    again = TicketCache(path)
    assert again.count(server) == 1 and again.count(server, admin) == 1
    assert again.count(server, guest) == 0
    assert again.take(server, guest) is None
    taken = again.take(server, admin)
    assert taken is not None and taken.identity == "spiffe://a/sa/server"
    assert again.count(server) == 0
