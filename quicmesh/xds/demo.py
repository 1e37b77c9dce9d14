"""``quicmesh demo --xds``: two sidecars driven only by an ADS server, changed under load.

Starts the test ADS server (:mod:`quicmesh.xds.testing`) and an echo app in
this process, and two ``quicmesh sidecar --xds`` child processes whose YAML
holds only their node, a development CA and the admin address::

    clients -> sidecar A (LDS outbound, CDS/EDS) ==mTLS tunnel==> sidecar B (LDS inbound) -> echo

While ``--flows`` concurrent clients send random bytes for ``--duration``
seconds, the control plane pushes three changes: a third of the way in it
flips A's cluster to the other transport (h2 <-> quic), at two thirds it moves
the cluster's endpoints to B's second listener port, and it rotates both
sidecars' certificates over SDS. The demo prints each step, the ACKs the
server received, and exits 0 only if every flow came back intact.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

from .._signals import scratch_directory
from ..errors import QuicmeshError
from ..sidecar.launch import (
    LOOPBACK,
    HandlerTasks,
    SidecarProcess,
    free_port,
    free_ports,
    run_async,
    terminate_as_exit,
)
from ..tls import DevCA
from .resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE
from .testing import AdsServer
from .testing import documents as docs

IDENTITY_A = "spiffe://mesh.local/ns/default/sa/productpage"
IDENTITY_B = "spiffe://mesh.local/ns/default/sa/reviews"


def _addr(port: int) -> str:
    return f"{LOOPBACK}:{port}"


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        pass
    finally:
        writer.close()


async def _client(port: int, size: int, deadline: float, tally: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        payload = os.urandom(size)
        try:
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(payload)
            writer.write_eof()
            # (Not wait_for: on Python 3.11 it loses a cancellation that comes as the read
            # completes, and the client went on until the deadline after SIGTERM.)
            async with asyncio.timeout(30):
                received = await reader.read(-1)
            writer.close()
            ok = received == payload
        except (OSError, TimeoutError):
            ok = False
        tally["ok" if ok else "failed"] += 1


def _sidecar(name: str, identity: str, ca: Path, workdir: Path, server: AdsServer) -> Any:
    config = {
        "node": {"name": name, "identity": identity},
        "tls": {"ca_dir": str(ca)},
        "admin": {"address": _addr(free_port())},
        "xds": {"address": server.address, "cluster": "demo"},
    }
    return SidecarProcess(name, config, workdir)


def _push_a(
    server: AdsServer, version: str, transport: str, out: int, b_port: int, echo: int
) -> None:
    server.set_resources(
        CLUSTER_TYPE, [docs.cluster(docs.cluster_doc("echo", transport))], version, node="a"
    )
    server.set_resources(
        ENDPOINT_TYPE,
        [docs.assignment(docs.cla_doc("echo", [(LOOPBACK, b_port, "HEALTHY", None)]))],
        version,
        node="a",
    )
    server.set_resources(
        LISTENER_TYPE,
        [docs.listener(docs.outbound_listener_doc("out", out, "echo", _addr(echo)))],
        version,
        node="a",
    )


def _push_secrets(server: AdsServer, ca: DevCA, version: str) -> None:
    for node, identity in (("a", IDENTITY_A), ("b", IDENTITY_B)):
        issued = ca.issue(identity)
        server.set_resources(
            SECRET_TYPE,
            [
                docs.secret(doc)
                for doc in docs.secret_docs(
                    issued.cert_chain_pem(), issued.private_key_pem(), ca.trust_bundle.pem
                )
            ],
            version,
            node=node,
        )


async def _run(args: argparse.Namespace, workdir: Path) -> int:
    ca = DevCA()
    ca.save(workdir / "ca")
    echo_handlers = HandlerTasks()  # cancelled and awaited at the end (Ctrl-C: no noise)
    echo_server = await asyncio.start_server(echo_handlers.wrap(_echo), LOOPBACK, 0)
    echo = int(echo_server.sockets[0].getsockname()[1])
    server = AdsServer()
    server.start()
    ports = dict(zip(("b1", "b2", "out"), free_ports(3), strict=True))
    inbound = []
    for prefix, port in (("in1", ports["b1"]), ("in2", ports["b2"])):
        inbound += [
            docs.listener(docs.inbound_listener_doc(f"{prefix}-quic", port, "UDP", [_addr(echo)])),
            docs.listener(docs.inbound_listener_doc(f"{prefix}-h2", port, "TCP", [_addr(echo)])),
        ]
    server.set_resources(LISTENER_TYPE, inbound, "1", node="b")
    server.set_resources(CLUSTER_TYPE, [], "1", node="b")
    first = args.transport  # quic or h2 (the command line refuses tcp with --xds)
    other = "quic" if first == "h2" else "h2"
    _push_a(server, "1", first, ports["out"], ports["b1"], echo)
    a = _sidecar("a", IDENTITY_A, workdir / "ca", workdir, server)
    b = _sidecar("b", IDENTITY_B, workdir / "ca", workdir, server)
    tally = {"ok": 0, "failed": 0}
    clients: list[asyncio.Future[None]] = []
    try:
        b.start()
        a.start()
        await asyncio.to_thread(b.wait_ready)
        await asyncio.to_thread(a.wait_ready)
        print(f"ADS server on {server.address}; sidecars a and b ready (driven only by it)")
        print(f"v1: cluster echo over {first} to b:{ports['b1']}")
        deadline = time.monotonic() + args.duration
        clients += [
            asyncio.ensure_future(_client(ports["out"], args.size, deadline, tally))
            for _ in range(args.flows)
        ]
        await asyncio.sleep(args.duration / 3)
        _push_a(server, "2", other, ports["out"], ports["b1"], echo)
        print(f"v2: cluster echo flipped to {other} ({tally['ok']} flows done so far)")
        await asyncio.sleep(args.duration / 6)
        _push_secrets(server, ca, "2")
        print("v2: new certificates for a and b over SDS")
        await asyncio.sleep(args.duration / 6)
        _push_a(server, "3", other, ports["out"], ports["b2"], echo)
        print(f"v3: endpoints moved to b:{ports['b2']} ({tally['ok']} flows done so far)")
        await asyncio.gather(*clients)
        stats = await asyncio.to_thread(a.stats)
        acks = [r for r in server.requests if r.version_info and not r.is_nack]
        nacks = [r for r in server.requests if r.is_nack]
        print(
            f"flows: {tally['ok']} intact, {tally['failed']} failed; "
            f"server saw {len(acks)} ACKs and {len(nacks)} NACKs; "
            f"a's certificate rotations: {stats['certificate']['rotations']}; "
            f"a's versions: {stats['xds']['versions']}"
        )
    finally:
        for client in clients:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        codes = await asyncio.to_thread(lambda: [a.stop(), b.stop()])
        server.stop(0)
        await echo_handlers.close(echo_server)
    ok = tally["failed"] == 0 and tally["ok"] > 0 and codes == [0, 0]
    print("demo ok" if ok else "demo FAILED", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def run_xds_demo(args: argparse.Namespace) -> int:
    """Run the xDS demo; 0 only if every flow came back intact and both sidecars drained."""
    from ..demo import load_problem

    problem = load_problem(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    # ``kill PID`` (SIGTERM) becomes SystemExit and Ctrl-C cancels the run: either way
    # the finally blocks stop both sidecars and the temporary directory goes.
    with terminate_as_exit(), scratch_directory("quicmesh-xds-demo-") as workdir:
        try:
            return run_async(_run(args, Path(workdir)))
        except QuicmeshError as exc:
            print(f"quicmesh demo: {exc}", file=sys.stderr)
            return 1
