"""An Envoy bootstrap file as a sidecar configuration.

``quicmesh sidecar -c envoy.yaml`` accepts either quicmesh's own YAML
(docs/config.md) or an Envoy bootstrap (a document with ``static_resources``
or ``dynamic_resources``). The bootstrap is parsed into Envoy's own
``envoy.config.bootstrap.v3.Bootstrap`` message, then mapped with
:mod:`quicmesh.xds.mapping`:

- ``node.id`` is the sidecar's name;
- ``admin.address`` the admin endpoint;
- ``static_resources.secrets``: a ``tls_certificate`` and a ``validation_context``
  whose data sources are ``filename`` s; the certificate's SPIFFE ID is
  ``node.identity``, and the files are watched (as with ``tls.cert``);
- ``static_resources.listeners`` / ``clusters``: the supported subset;
- ``dynamic_resources.ads_config`` naming (``envoy_grpc.cluster_name``) a static
  cluster with one endpoint: the ADS server. That cluster is the control plane's,
  not a mesh cluster.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from ..sidecar.config import (
    AdminConfig,
    NodeConfig,
    SidecarConfig,
    TlsConfig,
    XdsConfig,
    load_yaml,
    parse_config,
    read_config_text,
    wide_outbound_listener,
)

ENVOY_KEYS = {"static_resources", "dynamic_resources"}
"""Top-level keys that mark a document as an Envoy bootstrap."""


def is_envoy_bootstrap(document: object) -> bool:
    """Whether a parsed YAML document is an Envoy bootstrap rather than quicmesh YAML."""
    return isinstance(document, dict) and bool(ENVOY_KEYS & set(document))


def load_any_config(path: str | Path, *, xds_address: str | None = None) -> SidecarConfig:
    """quicmesh YAML or an Envoy bootstrap, whichever ``path`` holds (``xds_address``:
    the quicmesh file's ``xds.address``, set before it is validated; a bootstrap names
    its own control plane).

    :raises ConfigError: one line naming the file and the problem.
    """
    path = Path(path)
    text = read_config_text(path, "cannot read")
    # The text is read once (a FIFO gives it once) and parsed by the loader it is for.
    parse = functools.partial(parse_config, text, source=str(path), base_dir=path.parent)
    try:
        document = load_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return parse()  # says what is wrong in its usual words
    if not is_envoy_bootstrap(document):
        return parse(xds_address=xds_address)
    return parse_bootstrap(document, source=str(path), base_dir=path.parent)


def parse_bootstrap(document: Any, *, source: str, base_dir: Path | None = None) -> SidecarConfig:
    """Map an Envoy bootstrap document onto a :class:`SidecarConfig`.

    :raises ConfigError: ``<source>: <resource>: <problem>``.
    """
    from .mapping import MappingError
    from .resources import Bootstrap, ParseError, parse_message

    try:
        bootstrap = parse_message(document, Bootstrap, "bootstrap")
        return _map_bootstrap(bootstrap, source, base_dir or Path("."))
    except (ParseError, MappingError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def _map_bootstrap(bootstrap: Any, source: str, base_dir: Path) -> SidecarConfig:
    from .mapping import (
        MISSING,
        EnvoyResources,
        MappingError,
        _only,
        _socket_address,
        check_ports,
        map_resources,
        secrets_by_kind,
    )

    _only(bootstrap, {"node", "admin", "static_resources", "dynamic_resources"}, "bootstrap")
    _only(bootstrap.node, {"id", "cluster", "metadata"}, "bootstrap.node")
    if not bootstrap.node.id:
        raise MappingError("bootstrap.node.id is required: it is the sidecar's name")
    if not bootstrap.HasField("admin"):
        raise MappingError("bootstrap.admin.address is required")
    _only(bootstrap.admin, {"address"}, "bootstrap.admin")
    admin_address, _ = _socket_address(bootstrap.admin.address, "bootstrap.admin.address")
    static = bootstrap.static_resources
    _only(static, {"listeners", "clusters", "secrets"}, "bootstrap.static_resources")
    resources = EnvoyResources(
        listeners=_by_name(static.listeners, "bootstrap.static_resources.listeners"),
        clusters=_by_name(static.clusters, "bootstrap.static_resources.clusters"),
        secrets=_by_name(static.secrets, "bootstrap.static_resources.secrets"),
    )
    xds = _ads(bootstrap, resources)
    certificate, validation = secrets_by_kind(resources.secrets)
    if certificate is None or validation is None:
        raise MappingError(
            "bootstrap.static_resources.secrets: a tls_certificate and a validation_context "
            "are required (the sidecar's identity and trust bundle)"
        )
    cert = _filename(certificate.tls_certificate.certificate_chain, certificate.name, base_dir)
    key = _filename(certificate.tls_certificate.private_key, certificate.name, base_dir)
    bundle = _filename(validation.validation_context.trusted_ca, validation.name, base_dir)
    identity = _identity_of(cert, f"Secret {certificate.name!r}.tls_certificate.certificate_chain")
    _check_secret_files(certificate.name, cert, key, validation.name, bundle)
    mapped = map_resources(resources)
    if mapped.warming:
        # Static resources are fixed at load, beside what xDS gives: a static EDS
        # cluster or a static listener on a CDS cluster was dropped silently before
        # (its listener never bound); refused, naming it.
        name = mapped.warming[0]
        if name.endswith(MISSING):
            raise MappingError(
                f"tcp_proxy cluster {name.removesuffix(MISSING)!r}: no such cluster in "
                "bootstrap.static_resources.clusters: a static listener tunnels to a static "
                "cluster only (send the listener over LDS to use a cluster CDS gives)"
            )
        raise MappingError(
            f"Cluster {name!r}: a static cluster needs its endpoints inline "
            "(load_assignment), not EDS (send the cluster over CDS for EDS)"
        )
    check_ports(mapped, admin_address[1])
    if not mapped.outbound and not mapped.inbound and xds is None:
        raise MappingError("bootstrap.static_resources: at least one supported listener needed")
    from ..sidecar.config import is_name

    if not is_name(bootstrap.node.id):
        raise MappingError(f"bootstrap.node.id: {bootstrap.node.id!r} is not a quicmesh name")
    config = SidecarConfig(
        source=source,
        node=NodeConfig(name=bootstrap.node.id, identity=identity),
        tls=TlsConfig(cert=cert, key=key, trust_bundle=bundle),
        admin=AdminConfig(address=admin_address),
        outbound=mapped.outbound,
        inbound=mapped.inbound,
        clusters=mapped.clusters,
        warnings=tuple(
            f"{source}: Listener {listener.name!r}: {wide}"
            for listener in mapped.outbound
            if (wide := wide_outbound_listener(listener.address)) is not None
        ),
    )
    if xds is not None:
        metadata = tuple(
            (key, value.string_value)
            for key, value in bootstrap.node.metadata.fields.items()
            if value.WhichOneof("kind") == "string_value"
        )
        config = replace(
            config,
            xds=replace(xds, cluster=bootstrap.node.cluster or "quicmesh", metadata=metadata),
        )
    return config


def _by_name(resources: Any, where: str) -> dict[str, Any]:
    """Static resources by name; a name given twice is refused, as Envoy refuses it
    (and as a discovery response naming one twice is NACKed)."""
    from .mapping import MappingError

    named: dict[str, Any] = {}
    for index, resource in enumerate(resources):
        if resource.name in named:
            raise MappingError(f"{where}[{index}]: name {resource.name!r} appears twice")
        named[resource.name] = resource
    return named


def _ads(bootstrap: Any, resources: Any) -> XdsConfig | None:
    from .mapping import MappingError, _only, map_endpoints

    if not bootstrap.HasField("dynamic_resources"):
        return None
    dynamic = bootstrap.dynamic_resources
    where = "bootstrap.dynamic_resources"
    _only(dynamic, {"ads_config", "lds_config", "cds_config"}, where)
    for name in ("lds_config", "cds_config"):
        if not dynamic.HasField(name):
            continue
        source = getattr(dynamic, name)
        if not source.HasField("ads"):
            raise MappingError(f"{where}.{name}: only ads is supported (one ADS stream)")
        # Every other field is refused by name, as elsewhere.
        _only(source, {"ads", "resource_api_version", "initial_fetch_timeout"}, f"{where}.{name}")
        if source.resource_api_version not in (0, 2):  # AUTO, V3
            raise MappingError(f"{where}.{name}.resource_api_version: only V3 is supported")
    ads = dynamic.ads_config
    _only(ads, {"api_type", "transport_api_version", "grpc_services"}, f"{where}.ads_config")
    if len(ads.grpc_services) != 1 or not ads.grpc_services[0].HasField("envoy_grpc"):
        raise MappingError(f"{where}.ads_config: needs one grpc_services entry with envoy_grpc")
    cluster_name = ads.grpc_services[0].envoy_grpc.cluster_name
    cluster = resources.clusters.pop(cluster_name, None)
    if cluster is None:
        raise MappingError(
            f"{where}.ads_config: envoy_grpc.cluster_name {cluster_name!r} is not a static cluster"
        )
    endpoints = map_endpoints(cluster.load_assignment, f"Cluster {cluster_name!r}")
    if len(endpoints) != 1:
        raise MappingError(f"Cluster {cluster_name!r}: the ADS cluster needs exactly one endpoint")
    return XdsConfig(address=endpoints[0], initial_fetch_timeout=_fetch_timeout(dynamic, where))


def _fetch_timeout(dynamic: Any, where: str) -> float | None:
    """The first sync's wait, from ``lds_config`` and ``cds_config``'s
    ``initial_fetch_timeout`` (quicmesh has one for both): ``0s`` in either waits for ever
    (Envoy's meaning, as Istio's bootstraps give it), else the longer of those given, 15 s
    by default."""
    from .mapping import _duration, _seconds

    given: list[float] = []
    for name in ("lds_config", "cds_config"):
        source = getattr(dynamic, name)
        if not source.HasField("initial_fetch_timeout"):
            continue
        if _seconds(source.initial_fetch_timeout) == 0:
            return None
        given.append(_duration(source, "initial_fetch_timeout", 15.0, f"{where}.{name}"))
    return max(given, default=15.0)


def _filename(source: Any, secret: str, base_dir: Path) -> str:
    from .mapping import MappingError

    where = f"Secret {secret!r}"
    if source.WhichOneof("specifier") != "filename":
        raise MappingError(
            f"{where}: give certificates as filename data sources (they are watched for changes)"
        )
    return str(base_dir / str(source.filename))


def _check_secret_files(
    certificate: str, cert_path: str, key_path: str, validation: str, bundle_path: str
) -> None:
    """Load the key with its certificate, and the trust bundle, as the sidecar will
    (:func:`~quicmesh.sidecar.certs.load_identity`), so that what is wrong with them is
    named by the bootstrap's fields, not by quicmesh's YAML keys (``tls.key``).

    :raises MappingError: naming the Secret's field, the file and the problem.
    """
    from ..tls import Identity, TrustBundle
    from .mapping import MappingError

    where = f"Secret {certificate!r}.tls_certificate.certificate_chain, .private_key"
    try:
        Identity.from_files(cert_path, key_path)
    except ConfigError as exc:  # (the message names the file)
        raise MappingError(f"{where}: {exc}") from None
    try:
        TrustBundle.from_file(bundle_path)
    except ConfigError as exc:
        raise MappingError(f"Secret {validation!r}.validation_context.trusted_ca: {exc}") from None


def _identity_of(cert_path: str, where: str) -> str:
    """The SPIFFE ID of the certificate file the Secret ``where`` names.

    :raises MappingError: naming the Secret's field, the file and what is wrong with it.
    """
    from ..tls._pem import parse_certificates, read_file
    from ..tls.spiffe import spiffe_id_of
    from .mapping import MappingError

    try:
        certificate = parse_certificates(read_file(cert_path), cert_path)[0]
    except ConfigError as exc:  # (the message names the file)
        raise MappingError(f"{where}: {exc}") from None
    spiffe_id = spiffe_id_of(certificate)
    if spiffe_id is None:
        raise MappingError(f"{where}: {cert_path}: the certificate carries no SPIFFE ID (URI SAN)")
    return spiffe_id
