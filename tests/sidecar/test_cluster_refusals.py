"""A flow whose CONNECT our side got wrong is refused without blaming the endpoint."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import yaml
from quic_helpers import require_engine, until

from quicmesh import TRANSPORTS, DevCA, H2Transport, MeshStream, TrustBundle
from quicmesh.errors import (
    ConnectError,
    ConnectionLost,
    InvalidHeader,
    InvalidTarget,
    StreamRefused,
    StreamReset,
)
from quicmesh.sidecar.accesslog import Outcome
from quicmesh.sidecar.cluster import (
    Cluster,
    FailedOpen,
    FlowRefused,
    OpenedFlow,
    is_connection_failure,
)
from quicmesh.sidecar.config import Address, format_address, parse_config
from quicmesh.sidecar.health import HealthState
from quicmesh.sidecar.launch import free_port
from quicmesh.sidecar.stats import ClusterStats

from .test_sidecar_config import VALID


async def _echo(stream: MeshStream) -> None:
    while data := await stream.read(65536):
        stream.write(data)
    stream.write_eof()


async def _echoed(cluster: Cluster, flow: OpenedFlow, data: bytes) -> None:
    """Send ``data`` and EOF on ``flow`` (to an echo), read it all back, end the flow."""
    flow.stream.write(data)
    flow.stream.write_eof()
    assert await flow.stream.read() == data
    cluster.flow_finished(flow, len(data), len(data))


def _h2_cluster(ca: DevCA, endpoints: list[Address], transport: str = "h2", **keys: Any) -> Cluster:
    """A started HTTP/2 (or ``transport``) cluster (the configuration's first, with
    ``keys``) to ``endpoints``."""
    document = copy.deepcopy(VALID)
    cluster_doc = document["clusters"][0]
    cluster_doc.update(
        transport=transport, endpoints=[format_address(a) for a in endpoints], **keys
    )
    for key in ("congestion_control", "max_datagram_size", "early_data", "health_check"):
        cluster_doc.pop(key, None)
    config = parse_config(yaml.safe_dump(document), source="s.yaml").clusters[0]
    client = TRANSPORTS[transport](
        identity=ca.issue("spiffe://mesh.local/ns/default/sa/a"), trust=ca.trust_bundle
    )
    cluster = Cluster(config, client, ClusterStats(config.name))
    cluster.start()
    return cluster


def test_an_invalid_target_is_refused_and_never_ejects_the_endpoint() -> None:
    async def main() -> None:
        ca = DevCA()
        server = H2Transport(
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
        )
        listener = await server.listen(("127.0.0.1", 0), _echo)
        cluster = _h2_cluster(ca, [listener.address])
        config = cluster.config
        try:
            threshold = config.outlier_detection.consecutive_connect_failures
            for _ in range(threshold + 2):
                try:
                    await cluster.open_flow(target="10.0.0.999:80")
                except FlowRefused as refused:
                    assert refused.outcome is Outcome.REFUSED
                    assert "10.0.0.999:80" in refused.reason
                else:
                    raise AssertionError("an invalid target was opened")
            for _ in range(threshold + 2):
                # A header our side got wrong (a reserved name) is a usage error too.
                try:
                    await cluster.open_flow(headers={"connection": "close"})
                except FlowRefused as refused:
                    assert refused.outcome is Outcome.REFUSED
                    assert "'connection' is reserved" in refused.reason
                else:
                    raise AssertionError("a reserved header was sent")
            assert cluster.stats.connect_failures == 0
            assert cluster.stats.retries == 0
            now = asyncio.get_running_loop().time()
            assert cluster.health[listener.address].state(now) is HealthState.HEALTHY
            await _echoed(cluster, await cluster.open_flow(), b"ping")
        finally:
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize(
    ("error", "counted"),
    [
        (TimeoutError(), True),
        (ConnectError("cannot connect: Connection refused"), True),
        (ConnectionRefusedError(), True),
        (ConnectionLost("peer closed the connection"), True),
        (StreamReset("stream 0 lost: handshake failed"), True),  # lost with its connection
        (StreamReset("stream 0 reset by peer (error code 0x10c)", 0x10C), False),
        (StreamRefused(502, "cannot reach the app"), False),
        (InvalidTarget("target '10.0.0.999:80' has an invalid host name"), False),
        (InvalidHeader("header 'connection' is reserved and cannot be set"), False),
    ],
)
def test_outlier_detection_counts_only_connection_failures_and_timeouts(
    error: BaseException, counted: bool
) -> None:
    assert is_connection_failure(error) is counted


def test_a_first_attempt_made_outside_is_the_flows_answer_or_retried_elsewhere() -> None:
    """``open_flow(failed=...)``: an engine flow's refusal read by the engine is the flow's
    answer (raised at once, nothing opened, no retry); a draining peer's 503 (or no answer
    in time) was the first attempt, and the retry goes to another endpoint."""

    async def main() -> None:
        ca = DevCA()
        server = H2Transport(
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
        )
        opened: list[int] = []

        def serving(index: int) -> Callable[[MeshStream], Awaitable[None]]:
            async def handler(stream: MeshStream) -> None:
                opened.append(index)
                await _echo(stream)

            return handler

        listeners = [await server.listen(("127.0.0.1", 0), serving(i)) for i in range(2)]
        cluster = _h2_cluster(ca, [listener.address for listener in listeners], connect_retries=1)
        first = cluster.endpoints[listeners[0].address]
        try:
            refusal = StreamRefused(403, "not allowed")
            refused = FlowRefused(Outcome.REFUSED, str(refusal), first.name)
            with pytest.raises(FlowRefused) as caught:
                await cluster.open_flow(failed=FailedOpen(first, refused))
            assert caught.value is refused
            assert opened == [] and cluster.stats.retries == 0
            assert cluster.stats.streams_total == 0

            draining = FlowRefused(Outcome.CONNECT_FAILED, "peer refused ... 503", first.name)
            flow = await cluster.open_flow(failed=FailedOpen(first, draining))
            assert flow.endpoint.address == listeners[1].address  # not the one that refused
            assert cluster.stats.retries == 1
            await _echoed(cluster, flow, b"ping")
            assert opened == [1]
        finally:
            await cluster.close()
            for listener in listeners:
                listener.close()
                await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_a_503_that_no_other_endpoint_takes_is_the_flows_refusal_by_that_peer() -> None:
    """A full or draining peer's 503 is a failed attempt (another endpoint may take the
    flow), but with none left the flow was refused, as the peer's own record says (it
    was logged connect_failed), and by whom (the peer identity was empty)."""
    server_id = "spiffe://mesh.local/ns/default/sa/b"

    async def full(stream: MeshStream) -> None:
        stream.refuse(503, "max_streams_per_identity (2) reached")

    async def main() -> None:
        ca = DevCA()
        server = H2Transport(identity=ca.issue(server_id), trust=ca.trust_bundle)
        listener = await server.listen(("127.0.0.1", 0), full)
        cluster = _h2_cluster(ca, [listener.address])
        try:
            with pytest.raises(FlowRefused) as caught:
                await cluster.open_flow()
            assert caught.value.outcome is Outcome.REFUSED
            assert (
                "503" in caught.value.reason and "max_streams_per_identity" in caught.value.reason
            )
            assert caught.value.peer_identity == server_id
            assert cluster.stats.connect_failures == 0
        finally:
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_new_flows_pass_over_an_endpoint_that_is_going_away(engine: str) -> None:
    """Once a peer says it is going away (HTTP/3 GOAWAY: it is draining), the cluster
    sends new flows to its other endpoints; a review counted about 1,500 flows in 3 s
    dialled to a draining endpoint and refused there. With no other endpoint, the
    draining one is still used."""
    from quic_helpers import CA, CLIENT, SERVER

    from quicmesh import QuicTransport

    if engine == "native":
        pytest.importorskip("quicmesh._native")

    async def main() -> None:
        server = QuicTransport(identity=SERVER, trust=CA.trust_bundle, engine=engine)
        first = await server.listen(("127.0.0.1", 0), _echo)
        second = await server.listen(("127.0.0.1", 0), _echo)
        document = copy.deepcopy(VALID)
        cluster_doc = document["clusters"][0]
        cluster_doc.update(
            endpoints=[format_address(first.address), format_address(second.address)],
            load_balancing="round_robin",
            engine=engine,
            early_data=False,
        )
        cluster_doc.pop("health_check", None)
        config = parse_config(yaml.safe_dump(document), source="s.yaml").clusters[0]
        client = QuicTransport(identity=CLIENT, trust=CA.trust_bundle, engine=engine)
        cluster = Cluster(config, client, ClusterStats(config.name))
        cluster.start()
        try:
            opened = [await cluster.open_flow(target="127.0.0.1:1") for _ in range(4)]
            assert {o.endpoint.address for o in opened} == {first.address, second.address}
            (draining,) = first.connections
            assert draining.go_away()
            going = next(o.connection for o in opened if o.endpoint.address == first.address)
            while not going.going_away:
                await asyncio.sleep(0.005)
            later = [await cluster.open_flow(target="127.0.0.1:1") for _ in range(6)]
            assert {o.endpoint.address for o in later} == {second.address}
            # The only endpoint left: it takes the flow (a new connection there).
            alone = await cluster.open_flow(target="127.0.0.1:1", endpoint=first.address)
            assert alone.endpoint.address == first.address
            assert alone.connection is not going
            for flow in [*opened, *later, alone]:
                flow.stream.abort()
                cluster.flow_finished(flow, 0, 0)
        finally:
            await cluster.close()
            for listener in (first, second):
                listener.close()
                await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_an_endpoint_ejected_for_refusing_our_certificate_returns_when_ours_changes() -> None:
    """Our certificate refused (the peer does not trust our CA): the endpoint is ejected
    as for any failed handshake, and takes flows again as soon as our certificate
    changes; before, it stayed ejected after ours was fixed."""

    async def main() -> None:
        ours, theirs = DevCA(), DevCA()
        server = H2Transport(
            identity=theirs.issue("spiffe://mesh.local/ns/default/sa/b"),
            trust=theirs.trust_bundle,  # not ours
        )
        listener = await server.listen(("127.0.0.1", 0), _echo)
        outlier = {"consecutive_connect_failures": 3, "max_ejection_percent": 100}
        cluster = _h2_cluster(
            ours, [listener.address], outlier_detection=outlier, healthy_panic_threshold=0
        )  # (its only endpoint ejected: refused, not tried in panic)
        # We trust them; they do not trust us.
        both = TrustBundle(ours.trust_bundle.certificates + theirs.trust_bundle.certificates)
        cluster.transport.set_identity(ours.issue("spiffe://mesh.local/ns/default/sa/a"), both)
        try:
            outcomes = []
            for _ in range(4):
                try:
                    await cluster.open_flow()
                except FlowRefused as refused:
                    outcomes.append(refused.outcome)
                else:
                    raise AssertionError("a refused certificate opened a flow")
            assert outcomes[-1] is Outcome.NO_HEALTHY_ENDPOINT, outcomes
            assert cluster.stats.handshake_failures["our_certificate_refused"] >= 3
            # Our certificate is fixed (one they trust): the endpoint is back at once.
            cluster.transport.set_identity(
                theirs.issue("spiffe://mesh.local/ns/default/sa/a"), both
            )
            cluster.our_identity_changed()
            flow = await cluster.open_flow()
            flow.stream.write(b"back")
            flow.stream.write_eof()
            assert await asyncio.wait_for(flow.stream.read(), 10) == b"back"
        finally:
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 60))


@pytest.mark.parametrize("transport", ["h2", "tcp"])
def test_flows_on_a_ready_connection_are_not_pending_opens(transport: str) -> None:
    """``max_pending_opens`` counts flows waiting for a connection or stream credit: it
    counted every flow until its CONNECT was answered, so with 1, nine of ten concurrent
    flows on a warm connection with credit to spare were refused (engine flows were not,
    so the limit depended on the engine). On tcp every flow dials a connection of its
    own: those still wait, and nine of ten overflow."""

    async def main() -> None:
        ca = DevCA()
        answer = asyncio.Event()

        async def slow_answer(stream: MeshStream) -> None:
            await answer.wait()  # every CONNECT is in flight at once
            await _echo(stream)

        server = TRANSPORTS[transport](
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
        )
        listener = await server.listen(("127.0.0.1", 0), slow_answer)
        cluster = _h2_cluster(
            ca,
            [listener.address],
            transport,
            circuit_breakers={
                "max_connections": 1,
                "max_concurrent_streams": 100,
                "max_pending_opens": 1,
            },
        )
        try:
            answer.set()
            warm = await cluster.open_flow()  # dials: the one pending open
            cluster.flow_finished(warm, 0, 0)
            warm.stream.abort()
            answer.clear()
            opening = [asyncio.ensure_future(cluster.open_flow()) for _ in range(10)]
            await asyncio.sleep(0)
            answer.set()
            results = await asyncio.gather(*opening, return_exceptions=True)
            flows = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, FlowRefused)]
            expected = 9 if transport == "tcp" else 0
            assert cluster.stats.overflows["max_pending_opens"] == expected
            assert len(refused) == expected and len(flows) == 10 - expected
            assert all(r.outcome is Outcome.OVERFLOW for r in refused)
            for flow in flows:
                flow.stream.write(b"x")
                flow.stream.write_eof()
                assert await flow.stream.read() == b"x"
                cluster.flow_finished(flow, 1, 1)
        finally:
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_an_auto_endpoints_failure_names_it_once() -> None:
    """An auto transport's reason starts with the address it dialled: the cluster does not
    prefix it again ("127.0.0.1:N: 127.0.0.1:N: QUIC: ...")."""

    async def main() -> None:
        ca = DevCA()
        address = ("127.0.0.1", free_port())  # nothing listens there, on TCP or UDP
        cluster = _h2_cluster(ca, [address], transport="auto")
        try:
            with pytest.raises(FlowRefused) as refused:
                await cluster.open_flow()
        finally:
            await cluster.close()
        name = format_address(address)
        assert refused.value.reason.startswith(f"{name}: QUIC: "), refused.value.reason
        assert not refused.value.reason.startswith(f"{name}: {name}"), refused.value.reason

    asyncio.run(main())


@pytest.mark.parametrize("transport", ["h2", "quic"])
def test_a_flow_timed_out_queued_for_stream_credit_overflows_and_blames_no_endpoint(
    transport: str,
) -> None:
    """At ``max_connections``, on a connection at the peer's stream limit, a flow waits
    in the pool's queue for credit. Running out of ``connect_timeout`` there was counted
    as the endpoint's connect failure: a healthy busy peer was ejected, and the flow
    logged ``connect_failed``. It overflows ``max_connections`` (Envoy's pending request
    timing out in the queue). A CONNECT sent once credit came and left unanswered is
    still the endpoint's failure."""

    async def main() -> None:
        ca = DevCA()
        release = asyncio.Event()
        seen: list[MeshStream] = []

        async def first_two_answered(stream: MeshStream) -> None:
            seen.append(stream)
            if len(seen) <= 2:
                stream.accept()
            await release.wait()  # later CONNECTs are never answered

        server = TRANSPORTS[transport](
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"),
            trust=ca.trust_bundle,
            max_streams=2,
        )
        listener = await server.listen(("127.0.0.1", 0), first_two_answered)
        cluster = _h2_cluster(
            ca,
            [listener.address],
            transport,
            circuit_breakers={"max_connections": 1},
            connect_timeout="1s",
            outlier_detection={"consecutive_connect_failures": 1},
        )
        endpoint = format_address(listener.address)
        try:
            held = [await cluster.open_flow(), await cluster.open_flow()]
            with pytest.raises(FlowRefused) as queued:
                await cluster.open_flow()
            assert queued.value.outcome is Outcome.OVERFLOW
            assert queued.value.reason == (
                f"cluster {cluster.config.name}: timed out after 1s waiting for a stream "
                "slot (max_connections 1 reached)"
            )
            assert cluster.stats.overflows["max_connections"] == 1
            assert cluster.stats.connect_failures == 0
            assert cluster.stats.endpoint(endpoint).connect_failures == 0
            assert cluster.healthy_endpoints() == 1
            assert len(seen) == 2  # it never reached the peer

            # Queued again, credit comes (a held flow ends), the CONNECT goes unanswered.
            unanswered = asyncio.ensure_future(cluster.open_flow())
            await until(lambda: cluster.breaker.pending == 1)  # waiting for a slot
            held[0].stream.abort()
            cluster.flow_finished(held[0], 0, 0)
            with pytest.raises(FlowRefused) as timed_out:
                await unanswered
            assert timed_out.value.outcome is Outcome.CONNECT_FAILED
            assert timed_out.value.reason == f"{endpoint}: timed out after 1s"
            assert len(seen) == 3
            assert cluster.stats.connect_failures == 1
            assert cluster.stats.overflows["max_connections"] == 1
            assert cluster.stats.endpoint(endpoint).ejections == 1
            held[1].stream.abort()
            cluster.flow_finished(held[1], 0, 0)
        finally:
            release.set()
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize(
    ("transport", "engine"),
    [("quic", "aioquic"), ("quic", "native"), ("h2", None), ("tcp", None)],
    ids=["quic-aioquic", "quic-native", "h2", "tcp"],
)
def test_an_endpoint_presenting_an_identity_the_cluster_does_not_list_serves_no_flow(
    transport: str, engine: str | None
) -> None:
    """A cluster's ``server_identities`` (Istio's expected service accounts): an endpoint
    presenting another identity the trust bundle vouches for (a reused pod IP, a wrong
    endpoint list) gets no flow, and its connection counts as a handshake failure of
    that endpoint; until 2026-12-07 any identity of the trust bundle was served. A
    pattern that matches serves as before."""
    if engine == "native":
        require_engine("native")

    async def main() -> None:
        ca = DevCA()
        seen: list[MeshStream] = []

        async def handler(stream: MeshStream) -> None:
            seen.append(stream)
            await _echo(stream)

        server = TRANSPORTS[transport](
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/billing"), trust=ca.trust_bundle
        )
        listener = await server.listen(("127.0.0.1", 0), handler)
        keys: dict[str, Any] = {"engine": engine} if engine else {}
        pinned = _h2_cluster(
            ca,
            [listener.address],
            transport,
            server_identities=["spiffe://mesh.local/ns/default/sa/reviews"],
            **keys,
        )
        endpoint = format_address(listener.address)
        try:
            with pytest.raises(FlowRefused) as refused:
                await pinned.open_flow()
            assert refused.value.outcome is Outcome.CONNECT_FAILED
            assert refused.value.reason == (
                f"{endpoint}: peer certificate's identity spiffe://mesh.local/ns/default/sa/"
                "billing is not one of server_identities (spiffe://mesh.local/ns/default/sa/"
                "reviews)"
            )
            assert pinned.stats.handshake_failures == {"peer_certificate_invalid": 1}
            assert pinned.stats.endpoint(endpoint).connect_failures == 1
            assert seen == []  # no flow reached it
        finally:
            await pinned.close()
        matching = _h2_cluster(
            ca,
            [listener.address],
            transport,
            server_identities=[
                "spiffe://mesh.local/ns/other/*",
                "spiffe://mesh.local/ns/default/*",
            ],
            **keys,
        )
        try:
            await _echoed(matching, await matching.open_flow(), b"ping")
        finally:
            await matching.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())


@pytest.mark.parametrize("threshold", [50, 0])
def test_a_cluster_whose_only_endpoint_was_ejected_tries_it_again_in_panic(
    threshold: int,
) -> None:
    """A one-endpoint cluster's peer restarts: its connect failures eject it, and the
    cluster refused every flow ``no_healthy_endpoint`` for the whole ejection, the peer
    back or not (a review: 30 s). In panic (fewer than ``healthy_panic_threshold``
    percent healthy, Envoy's 50 by default) the flows try it anyway and go through as
    soon as it is back; 0 keeps the refusal."""

    async def main() -> None:
        ca = DevCA()
        server = H2Transport(
            identity=ca.issue("spiffe://mesh.local/ns/default/sa/b"), trust=ca.trust_bundle
        )
        listener = await server.listen(("127.0.0.1", 0), _echo)
        address = listener.address
        cluster = _h2_cluster(
            ca,
            [address],
            outlier_detection={"consecutive_connect_failures": 1, "base_ejection_time": "60s"},
            healthy_panic_threshold=threshold,
        )
        try:
            listener.close()
            await listener.wait_closed()
            with pytest.raises(FlowRefused) as down:
                await cluster.open_flow()
            assert down.value.outcome is Outcome.CONNECT_FAILED
            assert cluster.healthy_endpoints() == 0  # ejected, for a minute
            listener = await server.listen(address, _echo)  # the peer is back
            if threshold == 0:
                with pytest.raises(FlowRefused) as refused:
                    await cluster.open_flow()
                assert refused.value.outcome is Outcome.NO_HEALTHY_ENDPOINT
                assert cluster.snapshot()["panic"] is False
                return
            await _echoed(cluster, await cluster.open_flow(), b"back")
            snapshot = cluster.snapshot()
            assert snapshot["panic"] is True and snapshot["panic_flows"] == 1
        finally:
            await cluster.close()
            listener.close()
            await listener.wait_closed()

    asyncio.run(main())
