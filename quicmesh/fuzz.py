"""``quicmesh fuzz``: coverage-guided fuzzing (atheris) of every parser that meets
the network or a file (issue 13).

Each target takes raw bytes and feeds them where a peer or an operator could
put them; it passes when the parser answers with its events or raises the one
error its API documents, and fails (a crash) on anything else:

* ``connect``: a CONNECT request's target and header fields
  (:func:`~quicmesh.tunnel.connect.parse_target`,
  :func:`~quicmesh.tunnel.connect.validate_headers` and
  :func:`~quicmesh.tunnel.connect.parse_connect_request`, used by all three sessions);
* ``h3``: an HTTP/3 request stream and the QPACK encoder stream, into the server
  side of an :class:`~quicmesh.tunnel.h3.H3TunnelSession` over a real in-memory
  QUIC connection (aioquic, handshake done once);
* ``qpack``: the decoded-size bound (:class:`~quicmesh.tunnel.qpack.FieldSectionBound`)
  over an encoder stream and a header block, and the decoder behind it: whatever it
  decodes is within its limit;
* ``static_request``: a new request stream's first bytes, as the inbound engine
  flows read them (:func:`~quicmesh._aioquic.read_static_request`): what it reads is
  a request aioquic accepts, within the limit;
* ``h2``: the bytes of an HTTP/2 connection after the client preface, into the
  server's :class:`~quicmesh.tunnel.h2.H2TunnelSession` (the ``h2`` transport's
  framing inside TLS);
* ``http1``: the bytes of an HTTP/1.1 CONNECT connection into the server's
  :class:`~quicmesh.tunnel.http1.Http1TunnelSession` (the ``tcp`` transport's
  framing inside TLS);
* ``config``: a sidecar configuration file
  (:func:`~quicmesh.sidecar.config.parse_config`);
* ``endpoints``: an endpoints file
  (:func:`~quicmesh.sidecar.config.load_endpoints_document`).

``quicmesh fuzz [--seconds N] [--target NAME]`` runs each target for N seconds
in its own process (atheris instruments the loaded code; libFuzzer keeps a
corpus per target in ``--corpus``). An input that crashes is written to
``--crashes`` (by default ``tests/fuzz_regressions/<target>/``), where the test
suite replays every file (``tests/test_fuzz_targets.py``). Needs ``atheris``
(``pip install 'quicmesh[fuzz]'``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bench import OneLineParser
from .errors import ConfigError, QuicmeshError
from .outputs import output_dir

REGRESSIONS = Path(__file__).resolve().parent.parent / "tests" / "fuzz_regressions"
"""Where crashing inputs are kept, one directory per target (in a source checkout)."""


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Two inputs from one: the first byte says how long the first part is."""
    if not data:
        return b"", b""
    cut = data[0] % max(1, len(data))
    return data[1 : 1 + cut], data[1 + cut :]


# -- targets -------------------------------------------------------------------------


def fuzz_connect(data: bytes) -> None:
    """Target and header lines of a CONNECT request."""
    from .errors import TunnelUsageError
    from .tunnel.connect import parse_connect_request, parse_target, validate_headers

    text = data.decode("utf-8", "surrogateescape")
    target, _, rest = text.partition("\n")
    headers: dict[str, str] = {}
    fields = [(b":method", b"CONNECT"), (b":authority", target.encode("utf-8", "surrogateescape"))]
    for line in rest.split("\n"):
        name, _, value = line.partition(":")
        headers[name] = value
        fields.append(
            (name.encode("utf-8", "surrogateescape"), value.encode("utf-8", "surrogateescape"))
        )
    for call in (
        lambda: parse_target(target),
        lambda: validate_headers(headers),
        lambda: parse_connect_request(fields),
    ):
        with contextlib.suppress(TunnelUsageError):
            call()


def fuzz_h2(data: bytes) -> None:
    """HTTP/2 frames from a client, after its preface."""
    import h2.connection

    from .tunnel import events
    from .tunnel.h2 import H2TunnelSession

    server = H2TunnelSession(is_client=False)
    preface = h2.connection.H2Connection()
    preface.initiate_connection()
    produced = server.receive_data(preface.data_to_send())
    first, second = _split(data)
    for chunk in (first, second):
        produced += server.receive_data(chunk)
        server.data_to_send()
    produced += server.receive_eof()
    assert all(isinstance(event, events.TunnelEvent) for event in produced)


def fuzz_http1(data: bytes) -> None:
    """An HTTP/1.1 CONNECT connection from a client, in two chunks."""
    from .tunnel import events
    from .tunnel.http1 import Http1TunnelSession

    server = Http1TunnelSession(is_client=False)
    first, second = _split(data)
    produced = server.receive_data(first)
    produced += server.receive_data(second)
    produced += server.receive_eof()
    server.data_to_send()
    assert all(isinstance(event, events.TunnelEvent) for event in produced)


def fuzz_qpack(data: bytes) -> None:
    """An encoder stream and a header block through the decoded-size bound, and through
    the decoder it guards (``_aioquic._BoundedDecoder``, a limit of 4 KiB): a block it
    decodes is within the limit."""
    import pylsqpack

    from ._aioquic import FieldSectionTooLarge, _BoundedDecoder
    from .tunnel.qpack import FieldSectionBound, QpackFormatError

    encoder, block = _split(data)
    bound = FieldSectionBound(4096)
    try:
        bound.feed_encoder(encoder)
        assert bound.section_size(block, stop_above=60 * 1024) >= 0
    except QpackFormatError:
        pass
    limit = 4096
    decoder = _BoundedDecoder(pylsqpack.Decoder(4096, 16), 4096, limit)
    try:
        decoder.feed_encoder(encoder)
        _, fields = decoder.feed_header(0, block)
    except (
        FieldSectionTooLarge,
        pylsqpack.DecompressionFailed,
        pylsqpack.EncoderStreamError,
        pylsqpack.StreamBlocked,
    ):
        return
    size = sum(len(name) + len(value) + 32 for name, value in fields)
    assert size <= limit, f"decoded {size} bytes past the limit of {limit}"


def fuzz_static_request(data: bytes) -> None:
    """A request stream's first bytes as inbound engine flows read them."""
    from aioquic.h3.connection import validate_request_headers

    from ._aioquic import read_static_request

    limit = 4096
    read = read_static_request(data, limit)
    if read is None:
        return
    fields, rest = read
    assert data.endswith(rest)
    validate_request_headers(fields)
    assert sum(len(name) + len(value) + 32 for name, value in fields) <= limit


class _H3Pair:
    """A client and a server MeshQuicConnection with tunnel sessions, handshake done;
    the client's bytes reach the server through real QUIC packets."""

    def __init__(self) -> None:
        from ._aioquic import MeshQuicConnection
        from .tls import DevCA
        from .transport.quic import QuicTransport
        from .tunnel.h3 import H3TunnelSession

        ca = DevCA()
        client_transport = QuicTransport(
            identity=ca.issue(f"spiffe://{ca.trust_domain}/ns/fuzz/sa/client"),
            trust=ca.trust_bundle,
        )
        server_transport = QuicTransport(
            identity=ca.issue(f"spiffe://{ca.trust_domain}/ns/fuzz/sa/server"),
            trust=ca.trust_bundle,
        )
        self.now = 1000.0
        self.client = MeshQuicConnection(
            configuration=client_transport.configuration(is_client=True)
        )
        self.server = MeshQuicConnection(
            configuration=server_transport.configuration(is_client=False),
            original_destination_connection_id=self.client.original_destination_connection_id,
            request_client_certificate=True,
        )
        self.server_session = H3TunnelSession(self.server)
        self.client_session = H3TunnelSession(self.client)
        self.client.connect(("10.0.0.2", 4433), now=self.now)
        self.exchange()
        self.encoder_fed = False

    def exchange(self) -> list[Any]:
        """Move datagrams both ways until quiet; the server session's events. Time moves
        50 ms a round: aioquic's pacer sends nothing more while it stands still (the
        target's requests never reached the server)."""
        produced: list[Any] = []
        for _ in range(20):
            self.now += 0.05
            moved = 0
            for sender, receiver, addr in (
                (self.client, self.server, ("10.0.0.1", 1234)),
                (self.server, self.client, ("10.0.0.2", 4433)),
            ):
                for datagram, _ in sender.datagrams_to_send(now=self.now):
                    receiver.receive_datagram(datagram, addr, now=self.now)
                    moved += 1
            while (event := self.server.next_event()) is not None:
                produced += self.server_session.handle_quic_event(event)
            while (event := self.client.next_event()) is not None:
                self.client_session.handle_quic_event(event)
            if not moved:
                break
        return produced


_PAIR: _H3Pair | None = None


def fuzz_h3(data: bytes) -> None:
    """QPACK encoder-stream bytes and a request stream (HEADERS-framed or raw),
    sent by a real client connection."""
    from ._aioquic import can_open_bidi_stream, closing_reason
    from .tunnel import events

    global _PAIR
    pair = _PAIR
    if (
        pair is None
        or closing_reason(pair.server) is not None
        or not can_open_bidi_stream(pair.client)
    ):
        pair = _PAIR = _H3Pair()
    client = pair.client
    encoder, request = _split(data)
    if encoder and not pair.encoder_fed:
        pair.encoder_fed = True
        encoder_stream = pair.client_session.h3._local_encoder_stream_id
        assert encoder_stream is not None
        client.send_stream_data(encoder_stream, encoder)
    if request[:1] == b"\x01" and len(request) > 1:
        body = b"\x01" + bytes([min(len(request) - 1, 63)]) + request[1:]
    else:
        body = request
    client.send_stream_data(client.get_next_available_stream_id(), body, end_stream=True)
    produced = pair.exchange()
    assert all(isinstance(event, events.TunnelEvent) for event in produced)


def fuzz_config(data: bytes) -> None:
    """A sidecar configuration file."""
    from .sidecar.config import parse_config

    try:
        parse_config(data.decode("utf-8", "replace"), source="fuzz.yaml", base_dir=Path("/"))
    except ConfigError as exc:
        assert "\n" not in str(exc).strip(), str(exc)


def fuzz_endpoints(data: bytes) -> None:
    """An endpoints file (raw bytes: not UTF-8 is an error too)."""
    from .sidecar.config import load_endpoints_document

    with tempfile.NamedTemporaryFile(suffix=".yaml") as handle:
        handle.write(data)
        handle.flush()
        try:
            load_endpoints_document(handle.name)
        except ConfigError as exc:
            assert "\n" not in str(exc).strip(), str(exc)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "connect": fuzz_connect,
    "h3": fuzz_h3,
    "qpack": fuzz_qpack,
    "static_request": fuzz_static_request,
    "h2": fuzz_h2,
    "http1": fuzz_http1,
    "config": fuzz_config,
    "endpoints": fuzz_endpoints,
}
"""Every fuzz target by name."""


def replay(target: str, data: bytes) -> None:
    """Run one input through ``target`` (raises what the target let escape)."""
    TARGETS[target](data)


# -- running -------------------------------------------------------------------------


INSTRUMENTED: dict[str, list[str]] = {
    "connect": ["quicmesh.tunnel"],
    "h3": ["quicmesh.tunnel", "aioquic.h3"],
    "qpack": ["quicmesh.tunnel", "quicmesh._aioquic"],
    "static_request": ["quicmesh._aioquic", "quicmesh.tunnel", "aioquic.h3"],
    "h2": ["quicmesh.tunnel", "h2", "hpack"],
    "http1": ["quicmesh.tunnel", "h11"],
    "config": ["quicmesh.sidecar.config", "quicmesh.tunnel", "yaml"],
    "endpoints": ["quicmesh.sidecar.config", "quicmesh.tunnel", "yaml"],
}
"""The packages whose coverage guides each target (instrumenting everything
loaded takes minutes; these are the parsers and what they call)."""

_WORKER = """
import sys, atheris
with atheris.instrument_imports(include=sys.argv[1].split(",")):
    from quicmesh import fuzz
sys.exit(fuzz._worker(*sys.argv[2:]))
"""


def _worker(target: str, seconds: str, corpus: str, crashes: str) -> int:
    """One target under atheris in this process (atheris runs once per process;
    :data:`_WORKER` imports the code to instrument first)."""
    import atheris

    function = TARGETS[target]
    Path(corpus).mkdir(parents=True, exist_ok=True)
    Path(crashes).mkdir(parents=True, exist_ok=True)
    atheris.Setup(
        [
            sys.argv[0],
            f"-max_total_time={seconds}",
            f"-artifact_prefix={crashes}/",
            "-rss_limit_mb=2048",
            "-timeout=20",
            corpus,
        ],
        function,
    )
    atheris.Fuzz()
    return 0


def main(argv: list[str]) -> int:
    """``quicmesh fuzz``: run the targets, one process each; exit 1 if one crashed."""
    parser = OneLineParser(
        prog="quicmesh fuzz", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument(
        "--target", choices=sorted(TARGETS), action="append", help="(repeatable) default all"
    )
    parser.add_argument(
        "--corpus", type=output_dir, help="corpus directory (default: a temporary one)"
    )
    parser.add_argument(
        "--crashes",
        type=output_dir,
        default=REGRESSIONS,
        help="where crashing inputs are written, one folder per target "
        "(default: tests/fuzz_regressions/ of this checkout)",
    )
    args = parser.parse_args(argv)
    if args.seconds < 1:
        parser.error(f"--seconds must be at least 1, not {args.seconds}")
    try:
        import atheris  # noqa: F401
    except ImportError:
        raise QuicmeshError(
            "atheris is not installed: pip install 'quicmesh[fuzz]' (needs Python <= 3.11)"
        ) from None
    failed = []
    with tempfile.TemporaryDirectory(prefix="quicmesh-fuzz-") as scratch:
        for target in args.target or list(TARGETS):
            corpus = (args.corpus or Path(scratch)) / target
            crashes = args.crashes / target
            result = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _WORKER,
                    ",".join(INSTRUMENTED[target]),
                    target,
                    str(args.seconds),
                    str(corpus),
                    str(crashes),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONHASHSEED": "0"},
            )
            runs = [line for line in result.stderr.splitlines() if line.startswith("Done ")]
            summary = runs[-1] if runs else " ".join(result.stderr.strip().splitlines()[-1:])
            if result.returncode == 0:
                print(f"{target}: ok ({summary})", flush=True)
            else:
                failed.append(target)
                print(f"{target}: CRASH, input kept in {crashes}/", flush=True)
                print(result.stderr[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
