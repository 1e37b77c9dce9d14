"""Certificates over time: refused when unusable, renewed, reloaded, rotated under traffic.

Real sidecar processes on loopback. Rotation is driven by the certificates'
own lifetime (a few seconds), and the tests wait on the sidecars' counters
(``quicmesh_certificate_rotations_total``), never on a sleep.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from quic_helpers import require_engine

from quicmesh.sidecar.launch import SidecarProcess, free_port, metric
from quicmesh.tls import DevCA
from quicmesh.tls.check import handshake_failure_reason, own_certificate_problem, renewal_time

from .conftest import IDENTITY_A, IDENTITY_B, addr, echo_flow, refused, wait_until

NOW = datetime.datetime.now(datetime.UTC)


# -- sans-IO checks ----------------------------------------------------------------


def test_own_certificate_problems_are_named() -> None:
    ca, other = DevCA(), DevCA()
    good = ca.issue(IDENTITY_A)
    assert own_certificate_problem(good, ca.trust_bundle) is None
    expired = ca.issue(
        IDENTITY_A,
        not_before=NOW - datetime.timedelta(days=2),
        not_after=NOW - datetime.timedelta(days=1),
    )
    problem = own_certificate_problem(expired, ca.trust_bundle)
    assert problem is not None and problem.startswith(f"our certificate ({IDENTITY_A}) expired")
    future = ca.issue(IDENTITY_A, not_before=NOW + datetime.timedelta(days=1))
    problem = own_certificate_problem(future, ca.trust_bundle)
    assert problem is not None and "is not valid before" in problem
    problem = own_certificate_problem(good, other.trust_bundle)
    assert problem is not None and "not trusted by our own trust bundle" in problem


def test_renewal_is_two_thirds_into_the_lifetime() -> None:
    start = NOW.replace(microsecond=0) - datetime.timedelta(hours=1)
    identity = DevCA().issue(
        IDENTITY_A, not_before=start, not_after=start + datetime.timedelta(hours=3)
    )
    assert renewal_time(identity) == start + datetime.timedelta(hours=2)


def test_a_short_lifetime_is_counted_from_now_and_renewed_two_thirds_into_it(
    tmp_path: Path,
) -> None:
    """X.509 keeps whole seconds: a certificate for ``certificate_lifetime: 1s`` ended
    anywhere from 0 to 1 s after it was issued (the end rounded down), and two thirds
    into that it was renewed: 31 rotations in 5 s. It is valid for the whole lifetime."""
    from quicmesh.sidecar.certs import CertificateSource, load_identity
    from quicmesh.sidecar.config import parse_config

    DevCA().save(tmp_path / "ca")
    for lifetime in (1.0, 1.5, 2.0):
        config = parse_config(
            f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
            f"tls: {{ca_dir: ca, certificate_lifetime: {lifetime}s}}\n"
            "admin: {address: '127.0.0.1:15000'}\n"
            "listeners: {inbound: [{name: m, address: '127.0.0.1:15008', transports: [quic],"
            " destinations: ['127.0.0.1:80']}]}\n",
            source="a.yaml",
            base_dir=tmp_path,
        )
        before = datetime.datetime.now(datetime.UTC)
        identity, trust = load_identity(config)
        after = datetime.datetime.now(datetime.UTC)
        not_after = identity.certificate.not_valid_after_utc
        assert before + datetime.timedelta(seconds=lifetime) <= not_after
        assert not_after <= after + datetime.timedelta(seconds=lifetime + 1)
        renewal = CertificateSource(config, identity, trust).next_renewal()
        assert renewal is not None
        assert renewal >= before + datetime.timedelta(seconds=lifetime * 2 / 3)


def test_handshake_failure_reasons_name_the_side() -> None:
    from quicmesh.errors import ConnectError, PeerVerificationError

    assert handshake_failure_reason(PeerVerificationError("peer certificate has expired")) == (
        "peer_certificate_expired",
        "peer",
    )
    assert handshake_failure_reason(
        PeerVerificationError("handshake refused: peer certificate not signed by a trusted CA")
    ) == ("our_certificate_refused", "ours")
    # The peer's alert, whatever its reason: about our certificate (it was counted as
    # the peer's untrusted certificate).
    assert handshake_failure_reason(
        PeerVerificationError("handshake refused: error 42: unable to get local issuer certificate")
    ) == ("our_certificate_refused", "ours")
    assert handshake_failure_reason(
        PeerVerificationError(
            "server certificate not trusted: unable to get local issuer certificate"
        )
    ) == ("peer_certificate_untrusted", "peer")
    assert handshake_failure_reason(
        PeerVerificationError("server certificate not trusted: certificate has expired")
    ) == ("peer_certificate_expired", "peer")
    assert handshake_failure_reason(
        PeerVerificationError("the server rejected our certificate (TLS alert x)")
    ) == ("our_certificate_refused", "ours")
    assert handshake_failure_reason(ConnectError("QUIC handshake timed out after 1s")) == (
        "timeout",
        "unknown",
    )


# -- processes ---------------------------------------------------------------------


def _pem_config(directory: Path, name: str, identity: str, **ports: int) -> dict[str, Any]:
    return {
        "node": {"name": name, "identity": identity},
        "tls": {
            "cert": str(directory / f"{name}.crt"),
            "key": str(directory / f"{name}.key"),
            "trust_bundle": str(directory / "bundle.pem"),
        },
        "admin": {"address": addr(ports["admin"])},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": addr(ports["mesh"]),
                    "transports": ["quic"],
                    "destinations": ["127.0.0.1:*"],
                }
            ]
        },
    }


def _run(sidecar: SidecarProcess, *extra: str) -> subprocess.CompletedProcess[str]:
    """``quicmesh sidecar -c <its configuration> *extra`` as a user runs it, to its end."""
    return subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(sidecar.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _write_identity(directory: Path, name: str, identity: Any) -> None:
    tmp_cert, tmp_key = directory / f".{name}.crt", directory / f".{name}.key"
    identity.save(tmp_cert, tmp_key)
    os.replace(tmp_key, directory / f"{name}.key")
    os.replace(tmp_cert, directory / f"{name}.crt")


@pytest.mark.parametrize("case", ["expired", "not_yet_valid", "untrusted"])
def test_unusable_own_certificate_refuses_ready_and_check(tmp_path: Path, case: str) -> None:
    ca, other = DevCA(), DevCA()
    if case == "expired":
        identity = ca.issue(
            IDENTITY_B,
            not_before=NOW - datetime.timedelta(days=2),
            not_after=NOW - datetime.timedelta(days=1),
        )
        expected = "expired at"
    elif case == "not_yet_valid":
        identity = ca.issue(IDENTITY_B, not_before=NOW + datetime.timedelta(days=1))
        expected = "is not valid before"
    else:
        identity = other.issue(IDENTITY_B)
        expected = "not trusted by our own trust bundle"
    _write_identity(tmp_path, "b", identity)
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    ports = {"admin": free_port(), "mesh": free_port()}
    config = _pem_config(tmp_path, "b", IDENTITY_B, **ports)
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.write_config()
    check = _run(sidecar, "--check")
    assert check.returncode == 2
    lines = check.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and "our certificate" in lines[0]
    sidecar.start()
    try:
        # The admin answers "starting" until every listener is up, then names the problem.
        status, body = wait_until(
            lambda: _past_starting(_try_request(sidecar, "/ready")),
            timeout=20,
            what="admin answers past start-up",
        )
        assert status == 503
        assert expected in body.decode() and "our certificate" in body.decode()
        assert metric(sidecar.metrics(), "quicmesh_certificate_valid") == 0
        assert "not ready" not in sidecar.stderr() or expected in sidecar.stderr()
        assert expected in sidecar.stderr()
        # A good certificate written over the bad one is picked up: ready, without a restart.
        _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
        wait_until(lambda: _try_request(sidecar, "/ready") == (200, b"ready\n"), timeout=20)
        assert metric(sidecar.metrics(), "quicmesh_certificate_rotations_total") == 1
    finally:
        assert sidecar.stop() == 0


def test_a_certificate_expiring_while_the_sidecar_runs_is_logged_once(tmp_path: Path) -> None:
    """/ready turned 503 with the reason and nothing was logged (only a problem found at
    start or at a rotation was); one ERROR now, as it expires."""
    ca = DevCA()
    now = datetime.datetime.now(datetime.UTC)
    # 8 s: a loaded machine took more than 3 s to start the sidecar.
    _write_identity(
        tmp_path,
        "b",
        ca.issue(IDENTITY_B, not_before=now - datetime.timedelta(minutes=1),
                 not_after=now + datetime.timedelta(seconds=8)),
    )  # fmt: skip
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready()
        assert "not ready" not in sidecar.stderr()
        wait_until(lambda: "expired at" in sidecar.stderr(), timeout=20, what="expiry logged")
        status, body = _try_request(sidecar, "/ready") or (0, b"")
        assert status == 503 and b"expired at" in body
        status, body = _try_request(sidecar, "/stats/prometheus") or (0, b"")
        valid = f'\nquicmesh_certificate_valid{{identity="{IDENTITY_B}"}} 0.0\n'.encode()
        assert status == 200 and valid in body, body[:300]
        lines = [line for line in sidecar.stderr().splitlines() if "expired at" in line]
        assert len(lines) == 1 and "not ready: our certificate" in lines[0], lines
    finally:
        assert sidecar.stop() == 0


def _past_starting(answer: tuple[int, bytes] | None) -> tuple[int, bytes] | None:
    if answer is None or answer[1] == b"not ready: starting\n":
        return None
    return answer


def _try_request(sidecar: SidecarProcess, path: str) -> tuple[int, bytes] | None:
    try:
        return sidecar.request("GET", path, timeout=1.0)
    except OSError:
        return None


def test_good_certificate_passes_check(tmp_path: Path) -> None:
    ca = DevCA()
    _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.write_config()
    check = _run(sidecar, "--check")
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().endswith(": ok")


def test_check_warns_of_a_reset_key_others_may_read(tmp_path: Path) -> None:
    # The start warned of it; --check said only "ok" (review).
    ca = DevCA()
    _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    key = tmp_path / "reset.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o644)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    config["listeners"]["inbound"][0]["stateless_reset_key"] = str(key)
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.write_config()
    check = _run(sidecar, "--check")
    assert check.returncode == 0, check.stderr
    assert "warning: " in check.stderr and "reset.key is readable by others (mode 644)" in (
        check.stderr
    )
    key.chmod(0o600)
    assert "warning" not in _run(sidecar, "--check").stderr


@pytest.mark.parametrize(
    ("where", "value", "expected"),
    [
        (("access_log", "path"), "missing-dir/access.log", "access_log.path: no directory"),
        # (A traceback: a name the system refuses, as a directory it may not search.)
        (("access_log", "path"), "x" * 300, "cannot be checked: File name too long"),
        (("access_log", "path"), ".", "access_log.path: "),
        (("tls", "ticket_cache"), ".", "tls.ticket_cache: "),
        (("access_log", "path"), "b.yaml", "access_log.path: "),  # the configuration
        (("access_log", "path"), "", "access_log.path: is empty"),
        (("tls", "ticket_cache"), "notes.txt", "tls.ticket_cache: "),
        (
            ("listeners", "inbound", 0, "stateless_reset_key"),
            "missing-dir/reset.key",
            "listeners.inbound[0].stateless_reset_key: no directory",
        ),
        (
            ("listeners", "inbound", 0, "stateless_reset_key"),
            "short.key",
            "short.key is shorter than 16 bytes (5)",
        ),
        (("tls", "trust_bundle"), "missing.pem", ".yaml: tls.trust_bundle: "),
        (("tls", "key"), "missing.key", ".yaml: tls.cert, tls.key: "),
        # (Read until memory ran out: files are read up to 16 MiB.)
        (("tls", "trust_bundle"), "/dev/zero", "/dev/zero: cannot read: larger than 16,777,216"),
        (
            ("listeners", "inbound", 0, "stateless_reset_key"),
            "/dev/zero",
            "stateless_reset_key: /dev/zero is shorter than 16 bytes (0)",
        ),
        # The identity's files are never written nor taken as a reset key (flow records
        # were appended to the private key).
        (("access_log", "path"), "b.key", "b.key is also tls.key"),
        (("access_log", "path"), "hard.key", "hard.key is also tls.key"),  # a hard link
        (
            ("tls", "ticket_cache"),
            "bundle.pem",
            "bundle.pem is also tls.trust_bundle",
        ),
        (
            ("listeners", "inbound", 0, "stateless_reset_key"),
            "b.crt",
            "b.crt is also tls.cert",
        ),
    ],
)
def test_bad_files_fail_check_and_start_in_one_line_naming_the_key(
    tmp_path: Path, where: tuple[Any, ...], value: str, expected: str
) -> None:
    """``--check`` said ok for an access log in a missing directory (then the start
    was a traceback), a ticket cache that is a directory (then every save failed in
    traffic), a ticket cache that is another file (replaced at the first ticket) and a
    reset key in a missing directory (then the start exited 1); errors
    in the certificate files named the file but not the configuration or its key."""
    ca = DevCA()
    _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    (tmp_path / "notes.txt").write_text("not a ticket cache: never to be overwritten")
    (tmp_path / "short.key").write_bytes(b"short")  # --check said ok, the start exited 1
    os.link(tmp_path / "b.key", tmp_path / "hard.key")
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    node: Any = config
    for key in where[:-1]:
        node = node[key] if isinstance(key, int) else node.setdefault(key, {})
    node[where[-1]] = value
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.write_config()
    for extra in (["--check"], []):
        run = _run(sidecar, *extra)
        lines = [line for line in run.stderr.splitlines() if "event loop:" not in line]
        assert run.returncode == 2, run.stderr
        assert len(lines) == 1 and expected in lines[0], run.stderr
        assert Path(value).name in lines[0], run.stderr  # the file too


def _mesh_pair(
    tmp_path: Path, echo_port: int, transport: str, lifetime: str, a_lifetime: str = ""
) -> tuple[SidecarProcess, SidecarProcess, int]:
    DevCA().save(tmp_path / "ca")
    ports = {k: free_port() for k in ("b_admin", "b_mesh", "a_admin", "a_out")}
    tls = {"ca_dir": str(tmp_path / "ca"), "certificate_lifetime": lifetime}
    a_tls = {"ca_dir": str(tmp_path / "ca"), "certificate_lifetime": a_lifetime or lifetime}
    b = SidecarProcess(
        "b",
        {
            "node": {"name": "b", "identity": IDENTITY_B},
            "tls": tls,
            "admin": {"address": addr(ports["b_admin"])},
            "listeners": {
                "inbound": [
                    {
                        "name": "mesh",
                        "address": addr(ports["b_mesh"]),
                        "transports": [transport],
                        "destinations": [addr(echo_port)],
                    }
                ]
            },
        },
        tmp_path,
    )
    a = SidecarProcess(
        "a",
        {
            "node": {"name": "a", "identity": IDENTITY_A},
            "tls": a_tls,
            "admin": {"address": addr(ports["a_admin"])},
            "listeners": {
                "outbound": [{"name": "out", "address": addr(ports["a_out"]), "cluster": "echo"}]
            },
            "clusters": [
                {
                    "name": "echo",
                    "transport": transport,
                    "target": addr(echo_port),
                    "endpoints": [addr(ports["b_mesh"])],
                }
            ],
        },
        tmp_path,
    )
    return a, b, ports["a_out"]


@pytest.mark.parametrize(
    ("transport", "who_rotates"),
    [("quic", "both"), ("h2", "both"), ("tcp", "both"), ("quic", "server"), ("h2", "server")],
)
def test_short_lived_certificates_rotate_under_traffic_without_losing_a_flow(
    tmp_path: Path, echo_port: int, transport: str, who_rotates: str
) -> None:
    # "server": only B's certificate is short-lived; A must replace its pooled
    # connections before B's certificate (as presented on them) expires.
    a_lifetime = "3s" if who_rotates == "both" else "3600s"
    a, b, port = _mesh_pair(tmp_path, echo_port, transport, "3s", a_lifetime)
    a_rotations = 3 if who_rotates == "both" else 0
    b.start()
    a.start()
    try:
        b.wait_ready()
        a.wait_ready()
        results: list[bool] = []

        def rotations(sidecar: SidecarProcess) -> float:
            return metric(sidecar.metrics(), "quicmesh_certificate_rotations_total")

        async def long_flow() -> bool:
            # Opened before the first rotation, kept open across several, then finished.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            sent = bytearray()
            try:
                while rotations(a) < a_rotations or rotations(b) < 3:
                    chunk = os.urandom(2000)
                    writer.write(chunk)
                    sent += chunk
                    await writer.drain()
                    echoed = await asyncio.wait_for(reader.readexactly(len(chunk)), 10)
                    if echoed != chunk:
                        return False
                    await asyncio.sleep(0.05)
                writer.write_eof()
                return await asyncio.wait_for(reader.read(-1), 10) == b""
            finally:
                writer.close()

        async def steady_flows() -> None:
            while rotations(a) < a_rotations or rotations(b) < 3:
                payloads = [os.urandom(3000 + i) for i in range(4)]
                got = await asyncio.gather(*(echo_flow(port, p) for p in payloads))
                results.extend(g == p for g, p in zip(got, payloads, strict=True))

        async def main() -> bool:
            long = asyncio.ensure_future(long_flow())
            await asyncio.wait_for(steady_flows(), 60)
            return await long

        assert asyncio.run(main())
        assert results and all(results), f"{results.count(False)} of {len(results)} flows lost"
        samples = a.metrics()
        completed = metric(samples, "quicmesh_cluster_flows_total", outcome="completed")
        assert completed >= len(results)
        assert metric(samples, "quicmesh_handshake_failures_total") == 0
        assert metric(b.metrics(), "quicmesh_handshake_failures_total") == 0
        if transport != "tcp":
            # New connections were made with the new certificates.
            assert metric(samples, "quicmesh_cluster_connections_total", cluster="echo") >= 2
        lines = [r for r in a.access_log() if r.get("listener") == "out"]
        assert {r["outcome"] for r in lines} == {"completed"}
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0)


def _use_files(sidecar: SidecarProcess, directory: Path, identity: Any, bundle: bytes) -> None:
    _write_identity(directory, sidecar.name, identity)
    (directory / f"{sidecar.name}-bundle.pem").write_bytes(bundle)
    sidecar.config["tls"] = {
        "cert": str(directory / f"{sidecar.name}.crt"),
        "key": str(directory / f"{sidecar.name}.key"),
        "trust_bundle": str(directory / f"{sidecar.name}-bundle.pem"),
    }


@pytest.mark.parametrize(
    "transport",
    [
        # quic-<A's cluster engine>-<B's listener engine>: each engine's verdicts and
        # alerts are told apart, also facing the other engine.
        "quic-aioquic-aioquic",
        "quic-native-native",
        "quic-native-aioquic",
        "quic-aioquic-native",
        "h2",
    ],
)
@pytest.mark.parametrize("who_refuses", ["client", "server"])
def test_refused_certificates_are_counted_with_the_side_at_fault(
    tmp_path: Path, echo_port: int, who_refuses: str, transport: str
) -> None:
    transport, *engines = transport.split("-")
    for engine in engines:
        require_engine(engine)
    a, b, port = _mesh_pair(tmp_path, echo_port, transport, "3600s")
    if engines:
        a.config["clusters"][0]["engine"] = engines[0]
        b.config["listeners"]["inbound"][0]["engine"] = engines[1]
    ca_a, ca_b = DevCA(), DevCA()
    both = ca_a.trust_bundle.pem + ca_b.trust_bundle.pem
    if who_refuses == "client":
        # A trusts only its own CA: it refuses B's certificate (signed by another).
        _use_files(a, tmp_path, ca_a.issue(IDENTITY_A), ca_a.trust_bundle.pem)
        _use_files(b, tmp_path, ca_b.issue(IDENTITY_B), both)
    else:
        # A trusts B, but B trusts only its own CA: B refuses A's certificate.
        _use_files(a, tmp_path, ca_a.issue(IDENTITY_A), both)
        _use_files(b, tmp_path, ca_b.issue(IDENTITY_B), ca_b.trust_bundle.pem)
    b.start()
    a.start()
    try:
        b.wait_ready()
        a.wait_ready()
        assert asyncio.run(refused(port))
        wait_until(
            lambda: metric(a.metrics(), "quicmesh_handshake_failures_total", role="client") >= 1,
            what="A counts a failed handshake",
        )
        failures = a.stats()["handshake_failures"]["client"]
        if who_refuses == "client":
            assert set(failures) == {"peer_certificate_untrusted"}, failures
            assert "(the peer's certificate at fault)" in a.stderr()
            # B hears A's alert: its certificate refused (the native listener counted it
            # as the client's untrusted certificate, the aioquic one not at all).
            wait_until(
                lambda: b.stats()["handshake_failures"]["server"] != {},
                what="B counts the refusal of its certificate",
            )
            server = b.stats()["handshake_failures"]["server"]
            assert set(server) == {"our_certificate_refused"}, server
        else:
            assert set(failures) == {"our_certificate_refused"}, failures
            assert "(our certificate at fault)" in a.stderr()
            server = b.stats()["handshake_failures"]["server"]
            assert set(server) == {"peer_certificate_untrusted"}, server
            assert (
                metric(
                    b.metrics(),
                    "quicmesh_handshake_failures_total",
                    role="server",
                    reason="peer_certificate_untrusted",
                )
                >= 1
            )
    finally:
        codes = (a.stop(), b.stop())
    assert codes == (0, 0)


def test_a_certificate_without_a_spiffe_id_is_named_with_its_file_and_key(tmp_path: Path) -> None:
    """The one certificate error that named neither the configuration, nor its key, nor
    the file: a certificate carrying no ``spiffe://`` URI SAN."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = DevCA()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-spiffe")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(minutes=5))
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .sign(ca.private_key, hashes.SHA256())
    )
    (tmp_path / "b.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "b.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.write_config()
    run = _run(sidecar, "--check")
    assert run.returncode == 2, run.stderr
    [line] = [line for line in run.stderr.splitlines() if "event loop:" not in line]
    assert "b.yaml: tls.cert: " in line and "b.crt" in line and "no SPIFFE ID" in line, line


def _started_on_files(tmp_path: Path, ca: DevCA, bundle: bytes) -> SidecarProcess:
    """Sidecar B started on PEM files: a certificate from ``ca``, ``bundle``."""
    _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
    (tmp_path / "bundle.pem").write_bytes(bundle)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.start()
    return sidecar


@pytest.mark.parametrize("case", ["expired", "untrusted", "not_yet_valid"])
def test_a_working_certificate_is_not_swapped_for_one_that_cannot_be_used(
    tmp_path: Path, case: str
) -> None:
    """An agent writes a certificate that cannot be used (expired; from a CA the bundle
    does not hold, a CA rolled out in the wrong order) over a working one: the working
    one stays, one ERROR line says why, and the files are taken once they can be."""
    ca, other = DevCA(), DevCA()
    sidecar = _started_on_files(tmp_path, ca, ca.trust_bundle.pem)
    try:
        sidecar.wait_ready()
        serial = sidecar.stats()["certificate"]["serial"]
        if case == "expired":
            bad = ca.issue(
                IDENTITY_B,
                not_before=NOW - datetime.timedelta(days=2),
                not_after=NOW - datetime.timedelta(days=1),
            )
            expected = "expired at"
        elif case == "untrusted":
            bad = other.issue(IDENTITY_B)
            expected = "not trusted by our own trust bundle"
        else:  # issued a little ahead of now
            start = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=3)
            bad = ca.issue(IDENTITY_B, not_before=start)
            expected = "is not valid before"
        _write_identity(tmp_path, "b", bad)
        wait_until(
            lambda: "certificate files changed but not taken" in sidecar.stderr(),
            what="the refusal logged",
        )
        assert expected in sidecar.stderr()
        assert sidecar.request("GET", "/ready") == (200, b"ready\n")
        assert sidecar.stats()["certificate"]["serial"] == serial
        if case == "untrusted":
            # The bundle catches up: the certificate is taken with it.
            (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem + other.trust_bundle.pem)
        elif case == "expired":
            _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
        # (not_yet_valid: taken once valid, with no new write)
        wait_until(
            lambda: sidecar.stats()["certificate"]["serial"] != serial,
            what="the usable certificate taken",
        )
        assert sidecar.request("GET", "/ready") == (200, b"ready\n")
    finally:
        assert sidecar.stop() == 0


def test_a_ca_taken_out_of_the_trust_bundle_stops_being_trusted_at_once(tmp_path: Path) -> None:
    """A new bundle is never held back, even one that no longer holds our own CA (a
    CA removed after a compromise): it is in force at once, and the sidecar says its
    own certificate is now a problem (not ready)."""
    ca, other = DevCA(), DevCA()
    sidecar = _started_on_files(tmp_path, ca, ca.trust_bundle.pem + other.trust_bundle.pem)
    try:
        sidecar.wait_ready()
        (tmp_path / "bundle.pem").write_bytes(other.trust_bundle.pem)  # ours taken out
        status, body = wait_until(
            lambda: _past_ready(_try_request(sidecar, "/ready")), what="the bundle taken"
        )
        assert status == 503 and b"not trusted by our own trust bundle" in body
        assert "not taken" not in sidecar.stderr()
    finally:
        assert sidecar.stop() == 0


def _past_ready(answer: tuple[int, bytes] | None) -> tuple[int, bytes] | None:
    return None if answer is None or answer[0] == 200 else answer


def test_a_new_bundle_is_taken_while_a_certificate_issued_ahead_waits(tmp_path: Path) -> None:
    """A certificate issued ahead waits; a trust bundle written meanwhile (a CA added)
    is taken at once, without the waiting certificate."""
    ca, other = DevCA(), DevCA()
    sidecar = _started_on_files(tmp_path, ca, ca.trust_bundle.pem)
    try:
        sidecar.wait_ready()
        serial = sidecar.stats()["certificate"]["serial"]
        ahead = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=5)
        _write_identity(tmp_path, "b", ca.issue(IDENTITY_B, not_before=ahead))
        wait_until(lambda: "not taken" in sidecar.stderr(), what="the certificate waits")
        (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem + other.trust_bundle.pem)
        wait_until(
            lambda: metric(sidecar.metrics(), "quicmesh_certificate_rotations_total") >= 1,
            what="the bundle taken",
        )
        assert sidecar.stats()["certificate"]["serial"] == serial
        assert sidecar.request("GET", "/ready") == (200, b"ready\n")
    finally:
        assert sidecar.stop() == 0


# -- a new identity is taken by every transport or by none --------------------------------


def ed448_identity(ca: DevCA, spiffe_id: str) -> Any:
    """An identity Python loads but the native QUIC engine cannot (rustls has no Ed448
    keys), issued by ``ca`` as :meth:`DevCA.issue` issues: usable in every other respect."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed448
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from quicmesh.tls import Identity

    key = ed448.Ed448PrivateKey.generate()
    now = datetime.datetime.now(datetime.UTC)
    issuer_key_id = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "quicmesh")]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_key_id.value),
            critical=False,
        )
        .sign(ca.private_key, hashes.SHA256())
    )
    return Identity(certificate, key)


def test_certificate_files_the_quic_engine_cannot_load_are_refused_and_the_running_ones_kept(
    tmp_path: Path,
) -> None:
    """Files that load in Python but not in the native engine (an Ed448 key) were taken
    half way: the sidecar's identity was swapped before the QUIC listener refused it (the
    watcher task then died on the error, so no later file was ever read). They are logged
    and left, the running certificate stays in use, and the next good set is taken."""
    require_engine("native")
    ca = DevCA()
    _write_identity(tmp_path, "b", ca.issue(IDENTITY_B))
    (tmp_path / "bundle.pem").write_bytes(ca.trust_bundle.pem)
    config = _pem_config(tmp_path, "b", IDENTITY_B, admin=free_port(), mesh=free_port())
    config["listeners"]["inbound"][0]["engine"] = "native"
    sidecar = SidecarProcess("b", config, tmp_path)
    sidecar.start()
    try:
        sidecar.wait_ready()
        serial = sidecar.stats()["certificate"]["serial"]
        _write_identity(tmp_path, "b", ed448_identity(ca, IDENTITY_B))
        wait_until(
            lambda: "certificate files changed but cannot be used" in sidecar.stderr(),
            what="the refusal logged",
        )
        assert "the native QUIC engine cannot use the new certificate" in sidecar.stderr()
        certificate = sidecar.stats()["certificate"]
        assert (certificate["serial"], certificate["rotations"]) == (serial, 0)
        assert sidecar.request("GET", "/ready") == (200, b"ready\n")
        good = ca.issue(IDENTITY_B)
        _write_identity(tmp_path, "b", good)
        wait_until(
            lambda: (
                sidecar.stats()["certificate"]["serial"]
                == format(good.certificate.serial_number, "x")
            ),
            what="the next good set taken",
        )
        assert sidecar.stats()["certificate"]["rotations"] == 1
    finally:
        assert sidecar.stop() == 0


def test_a_transport_refusing_a_new_certificate_puts_back_those_that_took_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime switched the clusters' transports, then a listener refused: the
    clusters kept the new certificate (every handshake they made presented it), and the
    sidecar's own record said rotated. Now every transport is put back on the running
    certificate, the rotation is refused, and a handshake still gets the running one."""
    import ssl

    import yaml
    from cryptography import x509

    from quicmesh.errors import ConfigError, QuicmeshError
    from quicmesh.sidecar.runtime import Sidecar
    from quicmesh.tls.context import client_ssl_context
    from quicmesh.xds.bootstrap import load_any_config

    ca = DevCA()
    ca.save(tmp_path / "ca")
    mesh = free_port()
    path = tmp_path / "a.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "node": {"name": "a", "identity": IDENTITY_A},
                "tls": {"ca_dir": str(tmp_path / "ca")},
                "admin": {"address": addr(free_port())},
                "listeners": {
                    "outbound": [{"name": "out", "address": addr(free_port()), "cluster": "c"}],
                    "inbound": [
                        {
                            "name": "mesh",
                            "address": addr(mesh),
                            "transports": ["h2"],
                            "destinations": ["127.0.0.1:*"],
                        }
                    ],
                },
                "clusters": [
                    {
                        "name": "c",
                        "transport": "h2",
                        "target": "127.0.0.1:9",
                        "endpoints": [addr(mesh)],
                    }
                ],
            }
        )
    )

    async def presented() -> x509.Certificate:
        context = client_ssl_context(ca.issue(IDENTITY_B), ca.trust_bundle, ["h2"])
        _, writer = await asyncio.open_connection("127.0.0.1", mesh, ssl=context)
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            assert isinstance(ssl_object, ssl.SSLObject)
            der = ssl_object.getpeercert(binary_form=True)
            assert der is not None
            return x509.load_der_x509_certificate(der)
        finally:
            writer.close()

    async def main() -> None:
        sidecar = Sidecar(load_any_config(str(path)), str(path))
        await sidecar.start()
        try:
            running = sidecar.certs.identity
            listener = sidecar.inbound["mesh"]
            take = listener.set_identity

            def take_then_refuse(identity: Any, trust: Any) -> None:
                take(identity, trust)  # switched, then fails
                if identity is not running:
                    raise ConfigError("refused for the test")

            monkeypatch.setattr(listener, "set_identity", take_then_refuse)
            with pytest.raises(QuicmeshError, match="refused for the test"):
                sidecar.certs.replace(ca.issue(IDENTITY_A))
            assert sidecar.certs.identity is running and sidecar.certs.rotations == 0
            assert sidecar.identity is running
            assert sidecar.clusters["c"].transport.identity is running
            assert listener.identity is running
            assert (await presented()).serial_number == running.certificate.serial_number
        finally:
            await sidecar._close_everything()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_probe_that_cannot_open_its_socket_does_not_refuse_the_certificate() -> None:
    """The native engine's identity check binds a throwaway listener: out of descriptors,
    its failure refused a good certificate as one the engine "cannot use" (and watched
    files were not read again until they changed)."""
    require_engine("native")
    script = textwrap.dedent(
        """
        import resource, socket
        from quicmesh import DevCA
        from quicmesh import QuicTransport
        ca = DevCA()
        identity = ca.issue("spiffe://mesh.local/ns/default/sa/a")
        transport = QuicTransport(identity=identity, trust=ca.trust_bundle, engine="native")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        held = []
        try:
            while True:
                held.append(socket.socket())
        except OSError:
            pass
        print("problem:", transport.identity_problem(identity, ca.trust_bundle))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "problem: None" in result.stdout
    assert "could not check the new certificate on the native QUIC engine" in result.stderr
