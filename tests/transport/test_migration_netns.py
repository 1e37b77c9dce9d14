"""A client whose local address goes away mid-transfer keeps its connection until it
migrates, on both engines (a review: on aioquic the sends' own "Network is unreachable"
was counted as the peer's ICMP unreachable, and the connection died, every flow with it,
before the application could call ``migrate()``).

A network namespace with two addresses on a veth pair to the root namespace; the server
listens in the root namespace, the client runs in the other (``ip netns exec``), pins its
connection to the first address, deletes that address while three flows run, and moves to
the second 0.3 s later.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from quic_helpers import CA, require_engine, server_transport

from quicmesh import MeshStream

pytestmark = pytest.mark.netns

FLOW_BYTES = 4_000_000

CLIENT = """
import asyncio, hashlib, json, subprocess, sys
from quicmesh import DevCA, QuicTransport

engine, ca_dir, server, pinned, moved, device = sys.argv[1:7]

async def flow(conn, n):
    stream = await conn.open_stream("reviews.default.svc:9080")
    payload = bytes([n]) * FLOW_BYTES

    async def send():
        for offset in range(0, len(payload), 65536):
            stream.write(payload[offset : offset + 65536])
            await stream.drain()
        stream.write_eof()

    sender = asyncio.ensure_future(send())
    echoed = await stream.read()
    await sender
    return hashlib.sha256(echoed).hexdigest() == hashlib.sha256(payload).hexdigest()

async def main():
    ca = DevCA.load(ca_dir)
    client = QuicTransport(
        identity=ca.issue("spiffe://mesh.local/ns/default/sa/client"),
        trust=ca.trust_bundle, engine=engine,
    )
    conn = await client.connect((server, 4433))
    await conn.migrate((pinned, 0))
    flows = [asyncio.ensure_future(flow(conn, n)) for n in range(3)]
    await asyncio.sleep(0.3)
    subprocess.run(["ip", "addr", "del", pinned + "/24", "dev", device], check=True)
    await asyncio.sleep(0.3)
    lost = str(conn.lost_error) if conn.lost_error is not None else None
    if lost is None:
        await conn.migrate((moved, 0))
    results = await asyncio.wait_for(asyncio.gather(*flows, return_exceptions=True), 60)
    print(json.dumps({
        "lost_before_migrate": lost,
        "flows": [r if isinstance(r, bool) else repr(r)[:200] for r in results],
    }))
    conn.close()
    await conn.wait_closed()
    await client.aclose()

asyncio.run(main())
""".replace("FLOW_BYTES", str(FLOW_BYTES))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespace() -> Iterator[tuple[str, str, str]]:
    """A namespace with 10.x.y.2 and .3 on a veth whose root end is 10.x.y.1: its name
    and the device inside."""
    tag = f"{os.getpid() % 100000}"
    name, outside, inside = f"qmmig{tag}", f"qmm{tag}o", f"qmm{tag}i"
    taken = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    number = os.getpid() % 250
    while f" 10.234.{number}." in taken:  # (another test process's namespace: not that one)
        number = (number + 1) % 250
    net = f"10.234.{number}"
    ip("netns", "add", name)
    try:
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", name)
        ip("addr", "add", f"{net}.1/24", "dev", outside)
        ip("link", "set", outside, "up")
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "link", "set", inside, "up")
        subprocess.run(
            ["ip", "netns", "exec", name, "sysctl", "-q", "-w",
             f"net.ipv4.conf.{inside}.promote_secondaries=1"],
            check=True,
        )  # fmt: skip
        ip("-n", name, "addr", "add", f"{net}.2/24", "dev", inside)
        ip("-n", name, "addr", "add", f"{net}.3/24", "dev", inside)
        yield name, net, inside
    finally:
        subprocess.run(["ip", "link", "del", outside], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.parametrize("engine", ["aioquic", "native"])
def test_flows_survive_the_local_address_going_away_until_migrate(
    engine: str, namespace: tuple[str, str, str], tmp_path: Path
) -> None:
    require_engine(engine)
    name, net, device = namespace
    CA.save(tmp_path / "ca")  # (the client's identity comes from the same CA)

    async def echo(stream: MeshStream) -> None:
        stream.write(await stream.read())
        stream.write_eof()

    async def main() -> dict[str, object]:
        server = server_transport(engine=engine)
        listener = await server.listen((f"{net}.1", 4433), echo)
        client = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", name, sys.executable, "-c", CLIENT, engine,
            str(tmp_path / "ca"), f"{net}.1", f"{net}.2", f"{net}.3", device,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(client.communicate(), 90)
        listener.close()
        await listener.wait_closed()
        await server.aclose()
        assert client.returncode == 0, err.decode()[-2000:]
        return json.loads(out.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]

    result = asyncio.run(main())
    assert result == {"lost_before_migrate": None, "flows": [True, True, True]}, result


def test_a_link_local_address_has_a_route_to_its_neighbour(
    namespace: tuple[str, str, str],
) -> None:
    """``has_route`` bound an IPv6 socket to a link-local address without its scope, which
    the kernel refuses: a link-local peer's real ICMP unreachable was then taken for our
    own lost route and never counted (a review)."""
    name, _, device = namespace
    ip("-n", name, "addr", "add", "fe80::2/64", "dev", device, "nodad")
    probe = (
        "import socket, sys\n"
        "from quicmesh.transport._udp import has_route\n"
        "scope = socket.if_nametoindex(sys.argv[1])\n"
        "print(has_route(('fe80::2', 0, 0, scope), ('fe80::1', 4433)),"
        " has_route(('fe80::3', 0, 0, scope), ('fe80::1', 4433)))\n"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", name, sys.executable, "-c", probe, device],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert out.split() == ["True", "False"]  # (fe80::3 is not ours: no route from it)
