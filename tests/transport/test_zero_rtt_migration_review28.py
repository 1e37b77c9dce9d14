"""Review 28 (0-RTT and migration): resumption bounded by the client certificate and
the trust bundle, migration refused before the handshake completes, the native 0-RTT
cap under loss, the ``early_data`` type check and its reported outcomes, and the
benchmarks' argument errors. Real loopback sockets throughout."""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import time
from typing import Any

import pytest
import quic_helpers
from quic_helpers import CA, CLIENT, SERVER, Recorder, exchange, run, until

from quicmesh import ConfigError, ConnectError, QuicTransport, TrustBundle, TunnelError
from quicmesh.bench.relay import UdpRelay
from quicmesh.transport.tickets import TicketStore


async def prime(client: QuicTransport, address: tuple[str, int]) -> None:
    """One full handshake, so that the client holds a ticket for ``address`` (the
    native engine's arrive with the handshake, before any stream data)."""
    conn = await client.connect(address)
    assert await exchange(conn, b"prime", "prime")  # (echoed, or counted)
    if client.engine.name == "aioquic":
        await until(lambda: client.ticket_cache.count(address) > 0)
    conn.close()
    await conn.wait_closed()


async def resume(client: QuicTransport, address: tuple[str, int]) -> str:
    """Connect with early data, run one stream; the connection's 0-RTT outcome."""
    conn = await client.connect(address, early_data=True)
    stream = await conn.open_stream("a.default.svc:80", wait_response=False)
    stream.write(b"again")
    stream.write_eof()
    assert await asyncio.wait_for(stream.read(), 10) == b"again"
    outcome: str = conn.early_data
    await until(lambda: client.ticket_cache.count(address) > 0)
    conn.close()
    await conn.wait_closed()
    return outcome


# -- 1. resumption never outlives the client certificate, nor a removed CA ---------


def test_tickets_of_a_resumed_connection_expire_with_the_client_certificate() -> None:
    """A resumption presents no certificate and issues fresh tickets: without a bound,
    a client resuming in a chain was served for ever after its certificate expired.
    The server's clock is moved past the certificate's expiry (not its tickets' hour)."""
    expires = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)
    client_identity = CA.issue(CLIENT.spiffe_id, not_after=expires)
    offset = [0.0]
    store = TicketStore(lifetime=24 * 3600, clock=lambda: time.time() + offset[0])

    async def main() -> None:
        server = quic_helpers.server_transport(engine="aioquic", ticket_store=store)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = QuicTransport(identity=client_identity, trust=CA.trust_bundle, engine="aioquic")
        await prime(client, listener.address)
        assert await resume(client, listener.address) == "accepted"
        # The tickets the resumed connection issued carry the certificate's expiry.
        records = list(store._tickets.values())
        assert records
        assert all(r.valid_until == expires.replace(microsecond=0).timestamp() for r in records)
        offset[0] = 2 * 3600  # past the certificate's expiry, within the tickets' lifetime
        assert await resume(client, listener.address) == "rejected"
        listener.close()
        await listener.wait_closed()

    run(main())


def test_adding_a_ca_keeps_the_tickets_and_removing_one_forgets_the_clients() -> None:
    """A CA added (the first step of a CA rotation) must not lose every resumption; a
    client whose bundle drops a CA must not resume with a server verified under it."""
    other = quic_helpers.DevCA()
    both = TrustBundle.from_pem(CA.trust_bundle.pem + other.trust_bundle.pem)

    async def main() -> None:
        server = quic_helpers.server_transport(engine="aioquic")
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        client = QuicTransport(identity=CLIENT, trust=both, engine="aioquic")
        await prime(client, listener.address)
        server.set_identity(SERVER, both)
        assert len(server.ticket_store) > 0
        assert await resume(client, listener.address) == "accepted"
        client.set_identity(CLIENT, CA.trust_bundle)  # the client's bundle drops a CA
        assert client.ticket_cache.count(listener.address) == 0
        conn = await client.connect(listener.address, early_data=True)
        assert conn.early_data == "none"
        conn.close()
        await conn.wait_closed()
        listener.close()
        await listener.wait_closed()

    run(main())


# -- 2. no migration before the handshake completes ---------------------------------


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_migrate_during_its_own_0rtt_handshake_is_refused_and_the_connection_lives(
    engine: str,
) -> None:
    """RFC 9000 section 9: a client does not migrate before the handshake is confirmed.
    migrate() returned, and the native engine's connection died of probe timeouts."""
    quic_helpers.require_engine(engine)

    async def main() -> None:
        server = quic_helpers.server_transport(engine=engine)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        relay = await UdpRelay(listener.address, delay=0.05).start()
        client = quic_helpers.client_transport(engine=engine)
        await prime(client, relay.address)
        conn = await client.connect(relay.address, early_data=True)
        assert conn.early_data == "attempted"
        stream = await conn.open_stream("a.default.svc:80", wait_response=False)
        stream.write(b"zero-rtt")
        with pytest.raises(ConnectError, match="cannot migrate before the handshake completes"):
            await conn.migrate()
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b"zero-rtt"
        await conn.migrate()  # once it completed, it moves
        assert await exchange(conn, b"moved", "moved") == b"moved"
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_native_migrate_while_another_connection_is_in_its_handshake_is_refused() -> None:
    """The native engine moves every connection of the endpoint: one in its handshake
    timed out (the server took its packets from the new port for another client)."""
    quic_helpers.require_engine("native")

    async def main() -> None:
        server = quic_helpers.server_transport(engine="native")
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        relay = await UdpRelay(listener.address, delay=0.05).start()
        client = quic_helpers.client_transport(engine="native")
        first = await client.connect(listener.address)
        assert await exchange(first, b"one", "one") == b"one"
        second = asyncio.ensure_future(client.connect(relay.address))
        pump: Any = first.quic._pump  # type: ignore[attr-defined]
        await until(lambda: bool(pump.connecting))
        with pytest.raises(ConnectError, match="another connection of this endpoint"):
            await first.migrate()
        other = await asyncio.wait_for(second, 10)
        assert await exchange(other, b"two", "two") == b"two"
        await first.migrate()  # no handshake under way: it moves, with the other one
        assert await exchange(first, b"three", "three") == b"three"
        assert await exchange(other, b"four", "four") == b"four"
        for conn in (first, other):
            conn.close()
            await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


# -- 3. the native 0-RTT cap and a path that duplicates datagrams --------------------


class DuplicatingRelay(UdpRelay):
    """A path that delivers every client datagram twice (the native cap counts UDP
    bytes received, duplicates and resends included)."""

    duplicate = False

    def _forward_up(self, data: bytes, client: Any) -> None:
        super()._forward_up(data, client)
        if self.duplicate:
            super()._forward_up(data, client)


async def count_bytes(stream: Any) -> None:
    total = 0
    while data := await stream.read(65536):
        total += len(data)
    stream.write(b"%d" % total)
    stream.write_eof()


def test_a_native_listener_serves_0rtt_within_the_budget_over_a_duplicating_path() -> None:
    """12 000 bytes of 0-RTT (the client's budget is 16 KiB), every datagram delivered
    twice: the native listener closed it, "more than 20480 bytes of 0-RTT data"."""
    quic_helpers.require_engine("native")

    async def main() -> None:
        server = quic_helpers.server_transport(engine="native")
        listener = await server.listen(("127.0.0.1", 0), count_bytes)
        relay = await DuplicatingRelay(listener.address, delay=0.01).start()
        client = quic_helpers.client_transport(engine="native")
        await prime(client, relay.address)
        relay.duplicate = True
        conn = await client.connect(relay.address, early_data=True)
        assert conn.early_data == "attempted"
        stream = await conn.open_stream("a.default.svc:80", wait_response=False)
        stream.write(b"y" * 12000)
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b"12000"
        assert conn.early_data == "accepted"
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


# -- 4. early_data must be a bool -----------------------------------------------------


@pytest.mark.parametrize("engine", ["aioquic", "native"])
@pytest.mark.parametrize("value", ["false", 0, None])
def test_a_non_bool_early_data_is_a_config_error(engine: str, value: Any) -> None:
    """aioquic took "false" as True (0-RTT sent and accepted); the native engine raised
    PyO3's TypeError and warned that the extension was stale."""
    quic_helpers.require_engine(engine)

    async def main() -> None:
        server = quic_helpers.server_transport(engine=engine)
        with pytest.raises(ConfigError, match="early_data must be true or false"):
            await server.listen(("127.0.0.1", 0), Recorder(), early_data=value)
        client = quic_helpers.client_transport(engine=engine)
        with pytest.raises(ConfigError, match="early_data must be true or false"):
            await client.connect(("127.0.0.1", 9), early_data=value)

    run(main())


# -- 5. and 6. the 0-RTT outcome each side reports --------------------------------------


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_the_listeners_connection_that_arrived_in_0rtt_reports_it_accepted(engine: str) -> None:
    """A native listener's connection said ``early_data == "none"`` (aioquic's,
    "accepted")."""
    quic_helpers.require_engine(engine)

    async def main() -> None:
        server = quic_helpers.server_transport(engine=engine)
        listener = await server.listen(("127.0.0.1", 0), Recorder())
        relay = await UdpRelay(listener.address, delay=0.02).start()
        client = quic_helpers.client_transport(engine=engine)
        await prime(client, relay.address)
        conn = await client.connect(relay.address, early_data=True)
        stream = await conn.open_stream("a.default.svc:80", wait_response=False)
        stream.write(b"z")
        stream.write_eof()
        assert await asyncio.wait_for(stream.read(), 10) == b"z"
        assert conn.early_data == "accepted"
        outcomes = [c.early_data for c in listener.connections if not c.is_closed]
        assert outcomes == ["accepted"]
        # And the listener counts it (its zero_rtt_accepted stayed 0 before).
        assert server.counters["zero_rtt_accepted"] == 1
        assert client.counters["zero_rtt_accepted"] == 1
        conn.close()
        await conn.wait_closed()
        relay.close()
        listener.close()
        await listener.wait_closed()

    run(main())


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_a_failed_resumed_handshake_settles_the_0rtt_outcome(engine: str) -> None:
    """Another identity now answers at the address the ticket is for: the client refuses
    it. ``early_data`` stayed "attempted" and no outcome was counted (attempted !=
    accepted + rejected)."""
    quic_helpers.require_engine(engine)
    other = CA.issue("spiffe://mesh.local/ns/default/sa/other")

    async def main() -> None:
        first = await quic_helpers.server_transport(engine=engine).listen(
            ("127.0.0.1", 0), Recorder()
        )
        relay = await UdpRelay(first.address).start()
        client = quic_helpers.client_transport(engine=engine)
        await prime(client, relay.address)
        first.close()
        await first.wait_closed()
        impostor = await quic_helpers.server_transport(other, engine=engine).listen(
            ("127.0.0.1", 0), Recorder()
        )
        relay.upstream = impostor.address
        conn = await client.connect(relay.address, early_data=True)
        assert conn.early_data == "attempted"
        stream = await conn.open_stream("a.default.svc:80", wait_response=False)
        stream.write(b"z")
        stream.write_eof()
        with pytest.raises(TunnelError):
            await asyncio.wait_for(stream.read(), 10)
        await conn.wait_closed()
        assert conn.early_data == "rejected"
        counters = client.counters
        assert counters["zero_rtt_attempted"] == 1
        assert counters["zero_rtt_accepted"] + counters["zero_rtt_rejected"] == 1
        relay.close()
        impostor.close()
        await impostor.wait_closed()

    run(main())


# -- 7. the benchmarks name the bad argument -----------------------------------------


@pytest.mark.parametrize(
    ("bench", "argv", "named"),
    [
        ("ttfb", ["--trials", "0"], "argument --trials: must be at least 1"),
        ("ttfb", ["--cases", "bogus"], "argument --cases: unknown case 'bogus'"),
        ("migration", ["--flows", "0"], "argument --flows: must be at least 1"),
        ("migration", ["--repeat", "0"], "argument --repeat: must be at least 1"),
        ("migration", ["--rate", "-1"], "argument --rate: must be a finite number above 0"),
        ("migration", ["--cases", "bogus"], "argument --cases: unknown case 'bogus'"),
    ],
)
def test_a_bad_bench_argument_is_named_on_one_line(bench: str, argv: list[str], named: str) -> None:
    """Each printed every constraint at once ("need --rtt > 0, --trials >= 1, ...")."""
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "bench", bench, *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2, result
    err = result.stderr
    assert named in err
    assert len(err.strip().splitlines()) == 1
    assert "need --" not in err
