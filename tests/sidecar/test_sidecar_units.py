"""Unit tests for the sidecar's sans-IO pieces: balancing, health, circuit breakers,
pool choice, inbound policy, admin routing, access-log lines and metrics exposition."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import random
import socket
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.errors import ConfigError
from quicmesh.logs import quicmesh_loggers
from quicmesh.sidecar.accesslog import FlowRecord, Outcome
from quicmesh.sidecar.admin import Deferred, Response, route
from quicmesh.sidecar.circuit import CircuitBreaker
from quicmesh.sidecar.config import (
    CircuitBreakerConfig,
    HealthCheckConfig,
    IdentityPolicy,
    InboundListenerConfig,
    OutlierDetectionConfig,
    parse_destination,
)
from quicmesh.sidecar.health import EndpointHealth, HealthState, HealthTracker
from quicmesh.sidecar.launch import metric, parse_metrics
from quicmesh.sidecar.lb import LeastRequest, RandomChoice, RoundRobin, make_balancer
from quicmesh.sidecar.metrics import Metrics
from quicmesh.sidecar.policy import refusal_reason
from quicmesh.sidecar.pool import Action, plan_open
from quicmesh.transport.quic import COUNTERS as QUIC_COUNTERS


@dataclass
class Ep:
    name: str
    active_requests: int = 0


# -- load balancing ---------------------------------------------------------------


def test_round_robin_cycles_in_order() -> None:
    eps = [Ep("a"), Ep("b"), Ep("c")]
    lb = RoundRobin()
    assert [lb.choose(eps).name for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_request_prefers_the_idle_endpoint() -> None:
    eps = [Ep("busy", 10), Ep("idle", 0)]
    lb = LeastRequest(random.Random(1))
    assert {lb.choose(eps).name for _ in range(20)} == {"idle"}


def test_least_request_spreads_over_equal_endpoints() -> None:
    eps = [Ep(str(i)) for i in range(4)]
    lb = LeastRequest(random.Random(7))
    assert len({lb.choose(eps).name for _ in range(100)}) == 4


def test_random_is_reproducible_with_a_seed() -> None:
    eps = [Ep(str(i)) for i in range(5)]
    first = [RandomChoice(random.Random(3)).choose(eps).name for _ in range(1)]
    a = RandomChoice(random.Random(3))
    b = RandomChoice(random.Random(3))
    assert [a.choose(eps).name for _ in range(20)] == [b.choose(eps).name for _ in range(20)]
    assert first
    counts = Counter(a.choose(eps).name for _ in range(500))
    assert len(counts) == 5


def test_make_balancer_by_name() -> None:
    assert isinstance(make_balancer("least_request"), LeastRequest)
    assert isinstance(make_balancer("round_robin"), RoundRobin)


# -- health and outlier ejection --------------------------------------------------

OUTLIER = OutlierDetectionConfig(
    consecutive_connect_failures=3, base_ejection_time=10.0, max_ejection_percent=100
)


def test_consecutive_connect_failures_eject_then_the_ejection_ends() -> None:
    health = EndpointHealth(OUTLIER)
    assert not health.connect_failed(0.0)
    assert not health.connect_failed(1.0)
    assert health.connect_failed(2.0)
    assert health.state(5.0) is HealthState.EJECTED
    assert not health.is_available(11.9)
    assert health.state(12.0) is HealthState.HEALTHY


def test_a_success_resets_the_failure_count() -> None:
    health = EndpointHealth(OUTLIER)
    health.connect_failed(0.0)
    health.connect_failed(0.0)
    health.connect_succeeded(0.0)
    assert not health.connect_failed(0.0)
    assert health.is_available(0.0)


def test_repeated_ejections_last_longer() -> None:
    health = EndpointHealth(OUTLIER)
    for _ in range(3):
        health.connect_failed(0.0)
    assert health.ejected_until == 10.0
    for _ in range(3):
        health.connect_failed(15.0)  # back 5 s: less than a base ejection time
    assert health.ejected_until == 35.0


def _eject(health: EndpointHealth, now: float) -> float:
    """Fail ``health`` at ``now`` until it is ejected; how long the ejection lasts."""
    while not health.connect_failed(now):
        pass
    assert health.ejected_until is not None
    return health.ejected_until - now


def test_the_ejection_multiplier_decays_while_the_endpoint_stays_clean() -> None:
    """The multiplier only went up: an endpoint that recovered and served well for long
    was ejected for ten times the base at its next failures. One comes off for each
    ``base_ejection_time`` (Envoy: each ``interval``) it stays un-ejected without a
    connect failure; never below zero; it stays at most ten."""
    health = EndpointHealth(OUTLIER)  # 3 failures eject, for 10 s times the multiplier
    assert _eject(health, 0.0) == 10.0
    assert _eject(health, 15.0) == 20.0  # back 5 s before it failed again
    assert _eject(health, 40.0) == 30.0  # (ended at 35)
    # Ended at 70; 25 s clean: two base ejection times come off (3 - 2, then one more).
    assert _eject(health, 95.0) == 20.0
    # Ended at 115; a failure at 124 (not ejecting) starts the clean stretch afresh:
    # 9 s later, nothing comes off.
    assert not health.connect_failed(124.0)
    assert _eject(health, 133.0) == 30.0
    # A failure during an ejection (a flow already opening) does not start it early.
    assert not health.connect_failed(140.0)
    assert health.state(140.0) is HealthState.EJECTED
    assert _eject(health, 163.0 + 9.0) == 40.0  # ended at 163: 9 s clean
    # A long healthy stretch takes it to zero, not below.
    assert _eject(health, 1000.0) == 10.0
    # At most ten: twenty ejections back to back, then 20 s clean take two off.
    for _ in range(20):
        assert health.ejected_until is not None
        _eject(health, health.ejected_until)
    assert health.ejection_multiplier == 10
    assert health.ejected_until is not None
    assert _eject(health, health.ejected_until + 20.0) == 90.0


def test_an_ejection_ended_early_starts_the_clean_stretch() -> None:
    """An ejection that healthy checks end early (or our new certificate) is over from
    then: the clean stretch that takes the multiplier down counts from that moment."""
    health = EndpointHealth(OUTLIER, HealthCheckConfig(healthy_threshold=1))
    assert _eject(health, 0.0) == 10.0
    assert _eject(health, 10.0) == 20.0  # until 30
    health.check_passed(12.0)
    assert health.state(12.0) is HealthState.HEALTHY
    assert _eject(health, 22.0) == 20.0  # 10 s clean since 12: 2 - 1 + 1


def test_active_checks_mark_unhealthy_and_back() -> None:
    check = HealthCheckConfig(unhealthy_threshold=2, healthy_threshold=2)
    health = EndpointHealth(OUTLIER, check)
    health.check_failed(0.0)
    assert health.state(0.0) is HealthState.HEALTHY
    health.check_failed(1.0)
    assert health.state(1.0) is HealthState.UNHEALTHY
    health.check_passed(2.0)
    assert health.state(2.0) is HealthState.UNHEALTHY
    health.check_passed(3.0)
    assert health.state(3.0) is HealthState.HEALTHY


def test_a_passing_check_readmits_an_ejected_endpoint() -> None:
    health = EndpointHealth(OUTLIER, HealthCheckConfig(healthy_threshold=1))
    for _ in range(3):
        health.connect_failed(0.0)
    assert health.state(1.0) is HealthState.EJECTED
    health.check_passed(1.0)
    assert health.state(1.0) is HealthState.HEALTHY


def test_healthy_threshold_checks_in_a_row_end_an_ejection_early() -> None:
    """One passing check ended an ejection whatever ``healthy_threshold`` said."""
    health = EndpointHealth(OUTLIER, HealthCheckConfig(healthy_threshold=3))
    health.check_passed(0.0)
    health.check_passed(0.5)  # passed before the ejection: they do not count
    for _ in range(3):
        health.connect_failed(1.0)
    health.check_passed(2.0)
    health.check_passed(3.0)
    assert health.state(3.0) is HealthState.EJECTED
    health.check_failed(4.0)  # not in a row any more
    health.check_passed(5.0)
    health.check_passed(6.0)
    assert health.state(6.0) is HealthState.EJECTED
    health.check_passed(7.0)
    assert health.state(7.0) is HealthState.HEALTHY


def test_max_ejection_percent_keeps_some_endpoints() -> None:
    outlier = OutlierDetectionConfig(
        consecutive_connect_failures=1, base_ejection_time=10.0, max_ejection_percent=50
    )
    tracker = HealthTracker(outlier)
    tracker.set_endpoints(["a", "b"])
    assert tracker.connect_failed("a", 0.0)
    assert not tracker.connect_failed("b", 0.0)
    assert tracker.available(0.0) == ["b"]


def test_tracker_keeps_state_of_kept_endpoints() -> None:
    tracker = HealthTracker(OUTLIER)
    tracker.set_endpoints(["a", "b"])
    for _ in range(3):
        tracker.connect_failed("a", 0.0)
    tracker.set_endpoints(["a", "c"])
    assert tracker.available(1.0) == ["c"]


def test_a_new_certificate_of_ours_forgives_only_what_our_old_one_caused() -> None:
    """Ejections and failures caused by peers refusing our certificate end when ours
    changes (and do not lengthen a later ejection); other failures stay."""
    tracker = HealthTracker(OUTLIER)  # 3 failures eject, for 10 s
    tracker.set_endpoints(["ours", "counting", "dead", "mixed"])
    for _ in range(3):
        tracker.connect_failed("ours", 0.0, our_certificate_refused=True)
        tracker.connect_failed("dead", 0.0)
    # Timeouts, then one late refusal of our certificate: the endpoint's own failure.
    tracker.connect_failed("mixed", 0.0)
    tracker.connect_failed("mixed", 0.0)
    tracker.connect_failed("mixed", 0.0, our_certificate_refused=True)
    for _ in range(2):
        tracker.connect_failed("counting", 0.0, our_certificate_refused=True)
    assert tracker.available(1.0) == ["counting"]
    assert tracker.our_identity_changed(1.0) == 1
    assert tracker.available(1.0) == ["ours", "counting"]
    assert tracker["ours"].ejection_multiplier == 0 and tracker["counting"].connect_failures == 0
    assert tracker["dead"].state(1.0) is HealthState.EJECTED
    assert tracker["mixed"].state(1.0) is HealthState.EJECTED
    # Once forgiven, a later refusal of the new certificate counts afresh.
    assert tracker.our_identity_changed(2.0) == 0


# -- circuit breakers ---------------------------------------------------------------


def test_circuit_breaker_holds_each_limit() -> None:
    breaker = CircuitBreaker(
        CircuitBreakerConfig(max_connections=1, max_concurrent_streams=2, max_pending_opens=0)
    )
    assert breaker.try_open_stream() and breaker.try_open_stream()
    assert not breaker.try_open_stream()
    breaker.release_stream()
    assert breaker.try_open_stream()
    assert breaker.try_open_connection() and not breaker.try_open_connection()
    breaker.release_connection()
    assert breaker.try_open_connection()
    assert not breaker.try_begin_pending()
    assert (breaker.connections, breaker.streams, breaker.pending) == (1, 2, 0)


# -- the pool's choice ------------------------------------------------------------------


@dataclass
class Conn:
    active_streams: int = 0
    can_open_stream: bool = True
    is_closed: bool = False


def test_pool_reuses_a_connection_with_credit() -> None:
    busy, spare = Conn(5), Conn(1)
    plan = plan_open([busy, spare], connecting=False, may_connect=True)
    assert plan.action is Action.USE and plan.connection is spare


def test_pool_connects_only_at_the_stream_limit() -> None:
    full = Conn(100, can_open_stream=False)
    assert plan_open([full], connecting=False, may_connect=True).action is Action.CONNECT
    assert plan_open([], connecting=False, may_connect=True).action is Action.CONNECT


def test_pool_waits_for_a_dial_in_progress() -> None:
    full = Conn(100, can_open_stream=False)
    assert plan_open([full], connecting=True, may_connect=True).action is Action.WAIT_FOR_CONNECT


def test_pool_queues_or_overflows_at_max_connections() -> None:
    full = Conn(100, can_open_stream=False)
    plan = plan_open([full], connecting=False, may_connect=False)
    assert plan.action is Action.QUEUE and plan.connection is full
    assert plan_open([], connecting=False, may_connect=False).action is Action.OVERFLOW


def test_pool_skips_closed_connections() -> None:
    closed = Conn(0, is_closed=True)
    assert plan_open([closed], connecting=False, may_connect=True).action is Action.CONNECT


# -- inbound policy --------------------------------------------------------------------

A = "spiffe://mesh.local/ns/default/sa/a"
B = "spiffe://mesh.local/ns/default/sa/b"


def inbound(**kwargs: Any) -> InboundListenerConfig:
    defaults: dict[str, Any] = {
        "name": "mesh",
        "address": ("127.0.0.1", 15008),
        "transports": ("quic",),
        "destinations": tuple(
            parse_destination(d) for d in ("127.0.0.1:8080", "10.0.0.0/8:*", "db.local:5432")
        ),
    }
    defaults.update(kwargs)
    return InboundListenerConfig(**defaults)


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        ("127.0.0.1:8080", True),
        ("127.0.0.1:8081", False),
        ("10.1.2.3:443", True),
        ("11.0.0.1:443", False),
        ("db.local:5432", True),
        ("DB.local:5432", True),
        ("db.local:5433", False),
        ("[::1]:8080", False),
        ("garbage", False),
    ],
)
def test_destination_allow_list(target: str, allowed: bool) -> None:
    assert (refusal_reason(inbound(), A, target) is None) is allowed


def test_identity_policies() -> None:
    config = inbound(
        policies=(
            IdentityPolicy(A, (parse_destination("127.0.0.1:8080"),)),
            IdentityPolicy("spiffe://mesh.local/ns/ops/*", (parse_destination("10.0.0.0/8:*"),)),
        )
    )
    assert refusal_reason(config, A, "127.0.0.1:8080") is None
    reason = refusal_reason(config, B, "127.0.0.1:8080")
    assert reason is not None and B in reason
    assert refusal_reason(config, "spiffe://mesh.local/ns/ops/sa/x", "10.0.0.1:22") is None
    reason = refusal_reason(config, A, "10.0.0.1:22")
    assert reason is not None and "may not reach" in reason


def _inbound_config(policies: str) -> str:
    """Sidecar B's configuration: one inbound listener, ``policies`` its last lines."""
    return f"""
node: {{name: b, identity: "{B}"}}
tls: {{ca_dir: ca}}
admin: {{address: "127.0.0.1:15000"}}
listeners:
  inbound:
    - name: mesh
      address: 127.0.0.1:15008
      transports: [quic]
      destinations: ["127.0.0.1:8080"]
      {policies}
"""


@pytest.mark.parametrize(
    ("policies", "allowed"),
    [
        ("", True),  # no policies key: the destinations alone decide
        ("policies: []", False),  # given and empty: nobody (an Istio ALLOW without rules)
        (f"policies: [{{identity: '{A}', destinations: ['127.0.0.1:8080']}}]", True),
        (f"policies: [{{identity: '{B}', destinations: ['127.0.0.1:8080']}}]", False),
    ],
)
def test_an_empty_policies_list_allows_nobody(policies: str, allowed: bool) -> None:
    """``policies: []`` was read as no policies at all: every verified peer could reach
    every allowed destination."""
    from quicmesh.sidecar.config import parse_config
    from quicmesh.sidecar.policy import allowed_nowhere

    [listener] = parse_config(_inbound_config(policies), source="b.yaml").inbound
    assert (refusal_reason(listener, A, "127.0.0.1:8080") is None) is allowed
    assert allowed_nowhere(listener, A) is not allowed


def test_a_policies_key_with_no_value_is_refused() -> None:
    """``policies:`` whose entries are all commented out is YAML null: it was read as no
    key at all, so every verified peer got in (a policy failing open)."""
    from quicmesh.sidecar.config import parse_config

    commented_out = f"""policies:
      # - identity: "{A}"
      #   destinations: ["127.0.0.1:8080"]"""
    with pytest.raises(ConfigError) as refused:
        parse_config(_inbound_config(commented_out), source="b.yaml")
    message = str(refused.value)
    assert message.startswith("b.yaml: listeners.inbound[0].policies: has no value"), message
    assert "\n" not in message


# -- admin, access log, metrics ----------------------------------------------------------


class FakeView:
    def __init__(self) -> None:
        self.drains = 0
        self.ready = True

    def metrics_text(self) -> bytes:
        return b"m 1\n"

    def snapshot(self) -> dict[str, Any]:
        return {"x": 1}

    def config_dump(self) -> dict[str, Any]:
        return {"node": {"name": "n"}}

    def is_ready(self) -> bool:
        return self.ready

    def begin_drain(self, outbound_now: bool = False, graceful: bool | None = None) -> bool:
        self.drains += 1
        self.outbound_now = outbound_now
        self.graceful = graceful
        self.ready = False
        return self.drains == 1

    def quit(self) -> None:
        self.quits = getattr(self, "quits", 0) + 1

    def certificates(self) -> dict[str, Any]:
        return {"certificates": []}

    async def migrate(self) -> dict[str, Any]:
        return {"migrated": 1, "failed": 0, "connections": [{"cluster": "c"}]}


def test_admin_routes() -> None:
    view = FakeView()
    assert route(view, "GET", "/metrics").body == b"m 1\n"
    # Envoy's path for the same text, which Istio's scrape configuration asks for.
    assert route(view, "GET", "/stats/prometheus") == route(view, "GET", "/metrics")
    assert route(view, "GET", "/stats?format=prometheus") == route(view, "GET", "/metrics")
    assert json.loads(route(view, "GET", "/stats?format=json").body) == {"x": 1}
    refused = route(view, "GET", "/stats?format=yaml")
    assert refused.status == 400 and b"'yaml'" in refused.body
    assert json.loads(route(view, "GET", "/stats").body) == {"x": 1}
    assert json.loads(route(view, "GET", "/config_dump?x=1").body)["node"]["name"] == "n"
    assert route(view, "GET", "/ready").status == 200
    assert route(view, "GET", "/drain").status == 405
    assert route(view, "POST", "/drain") == Response(
        202, "text/plain; charset=utf-8", b"draining\n"
    )
    assert route(view, "GET", "/ready").status == 503
    assert route(view, "POST", "/drain").body == b"already draining\n"
    assert route(view, "GET", "/nope").status == 404
    # Absolute-form targets (a client set to use a proxy; RFC 9112 3.2.2) are their path.
    assert json.loads(route(view, "GET", "http://127.0.0.1:15000/stats?x=1").body) == {"x": 1}
    assert route(view, "GET", "HTTP://localhost").status == 200  # the listing at /
    assert route(view, "GET", "http://localhost/nope").status == 404
    assert route(view, "GET", "/migrate").status == 405
    deferred = route(view, "POST", "/migrate")
    assert isinstance(deferred, Deferred)
    response = asyncio.run(deferred.respond())
    assert response.status == 200 and json.loads(response.body)["migrated"] == 1


def test_admin_envoy_actions_take_envoys_flags() -> None:
    """``/drain_listeners`` as Istio's agent sends it, ``/quitquitquit``, ``/certs``:
    what each asks of the sidecar, and the flags refused by name."""
    view = FakeView()
    assert route(view, "GET", "/drain_listeners").status == 405
    for query in ("?inbound", "?inboundonly=x&x", "?graceful&drain_time_s=5"):
        refused = route(view, "POST", f"/drain_listeners{query}")
        assert refused.status == 400 and view.drains == 0, query
    assert b"unknown flag 'inbound'" in route(view, "POST", "/drain_listeners?inbound").body
    ok = route(view, "POST", "/drain_listeners?inboundonly&graceful")
    assert (ok.status, ok.body, view.drains, view.outbound_now) == (200, b"OK\n", 1, False)
    assert view.graceful is True
    assert route(view, "POST", "/drain_listeners?graceful").status == 200
    assert (view.drains, view.outbound_now, view.graceful) == (2, True, True)
    assert route(view, "POST", "/drain_listeners?inboundonly").status == 200
    assert (view.drains, view.outbound_now, view.graceful) == (3, False, False)
    # Istio's agent may add skip_exit: taken (the drain still ends the sidecar).
    assert route(view, "POST", "/drain_listeners?inboundonly&graceful&skip_exit").status == 200
    assert (view.drains, view.outbound_now) == (4, False)
    assert route(view, "POST", "/quitquitquit").body == b"OK\n" and view.quits == 1
    assert json.loads(route(view, "GET", "/certs").body) == {"certificates": []}
    assert route(view, "POST", "/certs").status == 405


def test_admin_logging_lists_and_sets_quicmesh_loggers() -> None:
    """Envoy's ``POST /logging``: the list, ``level=`` for all, ``<logger>=`` for one,
    and a 400 naming an unknown level or logger (the levels are put back after)."""
    view = FakeView()
    names = ("quicmesh", "quicmesh.sidecar", "quicmesh.sidecar.admin")
    before = {name: logging.getLogger(name).level for name in names}
    try:
        assert route(view, "GET", "/logging").status == 405
        listing = route(view, "POST", "/logging").body.decode()
        assert listing.startswith("active loggers:\n  quicmesh: ")
        assert "\n  quicmesh.sidecar.admin: " in listing
        one = route(view, "POST", "/logging?quicmesh.sidecar.admin=debug").body.decode()
        assert "  quicmesh.sidecar.admin: debug\n" in one
        assert logging.getLogger("quicmesh.sidecar.admin").isEnabledFor(logging.DEBUG)
        every = route(view, "POST", "/logging?level=off").body.decode()
        assert set(every.splitlines()[1:]) == {f"  {n}: off" for n in quicmesh_loggers()}
        assert not logging.getLogger("quicmesh.sidecar.admin").isEnabledFor(logging.CRITICAL)
        paths = route(view, "POST", "/logging?paths=quicmesh.sidecar:error,quicmesh:info")
        assert paths.status == 200 and b"  quicmesh.sidecar: error\n" in paths.body
        assert route(view, "POST", "/logging?paths=quicmesh.sidecar").status == 400
        route(view, "POST", "/logging?level=WARN")
        assert logging.getLogger("quicmesh.sidecar").getEffectiveLevel() == logging.WARNING
        loud = route(view, "POST", "/logging?level=loud")
        assert loud.status == 400 and b"unknown level 'loud'" in loud.body
        nosuch = route(view, "POST", "/logging?nosuch=debug")
        assert nosuch.status == 400 and b"unknown logger 'nosuch'" in nosuch.body
        # A 400 changed nothing (the valid part of a query was applied; a review).
        levels = quicmesh_loggers()
        for query in ("level=debug&bogus=warning", "paths=quicmesh.sidecar:debug,quicmesh.x:info"):
            assert route(view, "POST", f"/logging?{query}").status == 400
            assert quicmesh_loggers() == levels, query
        forged = route(view, "POST", "/logging?level=%0Aforged")
        assert forged.status == 400 and b"\nforged" not in forged.body
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)
        for name in quicmesh_loggers():
            if name not in before:
                logging.getLogger(name).setLevel(logging.NOTSET)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80), st.sampled_from(["/logging", "/drain_listeners"]))
def test_admin_action_queries_never_raise(query: str, path: str) -> None:
    """Any query string on the admin actions is a 200 or a one-line 400, never an
    exception (the admin's loop would log a traceback and close the connection)."""
    view = FakeView()
    levels = {name: logging.getLogger(name).level for name in quicmesh_loggers()}
    try:
        response = route(view, "POST", f"{path}?{query}")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert isinstance(response, Response) and response.status in (200, 400)
    if response.status == 400:
        assert response.body.count(b"\n") == 1


async def _ask_admin(view: Any, request: bytes) -> bytes:
    """Send ``request`` to an admin server on a loopback port serving ``view``; its
    whole answer (the server closes the connection after it)."""
    from quicmesh.sidecar.admin import AdminServer

    server = AdminServer(view, ("127.0.0.1", 0))
    await server.start()
    assert server._server is not None
    port = server._server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await server.close()
    return answer


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /stats HTTP/1.1\r\n\r\n", b"400"),  # no Host
        (b"\x16\x03\x01garbage\r\n\r\n", b"400"),
        (b"GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"v" * 100_000 + b"\r\n\r\n", b"431"),
        (b"POST /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", b"405"),
        (
            b"POST /drain HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\n"
            + b"x" * 100_000,
            b"413",
        ),
        (b"GET /ready HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", b"505"),
    ],
    ids=["no-host", "not-http", "too-large", "wrong-method", "body-too-large", "http-9.9"],
)
def test_the_admin_server_answers_a_bad_request(
    request_bytes: bytes, status: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """A malformed or oversized request is answered (400, 431), not dropped; a 405 says
    which methods the path takes (``allow``); an HTTP version other than 1.x is 505 (it
    was served 200). The answer quotes no Python repr of the client's bytes, and a loop
    that ends during the lingering close logs nothing ("Exception in callback" did)."""
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        answer = asyncio.run(_ask_admin(FakeView(), request_bytes))
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ", 2)[2].strip(), status_line  # a reason phrase (h11: none)
    if status == b"405":
        assert b"\r\nallow: GET, HEAD\r\n" in answer
    assert b"bytearray" not in answer, answer


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("0.0.0.0", True)])
def test_an_admin_reachable_from_other_hosts_is_named_in_a_warning(
    host: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """As Envoy's, the admin endpoint has no authentication (POST /drain): one bound
    beyond loopback is said so at start (it was silent)."""
    from quicmesh.sidecar.admin import AdminServer

    async def main() -> None:
        server = AdminServer(FakeView(), (host, 0))
        await server.start()
        await server.close()

    with caplog.at_level("WARNING", logger="quicmesh.sidecar.admin"):
        asyncio.run(main())
    said = [r.getMessage() for r in caplog.records if "need no authentication" in r.getMessage()]
    assert bool(said) is warned, said


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (b"Host: 127.0.0.1:15000\r\n", b"202"),
        (b"Host: localhost\r\n", b"202"),
        (b"Host: [::1]:15000\r\n", b"202"),
        (b"Host: 10.1.2.3:15000\r\n", b"202"),  # a probe or a scraper, by pod IP
        (b"Host: sidecar:15000\r\n", b"202"),  # a scraper, by a service name
        (b"Host: evil.example\r\nOrigin: http://evil.example\r\n", b"403"),  # rebinding
        (b"Host: 127.0.0.1\r\nOrigin: http://evil.example\r\n", b"403"),  # cross-site
        (b"Host: 127.0.0.1\r\nOrigin: null\r\n", b"403"),
    ],
    ids=["ip", "localhost", "ipv6", "pod-ip", "name", "rebinding", "origin", "origin-null"],
)
def test_the_admin_refuses_what_a_web_page_makes_a_browser_send(
    headers: bytes, status: bytes
) -> None:
    """The admin has no authentication: a web page could make a browser on the host POST
    /drain, cross-site or under the page's own name resolved to 127.0.0.1 (DNS
    rebinding); a browser's POST carries an Origin either way: refused, 403, and the
    sidecar does not drain (they were served). Tools send no Origin, by any Host."""
    view = FakeView()
    request = b"POST /drain HTTP/1.1\r\n" + headers + b"Content-Length: 0\r\n\r\n"
    answer = asyncio.run(_ask_admin(view, request))
    assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
    assert view.drains == (1 if status == b"202" else 0)


def test_access_log_line_is_one_json_object() -> None:
    record = FlowRecord(
        start=0.0,
        duration=0.0123,
        listener="app",
        direction="outbound",
        downstream="127.0.0.1:5",
        target="127.0.0.1:80",
        transport="quic",
        peer_identity=B,
        endpoint="127.0.0.1:15008",
        bytes_sent=10,
        bytes_received=20,
        outcome=Outcome.REFUSED,
        reason="no\nnewline",
    )
    line = record.to_json()
    assert "\n" not in line
    data = json.loads(line)
    assert data["start"] == "1970-01-01T00:00:00.000Z"
    assert data["duration_ms"] == 12.3
    assert data["outcome"] == "refused" and data["reason"] == "no\nnewline"


def test_metrics_exposition_from_a_snapshot() -> None:
    snapshot = {
        "node": "a",
        "ready": True,
        "draining": False,
        "started_at": 1_700_000_000.5,
        "reloads": {"ok": 1, "rejected": 2},
        "xds": {"connected": True, "acks": 4, "nacks": 2, "streams": 1, "stream_failures": 0},
        "listeners": {
            "app": {
                "kind": "outbound",
                "connections_total": 3,
                "connections_active": 1,
                "streams_total": 3,
                "streams_active": 1,
                "bytes_received": 100,
                "bytes_sent": 200,
                "streams_spliced": 2,
                "engine_flows": 1,
                "engine_flows_returned": 1,
                "idle_timeouts": 0,
                "outcomes": {"completed": 2},
            },
            "mesh": {
                "kind": "inbound",
                "connections_total": 0,
                "connections_active": 0,
                "streams_total": 0,
                "streams_active": 0,
                "bytes_received": 0,
                "bytes_sent": 0,
                "streams_spliced": 0,
                "engine_flows": 0,
                "engine_flows_returned": 0,
                "idle_timeouts": 0,
                "outcomes": {},
                "quic": {
                    **dict.fromkeys(QUIC_COUNTERS, 0),
                    "tickets_issued": 5,
                    "tickets_redeemed": 3,
                    "migrations_peer_address_change": 1,
                    "initials_undecryptable": 7,
                },
            },
        },
        "clusters": {
            "c": {
                "transport": "quic",
                "connections_total": 1,
                "connections_active": 1,
                "streams_total": 3,
                "streams_active": 1,
                "bytes_sent": 100,
                "bytes_received": 200,
                "connect_failures": 4,
                "retries": 1,
                "panic": True,
                "panic_flows": 6,
                "quic": {
                    **dict.fromkeys(QUIC_COUNTERS, 0),
                    "zero_rtt_attempted": 3,
                    "zero_rtt_accepted": 2,
                    "zero_rtt_rejected": 1,
                    "migrations_active": 2,
                    "path_validations_ok": 4,
                },
                "circuit_breaker_overflows": {"max_concurrent_streams": 5},
                "outcomes": {"completed": 2, "overflow": 5},
                "endpoints": {
                    "127.0.0.1:1": {
                        "health": "ejected",
                        "streams_active": 1,
                        "streams_total": 3,
                        "connect_failures": 4,
                        "ejections": 1,
                        "connections_total": 1,
                        "connections": [
                            {"id": "1", "rtt": 0.002, "cwnd": 13000, "packets_lost": 7}
                        ],
                    }
                },
            }
        },
    }
    samples = parse_metrics(Metrics(lambda: snapshot).exposition().decode())
    assert metric(samples, "quicmesh_ready") == 1
    assert metric(samples, "quicmesh_listener_connections_total", listener="app") == 3
    assert metric(samples, "quicmesh_listener_streams_spliced_total", listener="app") == 2
    assert metric(samples, "quicmesh_listener_engine_flows_total", listener="app") == 1
    assert metric(samples, "quicmesh_listener_engine_flows_returned_total", listener="app") == 1
    assert metric(samples, "quicmesh_cluster_migrations_total", cluster="c") == 2
    assert metric(samples, "quicmesh_cluster_migrations_total", cause="active") == 2
    assert metric(samples, "quicmesh_cluster_zero_rtt_total", result="accepted") == 2
    assert metric(samples, "quicmesh_cluster_zero_rtt_total", result="rejected") == 1
    assert metric(samples, "quicmesh_cluster_path_validations_total", result="ok") == 4
    assert metric(samples, "quicmesh_listener_session_tickets_total", result="redeemed") == 3
    assert metric(samples, "quicmesh_listener_migrations_total", cause="peer_address_change") == 1
    assert metric(samples, "quicmesh_listener_session_tickets_total", listener="app") == 0
    assert metric(samples, "quicmesh_listener_quic_admission_total", event="retries_sent") == 0
    assert (
        metric(samples, "quicmesh_listener_quic_admission_total", event="initials_undecryptable")
        == 7
    )
    assert (
        metric(
            samples,
            "quicmesh_cluster_circuit_breaker_overflows_total",
            limit="max_concurrent_streams",
        )
        == 5
    )
    assert metric(samples, "quicmesh_endpoint_health", state="ejected") == 1
    assert metric(samples, "quicmesh_endpoint_health", state="healthy") == 0
    assert metric(samples, "quicmesh_peer_connection_rtt_seconds") == 0.002
    assert metric(samples, "quicmesh_peer_connection_cwnd_bytes") == 13000
    assert metric(samples, "quicmesh_peer_connection_packets_lost_total") == 7
    assert metric(samples, "quicmesh_config_reloads_total", result="rejected") == 2
    # (In /stats alone until 2026-12-07.)
    assert metric(samples, "quicmesh_start_time_seconds", node="a") == 1_700_000_000.5
    assert metric(samples, "quicmesh_cluster_panic", cluster="c") == 1
    assert metric(samples, "quicmesh_cluster_panic_flows_total", cluster="c") == 6
    assert metric(samples, "quicmesh_xds_nacks_total") == 2
    assert metric(samples, "quicmesh_xds_acks_total") == 4
    assert metric(samples, "quicmesh_xds_connected") == 1


def test_chosen_ports_lie_below_the_kernels_ephemeral_range_and_differ() -> None:
    """A port chosen for a sidecar to bind later is not one the kernel hands to a
    connection (``connect`` takes local ports from the ephemeral range), and ports
    chosen together are different."""
    from quicmesh.sidecar.launch import _ephemeral_range, free_port, free_ports

    low, _ = _ephemeral_range()
    chosen = [free_port() for _ in range(20)] + free_ports(8)
    if low - 10000 >= 1000:  # (else the kernel chooses: no room below its range)
        assert all(10000 <= port < low for port in chosen), (low, chosen)
    assert len(set(chosen[-8:])) == 8
    for port in chosen:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", port))


def test_a_port_for_a_host_that_cannot_be_bound_says_why_at_once() -> None:
    from quicmesh.sidecar.launch import free_port

    with pytest.raises(OSError) as error:
        free_port("192.0.2.1")  # TEST-NET-1: not an address of this machine
    assert error.value.errno == errno.EADDRNOTAVAIL


def test_the_demo_keeps_the_ports_it_is_given_and_chooses_the_others() -> None:
    from quicmesh.demo import Ports

    ports = Ports(echo_app=1, http_app=2, admin_a=15001)
    assert ports.admin_a == 15001
    chosen = [ports.admin_b, ports.tunnel_b, ports.echo_a, ports.http_a]
    assert len(set(chosen)) == 4 and 15001 not in chosen and all(chosen)


@pytest.mark.parametrize(
    ("threshold", "ejected", "panic"),
    [(50, 3, True), (50, 2, False), (50, 4, True), (0, 4, False), (100, 1, True), (100, 0, False)],
)
def test_a_cluster_panics_below_its_healthy_share(
    threshold: int, ejected: int, panic: bool
) -> None:
    """Envoy's panic mode: under ``healthy_panic_threshold`` percent of endpoints
    available, every endpoint may take flows, health ignored; 0 turns it off."""
    outlier = OutlierDetectionConfig(consecutive_connect_failures=1, max_ejection_percent=100)
    tracker = HealthTracker(outlier, panic_threshold=threshold)
    tracker.set_endpoints(["a", "b", "c", "d"])
    for key in ["a", "b", "c", "d"][:ejected]:
        assert tracker.connect_failed(key, 0.0)
    assert tracker.in_panic(1.0) is panic
    routable, in_panic = tracker.routable(1.0)
    assert in_panic is panic
    chosen = [k for k in "abcd" if k in routable]
    assert chosen == (list("abcd") if panic else list("abcd")[ejected:])


def test_a_running_flows_bytes_stay_counted_when_it_ends_without_totals() -> None:
    """A flow whose running count was scraped, then ended by an exception (no totals,
    0 both ways), made the byte counters go down (a review of the live counters); an
    outbound and an inbound listener each count it from its own side."""
    from quicmesh.sidecar.accesslog import Outcome
    from quicmesh.sidecar.stats import ListenerStats

    moved = [5_000_000, 1_000]  # (to the stream, from it)
    for kind, expected in (("outbound", (5_000_000, 1_000)), ("inbound", (1_000, 5_000_000))):
        stats = ListenerStats("l", kind)
        flow = object()
        stats.live.add(flow, lambda: (moved[0], moved[1]))
        running = stats.to_dict()
        assert (running["bytes_received"], running["bytes_sent"]) == expected
        stats.flow_ended(Outcome.RESET, 0, 0, "cancelled", flow=flow)
        after = stats.to_dict()
        assert (after["bytes_received"], after["bytes_sent"]) == expected
        assert len(stats.live) == 0
