"""Thin wrappers that start each stack as an Interop Runner endpoint.

A :class:`Peer` turns one endpoint invocation (:class:`Invocation`: role, test
case, ports, files, log folder) into the commands that run it, says which test
cases it cannot do (with the reason, which the matrix shows as
"unsupported"), and installs itself from Debian or PyPI when missing.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

TESTCASES = (
    "handshake",
    "transfer",
    "multiplexing",
    "retry",
    "resumption",
    "zerortt",
    "http3",
    "keyupdate",
    "chacha20",
    "rebind-port",
    "rebind-addr",
    "connectionmigration",
    "handshakeloss",
    "transferloss",
)
"""The test cases, in the Interop Runner's order and naming."""

APT_PACKAGES = {"ngtcp2": ("ngtcp2-client", "ngtcp2-server"), "caddy": ("caddy",)}
"""Debian packages each peer needs."""


@dataclass
class Invocation:
    """One endpoint run: everything a wrapper needs to build its command line."""

    role: str
    testcase: str
    port: int
    """Server: the UDP port to listen on. Client: the port to connect to (the relay's)."""
    www: Path
    downloads: Path
    certs: Path
    requests: list[str]
    logdir: Path
    keylog: Path
    preferred_port: int | None = None
    """Server, connectionmigration: the port of the preferred address to announce."""
    client_certificate: bool = False
    """Client: present ``certs/client.pem`` (the server requires a client certificate)."""

    @property
    def qlogdir(self) -> Path:
        path = self.logdir / "qlog"
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Command:
    """A process to start: arguments, extra environment, working directory."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None


class Peer:
    """A QUIC stack wrapped as an interop endpoint."""

    name = ""
    description = ""
    roles: tuple[str, ...] = ("server", "client")
    writes_keylog = False
    """Whether the stack honours ``SSLKEYLOGFILE`` (its traffic can be decrypted)."""
    requires_client_certificate = False
    """(server) Whether the server refuses a client without a certificate."""
    is_quicmesh = False
    """Whether this is quicmesh itself (on one of its QUIC engines)."""
    not_available = "not installed (run without --no-install)"
    """What the matrix says when :meth:`available` stays False."""

    def available(self) -> bool:
        """Whether the stack can be run on this machine."""
        raise NotImplementedError

    def install(self) -> None:
        """Install the stack (Debian or PyPI); raises ``CalledProcessError`` on failure."""

    def unsupported(self, role: str, testcase: str) -> str | None:
        """Why the stack cannot play ``testcase`` as ``role``, or ``None`` if it can."""
        if role not in self.roles:
            return f"{self.name} has no {role}"
        return None

    def commands(self, run: Invocation) -> list[Command]:
        """The commands to run, in order (a client may use several connections)."""
        raise NotImplementedError


def _apt_install(packages: tuple[str, ...]) -> None:
    if os.geteuid() != 0:
        raise PermissionError(f"installing {' '.join(packages)} needs root (apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def _pip_install(*packages: str, python: str = sys.executable) -> None:
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *packages],
        check=True,
    )


def _endpoint_env(run: Invocation) -> dict[str, str]:
    return {
        "ROLE": run.role,
        "TESTCASE": run.testcase,
        "PORT": str(run.port),
        "HOST": "127.0.0.1",
        "WWW": str(run.www),
        "DOWNLOADS": str(run.downloads),
        "CERTS": str(run.certs),
        "REQUESTS": " ".join(run.requests),
        "QLOGDIR": str(run.qlogdir),
        "SSLKEYLOGFILE": str(run.keylog),
        "PYTHONPATH": str(REPO),
        "CLIENT_CERTIFICATE": "1" if run.client_certificate else "0",
    }


class QuicmeshPeer(Peer):
    """quicmesh's own endpoint (:mod:`interop.endpoint`) on its default engine, aioquic."""

    name = "quicmesh"
    description = "quicmesh (aioquic 1.7.2 with quicmesh's QUIC configuration)"
    writes_keylog = True
    is_quicmesh = True
    engine = "aioquic"

    def available(self) -> bool:
        return True

    def unsupported(self, role: str, testcase: str) -> str | None:
        from .endpoint import SUPPORTED

        if testcase not in SUPPORTED[role]:
            if role == "server" and testcase == "connectionmigration":
                return "aioquic's server cannot announce a preferred_address"
            return f"quicmesh's {role} does not implement {testcase}"
        return None

    def commands(self, run: Invocation) -> list[Command]:
        env = dict(_endpoint_env(run), ENGINE=self.engine)
        return [Command([sys.executable, "-m", "interop.endpoint"], env, REPO)]


class QuicmeshNativePeer(QuicmeshPeer):
    """quicmesh's endpoint on its native engine (quinn + rustls:
    :mod:`interop.native_endpoint`), which requires a client certificate."""

    name = "quicmesh-native"
    description = (
        "quicmesh's native engine (quinn 0.11 + rustls 0.23 in quicmesh._native, through"
        " quicmesh's engine interface; HTTP/3 in Python); requires a client certificate,"
        " writes no key log"
    )
    writes_keylog = False
    requires_client_certificate = True
    engine = "native"
    not_available = (
        "the native extension quicmesh._native is not built (pip install -e . with Rust; README)"
    )

    def available(self) -> bool:
        from quicmesh.transport.quic.native_engine import native_available

        return native_available()

    def unsupported(self, role: str, testcase: str) -> str | None:
        from .native_endpoint import WHY

        return WHY.get((role, testcase))


class AioquicApiPeer(Peer):
    """A stack with aioquic's asyncio API, run through :mod:`interop.stacks`."""

    module = ""
    package = ""
    python = sys.executable

    def available(self) -> bool:
        if self.python == sys.executable:
            return importlib.util.find_spec(self.module) is not None
        return (
            subprocess.run(
                [self.python, "-c", f"import {self.module}"], capture_output=True
            ).returncode
            == 0
        )

    def install(self) -> None:
        _pip_install(self.package, python=self.python)

    def unsupported(self, role: str, testcase: str) -> str | None:
        from .stacks import SUPPORTED

        reason = super().unsupported(role, testcase)
        if reason is None and testcase not in SUPPORTED[self.name][role]:
            reason = (
                SUPPORTED[self.name]
                .get("why", {})
                .get((role, testcase), f"{self.name}'s {role} cannot do {testcase}")
            )
        return reason

    def commands(self, run: Invocation) -> list[Command]:
        return [Command([self.python, "-m", "interop.stacks", self.name], _endpoint_env(run), REPO)]


class Qh3Peer(AioquicApiPeer):
    """qh3 (aioquic's API over its own Rust QUIC and TLS core)."""

    name = "qh3"
    description = "qh3 (PyPI; Rust core, aioquic-style API)"
    module = "qh3"
    package = "qh3"
    writes_keylog = True


class Ngtcp2Peer(Peer):
    """ngtcp2's example HTTP/3 client and server (GnuTLS build, from Debian)."""

    name = "ngtcp2"
    description = "ngtcp2 0.12 examples gtlsclient/gtlsserver (Debian, GnuTLS, nghttp3)"
    writes_keylog = True  # GnuTLS honours SSLKEYLOGFILE

    chacha20_priority = "NORMAL:-VERS-ALL:+VERS-TLS1.3:-CIPHER-ALL:+CHACHA20-POLY1305"

    def available(self) -> bool:
        return bool(shutil.which("gtlsclient") and shutil.which("gtlsserver"))

    def install(self) -> None:
        _apt_install(APT_PACKAGES["ngtcp2"])

    def unsupported(self, role: str, testcase: str) -> str | None:
        if role == "server" and testcase == "keyupdate":
            return None  # the client initiates it
        return super().unsupported(role, testcase)

    def commands(self, run: Invocation) -> list[Command]:
        env = {"SSLKEYLOGFILE": str(run.keylog)}
        common = ["-q", "--qlog-dir", str(run.qlogdir)]
        if run.testcase == "chacha20":
            common.append(f"--ciphers={self.chacha20_priority}")
        if run.role == "server":
            argv = [shutil.which("gtlsserver") or "gtlsserver", *common, "-d", str(run.www)]
            if run.testcase == "retry":
                argv.append("--validate-addr")
            if run.testcase == "connectionmigration" and run.preferred_port:
                argv.append(f"--preferred-ipv4-addr=127.0.0.1:{run.preferred_port}")
            argv += [
                "127.0.0.1",
                str(run.port),
                str(run.certs / "priv.key"),
                str(run.certs / "cert.pem"),
            ]
            return [Command(argv, env)]
        client = [
            shutil.which("gtlsclient") or "gtlsclient",
            *common,
            "--exit-on-all-streams-close",
            "--download",
            str(run.downloads),
            "--timeout=15s",
        ]
        if run.testcase == "keyupdate":
            client.append("--key-update=1ms")
        if run.client_certificate:
            client += ["--cert", str(run.certs / "client.pem")]
            client += ["--key", str(run.certs / "client.key")]
        target = ["127.0.0.1", str(run.port)]
        if run.testcase in ("resumption", "zerortt"):
            session = ["--session-file", str(run.logdir / "session.pem")]
            session += ["--tp-file", str(run.logdir / "tp.txt")]
            if run.testcase == "resumption":
                session.append("--disable-early-data")
            return [
                Command([*client, *session, *target, run.requests[0]], env),
                Command([*client, *session, *target, *run.requests[1:]], env),
            ]
        if run.testcase == "handshakeloss":
            return [Command([*client, *target, url], env) for url in run.requests]
        return [Command([*client, *target, *run.requests], env)]


class CaddyPeer(Peer):
    """Caddy's HTTP/3 file server (quic-go), from Debian."""

    name = "caddy"
    description = "Caddy 2.6 file_server over HTTP/3 (quic-go; Debian)"
    roles = ("server",)

    _why = {
        "retry": "Caddy has no setting for quic-go's address validation (Retry)",
        "chacha20": "quic-go follows crypto/tls, whose TLS 1.3 cipher suites cannot be chosen",
        "connectionmigration": "quic-go cannot announce a preferred_address",
    }

    def available(self) -> bool:
        return shutil.which("caddy") is not None

    def install(self) -> None:
        _apt_install(APT_PACKAGES["caddy"])

    def unsupported(self, role: str, testcase: str) -> str | None:
        return super().unsupported(role, testcase) or self._why.get(testcase)

    def commands(self, run: Invocation) -> list[Command]:
        caddyfile = run.logdir / "Caddyfile"
        caddyfile.write_text(
            "{\n"
            "\tadmin off\n"
            "\tauto_https off\n"
            f"\thttps_port {run.port}\n"
            "\tservers {\n\t\tprotocols h1 h2 h3\n\t}\n"
            "}\n"
            f"https://127.0.0.1:{run.port} {{\n"
            f"\ttls {run.certs / 'cert.pem'} {run.certs / 'priv.key'}\n"
            f"\troot * {run.www}\n"
            "\tfile_server\n"
            "}\n"
        )
        env = {
            "SSLKEYLOGFILE": str(run.keylog),
            "HOME": str(run.logdir),
            "XDG_DATA_HOME": str(run.logdir),
            "XDG_CONFIG_HOME": str(run.logdir),
        }
        argv = ["caddy", "run", "--config", str(caddyfile), "--adapter", "caddyfile"]
        return [Command(argv, env)]


class CurlPeer(Peer):
    """libcurl (ngtcp2 + BoringSSL) through curl_cffi, as an HTTP/3 client."""

    name = "curl"
    description = "curl_cffi (PyPI; libcurl with ngtcp2, nghttp3 and BoringSSL), v3only"
    roles = ("client",)
    writes_keylog = True

    def available(self) -> bool:
        return importlib.util.find_spec("curl_cffi") is not None

    def install(self) -> None:
        _pip_install("curl_cffi")

    def unsupported(self, role: str, testcase: str) -> str | None:
        from .stacks import SUPPORTED

        reason = super().unsupported(role, testcase)
        if reason is None and testcase not in SUPPORTED["curl"]["client"]:
            reason = SUPPORTED["curl"]["why"].get(("client", testcase), "not available")
        return reason

    def commands(self, run: Invocation) -> list[Command]:
        return [Command([sys.executable, "-m", "interop.stacks", "curl"], _endpoint_env(run), REPO)]


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        QuicmeshPeer(),
        QuicmeshNativePeer(),
        Ngtcp2Peer(),
        Qh3Peer(),
        CaddyPeer(),
        CurlPeer(),
    )
}
"""Every stack the runner knows, by name (quicmesh's engines first)."""

ENGINES: dict[str, Peer] = {"aioquic": PEERS["quicmesh"], "native": PEERS["quicmesh-native"]}
"""quicmesh's endpoint per QUIC engine (``python -m interop.run --engines``)."""
