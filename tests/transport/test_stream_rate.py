"""Issue 13, finding 5 (stream churn): new streams per peer identity are granted
at a bounded rate through QUIC stream credit (MAX_STREAMS), shared by all of the
identity's connections, and the credit held back is granted later without the
peer sending anything (the connection's timer), so it never stalls.

Real loopback QUIC; the rate is small so that the bounds are wide.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh import DevCA, MeshStream, QuicTransport
from quicmesh.errors import ConfigError
from quicmesh.transport._stream_rate import StreamRate, StreamRates

CA = DevCA()
SERVER = CA.issue("spiffe://mesh.local/ns/default/sa/server")
CHURNER = CA.issue("spiffe://mesh.local/ns/default/sa/churner")
OTHER = CA.issue("spiffe://mesh.local/ns/default/sa/other")
TARGET = "echo.default.svc:7"
RATE = 10.0
SLOTS = 4


async def _echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
    stream.write_eof()


async def _churn(conns: list[Any], seconds: float) -> int:
    """Open, use and close streams one after another on each connection; count them."""
    done = 0
    deadline = time.monotonic() + seconds

    async def loop(conn: Any) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            stream = await asyncio.wait_for(conn.open_stream(TARGET), 5)
            stream.write(b"x")
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(), 5) == b"x"
            done += 1

    await asyncio.gather(*(loop(conn) for conn in conns))
    return done


async def _scenario(rate: float | None) -> tuple[int, int]:
    server = QuicTransport(
        identity=SERVER, trust=CA.trust_bundle, max_streams=SLOTS, max_stream_rate=rate
    )
    listener = await server.listen(("127.0.0.1", 0), _echo)
    churner = QuicTransport(identity=CHURNER, trust=CA.trust_bundle)
    other = QuicTransport(identity=OTHER, trust=CA.trust_bundle)
    conns = [await churner.connect(listener.address) for _ in range(2)]
    other_conn = await other.connect(listener.address)
    try:
        churned, others = await asyncio.gather(_churn(conns, 2.0), _churn([other_conn], 2.0))
    finally:
        for conn in [*conns, other_conn]:
            conn.close()
            await conn.wait_closed()
        listener.close()
        await listener.wait_closed()
    return churned, others


def test_an_identity_gets_new_streams_at_the_rate_over_all_its_connections() -> None:
    churned, others = asyncio.run(asyncio.wait_for(_scenario(RATE), 60))
    # Two connections share the identity's bucket: each starts with SLOTS credit,
    # then RATE per second in all (plus the burst of SLOTS).
    assert churned <= 2 * SLOTS + SLOTS + RATE * 2.0 * 1.5
    # The held-back credit keeps coming (the timer grants it): no stall.
    assert churned >= RATE * 2.0 * 0.5
    # Another identity has its own bucket.
    assert others >= RATE * 2.0 * 0.5


def test_without_a_rate_streams_are_only_bounded_by_concurrency() -> None:
    churned, _ = asyncio.run(asyncio.wait_for(_scenario(None), 60))
    assert churned > 2 * SLOTS + SLOTS + RATE * 2.0 * 1.5


def test_a_rate_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_stream_rate"):
        QuicTransport(identity=SERVER, trust=CA.trust_bundle, max_stream_rate=0)


@given(
    rate=st.floats(1, 10_000),
    burst=st.floats(1, 1000),
    steps=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 500)), max_size=50),
)
def test_the_bucket_never_grants_more_than_burst_plus_rate_times_time(
    rate: float, burst: float, steps: list[tuple[float, int]]
) -> None:
    bucket = StreamRate(rate, burst, now=0.0)
    now = 0.0
    granted = 0
    for advance, wanted in steps:
        now += advance
        got = bucket.take(wanted, now)
        assert 0 <= got <= wanted
        granted += got
    assert granted <= burst + rate * now + 1e-6


def test_identities_share_one_bucket_while_in_use() -> None:
    rates = StreamRates(10.0, burst=5)
    first = rates.for_identity("spiffe://a", 0.0)
    assert first is rates.for_identity("spiffe://a", 1.0)
    assert first is not rates.for_identity("spiffe://b", 1.0)
    assert StreamRates(None, burst=5).for_identity("spiffe://a", 0.0) is None
