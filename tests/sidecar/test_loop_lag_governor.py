"""Issue 13, stream churn: the overload action on event-loop delay.

The sidecar has one event loop; when a timer probe fires more than
``max_lag`` late, the identity that opened the most streams lately gets its
new-stream credit cut (AIMD), never an identity opening few streams, and gets it
back once the loop is calm. Sans-IO units (hypothesis included) and one real
loopback run: a churning identity against an ``InboundListener`` whose loop is
made late, while a light identity's flows carry on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from quic_helpers import CA, CLIENT, SERVER, require_engine, run

from quicmesh import PeerConnection, QuicTransport, StreamRefused
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.flows import FlowTracker
from quicmesh.sidecar.inbound import InboundListener
from quicmesh.sidecar.metrics import Metrics
from quicmesh.sidecar.overload import StreamRateGovernor
from quicmesh.sidecar.policy import allowed_nowhere
from quicmesh.sidecar.stats import ListenerStats

CHURNER = "spiffe://mesh.local/ns/default/sa/churner"
INBOUND = """
node: {name: b, identity: spiffe://mesh.local/ns/default/sa/server}
tls: {ca_dir: ca}
admin: {address: "127.0.0.1:15000"}
listeners:
  inbound:
    - {name: mesh, address: "127.0.0.1:{port}", transports: [quic], destinations: ["127.0.0.1:*"],
       max_stream_rate: 1000, max_streams: 8, engine: "{engine}"}
"""
LIGHT = "spiffe://mesh.local/ns/default/sa/light"
CLIENT_ONLY = (
    "policies: [{identity: 'spiffe://mesh.local/ns/default/sa/client',"
    " destinations: ['127.0.0.1:*']}],"
)


def _open(governor: StreamRateGovernor, identity: str, count: int) -> None:
    for _ in range(count):
        governor.opened(identity)


def test_a_late_loop_cuts_the_heaviest_identity_by_half_of_what_it_opened() -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000)
    assert (governor.floor, governor.heavy, governor.late) == (100, 200, 2)
    assert governor.observe(0.0, 0.0) == {}
    _open(governor, CHURNER, 1800)
    _open(governor, LIGHT, 50)
    assert governor.observe(0.01, 0.5) == {}  # on time: nothing
    assert governor.observe(0.2, 0.5) == {}  # one late probe may be the machine
    governor.observe(0.01, 0.5)  # on time again: the count starts over
    assert governor.observe(0.2, 0.5) == {}
    # Two in a row: 1,800 streams in 1.5 s of window, 1,200/s opened: cut to half
    # of the lower of that and its rate (1,000/s).
    assert governor.observe(0.2, 0.5) == {CHURNER: 500.0}
    assert governor.observe(0.2, 0.6) == {}  # hold: one cut per 0.2 s
    assert governor.observe(0.2, 0.71) == {CHURNER: 250.0}
    for step in range(1, 10):
        governor.observe(0.2, 0.71 + 0.21 * step)
    assert governor.rates == {CHURNER: governor.floor}  # never below the floor
    assert LIGHT not in governor.rates
    assert governor.cuts == 4  # 500, 250, 125, then the floor


def test_an_identity_opening_few_streams_is_never_cut() -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000)
    governor.observe(0.0, 0.0)
    # 150 in the window: a light peer's 50 flows a second, and those a stall held
    # back arriving in a burst
    _open(governor, LIGHT, 150)
    for step in range(20):
        assert governor.observe(0.5, 0.1 * step) == {}
    assert governor.rates == {} and governor.cuts == 0


def test_a_calm_loop_gives_the_rate_back_step_by_step() -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000, recover=2.0)
    governor.observe(0.0, 0.0)
    _open(governor, CHURNER, 3000)
    governor.observe(0.3, 0.48)
    assert governor.observe(0.3, 0.5) == {CHURNER: 500.0}
    assert governor.observe(0.3, 0.8) == {CHURNER: 250.0}
    now, changes = 0.8, []
    while governor.rates and now < 30:
        now += 0.02
        if change := governor.observe(0.001, now):
            changes.append(change)
    assert changes == [{CHURNER: 500.0}, {CHURNER: None}]  # doubled, then the base again
    assert governor.observe(0.001, now + 5) == {}
    assert governor.lag < 0.05  # the last full window was calm


def test_an_identity_allowed_nowhere_is_held_and_never_cut_or_restored() -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000, recover=2.0)
    governor.observe(0.0, 0.0)
    assert governor.deny(CHURNER, 10) == {CHURNER: 10}
    assert governor.deny(CHURNER, 10) == {}  # held already: nothing to apply
    # The loop falls behind with the denied identity the busiest: the next
    # busiest (over `heavy`) is the one cut.
    _open(governor, CHURNER, 3000)
    _open(governor, LIGHT, 600)
    governor.observe(0.3, 0.48)
    assert governor.observe(0.3, 0.5) == {LIGHT: 200.0}
    now = 0.5
    while governor.rates and now < 30:  # calm: the cut identity gets its rate back...
        now += 0.02
        assert CHURNER not in governor.observe(0.001, now)
    assert governor.rates == {} and governor.denied == {CHURNER: 10}  # ...not the denied one


def test_a_new_configuration_releases_identities_it_allows_and_rerates_the_others() -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000)
    governor.deny(CHURNER, 10)
    governor.deny(LIGHT, 10)
    # LIGHT is allowed somewhere now; the denied rate changed to 5.
    assert governor.review_denied(lambda identity: identity == CHURNER, 5) == {
        LIGHT: None,
        CHURNER: 5,
    }
    assert governor.denied == {CHURNER: 5}
    assert governor.review_denied(lambda identity: True, 5) == {}


@pytest.mark.parametrize(
    ("policies", "identity", "nowhere"),
    [
        ("", CHURNER, False),  # no policies: the destinations alone decide
        (CLIENT_ONLY, CHURNER, True),
        (CLIENT_ONLY, CLIENT.spiffe_id, False),
        (
            "policies: [{identity: 'spiffe://mesh.local/ns/default/*',"
            " destinations: ['127.0.0.1:9']}],",
            CHURNER,
            False,
        ),
    ],
)
def test_allowed_nowhere_reads_the_listener_policies(
    policies: str, identity: str, nowhere: bool
) -> None:
    config = _listener("aioquic", options=policies).config
    assert allowed_nowhere(config, identity) is nowhere


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_an_identity_no_policy_allows_is_held_at_the_denied_rate(engine: str) -> None:
    """A mesh identity that no policy allows gets its streams refused (403), and
    from the first one on it may open ``denied_stream_rate`` new streams a second
    (here 1) beyond its connection's ``max_streams`` (8), whatever the loop's
    delay; an allowed identity's flows carry on. A reload that allows it gives
    the rate back."""
    require_engine(engine)
    churner_identity = CA.issue(CHURNER)

    async def main() -> None:
        app = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        stats = ListenerStats(name="mesh", kind="inbound")
        listener = _listener(engine, options=f"{CLIENT_ONLY} denied_stream_rate: 1,", stats=stats)
        await listener.start()
        address = listener._listeners[0].address
        loop = asyncio.get_running_loop()
        conns = []
        try:
            churner = QuicTransport(identity=churner_identity, trust=CA.trust_bundle)
            conns.append(churn_conn := await churner.connect(address))
            light_client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle)
            conns.append(light_conn := await light_client.connect(address))
            refused = 0

            async def churn() -> None:
                nonlocal refused
                while True:
                    with pytest.raises(StreamRefused) as info:
                        stream = await churn_conn.open_stream(target)
                        await stream.read()
                    assert info.value.status == 403
                    refused += 1

            churning = asyncio.create_task(churn())
            started = loop.time()
            for _ in range(5):  # the allowed identity's flows go through meanwhile
                stream = await asyncio.wait_for(light_conn.open_stream(target), 10)
                stream.write(b"ping")
                stream.write_eof()
                assert await asyncio.wait_for(stream.read(), 10) == b"ping"
            await asyncio.sleep(1.0)
            churning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await churning
            elapsed = loop.time() - started
            # Without the hold (max_stream_rate 1000) the churner gets hundreds.
            assert 1 <= refused <= 8 + 1 + 2 * elapsed, (refused, elapsed)
            assert listener.governor.denied == {CHURNER: 1}
            quic = listener._transports[0]
            assert isinstance(quic, QuicTransport)
            assert quic.stream_rates.rate_of(CHURNER) == 1
            assert quic.stream_rates.rate_of(CLIENT.spiffe_id) == 1000
            text = _metrics_text(stats)
            assert 'quicmesh_listener_denied_identities_held{listener="mesh"} 1.0' in text
            # A reload whose policies allow the churner somewhere releases it.
            listener.config = _listener(engine).config
            assert listener.governor.denied == {}
            assert quic.stream_rates.rate_of(CHURNER) == 1000
        finally:
            await _close_all(conns, listener, app)

    run(main())


@given(
    st.lists(
        st.tuples(
            st.floats(0, 0.3),  # probe delay
            st.floats(0.001, 0.1),  # time to the next probe
            st.dictionaries(st.sampled_from("abcd"), st.integers(0, 60), max_size=4),
        ),
        max_size=200,
    )
)
def test_rates_stay_between_the_floor_and_the_base_and_light_identities_keep_theirs(
    probes: list[tuple[float, float, dict[str, int]]],
) -> None:
    governor = StreamRateGovernor(max_lag=0.05, base_rate=1000, floor=10, heavy=100, late=1)
    now = 0.0
    opened: Counter[str] = Counter()
    applied: dict[str, float] = {}
    for delay, advance, streams in probes:
        for identity, count in streams.items():
            _open(governor, identity, count)
            opened[identity] += count
        now += advance
        for identity, rate in governor.observe(delay, now).items():
            if rate is None:
                applied.pop(identity)
            else:
                assert 10 <= rate < 1000
                applied[identity] = rate
    assert applied == governor.rates
    # An identity is only ever cut after opening more than `heavy` a second in
    # a window of at least `window` seconds.
    for identity in governor.rates:
        assert opened[identity] > 100 * governor.window


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_a_churning_identity_is_slowed_when_the_loop_is_late_and_the_light_one_is_not(
    engine: str,
) -> None:
    require_engine(engine)
    churner_identity = CA.issue(CHURNER)

    async def main() -> None:
        app = await asyncio.start_server(_echo, "127.0.0.1", 0)
        target = f"127.0.0.1:{app.sockets[0].getsockname()[1]}"
        stats = ListenerStats(name="mesh", kind="inbound")
        listener = _listener(engine, stats=stats)
        # Everything here shares one loop with the stalls (and a loaded machine
        # slows it further), so the churner is slow: "heavy" is lowered from its
        # default 200 streams/s; the light identity opens at most 5 a second.
        listener.governor = StreamRateGovernor(base_rate=1000, heavy=5, floor=2)
        await listener.start()
        address = listener._listeners[0].address
        loop = asyncio.get_running_loop()
        stop = loop.time() + 30
        conns = []
        try:

            def stall() -> None:  # the CPU a churn costs, made visible: 60 ms busy every 80 ms
                if loop.time() < stop and not listener.governor.rates:
                    end = time.monotonic() + 0.06
                    while time.monotonic() < end:
                        pass
                    loop.call_later(0.02, stall)

            churner = QuicTransport(identity=churner_identity, trust=CA.trust_bundle)
            conns.append(churn_conn := await churner.connect(address))
            light_client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle)
            conns.append(light_conn := await light_client.connect(address))

            async def churn() -> None:
                while loop.time() < stop and not listener.governor.rates:
                    streams = [await churn_conn.open_stream(target) for _ in range(8)]
                    for stream in streams:
                        stream.abort()

            async def light() -> int:
                done = 0
                while loop.time() < stop and not listener.governor.rates:
                    stream = await light_conn.open_stream(target)
                    stream.write(b"ping")
                    stream.write_eof()
                    assert await stream.read() == b"ping"
                    done += 1
                    await asyncio.sleep(0.2)
                return done

            loop.call_soon(stall)
            _, flows = await asyncio.wait_for(asyncio.gather(churn(), light()), 40)
            assert flows > 0
            governor = listener.governor
            assert CHURNER in governor.rates and CLIENT.spiffe_id not in governor.rates
            assert governor.cuts >= 1
            quic = listener._transports[0]
            assert isinstance(quic, QuicTransport)
            assert quic.stream_rates.rate_of(CHURNER) == governor.rates[CHURNER] < 1000
            # The light identity still gets a flow through at once.
            stream = await asyncio.wait_for(light_conn.open_stream(target), 10)
            stream.write(b"still")
            stream.write_eof()
            assert await stream.read() == b"still"
            text = _metrics_text(stats)
            assert 'quicmesh_listener_overload_stream_rate_cuts_total{listener="mesh"}' in text
            assert 'quicmesh_listener_overload_slowed_identities{listener="mesh"} 1.0' in text
            assert "quicmesh_listener_event_loop_lag_seconds" in text
        finally:
            await _close_all(conns, listener, app)

    run(main())


def _metrics_text(stats: ListenerStats) -> str:
    """The listener's ``/metrics`` exposition, as the admin server would serve it."""
    snapshot = {"node": "b", "ready": True, "draining": False, "reloads": {}}
    exposition = Metrics(lambda: {**snapshot, "listeners": {"mesh": stats.to_dict()}})
    return exposition.exposition().decode()


async def _close_all(
    conns: Sequence[PeerConnection], listener: InboundListener, app: asyncio.Server
) -> None:
    for conn in conns:
        conn.close()
        await conn.wait_closed()
    listener.close()
    await listener.wait_closed()
    app.close()
    await app.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):  # the churner's flows are reset
        while data := await reader.read(65536):
            writer.write(data)
    writer.close()


def test_a_zero_threshold_turns_the_probe_off() -> None:
    async def main() -> None:
        listener = _listener("aioquic", options="overload_max_loop_lag: 0s,")
        await listener.start()
        try:
            assert listener._lag_probe is None and listener.governor.max_lag == 0
        finally:
            listener.close()
            await listener.wait_closed()

    run(main())


def _listener(
    engine: str, options: str = "", stats: ListenerStats | None = None
) -> InboundListener:
    """An inbound listener of :data:`INBOUND` on a free port (``options``: more keys)."""
    document = (
        INBOUND.replace("{port}", str(_free_udp_port()))
        .replace("{engine}", engine)
        .replace("max_streams: 8,", f"max_streams: 8, {options}")
    )
    return InboundListener(
        parse_config(document, source="b.yaml", base_dir=Path(".")).inbound[0],
        SERVER,
        CA.trust_bundle,
        stats or ListenerStats(name="mesh", kind="inbound"),
        FlowTracker(),
        lambda record: None,
    )


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_the_probe_keeps_running_on_uvloop_when_it_fires_late(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop's call_at() of a time less than a millisecond ahead (or already past: a
    probe that ran late on a busy machine) returns a plain Handle without when(); the
    probe must neither raise nor stop (it did both: the governor was off from then on)."""
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.setattr("quicmesh.sidecar.inbound.LOOP_LAG_TICK", 0.0001)
    errors: list[dict[str, object]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, context: errors.append(context)
        )
        listener = _listener("aioquic")
        await listener.start()
        try:
            await asyncio.sleep(0.01)
            time.sleep(0.08)  # the loop is blocked: the next probe fires 80 ms late
            await asyncio.sleep(0.01)
            assert listener.governor._window_lag >= 0.07, "the probe stopped"
        finally:
            listener.close()
            await listener.wait_closed()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert errors == []
