"""HTTP/2 baseline against an independent peer: H2Transport's CONNECT tunnels through nghttpx.

``python -m interop.h2_nghttpx [--logs DIR] [--no-install]`` prints one
``PASS``/``FAIL`` line per check and exits 0 only if every check passed.

Topology, all on loopback::

    quicmesh H2Transport --h2 CONNECT, mTLS--> nghttpx --http2-proxy
        --HTTP/1.1 CONNECT--> backend proxy (this file) --TCP--> echo server

nghttpx (Debian ``nghttp2-proxy``) is the HTTP/2 peer under test. In
``--http2-proxy`` mode it is a forward proxy whose backend must itself be an
HTTP/1 proxy (nghttpx's documented design: Squid or the like behind it): it
turns each HTTP/2 CONNECT stream into an ``HTTP/1.1 CONNECT`` to its backend.
The backend here is a minimal HTTP/1.1 CONNECT proxy in this file; it answers
``502`` when the destination refuses the connection and closes without an
answer for ``*.blackhole.invalid`` targets (so nghttpx has to produce its own
error response).

mTLS with quicmesh's rules, with no change to quicmesh: nghttpx's server
certificate is issued by a :class:`quicmesh.DevCA` with a SPIFFE URI SAN (the
only SAN; nghttpx does not look at its own certificate's names), so quicmesh's
client verifies the chain and reads a SPIFFE ID as with any sidecar; nghttpx
requires and verifies client certificates against the same CA
(``--verify-client --verify-client-cacert``), so quicmesh's client certificate
is checked as well.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import quicmesh
from quicmesh.bench import OneLineParser
from quicmesh.outputs import output_dir

APT_PACKAGE = "nghttp2-proxy"
"""The Debian package that provides nghttpx."""

NGHTTPX_SPIFFE_ID = "spiffe://mesh.local/ns/interop/sa/nghttpx"
CLIENT_SPIFFE_ID = "spiffe://mesh.local/ns/interop/sa/h2-client"
BLACKHOLE_SUFFIX = ".blackhole.invalid"
STARTUP_TIMEOUT = 10.0
"""Seconds nghttpx has to start listening."""
CHECK_TIMEOUT = 30.0
"""Seconds one check may take."""


def nghttpx_path() -> str | None:
    """The nghttpx binary (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("nghttpx")
    if found is None and os.access("/usr/sbin/nghttpx", os.X_OK):
        found = "/usr/sbin/nghttpx"
    return found


def install_nghttpx() -> None:
    """``apt-get install nghttp2-proxy`` (root only); raises if that fails."""
    if os.geteuid() != 0:
        raise RuntimeError(f"nghttpx is missing and not root: apt-get install {APT_PACKAGE}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", APT_PACKAGE], check=True, env=env)


# -- the pieces behind nghttpx --------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Read an 8-byte length N, echo the next N bytes, then half-close (FIN).

    Length-prefixed, not "echo until EOF": nghttpx does not turn the client's
    END_STREAM into a FIN towards its backend (see docs/interop.md), so the
    echo cannot wait for one. Our FIN must come back to the client as END_STREAM.
    """
    try:
        size = int.from_bytes(await reader.readexactly(8), "big")
        while size:
            data = await reader.read(min(size, 256 * 1024))
            if not data:
                break
            size -= len(data)
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        await reader.read()  # until the tunnel is torn down
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


async def _connect_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A minimal HTTP/1.1 CONNECT proxy: nghttpx's backend in --http2-proxy mode."""
    upstream: asyncio.StreamWriter | None = None
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        method, authority, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        host, _, port = authority.rpartition(":")
        if method != "CONNECT" or not port.isdigit():
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            return
        if host.endswith(BLACKHOLE_SUFFIX):
            return  # close without an answer: nghttpx must produce the error itself
        try:
            up_reader, upstream = await asyncio.open_connection(host.strip("[]"), int(port))
        except OSError:
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        await asyncio.gather(_pump(reader, upstream), _pump(up_reader, writer))
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
        pass
    finally:
        if upstream is not None:
            upstream.close()
        writer.close()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class _Tracked:
    """Remembers the connections of the local servers, to end them at teardown."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    def wrap(self, handler: Handler) -> Handler:
        async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)  # type: ignore[arg-type]
            self.writers.add(writer)
            try:
                await handler(reader, writer)
            finally:
                self.writers.discard(writer)
                self.tasks.discard(task)  # type: ignore[arg-type]

        return run

    async def close(self) -> None:
        for writer in list(self.writers):
            writer.transport.abort()  # the handler sees EOF or an error and returns
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)


@dataclass
class Nghttpx:
    """A running nghttpx forward proxy and the identities around it."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path
    ca: quicmesh.DevCA

    async def wait_log(self, text: str, count: int, timeout: float = 5.0) -> None:
        """Bounded poll until ``text`` appears ``count`` times in nghttpx's log."""
        deadline = time.monotonic() + timeout
        while self.log.read_text(errors="replace").count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"nghttpx did not log {text!r}")
            await asyncio.sleep(0.02)  # poll interval only

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _closed_port() -> socket.socket:
    """A TCP socket bound to a loopback port and not listening: a connect there is
    refused for as long as it stays open. (A port merely freed can be taken meanwhile,
    e.g. as the source port of a connect to it, which then connects to itself.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def _wait_listening(process: subprocess.Popen[bytes], port: int, log: Path) -> None:
    """Bounded poll until nghttpx accepts TCP on ``port``; raise with its log if it never does."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nghttpx exited ({process.returncode}): {log.read_text()[-2000:]}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)  # poll interval only; the condition is the accepted connection
    raise RuntimeError(f"nghttpx not listening on {port} after {STARTUP_TIMEOUT:g}s")


def start_nghttpx(binary: str, backend_port: int, workdir: Path) -> Nghttpx:
    """Start nghttpx in HTTP/2 forward-proxy mode, TLS frontend requiring client certificates."""
    ca = quicmesh.DevCA()
    ca.save(workdir / "ca")
    ca.issue(NGHTTPX_SPIFFE_ID).save(workdir / "nghttpx.pem", workdir / "nghttpx-key.pem")
    log = workdir / "nghttpx.log"
    port = _free_port()
    command = [
        binary,
        "--conf=/dev/null",  # not /etc/nghttpx/nghttpx.conf
        "--http2-proxy",
        f"--frontend=127.0.0.1,{port}",
        f"--backend=127.0.0.1,{backend_port}",
        "--verify-client",
        f"--verify-client-cacert={workdir / 'ca' / 'ca.pem'}",
        "--no-ocsp",
        "--workers=1",
        "--log-level=INFO",
        f"--errorlog-file={log}",
        str(workdir / "nghttpx-key.pem"),
        str(workdir / "nghttpx.pem"),
    ]
    (workdir / "nghttpx.cmd").write_text(" ".join(command) + "\n")
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_listening(process, port, log)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return Nghttpx(process, port, log, ca)


# -- the checks ---------------------------------------------------------------------


@dataclass
class Result:
    name: str
    ok: bool
    detail: str


class Checks:
    """The checks, sharing one nghttpx, one backend proxy and one echo server."""

    def __init__(self, proxy: Nghttpx, echo_port: int, closed_port: int) -> None:
        self.proxy = proxy
        self.echo = f"127.0.0.1:{echo_port}"
        self.closed_port = closed_port
        self.identity = proxy.ca.issue(CLIENT_SPIFFE_ID)
        self.transport = quicmesh.H2Transport(identity=self.identity, trust=proxy.ca.trust_bundle)
        self.address = ("127.0.0.1", proxy.port)
        self.notes: list[str] = []

    async def _connect(self) -> quicmesh.PeerConnection:
        return await self.transport.connect(self.address, timeout=10)

    def _close(self, conn: quicmesh.PeerConnection) -> None:
        """Close, tolerating the OSError quicmesh's close() can raise (see docs/interop.md)."""
        try:
            conn.close()
        except OSError as exc:
            self.notes.append(f"PeerConnection.close() raised {exc!r} (quicmesh issue, see docs)")

    async def _echo_stream(self, conn: quicmesh.PeerConnection, payload: bytes) -> str | None:
        """Send ``len(payload)`` + payload and END_STREAM; read the echo to END_STREAM."""
        stream = await conn.open_stream(self.echo)
        reply = asyncio.ensure_future(stream.read())  # read while writing: flow control both ways
        try:
            stream.write(len(payload).to_bytes(8, "big") + payload)
            await stream.drain()
            stream.write_eof()
            data = await reply  # returns once the echo server's FIN came back as END_STREAM
        finally:
            reply.cancel()
        await stream.wait_closed()
        if data != payload:
            return (
                f"echo mismatch: sent {len(payload)} bytes sha256 "
                f"{hashlib.sha256(payload).hexdigest()[:12]}, got {len(data)} bytes sha256 "
                f"{hashlib.sha256(data).hexdigest()[:12]}"
            )
        return None

    async def handshake(self) -> str:
        conn = await self._connect()
        try:
            if conn.peer_identity != NGHTTPX_SPIFFE_ID:
                raise AssertionError(f"peer identity {conn.peer_identity!r}")
            return f"TLS 1.3 + ALPN h2 + SETTINGS; nghttpx is {conn.peer_identity}"
        finally:
            self._close(conn)

    async def echo_halfclose(self) -> str:
        conn = await self._connect()
        try:
            payload = os.urandom(100_000)
            error = await self._echo_stream(conn, payload)
            if error:
                raise AssertionError(error)
            return (
                f"{len(payload)} bytes echoed; our END_STREAM accepted, backend FIN -> END_STREAM"
            )
        finally:
            self._close(conn)

    async def concurrent(self) -> str:
        conn = await self._connect()
        try:
            payloads = [os.urandom(256 * 1024 + 977 * i) for i in range(8)]
            errors = await asyncio.gather(*(self._echo_stream(conn, p) for p in payloads))
            bad = [f"stream {i}: {e}" for i, e in enumerate(errors) if e]
            if bad:
                raise AssertionError("; ".join(bad))
            total = sum(map(len, payloads))
            return f"{len(payloads)} concurrent streams, {total} bytes each way, all intact"
        finally:
            self._close(conn)

    async def large(self) -> str:
        conn = await self._connect()
        try:
            payload = os.urandom(16 * 1024 * 1024)
            error = await self._echo_stream(conn, payload)
            if error:
                raise AssertionError(error)
            stats = conn.stats()
            return (
                f"{len(payload)} bytes echoed on one stream (flow control both ways; "
                f"sent {stats.get('bytes_sent')} TLS bytes)"
            )
        finally:
            self._close(conn)

    async def _expect_refused(self, target: str) -> tuple[int, str, quicmesh.PeerConnection]:
        conn = await self._connect()
        try:
            stream = await conn.open_stream(target)
        except quicmesh.StreamRefused as exc:
            return exc.status, exc.reason, conn
        self._close(conn)
        stream.abort()
        raise AssertionError(f"CONNECT {target} was accepted")

    async def refused_unreachable(self) -> str:
        target = f"127.0.0.1:{self.closed_port}"
        status, reason, conn = await self._expect_refused(target)
        try:
            if status != 502:
                raise AssertionError(f"status {status} (expected 502), reason {reason!r}")
            # the connection survives a refused stream
            error = await self._echo_stream(conn, b"still alive")
            if error:
                raise AssertionError(f"after the refusal: {error}")
            return f"CONNECT {target} -> StreamRefused({status}); connection still usable"
        finally:
            self._close(conn)

    async def refused_by_nghttpx(self) -> str:
        target = "nowhere" + BLACKHOLE_SUFFIX + ":443"
        status, reason, conn = await self._expect_refused(target)
        self._close(conn)
        if status < 500:
            raise AssertionError(f"status {status}, reason {reason!r}")
        return f"backend gave no answer; nghttpx's own {status} -> StreamRefused"

    async def mtls_enforced(self) -> str:
        stranger = quicmesh.DevCA()  # same trust domain, different root
        transport = quicmesh.H2Transport(
            identity=stranger.issue(CLIENT_SPIFFE_ID), trust=self.proxy.ca.trust_bundle
        )
        before = self.proxy.log.read_text(errors="replace").count("client certificate verify error")
        error: quicmesh.TunnelError
        try:
            conn = await transport.connect(self.address, timeout=10)
        except (quicmesh.ConnectError, quicmesh.ConnectionLost) as exc:
            error, outcome = exc, f"connect() raised {type(exc).__name__}: {exc}"
        else:
            try:
                await conn.open_stream(self.echo)
            except quicmesh.TunnelError as exc:
                error, outcome = exc, f"first stream raised {type(exc).__name__}: {exc}"
            else:
                raise AssertionError("nghttpx accepted a client certificate from an untrusted CA")
            finally:
                self._close(conn)
        if not isinstance(error, quicmesh.PeerVerificationError):
            self.notes.append(
                f"untrusted client certificate: {outcome}, not PeerVerificationError"
                " (quicmesh issue, see docs)"
            )
        await self.proxy.wait_log("client certificate verify error", before + 1)
        return f"nghttpx logged 'client certificate verify error'; {outcome}"

    async def graceful_close(self) -> str:
        conn = await self._connect()
        error = await self._echo_stream(conn, b"x" * 1000)
        if error:
            raise AssertionError(error)
        before = self.proxy.log.read_text(errors="replace").count("GOAWAY received")
        try:
            await conn.aclose(timeout=5)
        except OSError as exc:  # quicmesh issue: close() can raise ENOTCONN, see docs
            self.notes.append(f"PeerConnection.close() raised {exc!r} (quicmesh issue, see docs)")
        await asyncio.wait_for(conn.wait_closed(), 5)
        await self.proxy.wait_log("GOAWAY received", before + 1)
        return "aclose(): nghttpx logged our GOAWAY; connection closed"

    async def server_goes_away(self) -> str:
        """nghttpx's graceful shutdown (SIGQUIT) sends GOAWAY while a stream is open:
        the stream finishes, the connection takes no new one. Last: nghttpx exits."""
        conn = await self._connect()
        try:
            stream = await conn.open_stream(self.echo)
            payload = os.urandom(200_000)
            reply = asyncio.ensure_future(stream.read())
            stream.write(len(payload).to_bytes(8, "big") + payload[:1000])
            await stream.drain()
            self.proxy.process.send_signal(signal.SIGQUIT)
            deadline = time.monotonic() + 5
            stream.write(payload[1000:2000])  # (nghttpx notices on its next read)
            while not conn.going_away:
                if conn.is_closed or time.monotonic() > deadline:
                    reply.cancel()
                    raise AssertionError(
                        f"no GOAWAY seen (connection closed: {conn.is_closed}, {conn.lost_error})"
                    )
                await asyncio.sleep(0.02)  # poll interval only
            stream.write(payload[2000:])
            stream.write_eof()
            data = await asyncio.wait_for(reply, 10)
            if data != payload:
                raise AssertionError(f"the open stream got {len(data)} of {len(payload)} bytes")
            try:
                await conn.open_stream(self.echo)
            except quicmesh.ConnectionLost as exc:
                refused = str(exc)
            else:
                raise AssertionError("a new stream opened after the GOAWAY")
            return (
                f"SIGQUIT: GOAWAY; the open stream finished ({len(payload)} bytes echoed), "
                f"a new one refused ({refused})"
            )
        finally:
            self._close(conn)

    def all(self) -> list[tuple[str, Callable[[], Awaitable[str]]]]:
        return [
            ("handshake", self.handshake),
            ("echo-halfclose", self.echo_halfclose),
            ("concurrent-streams", self.concurrent),
            ("large-transfer", self.large),
            ("refused-unreachable", self.refused_unreachable),
            ("refused-by-nghttpx", self.refused_by_nghttpx),
            ("mtls-enforced", self.mtls_enforced),
            ("graceful-close", self.graceful_close),
            ("server-goes-away", self.server_goes_away),  # last: nghttpx exits
        ]


async def run_checks(binary: str, workdir: Path) -> tuple[list[Result], list[str]]:
    """Start the echo server, the backend proxy and nghttpx; run every check; stop them."""
    workdir.mkdir(parents=True, exist_ok=True)
    tracked = _Tracked()
    echo = await asyncio.start_server(tracked.wrap(_echo), "127.0.0.1", 0)
    backend = await asyncio.start_server(tracked.wrap(_connect_proxy), "127.0.0.1", 0)
    closed = _closed_port()  # nothing listens there
    proxy: Nghttpx | None = None
    results: list[Result] = []
    try:
        backend_port = backend.sockets[0].getsockname()[1]
        proxy = await asyncio.to_thread(start_nghttpx, binary, backend_port, workdir)
        checks = Checks(proxy, echo.sockets[0].getsockname()[1], closed.getsockname()[1])
        for name, check in checks.all():
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    detail = await check()
                results.append(Result(name, True, detail))
            except Exception as exc:  # a check's failure is reported, not raised
                results.append(Result(name, False, f"{type(exc).__name__}: {exc}"))
        return results, checks.notes
    finally:
        closed.close()
        if proxy is not None:
            proxy.stop()
        echo.close()
        backend.close()
        await tracked.close()


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="python -m interop.h2_nghttpx", description=__doc__.split("\n", 1)[0]
    )
    parser.add_argument("--logs", type=output_dir, default=Path("/tmp/quicmesh-interop/h2_nghttpx"))
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install")
    args = parser.parse_args(argv)
    binary = nghttpx_path()
    if binary is None and not args.no_install and os.geteuid() == 0:
        install_nghttpx()
        binary = nghttpx_path()
    if binary is None:
        print(f"FAIL nghttpx: not installed (apt-get install {APT_PACKAGE})")
        return 1
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"peer: {version} ({binary}); logs in {args.logs}")
    results, notes = asyncio.run(run_checks(binary, args.logs))
    for result in results:
        print(f"{'PASS' if result.ok else 'FAIL'} {result.name}: {result.detail}")
    for note in dict.fromkeys(notes):
        print(f"NOTE {note}")
    return 0 if results and all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
