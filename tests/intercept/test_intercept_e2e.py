"""End to end, as root: an unmodified client in a namespace reaches a backend through the mesh.

One lab (:class:`quicmesh.intercept.lab.InterceptLab`) for the module: sidecar A
with ``quicmesh intercept install`` in the app namespace, sidecar B with its own
rules and the backends in the service namespace, QUIC between them over a veth
pair. The client programs (curl, a raw socket) know nothing of the mesh.
"""

from __future__ import annotations

import errno
import functools
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from quicmesh.intercept import lab as L
from quicmesh.intercept.lab import InterceptLab, NamespacedSidecar
from quicmesh.sidecar.launch import metric
from quicmesh.tls import DevCA
from tests.sidecar.conftest import wait_until as sidecar_wait_until

pytestmark = pytest.mark.netns

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"
# The sidecar tests' poll, with a longer default: these flows cross two namespaces.
wait_until = functools.partial(sidecar_wait_until, timeout=30.0)


VIP = "10.96.0.10"
ECHO_VIP = "10.96.0.11"
NEW_VIP = "10.96.0.12"
VIP6 = "fd96::10"
SELF_PORT = 7300
TUNNEL = f"{L.SERVICE_ADDRESS}:15008"
B_DESTINATIONS = ["127.0.0.1:9080", "127.0.0.1:7007", f"{L.SERVICE_ADDRESS}:9080"]


def a_config(workdir: Path, policy: str) -> dict[str, Any]:
    return {
        "node": {"name": "a", "identity": IDENTITY_A},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": "127.0.0.1:15000"},
        "intercept": {"outbound_policy": policy, "connect_timeout": "3s"},
        "clusters": [
            {
                "name": "reviews",
                "transport": "quic",
                "target": "127.0.0.1:9080",
                "endpoints": [TUNNEL],
                "services": [f"{VIP}:9080", f"[{VIP6}]:9080"],
            },
            {
                "name": "echo",
                "transport": "quic",
                "target": "127.0.0.1:7007",
                "endpoints_file": str(workdir / "echo-endpoints.yaml"),
            },
        ],
    }


def b_config(workdir: Path) -> dict[str, Any]:
    return {
        "node": {"name": "b", "identity": IDENTITY_B},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": "127.0.0.1:15000"},
        "intercept": {"outbound_policy": "registry_only"},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": TUNNEL,
                    "transports": ["quic"],
                    "destinations": B_DESTINATIONS,
                    "policies": [{"identity": IDENTITY_A, "destinations": B_DESTINATIONS}],
                }
            ]
        },
    }


def write_endpoints(workdir: Path, services: list[str]) -> None:
    path = workdir / "echo-endpoints.yaml"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"endpoints": [TUNNEL], "services": services}))
    tmp.replace(path)


class World:
    def __init__(self, lab: InterceptLab, a: NamespacedSidecar, b: NamespacedSidecar) -> None:
        self.lab, self.a, self.b = lab, a, b


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("intercept")
    DevCA().save(workdir / "ca")
    write_endpoints(workdir, [f"{ECHO_VIP}:7007"])
    with InterceptLab() as lab:
        b = lab.sidecar("b", b_config(workdir), workdir, lab.service_ns)
        a = lab.sidecar("a", a_config(workdir, "registry_only"), workdir, lab.app_ns)
        for namespace, extra in (
            (lab.app_ns, ["--exclude-ports", str(L.EXCLUDED_ECHO_PORT)]),
            (lab.service_ns, ["--exclude-inbound-ports", f"22,{L.EXCLUDED_ECHO_PORT}"]),
        ):
            done = lab.intercept(namespace, "install", *extra)
            assert done.returncode == 0, done.stderr
        yield World(lab, a, b)


def curl(world: World, url: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["ip", "netns", "exec", world.lab.app_ns, "curl", "-sS", "--max-time", "10", url],
        capture_output=True,
        timeout=20,
        check=False,
    )


def exchange(world: World, address: tuple[str, int], payload: bytes) -> bytes:
    """A raw TCP client in the app namespace: send, half-close, read until EOF."""
    with world.lab.entered(world.lab.app_ns):
        sock = socket.create_connection(address, timeout=30)
    with sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def refused(world: World, address: tuple[str, int]) -> bool:
    """True if the connection is reset (or closed) without an answer."""
    try:
        return exchange(world, address, b"anyone there?") == b""
    except (ConnectionResetError, BrokenPipeError):
        return True  # the reset may arrive during the connect, the send or the read
    except OSError as exc:
        # ... or before the half-close: a reset socket is no longer connected.
        if exc.errno == errno.ENOTCONN:
            return True
        raise


def log_lines(sidecar: NamespacedSidecar, **fields: str) -> list[dict[str, Any]]:
    return [
        line
        for line in sidecar.access_log()
        if all(line.get(key) == value for key, value in fields.items())
    ]


def captured_outbound(world: World) -> int:
    return int(world.a.stats()["listeners"]["intercept_outbound"]["connections_total"])


def test_curl_to_a_vip_nobody_owns_reaches_the_backend_over_quic(world: World) -> None:
    done = curl(world, f"http://{VIP}:9080/")
    assert done.returncode == 0, done.stderr
    assert done.stdout == L.HTTP_BODY
    a_line = wait_until(
        lambda: log_lines(world.a, original_destination=f"{VIP}:9080"), what="A's log line"
    )[-1]
    assert a_line["listener"] == "intercept_outbound"
    assert a_line["outcome"] == "completed" and a_line["transport"] == "quic"
    assert a_line["peer_identity"] == IDENTITY_B and a_line["target"] == "127.0.0.1:9080"
    b_line = wait_until(
        lambda: log_lines(world.b, listener="mesh", target="127.0.0.1:9080"), what="B's log"
    )[-1]
    assert b_line["peer_identity"] == IDENTITY_A  # B sees A's SPIFFE identity
    # The start line names the capture listeners (it read "outbound -, inbound -").
    started = world.a.stderr_path.read_text()
    assert ", intercept outbound *:15001 inbound *:15006" in started, started[-2000:]
    samples = world.a.metrics()
    assert (
        metric(
            samples,
            "quicmesh_intercept_flows_total",
            original_destination=f"{VIP}:9080",
            route="reviews",
        )
        >= 1
    )


def test_ipv6_vip_is_captured_too(world: World) -> None:
    done = curl(world, f"http://[{VIP6}]:9080/")
    assert done.returncode == 0, done.stderr
    assert done.stdout == L.HTTP_BODY
    wait_until(
        lambda: log_lines(world.a, original_destination=f"[{VIP6}]:9080", outcome="completed"),
        what="A's log line for the IPv6 VIP",
    )


def test_raw_tcp_echo_through_the_tunnel(world: World) -> None:
    payload = bytes(range(256)) * 400
    assert exchange(world, (ECHO_VIP, 7007), payload) == payload
    line = wait_until(lambda: log_lines(world.a, original_destination=f"{ECHO_VIP}:7007"))[-1]
    assert line["bytes_sent"] == len(payload) and line["bytes_received"] == len(payload)


def test_an_endpoint_address_goes_through_the_peer_fronting_it(world: World) -> None:
    done = curl(world, f"http://{L.SERVICE_ADDRESS}:9080/")
    assert done.returncode == 0, done.stderr
    assert done.stdout == L.HTTP_BODY
    line = wait_until(lambda: log_lines(world.a, original_destination=f"{L.SERVICE_ADDRESS}:9080"))[
        -1
    ]
    assert line["target"] == f"{L.SERVICE_ADDRESS}:9080" and line["endpoint"] == TUNNEL
    assert line["peer_identity"] == IDENTITY_B


def test_a_service_added_to_the_endpoints_file_is_reachable_without_restart(
    world: World,
) -> None:
    assert refused(world, (NEW_VIP, 7007))  # registry_only: unknown yet
    ok_before = world.a.stats()["reloads"]["ok"]
    write_endpoints(Path(world.a.workdir), [f"{ECHO_VIP}:7007", f"{NEW_VIP}:7007"])
    wait_until(lambda: world.a.stats()["reloads"]["ok"] > ok_before, what="endpoints reload")
    assert exchange(world, (NEW_VIP, 7007), b"new service") == b"new service"


def test_registry_only_refuses_and_counts_passthrough_connects(world: World) -> None:
    unknown = (L.OTHER_ADDRESS, L.PLAIN_ECHO_PORT)
    assert refused(world, unknown)
    line = wait_until(lambda: log_lines(world.a, original_destination="10.79.0.3:7008"))[-1]
    assert line["outcome"] == "refused" and "registry_only" in line["reason"]
    samples = world.a.metrics()
    assert metric(samples, "quicmesh_intercept_flows_total", route="registry_only") >= 1

    workdir = Path(world.a.workdir)
    before = captured_outbound(world)
    inbound_before = log_lines(world.b, listener="intercept_inbound")
    world.a.write_config(a_config(workdir, "passthrough"))
    ok_before = world.a.stats()["reloads"]["ok"]
    world.a.signal(signal.SIGHUP)
    wait_until(lambda: world.a.stats()["reloads"]["ok"] > ok_before, what="reload")
    try:
        assert exchange(world, unknown, b"straight through") == b"straight through"
        line = wait_until(
            lambda: log_lines(world.a, original_destination="10.79.0.3:7008", outcome="completed")
        )[-1]
        assert line["transport"] == "direct" and line["endpoint"] == "10.79.0.3:7008"
        # A's own connection to the destination was not captured again: one flow, no loop.
        assert captured_outbound(world) == before + 1
        # B's inbound capture took it (A's traffic left the app namespace unmodified).
        b_lines = wait_until(
            lambda: log_lines(world.b, listener="intercept_inbound")[len(inbound_before) :]
        )
        assert b_lines[-1]["original_destination"] == "10.79.0.3:7008"
        assert b_lines[-1]["outcome"] == "completed"
    finally:
        world.a.write_config(a_config(workdir, "registry_only"))
        ok_before = world.a.stats()["reloads"]["ok"]
        world.a.signal(signal.SIGHUP)
        wait_until(lambda: world.a.stats()["reloads"]["ok"] > ok_before, what="reload")


def test_excluded_ports_are_untouched(world: World) -> None:
    before_a = captured_outbound(world)
    before_b = len(log_lines(world.b, listener="intercept_inbound"))
    # registry_only would refuse it if it were captured; excluded, it goes straight there.
    address = (L.OTHER_ADDRESS, L.EXCLUDED_ECHO_PORT)
    assert exchange(world, address, b"not for the mesh") == b"not for the mesh"
    assert captured_outbound(world) == before_a
    assert len(log_lines(world.b, listener="intercept_inbound")) == before_b


def test_the_sidecar_group_is_not_captured(world: World) -> None:
    """A process with the sidecar's group ID dials an unknown address: not refused, not seen."""
    before = captured_outbound(world)
    code = (
        "import socket; s = socket.create_connection(('10.79.0.3', 7008), timeout=5); "
        "s.sendall(b'own'); s.shutdown(socket.SHUT_WR); print(s.recv(100).decode())"
    )
    done = subprocess.run(
        ["ip", "netns", "exec", world.lab.app_ns, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
        group=1337,
        extra_groups=[],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "own"
    assert captured_outbound(world) == before


def test_direct_connection_to_the_capture_port_is_reset(world: World) -> None:
    """Dialling 15001 itself (no NAT record) is refused rather than looped."""
    assert refused(world, ("127.0.0.1", 15001))
    line = wait_until(lambda: log_lines(world.a, listener="intercept_outbound", outcome="refused"))
    assert any("not a redirected connection" in item["reason"] for item in line)


def test_install_twice_changes_nothing_and_remove_leaves_nothing(world: World) -> None:
    lab = world.lab
    listed = subprocess.run(
        ["ip", "netns", "exec", lab.app_ns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "table inet quicmesh" in listed
    again = lab.intercept(lab.app_ns, "install", "--exclude-ports", str(L.EXCLUDED_ECHO_PORT))
    assert again.returncode == 0, again.stderr
    relisted = subprocess.run(
        ["ip", "netns", "exec", lab.app_ns, "nft", "list", "ruleset"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert relisted == listed
    for namespace in (lab.app_ns, lab.service_ns):
        for _ in range(2):  # removing twice is fine too
            done = lab.intercept(namespace, "remove")
            assert done.returncode == 0, done.stderr
        empty = subprocess.run(
            ["ip", "netns", "exec", namespace, "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert empty.strip() == ""
    # Without the rules, the VIP is no longer reachable: nothing captures it.
    done = curl(world, f"http://{VIP}:9080/")
    assert done.returncode != 0


def test_an_application_calling_its_own_address_is_not_captured(world: World) -> None:
    """A pod calling itself on its pod IP (a health check, say) stays local, as with
    istio-iptables: it was captured, and registry_only refused it."""
    with world.lab.entered(world.lab.app_ns):
        world.lab._serve(L._Threading((L.APP_ADDRESS, SELF_PORT), L._Echo))
    assert exchange(world, (L.APP_ADDRESS, SELF_PORT), b"me") == b"me"
    assert not log_lines(world.a, original_destination=f"{L.APP_ADDRESS}:{SELF_PORT}")


def test_a_sidecar_the_rules_do_not_exempt_refuses_its_own_captured_connections(
    tmp_path: Path,
) -> None:
    """A sidecar started without the exempted group has its own connections captured
    again: under passthrough each one dialled once more (thousands of connections a
    second, until descriptors ran out). Now the captured one is refused as a loop, with
    a line saying what to fix, and the flow ends."""
    DevCA().save(tmp_path / "ca")
    write_endpoints(tmp_path, [f"{ECHO_VIP}:7007"])
    config = a_config(tmp_path, "passthrough")
    with InterceptLab() as lab:
        a = lab.sidecar("a", config, tmp_path, lab.app_ns, proxy_group=False)
        done = lab.intercept(lab.app_ns, "install")
        assert done.returncode == 0, done.stderr
        try:
            got = exchange(World(lab, a, a), (L.OTHER_ADDRESS, L.PLAIN_ECHO_PORT), b"x")
        except (ConnectionResetError, BrokenPipeError):
            got = b""
        assert got == b""
        [loop] = wait_until(lambda: log_lines(a, listener="intercept_outbound", outcome="refused"))
        assert "the sidecar's own connection" in loop["reason"], loop
        assert loop["original_destination"] == f"{L.OTHER_ADDRESS}:{L.PLAIN_ECHO_PORT}"
        listener = a.stats()["listeners"]["intercept_outbound"]
        assert int(listener["connections_total"]) == 2  # the flow, and its one loop back
        stderr = Path(a.stderr_path).read_text()
        assert "run it with the user or group the intercept rules exempt" in stderr


@pytest.mark.parametrize("transport", ["h2", "tcp"])
def test_a_sidecar_the_rules_do_not_exempt_refuses_its_own_tunnel_connections(
    tmp_path: Path, transport: str
) -> None:
    """Without the exempted group, the sidecar's own h2 or tcp tunnel connection to its
    peer (a TCP connection to the cluster endpoint's address) is captured too: it was
    routed through the cluster that fronts the peer's address, which dialled the tunnel
    again (over tcp, one connection more for each, without end). The captured one is now
    refused as a loop, named as a tunnel address, and the flow fails."""
    DevCA().save(tmp_path / "ca")
    write_endpoints(tmp_path, [f"{ECHO_VIP}:7007"])
    config = a_config(tmp_path, "registry_only")
    config["clusters"][0]["transport"] = transport
    config["clusters"][0]["connect_timeout"] = "2s"
    config["clusters"][0]["connect_retries"] = 0
    b = b_config(tmp_path)
    b["listeners"]["inbound"][0]["transports"] = [transport]
    with InterceptLab() as lab:
        lab.sidecar("b", b, tmp_path, lab.service_ns)
        a = lab.sidecar("a", config, tmp_path, lab.app_ns, proxy_group=False)
        done = lab.intercept(lab.app_ns, "install")
        assert done.returncode == 0, done.stderr
        world = World(lab, a, a)
        assert curl(world, f"http://{VIP}:9080/").returncode != 0
        [loop] = wait_until(
            lambda: log_lines(a, listener="intercept_outbound", original_destination=TUNNEL)
        )
        assert loop["outcome"] == "refused", loop
        assert f"a connection to {TUNNEL}, a peer sidecar's tunnel address" in loop["reason"]
        stderr = Path(a.stderr_path).read_text()
        assert "run it with the user or group the intercept rules exempt" in stderr
        # One loop back for the flow's one dial: not a dial for each captured one.
        assert len(log_lines(a, listener="intercept_outbound", original_destination=TUNNEL)) == 1
