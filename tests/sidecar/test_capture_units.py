"""Sans-IO parts of interception: the destination table, sockaddr parsing, config, counts."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.errors import ConfigError
from quicmesh.sidecar.capture import DestinationCounts, pipe
from quicmesh.sidecar.config import (
    load_endpoints_document,
    load_endpoints_file,
    parse_config,
    parse_service,
)
from quicmesh.sidecar.destinations import (
    ClusterDestinations,
    DestinationTable,
    DuplicateService,
    RouteKind,
)
from quicmesh.sidecar.origdst import original_destination, parse_sockaddr

v4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
v6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
ips = v4 | v6
ports = st.integers(1, 65535)
addresses = st.tuples(ips, ports)


# -- the destination table ----------------------------------------------------------


@given(st.dictionaries(addresses, st.sampled_from(["a", "b", "c"]), max_size=40), addresses)
def test_services_route_to_their_cluster_and_the_rest_follow_the_policy(
    services: dict[tuple[str, int], str], probe: tuple[str, int]
) -> None:
    entries = [
        ClusterDestinations(name, tuple(a for a, c in services.items() if c == name), ())
        for name in ("a", "b", "c")
    ]
    for policy, kind in (
        ("registry_only", RouteKind.REFUSE),
        ("passthrough", RouteKind.PASSTHROUGH),
    ):
        table = DestinationTable(entries, policy)
        assert len(table) == len(services)
        for address, cluster in services.items():
            route = table.route(address)
            assert route.kind is RouteKind.CLUSTER and route.cluster == cluster
            assert route.target is None and route.endpoint is None
        if probe not in services:
            assert table.route(probe).kind is kind
            assert table.route(probe).name == kind.value


@given(v4, ports)
def test_ipv4_mapped_and_respelled_addresses_are_the_same_service(ip: str, port: int) -> None:
    table = DestinationTable([ClusterDestinations("a", ((ip, port),), ())], "registry_only")
    assert table.route((f"::ffff:{ip}", port)).cluster == "a"
    six = str(ipaddress.IPv6Address(2**127 + 5))
    table6 = DestinationTable([ClusterDestinations("b", ((six, port),), ())], "registry_only")
    assert table6.route((ipaddress.IPv6Address(six).exploded, port)).cluster == "b"


@given(ips, ports, ports)
def test_an_endpoint_host_routes_to_its_peer_with_the_dialled_target(
    host: str, sidecar_port: int, app_port: int
) -> None:
    table = DestinationTable(
        [
            ClusterDestinations("first", (), ((host, sidecar_port),)),
            ClusterDestinations("second", (), ((host, sidecar_port),)),
        ],
        "registry_only",
    )
    route = table.route((host, app_port))
    if app_port == sidecar_port:  # the peer's tunnel address itself: our own connection
        assert route.kind is RouteKind.TUNNEL and route.name == "loop"
        return
    assert route.kind is RouteKind.CLUSTER and route.cluster == "first"
    assert route.endpoint == (host, sidecar_port)
    wrapped = f"[{host}]" if ":" in host else host
    assert route.target == f"{wrapped}:{app_port}"


def test_a_service_wins_over_an_endpoint_host_and_names_are_ignored() -> None:
    table = DestinationTable(
        [
            ClusterDestinations("peer", (), (("10.0.0.2", 15008), ("b.example", 15008))),
            ClusterDestinations("svc", (("10.0.0.2", 9080),), ()),
        ],
        "passthrough",
    )
    assert table.route(("10.0.0.2", 9080)).cluster == "svc"
    assert table.route(("10.0.0.2", 22)).cluster == "peer"
    # The peer's tunnel address is where the sidecar's own tunnel connections go.
    assert table.route(("10.0.0.2", 15008)).kind is RouteKind.TUNNEL
    assert table.route(("::ffff:10.0.0.2", 15008)).kind is RouteKind.TUNNEL
    # Over QUIC (UDP) none is a TCP connection: a TCP one to that port is the app's.
    udp = DestinationTable(
        [ClusterDestinations("peer", (), (("10.0.0.2", 443),), tunnels_over_tcp=False)],
        "passthrough",
    )
    assert udp.route(("10.0.0.2", 443)).cluster == "peer"
    assert table.route(("b.example", 9080)).kind is RouteKind.PASSTHROUGH


def test_two_clusters_claiming_one_service_is_an_error() -> None:
    with pytest.raises(DuplicateService, match=r"10\.96\.0\.10:80 is a service of both"):
        DestinationTable(
            [
                ClusterDestinations("a", (("10.96.0.10", 80),), ()),
                ClusterDestinations("b", (("10.96.0.10", 80),), ()),
            ],
            "registry_only",
        )


# -- original destination -----------------------------------------------------------


@given(v4, ports)
def test_sockaddr_in_parses(ip: str, port: int) -> None:
    data = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
    data += ipaddress.IPv4Address(ip).packed + bytes(8)
    assert parse_sockaddr(data) == (ip, port)


@given(v6, ports, st.integers(0, 2**32 - 1))
def test_sockaddr_in6_parses(ip: str, port: int, scope: int) -> None:
    data = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
    data += ipaddress.IPv6Address(ip).packed + struct.pack("=I", scope)
    assert parse_sockaddr(data) == (ip, port)


@given(st.binary(max_size=40))
def test_garbage_sockaddr_is_a_value_error_or_an_address(data: bytes) -> None:
    try:
        host, port = parse_sockaddr(data)
    except ValueError:
        return
    assert ipaddress.ip_address(host) and 0 <= port <= 65535


def test_a_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        with client, accepted:
            assert original_destination(accepted) is None


# -- configuration ------------------------------------------------------------------

BASE = {
    "node": {"name": "a", "identity": "spiffe://mesh.local/ns/default/sa/a"},
    "tls": {"ca_dir": "ca"},
    "admin": {"address": "127.0.0.1:15000"},
}
CLUSTER = {"name": "reviews", "transport": "quic", "target": "127.0.0.1:9080"}


def config(**extra: object) -> str:
    return yaml.safe_dump({**BASE, **extra})


def test_intercept_section_alone_is_a_valid_sidecar() -> None:
    parsed = parse_config(
        config(
            intercept={"outbound_policy": "passthrough"},
            clusters=[
                {**CLUSTER, "endpoints": ["10.0.0.2:15008"], "services": ["10.96.0.10:9080"]}
            ],
        ),
        source="s.yaml",
    )
    assert parsed.intercept is not None
    assert (parsed.intercept.outbound_port, parsed.intercept.inbound_port) == (15001, 15006)
    assert parsed.intercept.outbound_policy == "passthrough"
    assert parsed.clusters[0].services == (("10.96.0.10", 9080),)
    defaults = parse_config(config(intercept={"inbound_port": None}), source="s.yaml")
    assert defaults.intercept is not None and defaults.intercept.inbound_port is None
    assert defaults.intercept.outbound_policy == "registry_only"  # secure by default


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"intercept": {"outbound_policy": "allow_any"}},
            "intercept.outbound_policy: 'allow_any' is not one of registry_only, passthrough",
        ),
        ({"intercept": {"outbound_port": 15000}}, "port 15000 is also used by admin.address"),
        ({"intercept": {"inbound_port": 15001}}, "intercept.inbound_port: port 15001 is also"),
        ({"intercept": {"mode": "x"}}, "intercept.mode: unknown field"),
        (
            {
                "intercept": {},
                "clusters": [{**CLUSTER, "endpoints": ["b:1"], "services": ["reviews:9080"]}],
            },
            "clusters[0].services[0]: 'reviews' is not an IP address",
        ),
        (
            {
                "intercept": {},
                "clusters": [
                    {**CLUSTER, "endpoints": ["b:1"], "services": ["10.96.0.1:80"]},
                    {**CLUSTER, "name": "x", "endpoints": ["b:1"], "services": ["10.96.0.1:80"]},
                ],
            },
            "clusters[1].services: 10.96.0.1:80 is also a service of cluster 'reviews'",
        ),
        (
            # The same service spelt as an IPv4-mapped IPv6 address: the destination
            # table refused it at start, with a traceback (--check said ok).
            {
                "intercept": {},
                "clusters": [
                    {**CLUSTER, "endpoints": ["b:1"], "services": ["10.96.0.10:80"]},
                    {
                        **CLUSTER,
                        "name": "y",
                        "endpoints": ["b:1"],
                        "services": ["[::ffff:10.96.0.10]:80"],
                    },
                ],
            },
            # (Named as compared, IPv4; it read [::ffff:a60:a]:80 until 2026-12-07.)
            "clusters[1].services: 10.96.0.10:80 is also a service of cluster 'reviews'",
        ),
        (
            # A scoped IPv6 literal: the table drops the zone (so did --check pass it).
            {
                "intercept": {},
                "clusters": [
                    {**CLUSTER, "endpoints": ["b:1"], "services": ["[fe80::1%eth0]:80"]},
                    {**CLUSTER, "name": "y", "endpoints": ["b:1"], "services": ["[fe80::1]:80"]},
                ],
            },
            "clusters[1].services: [fe80::1]:80 is also a service of cluster 'reviews'",
        ),
    ],
)
def test_bad_intercept_config_is_one_line(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(config(**extra), source="s.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_endpoints_file_may_list_services(tmp_path: Path) -> None:
    path = tmp_path / "ep.yaml"
    path.write_text(yaml.safe_dump({"endpoints": ["10.0.0.2:15008"], "services": ["[fd96::a]:80"]}))
    document = load_endpoints_document(path)
    assert document.endpoints == (("10.0.0.2", 15008),)
    assert document.services == (("fd96::a", 80),)
    assert load_endpoints_file(path) == (("10.0.0.2", 15008),)
    parsed = parse_config(
        config(
            intercept={},
            clusters=[{**CLUSTER, "endpoints_file": str(path), "services": ["10.96.0.9:80"]}],
        ),
        source="s.yaml",
    )
    cluster = parsed.clusters[0]
    assert cluster.all_services == (("10.96.0.9", 80), ("fd96::a", 80))
    path.write_text(yaml.safe_dump({"endpoints": [], "services": ["vip:80"]}))
    with pytest.raises(ConfigError, match=r"ep.yaml: services\[0\]: 'vip' is not an IP address"):
        load_endpoints_document(path)


def test_a_reload_that_changes_services_does_not_keep_the_cluster(tmp_path: Path) -> None:
    """A cluster kept on reload (only its endpoints differ) keeps its configuration: one
    whose ``services`` changed was kept too, and the next change of its endpoints file
    rebuilt the destination table from the old services."""
    path = tmp_path / "ep.yaml"
    path.write_text(yaml.safe_dump({"endpoints": ["10.0.0.2:15008"], "services": []}))

    def cluster(services: list[str], endpoints: list[str]) -> Any:
        path.write_text(yaml.safe_dump({"endpoints": endpoints, "services": ["10.96.0.20:80"]}))
        document = config(
            intercept={},
            clusters=[{**CLUSTER, "endpoints_file": str(path), "services": services}],
        )
        return parse_config(document, source="s.yaml").clusters[0]

    running = cluster(["10.96.0.10:80"], ["10.0.0.2:15008"])
    assert running.same_except_endpoints(cluster(["10.96.0.10:80"], ["10.0.0.3:15008"]))
    assert not running.same_except_endpoints(
        cluster(["10.96.0.10:80", "10.96.0.11:80"], ["10.0.0.2:15008"])
    )


@given(st.text(max_size=30))
def test_service_parser_accepts_ip_port_or_raises(text: str) -> None:
    try:
        host, port = parse_service(text)
    except ValueError:
        return
    assert ipaddress.ip_address(host) and 1 <= port <= 65535


# -- counting and piping ------------------------------------------------------------


def test_destination_counts_are_bounded() -> None:
    counts = DestinationCounts(limit=3)
    for index in range(10):
        counts.count("outbound", f"10.0.0.{index}:80", "passthrough")
    listed = counts.to_list()
    assert len(listed) == 4  # three named destinations and "other"
    other = [e for e in listed if e["original_destination"] == "other"]
    assert other and other[0]["flows"] == 7


def test_pipe_copies_both_ways_with_half_close() -> None:
    async def main() -> tuple[int, int, str, bytes]:
        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            data = await reader.read()  # until the half-close
            writer.write(data.upper())
            writer.write_eof()
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        up = await asyncio.start_server(upstream, "127.0.0.1", 0)
        result: list[tuple[int, int, str]] = []

        async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            up_reader, up_writer = await asyncio.open_connection(*up.sockets[0].getsockname())
            result.append(await pipe(reader, writer, up_reader, up_writer))

        front_server = await asyncio.start_server(front, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*front_server.sockets[0].getsockname())
        writer.write(b"hello " * 1000)
        writer.write_eof()
        answer = await reader.read()
        writer.close()
        while not result:
            await asyncio.sleep(0.01)
        await writer.wait_closed()
        up.close()
        front_server.close()
        await up.wait_closed()
        await front_server.wait_closed()
        return (*result[0], answer)

    sent, received, error, answer = asyncio.run(main())
    assert answer == b"HELLO " * 1000
    assert (sent, received, error) == (6000, 6000, "")


def test_a_captured_direct_flow_is_counted_while_it_runs() -> None:
    """Interception's direct flows (inbound to the application, outbound passthrough)
    showed their bytes only at their end (a review of the live byte counters): 100,000
    bytes in and 7,000 back, the flow still open, are counted now, each way, and once."""
    from quicmesh.sidecar.accesslog import FlowRecord, Outcome
    from quicmesh.sidecar.capture import CaptureInboundListener
    from quicmesh.sidecar.config import InterceptConfig
    from quicmesh.sidecar.flows import FlowTracker
    from quicmesh.sidecar.stats import ListenerStats

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async def application(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(100_000)
            writer.write(bytes(7_000))
            await writer.drain()
            await reader.read()  # until the flow ends
            writer.close()

        app = await asyncio.start_server(application, "127.0.0.1", 0)
        stats = ListenerStats("intercept_inbound", "intercept_inbound")
        listener = CaptureInboundListener(
            InterceptConfig(), stats, FlowTracker(), DestinationCounts(), lambda record: None
        )
        ended = asyncio.Event()

        async def captured(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            record = FlowRecord(
                start=0.0, duration=0.0, listener="intercept_inbound", direction="inbound",
                downstream="", target="", transport="", peer_identity="", endpoint="",
                bytes_sent=0, bytes_received=0, outcome=Outcome.COMPLETED,
            )  # fmt: skip
            try:
                await listener._direct(app.sockets[0].getsockname()[:2], reader, writer, record)
            finally:
                stats.flow_ended(record.outcome, record.bytes_sent, record.bytes_received,
                                 record.reason, flow=record)  # fmt: skip
                ended.set()

        front = await asyncio.start_server(captured, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*front.sockets[0].getsockname()[:2])
        writer.write(bytes(100_000))
        assert await reader.readexactly(7_000) == bytes(7_000)
        running = stats.to_dict()
        writer.close()
        await asyncio.wait_for(ended.wait(), 10)
        front.close()
        app.close()
        return running, stats.to_dict()

    running, after = asyncio.run(main())
    assert (running["bytes_received"], running["bytes_sent"]) == (100_000, 7_000), running
    assert (after["bytes_received"], after["bytes_sent"]) == (100_000, 7_000), after
