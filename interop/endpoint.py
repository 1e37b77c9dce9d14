"""quicmesh's interop endpoint: an HTTP/3 file server and client on quicmesh's QUIC layer.

It follows the QUIC Interop Runner's endpoint conventions, with paths and
ports taken from the environment instead of a container's fixed layout:

``ROLE``
    ``server`` or ``client``.
``TESTCASE``
    One of :data:`SUPPORTED`; anything else exits with status 127.
``WWW`` / ``PORT`` / ``HOST`` (server)
    Directory served, UDP port and address to listen on.
``REQUESTS`` / ``DOWNLOADS`` (client)
    Space-separated ``https://`` URLs to GET over HTTP/3, and where to save them.
    For ``resumption`` and ``zerortt`` the first URL is fetched on a first
    connection and the rest on a second one resuming it (in 0-RTT for
    ``zerortt``); for ``handshakeloss`` each URL gets its own connection.
``CERTS``
    ``cert.pem`` / ``priv.key`` (server), ``ca.pem`` (client), ``client.pem`` /
    ``client.key`` (client, with ``CLIENT_CERTIFICATE=1``), as written by
    :mod:`interop.certs`.
``CLIENT_CERTIFICATE``
    ``1``: the client presents ``client.pem`` (the server requires a client
    certificate: quicmesh's native engine does).
``ENGINE``
    quicmesh's QUIC engine: ``aioquic`` (default) or ``native``
    (:mod:`interop.native_endpoint`).
``QLOGDIR`` / ``SSLKEYLOGFILE``
    Where to write qlog traces and TLS secrets (optional).

The QUIC configuration is :meth:`quicmesh.QuicTransport.configuration`, with
two interop changes: the client presents no certificate (quicmesh sidecars use
mutual TLS; web servers do not ask for one) and the server presents an ordinary
server certificate. ``max_datagram_frame_size`` stays ``None``: the endpoint
never announces or sends DATAGRAM frames. Exit status: 0 success, 1 failure,
127 unsupported test case.

Run as ``python -m interop.endpoint``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aioquic.asyncio
import aioquic.h3.events
import aioquic.quic.events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import CipherSuite

from quicmesh import Identity, QuicTransport, TrustBundle
from quicmesh._aioquic import MeshH3Connection, MeshQuicConnection
from quicmesh.transport.quic.server import MeshQuicServer

from .certs import SERVER_NAME
from .peers import TESTCASES

logger = logging.getLogger("quicmesh.interop.endpoint")

SUPPORTED_SERVER = frozenset(TESTCASES) - {"connectionmigration"}
"""Server test cases. ``connectionmigration`` is missing: aioquic's server cannot
announce a preferred_address transport parameter."""

SUPPORTED_CLIENT = SUPPORTED_SERVER | {"connectionmigration"}
"""Client test cases (aioquic's client moves to a server's preferred address)."""

SUPPORTED = {"server": SUPPORTED_SERVER, "client": SUPPORTED_CLIENT}

EXIT_UNSUPPORTED = 127


@dataclass(frozen=True)
class Stack:
    """A QUIC stack with aioquic's asyncio API (aioquic itself, qh3).

    The endpoint logic below is written once against this; each stack brings its
    modules and its configuration.
    """

    name: str
    asyncio: Any
    """The ``connect``/``serve``/``QuicConnectionProtocol`` module."""
    h3_connection: Any
    h3_events: Any
    quic_events: Any
    configure: Callable[..., Any]
    """``configure(is_client=, testcase=, certs=, qlog_dir=)`` gives the configuration."""
    supported: dict[str, frozenset[str]]
    serve: Callable[..., Any] | None = None
    """Replaces ``asyncio.serve`` (same arguments): quicmesh's server builds its own
    connection class."""
    client_connection: Callable[..., Any] | None = None
    """``client_connection(configuration, session_ticket_handler)`` replaces the
    connection ``asyncio.connect`` built (quicmesh: :class:`MeshQuicConnection`, the
    class ``QuicTransport`` uses, with every fix quicmesh applies to aioquic)."""


def wants_client_certificate() -> bool:
    """Whether the client is to present ``client.pem`` (``CLIENT_CERTIFICATE=1``: the
    server requires one, as quicmesh's native engine does)."""
    return os.environ.get("CLIENT_CERTIFICATE") == "1"


def configuration(
    *, is_client: bool, testcase: str, certs: Path, qlog_dir: str | None
) -> QuicConfiguration:
    """quicmesh's QUIC configuration, adapted for a foreign peer and a test case."""
    chain = (certs / "cert.pem").read_bytes()
    identity = Identity.from_pem(chain, (certs / "priv.key").read_bytes())
    transport = QuicTransport(
        identity=identity,
        trust=TrustBundle.from_file(certs / "ca.pem"),
        idle_timeout=30.0,
        qlog_dir=qlog_dir,
    )
    config = transport.configuration(is_client=is_client)
    if is_client and wants_client_certificate():
        # The server asks for one (quicmesh's native listener): certs/client.pem.
        client = Identity.from_pem(
            (certs / "client.pem").read_bytes(), (certs / "client.key").read_bytes()
        )
        config.certificate = client.certificate
        config.certificate_chain = client.chain
        config.private_key = client.private_key
        config.server_name = SERVER_NAME
    elif is_client:
        # No client certificate: quicmesh's mutual TLS is for sidecars only.
        config.certificate = None
        config.certificate_chain = []
        config.private_key = None
        config.server_name = SERVER_NAME
    else:
        config.cadata = None
    if testcase == "chacha20":
        config.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog:
        config.secrets_log_file = open(keylog, "a", buffering=1)  # noqa: SIM115
    if config.max_datagram_frame_size is not None:
        raise AssertionError("quicmesh must not announce DATAGRAM support to interop peers")
    return config


async def _serve_mesh(
    host: str,
    port: int,
    *,
    configuration: QuicConfiguration,
    create_protocol: Callable[..., Any],
    session_ticket_fetcher: Callable[[bytes], Any],
    session_ticket_handler: Callable[[Any], None],
    retry: bool,
) -> MeshQuicServer:
    """aioquic's ``serve`` with :class:`MeshQuicConnection` connections."""

    def accept(
        original_cid: bytes | None, retry_source_cid: bytes | None
    ) -> tuple[MeshQuicConnection, Any]:
        quic = MeshQuicConnection(
            configuration=configuration,
            original_destination_connection_id=original_cid,
            retry_source_connection_id=retry_source_cid,
            fetch_ticket=session_ticket_fetcher,
            on_ticket_issued=session_ticket_handler,
        )
        return quic, create_protocol(quic)

    _, server = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: MeshQuicServer(
            configuration=configuration,
            accept=accept,
            retry=retry,
        ),
        local_addr=(host, port),
    )
    return server


def _client_mesh_connection(
    configuration: QuicConfiguration, session_ticket_handler: Callable[[Any], None]
) -> MeshQuicConnection:
    return MeshQuicConnection(
        configuration=configuration, session_ticket_handler=session_ticket_handler
    )


QUICMESH = Stack(
    name="quicmesh",
    asyncio=aioquic.asyncio,
    h3_connection=MeshH3Connection,
    h3_events=aioquic.h3.events,
    quic_events=aioquic.quic.events,
    configure=configuration,
    supported=SUPPORTED,
    serve=_serve_mesh,
    client_connection=_client_mesh_connection,
)


# -- server --------------------------------------------------------------------


def serve_file(
    h3: Any, stream_id: int, headers: list[tuple[bytes, bytes]], root: Path, name: str
) -> None:
    """Answer one request on an HTTP/3 connection: the file below ``root`` for a GET.

    ``h3`` is any HTTP/3 connection with aioquic's API (aioquic's, qh3's, or
    quicmesh's over either QUIC engine); ``name`` goes in the ``server`` header.
    The caller transmits.
    """
    fields = dict(headers)
    path = fields.get(b":path", b"/").decode().split("?", 1)[0]
    target = (root / path.lstrip("/")).resolve()
    if fields.get(b":method") != b"GET" or not target.is_relative_to(root):
        status, body = 400, b""
    elif not target.is_file():
        status, body = 404, b""
    else:
        status, body = 200, target.read_bytes()
    h3.send_headers(
        stream_id,
        [
            (b":status", str(status).encode()),
            (b"content-length", str(len(body)).encode()),
            (b"server", f"{name}-interop".encode()),
        ],
    )
    h3.send_data(stream_id, body, end_stream=True)


def _server_protocol(stack: Stack, www: Path) -> Callable[..., Any]:
    """A protocol class of ``stack`` serving GET requests for files below ``www``."""
    root = www.resolve()

    class ServerProtocol(stack.asyncio.QuicConnectionProtocol):  # type: ignore[misc, name-defined]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._h3: Any = None

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, stack.quic_events.ProtocolNegotiated) and (
                event.alpn_protocol in ("h3", "h3-29")
            ):
                self._h3 = stack.h3_connection(self._quic)
            if self._h3 is None:
                return
            for h3_event in self._h3.handle_event(event):
                if isinstance(h3_event, stack.h3_events.HeadersReceived):
                    serve_file(self._h3, h3_event.stream_id, h3_event.headers, root, stack.name)
                    self.transmit()

    return ServerProtocol


async def run_server(stack: Stack, testcase: str) -> int:
    """Serve ``WWW`` until SIGTERM or SIGINT."""
    config = stack.configure(
        is_client=False,
        testcase=testcase,
        certs=Path(os.environ.get("CERTS", "/certs")),
        qlog_dir=os.environ.get("QLOGDIR") or None,
    )
    tickets: dict[bytes, Any] = {}
    server = await (stack.serve or stack.asyncio.serve)(
        os.environ.get("HOST", "127.0.0.1"),
        int(os.environ.get("PORT", "443")),
        configuration=config,
        create_protocol=_server_protocol(stack, Path(os.environ.get("WWW", "/www"))),
        session_ticket_fetcher=tickets.get,
        session_ticket_handler=lambda ticket: tickets.__setitem__(ticket.ticket, ticket),
        retry=testcase == "retry",
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    # Close what is open so that every qlog trace is written.
    protocols = set(getattr(server, "_protocols", {}).values())
    for protocol in protocols:
        protocol.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(p.wait_closed() for p in protocols)), timeout=2.0)
    server.close()
    return 0


# -- client --------------------------------------------------------------------


async def save_responses(
    urls: list[str],
    futures: dict[str, asyncio.Future[int]],
    body: Callable[[asyncio.Future[int]], bytes],
    downloads: Path,
) -> None:
    """Wait for every response (2 minutes at most), check each is a 200 and write its
    body into ``downloads`` under the URL's file name."""
    statuses = await asyncio.wait_for(
        asyncio.gather(*(futures[url] for url in urls)), timeout=120.0
    )
    for url, status in zip(urls, statuses, strict=True):
        if status != 200:
            raise RuntimeError(f"GET {url}: status {status}")
        name = Path(urlsplit(url).path).name or "index.html"
        (downloads / name).write_bytes(body(futures[url]))


def request_headers(url: str, name: str) -> list[tuple[bytes, bytes]]:
    """The header section of a GET for ``url`` (``name`` goes in ``user-agent``)."""
    parts = urlsplit(url)
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", parts.netloc.encode()),
        (b":path", (parts.path or "/").encode()),
        (b"user-agent", f"{name}-interop".encode()),
    ]


class Responses:
    """The responses a client waits for, by request stream, whatever the stack."""

    def __init__(self, h3_events: Any) -> None:
        self._events = h3_events
        self._responses: dict[int, tuple[asyncio.Future[int], list[bytes], list[int]]] = {}

    def expect(self, stream_id: int) -> asyncio.Future[int]:
        """A future for the response on ``stream_id``: its status once the body is in."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._responses[stream_id] = (future, [], [0])
        return future

    def body(self, future: asyncio.Future[int]) -> bytes:
        """The body of the response ``future`` stands for."""
        for candidate, chunks, _ in self._responses.values():
            if candidate is future:
                return b"".join(chunks)
        raise KeyError("unknown request")

    def fail(self, reason: str) -> None:
        """The connection ended: every response still awaited fails with ``reason``."""
        for future, _, _ in self._responses.values():
            if not future.done():
                future.set_exception(ConnectionError(f"connection closed: {reason}"))

    def received(self, event: Any) -> None:
        """Take one HTTP/3 event (headers or data of a response)."""
        if not isinstance(event, self._events.HeadersReceived | self._events.DataReceived):
            return
        entry = self._responses.get(event.stream_id)
        if entry is None:
            return
        future, chunks, status = entry
        if isinstance(event, self._events.HeadersReceived):
            status[0] = int(dict(event.headers).get(b":status", b"0"))
        else:
            chunks.append(event.data)
        if event.stream_ended and not future.done():
            future.set_result(status[0])


def _client_protocol(stack: Stack, on_ticket: Callable[[Any], None]) -> Callable[..., Any]:
    """A protocol class of ``stack`` that sends GET requests and collects responses."""

    class ClientProtocol(stack.asyncio.QuicConnectionProtocol):  # type: ignore[misc, name-defined]
        def __init__(self, quic: Any, *args: Any, **kwargs: Any) -> None:
            if stack.client_connection is not None:
                quic = stack.client_connection(quic.configuration, on_ticket)
            super().__init__(quic, *args, **kwargs)
            self._h3 = stack.h3_connection(self._quic)
            self._responses = Responses(stack.h3_events)

        def get(self, url: str) -> asyncio.Future[int]:
            """Send a GET for ``url``; the future gives the status once the body is in."""
            stream_id = self._quic.get_next_available_stream_id()
            self._h3.send_headers(stream_id, request_headers(url, stack.name), end_stream=True)
            return self._responses.expect(stream_id)

        def body(self, future: asyncio.Future[int]) -> bytes:
            return self._responses.body(future)

        def quic_event_received(self, event: Any) -> None:
            if isinstance(event, stack.quic_events.ConnectionTerminated):
                self._responses.fail(repr(event.reason_phrase))
            for h3_event in self._h3.handle_event(event):
                self._responses.received(h3_event)

    return ClientProtocol


MAX_REQUESTS_IN_FLIGHT = 100
"""Requests a client keeps open at once (servers here allow 100 or more streams)."""


async def _request_key_update(protocol: Any) -> None:
    """Ask for a key update as soon as the stack allows it.

    aioquic defers a key update requested before the handshake is confirmed;
    qh3 refuses it, so keep asking until the HANDSHAKE_DONE frame has arrived.
    """
    for _ in range(200):
        try:
            protocol._quic.request_key_update()
        except AssertionError:
            await asyncio.sleep(0.01)
        else:
            protocol.transmit()
            return
    raise RuntimeError("the handshake was never confirmed: no key update")


async def _fetch(
    stack: Stack,
    urls: list[str],
    config: Any,
    downloads: Path,
    *,
    testcase: str,
    tickets: list[Any],
    early_data: bool = False,
) -> None:
    """Fetch ``urls`` on one connection and save them below ``downloads``."""
    parts = urlsplit(urls[0])
    host, port = parts.hostname or "127.0.0.1", parts.port or 443
    async with stack.asyncio.connect(
        host,
        port,
        configuration=config,
        create_protocol=_client_protocol(stack, tickets.append),
        session_ticket_handler=tickets.append,
        wait_connected=not early_data,
    ) as protocol:
        if testcase == "keyupdate":
            await _request_key_update(protocol)
        # The first requests go out together (in 0-RTT when resuming); the rest
        # as earlier ones finish, since a stack may refuse to open a stream
        # beyond the peer's MAX_STREAMS instead of queueing it (qh3 does).
        futures = {url: protocol.get(url) for url in urls[:MAX_REQUESTS_IN_FLIGHT]}
        protocol.transmit()
        window = asyncio.Semaphore(0)
        for future in futures.values():
            future.add_done_callback(lambda _: window.release())

        async def get_later(url: str) -> None:
            await window.acquire()
            while True:
                try:
                    futures[url] = protocol.get(url)
                except ValueError:  # qh3: no stream credit (MAX_STREAMS) yet
                    await asyncio.sleep(0.01)
                else:
                    break
            futures[url].add_done_callback(lambda _: window.release())
            protocol.transmit()

        await asyncio.gather(*(get_later(url) for url in urls[MAX_REQUESTS_IN_FLIGHT:]))
        await save_responses(urls, futures, protocol.body, downloads)
        if testcase in ("resumption", "zerortt"):
            # NewSessionTicket may trail the responses slightly.
            for _ in range(20):
                if tickets:
                    break
                await asyncio.sleep(0.05)


async def run_client(stack: Stack, testcase: str) -> int:
    """Fetch ``REQUESTS`` into ``DOWNLOADS``."""
    urls = os.environ.get("REQUESTS", "").split()
    if not urls:
        print("REQUESTS is empty", file=sys.stderr)
        return 1
    downloads = Path(os.environ.get("DOWNLOADS", "/downloads"))
    downloads.mkdir(parents=True, exist_ok=True)
    certs = Path(os.environ.get("CERTS", "/certs"))
    qlog_dir = os.environ.get("QLOGDIR") or None

    def config() -> Any:
        return stack.configure(is_client=True, testcase=testcase, certs=certs, qlog_dir=qlog_dir)

    tickets: list[Any] = []
    if testcase in ("resumption", "zerortt"):
        await _fetch(stack, urls[:1], config(), downloads, testcase=testcase, tickets=tickets)
        if not tickets:
            print("the server sent no session ticket", file=sys.stderr)
            return 1
        resumed = config()
        resumed.session_ticket = tickets[-1]
        await _fetch(
            stack,
            urls[1:],
            resumed,
            downloads,
            testcase=testcase,
            tickets=[],
            early_data=testcase == "zerortt",
        )
    elif testcase == "handshakeloss":
        for url in urls:
            await _fetch(stack, [url], config(), downloads, testcase=testcase, tickets=tickets)
    else:
        await _fetch(stack, urls, config(), downloads, testcase=testcase, tickets=tickets)
    return 0


def run(stack: Stack) -> int:
    """Run the role named by ``ROLE`` for ``TESTCASE`` with ``stack``; the exit status."""
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    role = os.environ.get("ROLE", "")
    testcase = os.environ.get("TESTCASE", "")
    if role not in stack.supported:
        print(f"{stack.name} cannot be a {role!r}", file=sys.stderr)
        return EXIT_UNSUPPORTED if role in ("server", "client") else 1
    if testcase not in stack.supported[role]:
        print(f"test case {testcase!r} not supported as {role}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    try:
        if role == "server":
            return asyncio.run(run_server(stack, testcase))
        return asyncio.run(run_client(stack, testcase))
    except Exception as exc:
        print(f"{role} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def main() -> int:
    """Entry point: quicmesh's endpoint on the engine ``ENGINE`` names (aioquic by default)."""
    engine = os.environ.get("ENGINE", "aioquic")
    if engine == "native":
        from .native_endpoint import main as native_main

        return native_main()
    if engine != "aioquic":
        print(f"ENGINE must be aioquic or native, not {engine!r}", file=sys.stderr)
        return 1
    return run(QUICMESH)


if __name__ == "__main__":
    sys.exit(main())
