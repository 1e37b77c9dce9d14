"""quicmesh's interop endpoint on the native QUIC engine (``ENGINE=native``).

The same HTTP/3 file server and client as :mod:`interop.endpoint`, with the
same environment (``ROLE``, ``TESTCASE``, ``WWW``, ``PORT``, ``HOST``,
``REQUESTS``, ``DOWNLOADS``, ``CERTS``) and exit statuses, on the native engine
(quinn + rustls, ``quicmesh._native``) instead of aioquic. The QUIC side goes
through quicmesh's engine interface only (:mod:`quicmesh.transport.quic.engine`):
``QuicTransport(engine="native")`` gives the engine and the connection settings
(:meth:`~quicmesh.QuicTransport.engine_limits`), the server is
:meth:`QuicEngine.listen`, a client connection :meth:`QuicEngine.connect`, and
HTTP/3 is quicmesh's :class:`~quicmesh._aioquic.MeshH3Connection` over the
engine connection (the layering of quicmesh's CONNECT tunnel,
:mod:`quicmesh.tunnel.h3`), driven from the engine's wake-ups. The request and
response handling is :mod:`interop.endpoint`'s (:func:`~interop.endpoint.serve_file`,
:class:`~interop.endpoint.Responses`).

What the native engine does as it does for sidecars, and the interop runner
therefore sees:

* **mutual TLS with SPIFFE IDs, checked inside the handshake**: the server
  requires a client certificate (``client.pem``: the runner tells a client
  with ``CLIENT_CERTIFICATE=1``), and the client accepts a server leaf that
  carries one ``spiffe://`` URI (:mod:`interop.certs` issues both). The client
  presents ``client.pem`` when asked;
* **tickets and 0-RTT** are rustls's, kept in the client endpoint's memory: the
  two connections of ``resumption`` and ``zerortt`` run in one process on one
  engine, and a resumed connection sends its requests in 0-RTT at once
  (:attr:`~quicmesh.transport.quic.engine.SocketConnection.early`);
* **no TLS key log and no qlog**: the extension writes neither, so the runner
  decrypts a trace with the peer's key log (``SSLKEYLOGFILE`` is ignored here).

Test cases the native engine cannot play are in :data:`WHY` (the matrix shows
them as unsupported with that reason); the endpoint exits 127 for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aioquic.h3.events
from aioquic.quic import events as quic_events

from quicmesh import Identity, QuicTransport, TrustBundle
from quicmesh._aioquic import MeshH3Connection
from quicmesh.transport._admission import AdmissionConfig
from quicmesh.transport.quic.engine import EngineTls, SocketConnection

from .endpoint import EXIT_UNSUPPORTED, Responses, request_headers, save_responses, serve_file
from .peers import TESTCASES

NAME = "quicmesh-native"

WHY: dict[tuple[str, str], str] = {
    ("server", "connectionmigration"): "the native listener cannot announce a preferred_address"
    " (one UDP socket per listener)",
    ("client", "keyupdate"): "the native extension cannot start a key update"
    " (quinn's Connection::force_key_update is not bound)",
    ("client", "chacha20"): "the native engine offers all of rustls's TLS 1.3 cipher suites"
    " and cannot be limited to one",
    ("client", "connectionmigration"): "quinn 0.11 does not move to a server's"
    " preferred_address (it only takes the connection ID)",
}
"""Why the native engine cannot play a test case in a role."""

SUPPORTED = {
    role: frozenset(TESTCASES) - {case for (r, case) in WHY if r == role}
    for role in ("server", "client")
}
"""Test cases per role."""

HANDSHAKE_TIMEOUT = 30.0
"""Seconds a client waits for its handshake (the idle timeout ends it earlier), and a
server keeps a half-open connection: the sidecar's listeners drop one after 10 s (their
admission's ``handshake_timeout``), which two native engines at handshakeloss's 30 %
loss each way overran for 2 or 3 of 5 connections (PTOs of 1, 2, 4, 8 s) while the other
stacks the runner plays keep a handshake for their idle timeout."""


def transport(certs: Path, role: str, *, retry: bool = False) -> QuicTransport:
    """A native-engine transport: the server's or the client's certificate, the interop CA.

    :param retry: (server) answer every first Initial with a Retry (the listener's
        admission, ``AdmissionConfig(retry="always")``); never otherwise.
    """
    cert, key = ("cert.pem", "priv.key") if role == "server" else ("client.pem", "client.key")
    return QuicTransport(
        identity=Identity.from_pem((certs / cert).read_bytes(), (certs / key).read_bytes()),
        trust=TrustBundle.from_file(certs / "ca.pem"),
        idle_timeout=30.0,
        engine="native",
        admission=AdmissionConfig(
            retry="always" if retry else "never", handshake_timeout=HANDSHAKE_TIMEOUT
        ),
    )


class Session:
    """HTTP/3 over one native engine connection, driven from the engine's wake-ups.

    :param on_h3_event: called with each HTTP/3 event.
    :param on_closed: called once with the reason when the connection ends.
    """

    def __init__(
        self,
        quic: SocketConnection,
        on_h3_event: Callable[[Any], None],
        on_closed: Callable[[str], None] | None = None,
    ) -> None:
        self.quic = quic
        self.h3: MeshH3Connection | None = None
        loop = asyncio.get_running_loop()
        self.established: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()
        self._on_h3_event = on_h3_event
        self._on_closed = on_closed
        self._woken = asyncio.Event()
        if quic.early:  # resumed with 0-RTT: requests may go out now
            self._start_h3()
        quic.set_wake(self.drain)
        self.drain()

    def _start_h3(self) -> None:
        if self.h3 is None:
            self.h3 = MeshH3Connection(cast(Any, self.quic))

    def drain(self) -> None:
        """Handle every event the engine queued for the connection."""
        while (event := self.quic.next_event()) is not None:
            if isinstance(event, quic_events.HandshakeCompleted):
                self._start_h3()
                if not self.established.done():
                    self.established.set_result(None)
            elif isinstance(event, quic_events.ConnectionTerminated):
                reason = event.reason_phrase or f"error {event.error_code}"
                if not self.established.done():
                    self.established.set_exception(ConnectionError(reason))
                    self.established.exception()  # retrieved: no asyncio warning
                if not self.closed.done():
                    self.closed.set_result(reason)
                    if self._on_closed is not None:
                        self._on_closed(reason)
            if self.h3 is not None:
                for h3_event in self.h3.handle_event(event):
                    self._on_h3_event(h3_event)
            if (
                isinstance(event, quic_events.StreamDataReceived)
                and not event.stream_id & 2
                and not event.end_stream
            ):
                # What arrived on a request stream is taken at once: read on.
                self.quic.track_stream(event.stream_id)
                self.quic.stream_delivered(event.stream_id, len(event.data), 0)
        self.quic.flush()
        self._woken.set()

    async def stream_credit(self) -> None:
        """Wait until the peer's MAX_STREAMS allows one more request stream."""
        while not self.quic.can_open_bidi_stream():
            if self.closed.done():
                raise ConnectionError(f"connection closed: {self.closed.result()}")
            self._woken.clear()
            await self._woken.wait()

    async def close(self, timeout: float = 2.0) -> None:
        """Close the connection and wait (at most ``timeout``) for the engine to report it."""
        self.quic.close()
        self.quic.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.closed), timeout)


# -- server --------------------------------------------------------------------


async def run_server(testcase: str) -> int:
    """Serve ``WWW`` until SIGTERM or SIGINT."""
    mesh = transport(Path(os.environ.get("CERTS", "/certs")), "server", retry=testcase == "retry")
    engine = mesh.engine
    root = Path(os.environ.get("WWW", "/www")).resolve()
    tls = EngineTls(identity=mesh.identity, trust=mesh.trust)
    sessions: list[Session] = []
    listener: Any = None

    def serve(session: list[Session]) -> Callable[[Any], None]:
        def on_h3_event(event: Any) -> None:
            if isinstance(event, aioquic.h3.events.HeadersReceived):
                h3 = session[0].h3
                assert h3 is not None
                serve_file(h3, event.stream_id, event.headers, root, NAME)

        return on_h3_event

    def accept() -> None:
        for why in listener.refused():
            print(f"refused a client: {why}", file=sys.stderr, flush=True)
        for quic in listener.accepted():
            holder: list[Session] = []
            holder.append(Session(quic, serve(holder)))
            sessions.append(holder[0])
        sessions[:] = [s for s in sessions if not s.closed.done()]

    host, port = os.environ.get("HOST", "127.0.0.1"), int(os.environ.get("PORT", "443"))
    listener = engine.listen(mesh.engine_limits(), tls, (host, port), wake=accept)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await asyncio.gather(*(s.close() for s in sessions if not s.closed.done()))
    listener.close()
    await mesh.aclose()
    return 0


# -- client --------------------------------------------------------------------


async def _fetch(mesh: QuicTransport, tls: EngineTls, urls: list[str], downloads: Path) -> None:
    """Fetch ``urls`` on one connection and save them below ``downloads``.

    A connection the engine resumed with 0-RTT sends its requests at once, in
    0-RTT packets (whether they were is the runner's check, on the trace); any
    other waits for its handshake.
    """
    parts = urlsplit(urls[0])
    address = (parts.hostname or "127.0.0.1", parts.port or 443)
    quic = cast(SocketConnection, mesh.engine.connect(mesh.engine_limits(), tls, address))
    responses = Responses(aioquic.h3.events)
    session = Session(quic, responses.received, responses.fail)
    try:
        if not quic.early:
            await asyncio.wait_for(asyncio.shield(session.established), HANDSHAKE_TIMEOUT)
        futures: dict[str, asyncio.Future[int]] = {}
        for url in urls:
            await session.stream_credit()
            stream_id = quic.get_next_available_stream_id()
            assert session.h3 is not None
            session.h3.send_headers(stream_id, request_headers(url, NAME), end_stream=True)
            quic.track_stream(stream_id)
            futures[url] = responses.expect(stream_id)
            quic.flush()
        await save_responses(urls, futures, responses.body, downloads)
    finally:
        await session.close()


async def run_client(testcase: str) -> int:
    """Fetch ``REQUESTS`` into ``DOWNLOADS``."""
    urls = os.environ.get("REQUESTS", "").split()
    if not urls:
        print("REQUESTS is empty", file=sys.stderr)
        return 1
    downloads = Path(os.environ.get("DOWNLOADS", "/downloads"))
    downloads.mkdir(parents=True, exist_ok=True)
    mesh = transport(Path(os.environ.get("CERTS", "/certs")), "client")
    # One EngineTls for every connection: the engine keeps one client endpoint (and
    # one ticket store) per identity, so the second connection resumes the first.
    tls = EngineTls(identity=mesh.identity, trust=mesh.trust)
    try:
        if testcase in ("resumption", "zerortt"):
            await _fetch(mesh, tls, urls[:1], downloads)
            await _fetch(mesh, tls, urls[1:], downloads)
        elif testcase == "handshakeloss":
            for url in urls:
                await _fetch(mesh, tls, [url], downloads)
        else:
            await _fetch(mesh, tls, urls, downloads)
    finally:
        await mesh.aclose()
    return 0


def main() -> int:
    """Run the role named by ``ROLE`` for ``TESTCASE`` on the native engine; the exit status."""
    role = os.environ.get("ROLE", "")
    testcase = os.environ.get("TESTCASE", "")
    if role not in SUPPORTED:
        print(f"{NAME} cannot be a {role!r}", file=sys.stderr)
        return 1
    if testcase not in SUPPORTED[role]:
        why = WHY.get((role, testcase), "unknown test case")
        print(f"test case {testcase!r} not supported as {role}: {why}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    try:
        if role == "server":
            return asyncio.run(run_server(testcase))
        return asyncio.run(run_client(testcase))
    except Exception as exc:
        print(f"{role} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
