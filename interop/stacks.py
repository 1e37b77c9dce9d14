"""Interop endpoints for the Python-packaged peers: qh3 and curl (curl_cffi).

``python -m interop.stacks NAME`` runs NAME's endpoint with the same
environment conventions as :mod:`interop.endpoint`. qh3 has aioquic's asyncio
API, so it reuses the endpoint logic written for quicmesh
(:class:`interop.endpoint.Stack`) with its own modules and configuration.
curl is an HTTP/3 client only, driven through curl_cffi's ``Session`` and
``AsyncSession``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .certs import SERVER_NAME
from .endpoint import EXIT_UNSUPPORTED, Stack, run, wants_client_certificate
from .peers import TESTCASES

_ALL = frozenset(TESTCASES)

SUPPORTED: dict[str, dict[str, Any]] = {
    "qh3": {
        "server": _ALL - {"connectionmigration"},
        "client": _ALL - {"connectionmigration"},
        "why": {
            (role, "connectionmigration"): "qh3 leaves preferred_address inactive"
            " ('the native core cannot yet install its CID/reset token and path atomically',"
            " qh3/quic/connection.py)"
            for role in ("server", "client")
        },
    },
    "curl": {
        "client": _ALL - {"keyupdate", "chacha20"},
        "why": {
            ("client", "keyupdate"): "libcurl has no way to ask ngtcp2 for a key update",
            ("client", "chacha20"): "BoringSSL does not let an application choose TLS 1.3"
            " cipher suites",
        },
    },
}
"""Test cases per stack and role, and why the missing ones are missing."""


def qh3_configuration(*, is_client: bool, testcase: str, certs: Path, qlog_dir: str | None) -> Any:
    """qh3's configuration for one role of a test case."""
    from qh3.h3.connection import H3_ALPN
    from qh3.quic.configuration import QuicConfiguration
    from qh3.quic.logger import QuicFileLogger
    from qh3.tls import CipherSuite

    # qh3's HTTP/3 layer always announces SETTINGS_H3_DATAGRAM, which RFC 9297
    # only allows with the max_datagram_frame_size transport parameter.
    config = QuicConfiguration(
        is_client=is_client, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536
    )
    if is_client:
        config.cafile = str(certs / "ca.pem")
        config.server_name = SERVER_NAME
        if wants_client_certificate():
            config.load_cert_chain(certs / "client.pem", certs / "client.key")
    else:
        config.load_cert_chain(certs / "cert.pem", certs / "priv.key")
    if testcase == "chacha20":
        config.cipher_suites = [CipherSuite.CHACHA20_POLY1305_SHA256]
    if qlog_dir:
        config.quic_logger = QuicFileLogger(qlog_dir)
    keylog = os.environ.get("SSLKEYLOGFILE")
    if keylog:
        config.secrets_log_file = open(keylog, "a", buffering=1)  # noqa: SIM115
    return config


def qh3_stack() -> Stack:
    """qh3 as a :class:`~interop.endpoint.Stack`."""
    import qh3.asyncio
    import qh3.h3.connection
    import qh3.h3.events
    import qh3.quic.events

    return Stack(
        name="qh3",
        asyncio=qh3.asyncio,
        h3_connection=qh3.h3.connection.H3Connection,
        h3_events=qh3.h3.events,
        quic_events=qh3.quic.events,
        configure=qh3_configuration,
        supported={k: v for k, v in SUPPORTED["qh3"].items() if k != "why"},
    )


# -- curl ----------------------------------------------------------------------

_CURLSSLOPT_EARLYDATA = 1 << 6


def _curl_session(testcase: str) -> Any:
    from curl_cffi import CurlOpt
    from curl_cffi.requests import Session

    options: dict[Any, Any] = {CurlOpt.PIPEWAIT: 1}
    if testcase == "zerortt":
        options[CurlOpt.SSL_OPTIONS] = _CURLSSLOPT_EARLYDATA
    return Session(
        http_version="v3only",
        verify=str(Path(os.environ["CERTS"]) / "ca.pem"),
        cert=_curl_client_certificate(),
        curl_options=options,
    )


def _curl_client_certificate() -> tuple[str, str] | None:
    """``client.pem`` and its key when the server requires a client certificate."""
    if not wants_client_certificate():
        return None
    certs = Path(os.environ["CERTS"])
    return str(certs / "client.pem"), str(certs / "client.key")


def _save(downloads: Path, url: str, response: Any) -> None:
    if response.status_code != 200:
        raise RuntimeError(f"GET {url}: status {response.status_code}")
    (downloads / Path(urlsplit(url).path).name).write_bytes(response.content)


async def _curl_parallel(urls: list[str], downloads: Path) -> None:
    from curl_cffi import CurlOpt
    from curl_cffi.requests import AsyncSession

    async with AsyncSession(
        http_version="v3only",
        verify=str(Path(os.environ["CERTS"]) / "ca.pem"),
        cert=_curl_client_certificate(),
        curl_options={CurlOpt.PIPEWAIT: 1},
        max_clients=len(urls),
    ) as session:
        # The first request sets up the connection the others multiplex onto.
        _save(downloads, urls[0], await session.get(urls[0], timeout=60))
        responses = await asyncio.gather(*(session.get(url, timeout=60) for url in urls[1:]))
        for url, response in zip(urls[1:], responses, strict=True):
            _save(downloads, url, response)


def run_curl() -> int:
    """curl's client: fetch ``REQUESTS`` into ``DOWNLOADS``."""
    from curl_cffi import CurlOpt

    role, testcase = os.environ.get("ROLE"), os.environ.get("TESTCASE", "")
    if role != "client" or testcase not in SUPPORTED["curl"]["client"]:
        print(f"curl cannot run {testcase!r} as {role!r}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    urls = os.environ["REQUESTS"].split()
    downloads = Path(os.environ["DOWNLOADS"])
    try:
        if testcase in ("multiplexing", "http3"):
            asyncio.run(_curl_parallel(urls, downloads))
        elif testcase == "handshakeloss":
            for url in urls:
                with _curl_session(testcase) as session:
                    _save(downloads, url, session.get(url, timeout=60))
        else:
            with _curl_session(testcase) as session:
                for index, url in enumerate(urls):
                    if index == 0 and testcase in ("resumption", "zerortt"):
                        # Close the first connection after its request; the next
                        # request opens a new one, resuming its TLS session.
                        # (curl_cffi resets the handle after each request.)
                        session.curl.setopt(CurlOpt.FORBID_REUSE, 1)
                    _save(downloads, url, session.get(url, timeout=60))
    except Exception as exc:
        print(f"client failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    """``python -m interop.stacks qh3|curl``."""
    if argv == ["qh3"]:
        return run(qh3_stack())
    if argv == ["curl"]:
        return run_curl()
    print("usage: python -m interop.stacks qh3|curl", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
