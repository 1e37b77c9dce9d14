"""The ADS client against a control plane that goes silent, sends a response over
gRPC's default 4 MiB, unknown enum values, swapped SDS names or a reserved metadata
key; the test ADS server on IPv6.

The sidecar and its :class:`~quicmesh.xds.client.AdsClient` run in this process (so the
client's keepalive times can be a second), against the test ADS server on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from quicmesh.errors import ConfigError
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.launch import LOOPBACK, free_port
from quicmesh.sidecar.runtime import Sidecar
from quicmesh.tls import DevCA
from quicmesh.xds.client import AdsClient
from quicmesh.xds.mapping import MappingError, map_endpoints, map_listener, secrets_by_kind
from quicmesh.xds.resources import CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE
from quicmesh.xds.state import SECRET_NAMES, make_node
from quicmesh.xds.testing import AdsServer, ReceivedRequest
from quicmesh.xds.testing import documents as docs

from .conftest import IDENTITY_A

Predicate = Callable[[list[ReceivedRequest]], bool]


@contextlib.asynccontextmanager
async def driven(
    address: str, ca_dir: Path, **client_options: Any
) -> AsyncIterator[tuple[Sidecar, AdsClient]]:
    """A started sidecar ``a`` with no listeners, driven by the ADS server at ``address``."""
    text = (
        f"node: {{name: a, identity: '{IDENTITY_A}'}}\n"
        f"tls: {{ca_dir: '{ca_dir}'}}\n"
        f"admin: {{address: '{LOOPBACK}:{free_port()}'}}\n"
        "drain: {grace_period: 1s}\n"
        f"xds: {{address: '{address}', initial_fetch_timeout: 0s}}\n"
    )
    config = parse_config(text, source="a.yaml")
    assert config.xds is not None
    sidecar = Sidecar(config, None)
    await sidecar.start()
    client = AdsClient(sidecar, config.xds, **client_options)
    sidecar.attach_xds(client)
    try:
        yield sidecar, client
    finally:
        sidecar.begin_drain()
        await sidecar.wait_drained()


async def answered(ads: AdsServer, type_url: str, version: str, after: int) -> ReceivedRequest:
    """The client's answer (ACK or NACK) to ``version`` of ``type_url``, among the requests
    of that type after the first ``after``; waited for in a thread (the client runs in
    this loop)."""

    def of(requests: list[ReceivedRequest]) -> list[ReceivedRequest]:
        return [
            r
            for r in [r for r in requests if r.type_url == type_url][after:]
            if r.is_nack or r.version_info == version
        ]

    requests = await asyncio.to_thread(ads.wait_for, lambda requests: bool(of(requests)), 20.0)
    return of(requests)[0]


def empty_lds_cds(ads: AdsServer, version: str) -> None:
    ads.set_resources(CLUSTER_TYPE, [], version, node="a")
    ads.set_resources(LISTENER_TYPE, [], version, node="a")


# -- 1: a control plane gone silent ---------------------------------------------------


class FreezingProxy:
    """A TCP proxy on loopback to ``port`` whose connections can go silent: after
    :meth:`freeze` the ones open then forward nothing and close nothing (no FIN, no
    RST), as a partitioned or hung host; new connections are forwarded."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.generation = 0
        self.frozen_below = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accepted, LOOPBACK, 0)

    def freeze(self) -> None:
        self.frozen_below = self.generation + 1

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.generation += 1
        generation = self.generation
        up_reader, up_writer = await asyncio.open_connection(LOOPBACK, self.port)
        self.writers += [writer, up_writer]
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pump(generation, source, sink))
            self.tasks.add(task)

    async def _pump(
        self, generation: int, source: asyncio.StreamReader, sink: asyncio.StreamWriter
    ) -> None:
        while data := await source.read(65536):
            if generation < self.frozen_below:
                await asyncio.Event().wait()  # silent for ever: nothing forwarded or closed
            sink.write(data)
            await sink.drain()
        sink.close()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()


def test_a_control_plane_gone_silent_is_noticed_and_the_client_reconnects(
    ads: AdsServer, ca_dir: Path
) -> None:
    """A control plane that stops answering without closing the connection (no FIN, no
    RST) is noticed by the HTTP/2 keepalive pings, and the client reconnects and takes
    the update it missed (before, it stayed ``connected`` on the dead stream for ever)."""

    async def main() -> None:
        empty_lds_cds(ads, "1")
        proxy = FreezingProxy(ads.port)
        await proxy.start()
        try:
            async with driven(proxy.address, ca_dir, keepalive_time=1.0, keepalive_timeout=1.0) as (
                _,
                client,
            ):
                await asyncio.wait_for(client.synced.wait(), 20)
                assert client.counters["streams"] == 1
                proxy.freeze()
                seen = len(ads.requests_of(CLUSTER_TYPE))
                empty_lds_cds(ads, "2")  # pushed on the silent stream: lost
                ack = await answered(ads, CLUSTER_TYPE, "2", seen)
                assert not ack.is_nack, ack.error_detail
                assert client.state.version(CLUSTER_TYPE) == "2"
                assert client.counters["stream_failures"] >= 1
                assert client.connected
                assert "ping timeout" in client.last_error, client.last_error
        finally:
            await proxy.close()

    asyncio.run(asyncio.wait_for(main(), 90))


def test_keepalive_times_must_be_more_than_zero(ca_dir: Path) -> None:
    async def main() -> None:
        async with driven(f"{LOOPBACK}:{free_port()}", ca_dir) as (sidecar, client):
            assert client.config is not None
            with pytest.raises(ConfigError, match=r"^keepalive_time must be positive"):
                AdsClient(sidecar, client.config, keepalive_time=0)
            with pytest.raises(ConfigError, match=r"^keepalive_timeout must be positive"):
                AdsClient(sidecar, client.config, keepalive_timeout=float("nan"))

    asyncio.run(asyncio.wait_for(main(), 60))


# -- 7: a response over gRPC's default 4 MiB -----------------------------------------


def test_a_response_over_4_mib_is_applied(ads: AdsServer, ca_dir: Path) -> None:
    """A CDS response of 5 MiB is received and ACKed (gRPC's default receive limit, 4 MiB,
    failed the stream with RESOURCE_EXHAUSTED and the sidecar reconnected for ever)."""
    cluster = docs.cluster(docs.static_cluster_doc("big", "quic", [(LOOPBACK, 9)]))
    # A field this API version does not know (not read, kept by protobuf): the bulk.
    padding = 5 * 1024 * 1024
    tag, size = bytes([0xBA, 0xB8, 0x04]), padding  # field 9999, length-delimited
    varint = bytearray()
    while True:
        byte, size = size & 0x7F, size >> 7
        varint.append(byte | (0x80 if size else 0))
        if not size:
            break
    cluster.MergeFromString(tag + bytes(varint) + b"x" * padding)
    assert cluster.ByteSize() > padding

    async def main() -> None:
        empty_lds_cds(ads, "1")
        async with driven(ads.address, ca_dir) as (sidecar, client):
            await asyncio.wait_for(client.synced.wait(), 20)
            seen = len(ads.requests_of(CLUSTER_TYPE))
            ads.set_resources(CLUSTER_TYPE, [cluster], "big", node="a")
            ack = await answered(ads, CLUSTER_TYPE, "big", seen)
            assert not ack.is_nack, ack.error_detail
            assert [c.name for c in sidecar.config.clusters] == ["big"]
            assert client.counters["stream_failures"] == 0, client.last_error

    asyncio.run(asyncio.wait_for(main(), 90))


# -- 2: unknown enum values ----------------------------------------------------------


def test_an_unknown_endpoint_health_status_is_refused_by_number() -> None:
    """Neither taken as healthy (it took flows before) nor left out."""
    assignment = docs.assignment(docs.cla_doc("c", [(LOOPBACK, 9, "HEALTHY", None)]))
    assignment.endpoints[0].lb_endpoints[0].health_status = 42
    with pytest.raises(MappingError) as info:
        map_endpoints(assignment, "Cluster 'c'")
    assert str(info.value) == (
        "Cluster 'c': ClusterLoadAssignment.endpoints[0].lb_endpoints[0]: "
        "health_status 42 (unknown) is not supported"
    )


@pytest.mark.parametrize("status", ["UNKNOWN", "HEALTHY", "UNHEALTHY", "DRAINING", "DEGRADED"])
def test_known_health_statuses_still_map(status: str) -> None:
    assignment = docs.assignment(docs.cla_doc("c", [(LOOPBACK, 9, status, None)]))
    taking = map_endpoints(assignment, "Cluster 'c'")
    assert taking == (() if status in ("UNHEALTHY", "DRAINING") else ((LOOPBACK, 9),))


def test_an_unknown_socket_address_protocol_is_refused_by_number() -> None:
    """Not taken as TCP (it was before)."""
    doc = docs.outbound_listener_doc("out", free_port(), "echo", f"{LOOPBACK}:9080")
    doc["address"]["socket_address"]["protocol"] = 99
    with pytest.raises(MappingError) as info:
        map_listener(docs.listener(doc))
    assert str(info.value) == (
        "Listener 'out': address.socket_address: protocol 99 (unknown) is not supported"
    )


def test_an_unknown_enum_value_over_ads_is_nacked_naming_it(ads: AdsServer, ca_dir: Path) -> None:
    async def main() -> None:
        empty_lds_cds(ads, "1")
        async with driven(ads.address, ca_dir) as (sidecar, client):
            doc = docs.outbound_listener_doc("out", free_port(), "echo", f"{LOOPBACK}:9080")
            doc["address"]["socket_address"]["protocol"] = 99
            await asyncio.wait_for(client.synced.wait(), 20)
            seen = len(ads.requests_of(LISTENER_TYPE))
            ads.set_resources(LISTENER_TYPE, [docs.listener(doc)], "l99", node="a")
            nack = await answered(ads, LISTENER_TYPE, "l99", seen)
            assert "protocol 99 (unknown) is not supported" in nack.error_detail
            assert sidecar.config.outbound == ()

    asyncio.run(asyncio.wait_for(main(), 60))


# -- 3: SDS names and kinds ----------------------------------------------------------


def _secrets(ca: DevCA) -> tuple[Any, Any]:
    identity = ca.issue(IDENTITY_A)
    certificate, validation = docs.secret_docs(
        identity.cert_chain_pem(), identity.private_key_pem(), ca.trust_bundle.pem
    )
    return certificate, validation


def test_sds_secrets_under_each_others_names_are_refused_naming_them() -> None:
    certificate, validation = _secrets(DevCA())
    certificate["name"], validation["name"] = "ROOTCA", "default"
    swapped = {d["name"]: docs.secret(d) for d in (certificate, validation)}
    with pytest.raises(MappingError) as info:
        secrets_by_kind(swapped, SECRET_NAMES)
    assert "'ROOTCA': has a tls_certificate" in str(info.value)
    assert "identity's Secret 'default'" in str(info.value)
    # A bootstrap's static secrets are named freely (by their transport sockets).
    found, trusted = secrets_by_kind(swapped)
    assert (found and found.name, trusted and trusted.name) == ("ROOTCA", "default")


def test_a_validation_context_in_default_is_refused() -> None:
    _, validation = _secrets(DevCA())
    validation["name"] = "default"
    with pytest.raises(MappingError, match=r"'default': has a validation_context.*'ROOTCA'"):
        secrets_by_kind({"default": docs.secret(validation)}, SECRET_NAMES)


def test_swapped_sds_names_are_nacked_and_the_certificate_kept(
    ads: AdsServer, ca_dir: Path
) -> None:
    """``ROOTCA`` carrying the identity and ``default`` the trust bundle were ACKed and
    applied; now NACKed naming the Secret, and the running certificate stays."""
    certificate, validation = _secrets(DevCA.load(ca_dir))
    certificate["name"], validation["name"] = "ROOTCA", "default"

    async def main() -> None:
        empty_lds_cds(ads, "1")
        async with driven(ads.address, ca_dir) as (sidecar, client):
            await asyncio.wait_for(client.synced.wait(), 20)
            running = sidecar.certs.identity.cert_chain_pem()
            secrets = [docs.secret(certificate), docs.secret(validation)]
            seen = len(ads.requests_of(SECRET_TYPE))
            ads.set_resources(SECRET_TYPE, secrets, "s1", node="a")
            nack = await answered(ads, SECRET_TYPE, "s1", seen)
            assert nack.is_nack
            assert any(
                f"Secret {name!r}: has a {kind}, which only" in nack.error_detail
                for name, kind in (("ROOTCA", "tls_certificate"), ("default", "validation_context"))
            ), nack.error_detail
            assert sidecar.certs.identity.cert_chain_pem() == running

    asyncio.run(asyncio.wait_for(main(), 60))


# -- 4: the reserved metadata key ----------------------------------------------------


def test_the_reported_identity_is_always_the_sidecars_own() -> None:
    admin = "spiffe://mesh.local/ns/kube-system/sa/admin"
    node = make_node("a", "mesh", (("quicmesh.identity", admin), ("zone", "z1")), IDENTITY_A)
    assert node.metadata.fields["quicmesh.identity"].string_value == IDENTITY_A
    assert node.metadata.fields["zone"].string_value == "z1"


# -- 6: the test ADS server on IPv6 --------------------------------------------------


def test_the_test_ads_server_listens_on_an_ipv6_literal(ca_dir: Path) -> None:
    server = AdsServer(host="::1")
    server.start()
    try:
        assert server.address == f"[::1]:{server.port}"

        async def main() -> None:
            empty_lds_cds(server, "1")
            async with driven(server.address, ca_dir) as (_, client):
                await asyncio.wait_for(client.synced.wait(), 20)
                assert client.state.version(LISTENER_TYPE) == "1"

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        server.stop(0)


def test_the_reserved_identity_key_is_refused_in_xds_metadata(tmp_path: Path) -> None:
    """``xds.metadata: {quicmesh.identity: ...}`` passed ``--check`` (and was reported in
    place of ``node.identity`` before ``make_node`` overrode it): a one-line error now."""
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "node: {name: a, identity: spiffe://mesh.local/ns/default/sa/productpage}\n"
        f"tls: {{ca_dir: {tmp_path / 'ca'}}}\n"
        "xds:\n"
        "  address: 127.0.0.1:15010\n"
        "  metadata: {quicmesh.identity: spiffe://mesh.local/ns/default/sa/admin}\n"
    )
    DevCA().save(tmp_path / "ca")
    result = subprocess.run(
        [sys.executable, "-m", "quicmesh", "sidecar", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "xds.metadata['quicmesh.identity']: is reserved" in line, line
