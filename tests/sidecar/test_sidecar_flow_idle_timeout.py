"""End to end: a listener's ``flow_idle_timeout`` (Envoy's ``tcp_proxy`` ``idle_timeout``).

Two ``quicmesh sidecar`` processes as the README runs them. A flow that moves no byte
either way for the timeout is reset on both sides: the local client and the backend see a
TCP reset, both access logs say the flow was reset, and the one whose listener timed out
says why. It is checked on each side (A's outbound listener, B's inbound listener) and on
both engines: the native engine carries the flow without Python (engine flows), aioquic
in Python (:func:`quicmesh.splice`).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from quic_helpers import require_engine

from quicmesh import DevCA, MeshStream, QuicTransport
from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess, free_port, metric

from .conftest import IDENTITY_A, IDENTITY_B, addr, wait_until

IDLE = "700ms"
REASON = "idle timeout: no bytes either way for 0.7s"


class SilentApp:
    """A backend that answers ``+OK`` to the first bytes, then waits, and records how each
    connection ended (``eof`` or ``reset``)."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"+OK\n")
        try:
            while await reader.read(65536):
                pass
            self.ended.append("eof")
        except ConnectionResetError:
            self.ended.append("reset")
        writer.close()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()

    def __enter__(self) -> SilentApp:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture
def app() -> Iterator[SilentApp]:
    with SilentApp() as server:
        yield server


def sidecar_a(
    name: str, workdir: Path, listen: int, cluster: dict[str, Any], idle: dict[str, Any]
) -> SidecarProcess:
    """Sidecar A: outbound listener ``app`` on ``listen`` (with ``idle``) to the QUIC
    cluster ``app`` (``cluster``: its engine, target and endpoints)."""
    return SidecarProcess(
        name,
        {
            "node": {"name": "a", "identity": IDENTITY_A},
            "tls": {"ca_dir": str(workdir / "ca")},
            "admin": {"address": addr(free_port())},
            "listeners": {
                "outbound": [{"name": "app", "address": addr(listen), "cluster": "app", **idle}]
            },
            "clusters": [{"name": "app", "transport": "quic", **cluster}],
        },
        workdir,
    )


def sidecars(
    workdir: Path, app_port: int, engine: str, side: str
) -> tuple[SidecarProcess, SidecarProcess, int]:
    mesh, listen = free_port(), free_port()
    idle: dict[str, Any] = {"flow_idle_timeout": IDLE}
    b = SidecarProcess(
        f"idle-b-{engine}-{side}",
        {
            "node": {"name": "b", "identity": IDENTITY_B},
            "tls": {"ca_dir": str(workdir / "ca")},
            "admin": {"address": addr(free_port())},
            "listeners": {
                "inbound": [
                    {
                        "name": "mesh",
                        "address": addr(mesh),
                        "transports": ["quic"],
                        "engine": engine,
                        "destinations": [addr(app_port)],
                        **(idle if side == "b" else {}),
                    }
                ]
            },
        },
        workdir,
    )
    a = sidecar_a(
        f"idle-a-{engine}-{side}",
        workdir,
        listen,
        {"engine": engine, "target": addr(app_port), "endpoints": [addr(mesh)]},
        idle if side == "a" else {},
    )
    return a, b, listen


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("engine", ["native", "aioquic"])
def test_an_idle_flow_is_reset_end_to_end(
    workdir: Path, app: SilentApp, engine: str, side: str
) -> None:
    require_engine(engine)
    a, b, listen = sidecars(workdir, app.port, engine, side)
    b.start()
    a.start()
    try:
        b.wait_ready()
        a.wait_ready()

        async def flow() -> str:
            reader, writer = await asyncio.open_connection(LOOPBACK, listen)
            writer.write(b"hello\n")
            assert await asyncio.wait_for(reader.readline(), 20) == b"+OK\n"
            try:
                await asyncio.wait_for(reader.read(), 20)
            except ConnectionResetError:
                return "reset"
            finally:
                writer.close()
            return "clean end"

        assert asyncio.run(flow()) == "reset"
        wait_until(lambda: app.ended, 20.0, "the backend saw the flow end")
        assert app.ended == ["reset"]

        def logged() -> list[dict[str, Any]]:
            lines = [*a.access_log(), *b.access_log()]
            return lines if len(lines) == 2 else []

        a_line, b_line = wait_until(logged, 20.0, "both sidecars logged the flow")
        assert (a_line["outcome"], b_line["outcome"]) == ("reset", "reset")
        timed_out = a_line if side == "a" else b_line
        assert timed_out["reason"] == REASON
        # Counted by the listener that timed the flow out, not by the other side's.
        for sidecar, listener, counted in ((a, "app", side == "a"), (b, "mesh", side == "b")):
            samples = sidecar.metrics()
            assert metric(samples, "quicmesh_listener_idle_timeouts_total", listener=listener) == (
                1 if counted else 0
            )
    finally:
        a.stop()
        b.stop()


def test_the_timeout_runs_from_the_splice_not_from_a_slow_answer(workdir: Path) -> None:
    """An engine flow whose peer takes longer than the idle timeout to answer its CONNECT
    (here 1.5 s against 0.7 s) is not idle while it waits (the connect timeout bounds
    that): the answer's bytes arrive, and only then does the flow go idle and get reset."""
    require_engine("native")
    ca = DevCA.load(workdir / "ca")
    peer_port, listen = free_port(), free_port()
    a = sidecar_a(
        "idle-a-slow-answer",
        workdir,
        listen,
        {"engine": "native", "target": "app.local:80", "endpoints": [addr(peer_port)]},
        {"flow_idle_timeout": IDLE},
    )

    async def slow_peer(stream: MeshStream) -> None:
        await asyncio.sleep(1.5)
        stream.accept()
        await asyncio.sleep(0.3)
        stream.write(b"+OK\n")
        await stream.drain()
        try:
            while await stream.read(65536):
                pass
        except Exception:  # the reset this test expects
            pass

    async def flow() -> tuple[bytes, str]:
        reader, writer = await asyncio.open_connection(LOOPBACK, listen)
        writer.write(b"hello\n")
        got = b""
        try:
            while chunk := await asyncio.wait_for(reader.read(100), 20):
                got += chunk
            ending = "clean end"
        except ConnectionResetError:
            ending = "reset"
        writer.close()
        return got, ending

    async def main() -> list[tuple[bytes, str]]:
        server = QuicTransport(identity=ca.issue(IDENTITY_B), trust=ca.trust_bundle)
        listener = await server.listen((LOOPBACK, peer_port), slow_peer)
        a.start()
        try:
            await asyncio.to_thread(a.wait_ready)
            # The first flow dials the connection (Python carries it until its 200); the
            # second finds it pooled and runs as an engine flow.
            return [await flow(), await flow()]
        finally:
            listener.close()
            await listener.wait_closed()

    try:
        assert asyncio.run(main()) == [(b"+OK\n", "reset")] * 2
        lines = wait_until(lambda: a.access_log()[1:] and a.access_log(), 20.0, "logged")
        for line in lines:
            assert (line["outcome"], line["reason"]) == ("reset", REASON)
            assert line["bytes_received"] == len(b"+OK\n")
        engine_flows = metric(a.metrics(), "quicmesh_listener_engine_flows_total", listener="app")
        assert engine_flows == 1
    finally:
        a.stop()
