"""The pool drops the connections of an endpoint found dead (issue 12): over loopback QUIC."""

from __future__ import annotations

import logging

import pytest

from quicmesh.sidecar.circuit import CircuitBreaker
from quicmesh.sidecar.config import CircuitBreakerConfig
from quicmesh.sidecar.pool import EndpointPool
from quicmesh.tls import DevCA, TrustBundle
from tests.quic_helpers import (
    CA,
    TARGET,
    Recorder,
    client_transport,
    run,
    server_transport,
    until,
)


def test_retired_connections_take_no_new_flow_and_close_when_idle() -> None:
    async def main() -> None:
        listener = await server_transport().listen(("127.0.0.1", 0), Recorder())
        breaker = CircuitBreaker(CircuitBreakerConfig())
        pool = EndpointPool(listener.address, client_transport(), breaker, connect_timeout=5)
        busy, first, _ = await pool.open_stream(TARGET, {})
        assert pool.connections_opened == 1
        pool.retire_connections("failed its health checks")
        # The busy connection stays for its flow but takes no new one: a new one is dialled.
        assert not first.is_closed
        other, second, _ = await pool.open_stream(TARGET, {})
        assert second is not first
        assert pool.connections_opened == 2
        # An idle retired connection is closed at once.
        other.write_eof()
        await other.read()
        await until(lambda: second.active_streams == 0)
        pool.retire_connections("ejected")
        assert all(p.connection is not second for p in pool.connections)
        # The busy one closes once its last flow has ended.
        busy.write(b"bye")
        busy.write_eof()
        assert await busy.read() == b"bye"
        await until(lambda: first.active_streams == 0)
        pool.close_idle(0.0, 60.0)
        await until(lambda: first.is_closed, timeout=10)
        assert pool.connections == []
        assert breaker.connections == 0
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_ca_taken_out_of_the_trust_bundle_retires_the_connections_it_verified() -> None:
    """A review of the day's change: the inbound side refused peers a removed CA had
    vouched for, but a cluster's pooled connections (verified with the old bundle) kept
    taking new flows when only the trust bundle changed. A bundle that adds a CA keeps
    them (the first step of a CA rotation)."""

    async def main() -> None:
        listener = await server_transport().listen(("127.0.0.1", 0), Recorder())
        breaker = CircuitBreaker(CircuitBreakerConfig())
        transport = client_transport()
        pool = EndpointPool(listener.address, transport, breaker, connect_timeout=5)
        stream, first, _ = await pool.open_stream(TARGET, {})
        stream.write_eof()
        await stream.read()
        await until(lambda: first.active_streams == 0)
        other = DevCA().trust_bundle
        both = TrustBundle.from_pem(CA.trust_bundle.pem + other.pem)
        transport.set_identity(transport.identity, both)  # a CA added: kept
        stream, same, _ = await pool.open_stream(TARGET, {})
        assert same is first and pool.connections_opened == 1
        stream.write_eof()
        await stream.read()
        await until(lambda: first.active_streams == 0)
        transport.set_identity(transport.identity, CA.trust_bundle)  # the other removed
        stream, second, _ = await pool.open_stream(TARGET, {})
        assert second is not first and pool.connections_opened == 2
        pool.close_idle(0.0, 60.0)
        await until(lambda: first.is_closed, timeout=10)
        stream.close()
        await pool.close()
        listener.close()
        await listener.wait_closed()

    run(main())


def test_a_peer_going_away_on_every_connection_is_logged_once_an_interval(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A draining peer sends a GOAWAY on every connection dialled to it, one a flow: the
    pool says so once per 10 s with a count, not a line per connection (a review of a
    drain saw 400 such lines a second)."""
    from quicmesh.logs import RateLimitedLog
    from quicmesh.sidecar import pool as pool_module

    monkeypatch.setattr(pool_module, "POOL_LOG", RateLimitedLog(pool_module.logger))

    async def main() -> None:
        listener = await server_transport().listen(("127.0.0.1", 0), Recorder())
        breaker = CircuitBreaker(CircuitBreakerConfig())
        pool = EndpointPool(listener.address, client_transport(), breaker, connect_timeout=5)
        for _ in range(5):
            stream, connection, _ = await pool.open_stream(TARGET, {})
            await until(lambda: any(not c.going_away for c in listener.connections))
            for accepted in listener.connections:
                accepted.go_away()
            await until(lambda c=connection: c.going_away)
            pool.sweep_closed()  # (retires it: "the peer is going away")
            stream.write_eof()
            await stream.read()
        await pool.close()
        listener.close()
        await listener.wait_closed()

    with caplog.at_level(logging.INFO, logger="quicmesh.sidecar.pool"):
        run(main())
    said = [r.getMessage() for r in caplog.records if "going away (GOAWAY)" in r.getMessage()]
    assert len(said) == 1, said
