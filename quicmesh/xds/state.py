"""The ADS protocol state of one sidecar, sans-IO: subscriptions, versions, nonces.

:class:`AdsState` follows the xDS protocol document's state-of-the-world
variant on one aggregated stream:

- it subscribes to CDS and LDS with a wildcard, to SDS with the secret names
  (:data:`SECRET_NAMES`), and to EDS with the names of the EDS clusters it
  accepted (so clusters warm: they are used once their endpoints arrived);
- every response is an :class:`Update`; the caller validates and applies it,
  then calls :meth:`AdsState.accept` (an ACK: ``version_info`` the new version,
  ``response_nonce`` the response's nonce) or :meth:`AdsState.reject` (a NACK:
  ``version_info`` the last accepted version, and ``error_detail``);
- an LDS/CDS response holds every resource: one missing is removed. EDS and
  SDS responses hold the named resources; an EDS resource goes when its
  cluster does (the subscription shrinks);
- on a new stream (after a reconnect) :meth:`AdsState.requests_for_new_stream`
  repeats the subscriptions with the last accepted versions; the resources
  accepted so far stay in force until the control plane says otherwise.

Nothing here does I/O: messages in, messages out.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import struct_pb2
from google.protobuf.message import DecodeError
from google.rpc import status_pb2

from ..sidecar.config import XDS_IDENTITY_KEY
from .mapping import EnvoyResources
from .resources import (
    CLUSTER_TYPE,
    ENDPOINT_TYPE,
    LISTENER_TYPE,
    RESOURCE_TYPES,
    SECRET_TYPE,
    resource_name,
)

logger = logging.getLogger("quicmesh.xds")

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse

SECRET_NAMES = ("default", "ROOTCA")
"""SDS names subscribed to: the identity and the trust bundle (Istio's names)."""

SUBSCRIPTION_ORDER = (CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE)
"""The order the first requests go in (CDS before LDS, as the protocol advises)."""

_ATTRIBUTE = {
    LISTENER_TYPE: "listeners",
    CLUSTER_TYPE: "clusters",
    ENDPOINT_TYPE: "assignments",
    SECRET_TYPE: "secrets",
}


class ProtocolError(ValueError):
    """A response that cannot be taken at all (unknown type, bad resource); NACKed."""


@dataclass
class Update:
    """A response turned into the resources the sidecar would hold if it accepted it."""

    type_url: str
    version: str
    nonce: str
    resources: EnvoyResources
    """Every resource type, with this response's type replaced."""
    removed: tuple[str, ...] = ()
    """Names of resources of this type that the response removed."""


@dataclass
class _TypeState:
    version: str = ""
    nonce: str = ""
    names: tuple[str, ...] = ()
    wildcard: bool = False
    subscribed: bool = False


@dataclass
class AdsState:
    """Subscriptions and accepted resources of one ADS client.

    :param node: the Node sent in the first request of each stream.
    """

    node: Any
    resources: EnvoyResources = field(default_factory=EnvoyResources)
    _types: dict[str, _TypeState] = field(default_factory=dict)
    _node_sent: bool = False

    def __post_init__(self) -> None:
        self._types = {
            CLUSTER_TYPE: _TypeState(wildcard=True, subscribed=True),
            LISTENER_TYPE: _TypeState(wildcard=True, subscribed=True),
            ENDPOINT_TYPE: _TypeState(),
            SECRET_TYPE: _TypeState(names=SECRET_NAMES, subscribed=True),
        }

    # -- views ------------------------------------------------------------------

    def subscribed(self, type_url: str) -> bool:
        """Whether the stream subscribes to resources of this type (EDS: once a cluster
        needs endpoints)."""
        state = self._types.get(type_url)
        return state is not None and state.subscribed

    def version(self, type_url: str) -> str:
        """The last accepted version of a type ("" before the first)."""
        return self._types[type_url].version

    def names(self, type_url: str) -> tuple[str, ...]:
        """The resource names subscribed to (empty for a wildcard subscription)."""
        return self._types[type_url].names

    # -- requests ---------------------------------------------------------------

    def requests_for_new_stream(self) -> list[Any]:
        """The subscriptions to send on a new stream, with the versions accepted so far."""
        self._node_sent = False
        for state in self._types.values():
            state.nonce = ""
        return [self._request(t) for t in SUBSCRIPTION_ORDER if self._types[t].subscribed]

    def _request(self, type_url: str, error: str | None = None) -> Any:
        state = self._types[type_url]
        request = DiscoveryRequest(
            type_url=type_url,
            version_info=state.version,
            response_nonce=state.nonce,
            resource_names=list(state.names),
        )
        if not self._node_sent:
            request.node.CopyFrom(self.node)
            self._node_sent = True
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        return request

    # -- responses --------------------------------------------------------------

    def on_response(self, response: Any) -> Update:
        """Turn a response into an :class:`Update` for the caller to validate.

        :raises ProtocolError: the type is not subscribed, or a resource does not
            unpack; answer with :meth:`reject_response`.
        """
        type_url = response.type_url
        if type_url not in self._types:
            raise ProtocolError(f"response of type {type_url!r}, which was not subscribed to")
        state = self._types[type_url]
        state.nonce = response.nonce
        message_type = RESOURCE_TYPES[type_url]
        received: dict[str, Any] = {}
        for index, packed in enumerate(response.resources):
            message = message_type()
            try:
                unpacked = packed.type_url == type_url and packed.Unpack(message)
            except DecodeError as exc:
                raise ProtocolError(f"resources[{index}] does not decode: {exc}") from None
            if not unpacked:
                raise ProtocolError(
                    f"resources[{index}] is {packed.type_url!r}, expected {type_url!r}"
                )
            name = resource_name(message)
            if not name:
                raise ProtocolError(f"resources[{index}] has no name")
            if name in received:
                raise ProtocolError(f"resources[{index}]: {name!r} appears twice")
            received[name] = message
        candidate = copy.copy(self.resources)
        current: dict[str, Any] = getattr(self.resources, _ATTRIBUTE[type_url])
        if state.wildcard:
            new = received
        else:
            # Named subscriptions: a response updates the resources it carries.
            new = {k: v for k, v in current.items() if k in state.names}
            new.update({k: v for k, v in received.items() if k in state.names})
        setattr(candidate, _ATTRIBUTE[type_url], new)
        if type_url == CLUSTER_TYPE:
            # Endpoints of clusters that are gone go with them.
            services = _eds_services(new)
            candidate.assignments = {
                k: v for k, v in candidate.assignments.items() if k in services
            }
        removed = tuple(sorted(set(current) - set(new)))
        return Update(type_url, response.version_info, response.nonce, candidate, removed)

    def accept(self, update: Update) -> list[Any]:
        """The update was applied: keep it, ACK it, and adjust the EDS subscription."""
        self.resources = update.resources
        state = self._types[update.type_url]
        state.version = update.version
        requests = [self._request(update.type_url)]
        if update.type_url == CLUSTER_TYPE:
            names = tuple(sorted(_eds_services(self.resources.clusters)))
            eds = self._types[ENDPOINT_TYPE]
            if names != eds.names and (names or eds.subscribed):
                # No names and none before: no request (an empty list would be a
                # wildcard subscription to every assignment). Names going to none: the
                # empty list unsubscribes (after named ones it is no wildcard).
                eds.names = names
                eds.subscribed = bool(names)
                requests.append(self._request(ENDPOINT_TYPE))
        return requests

    def reject(self, update: Update, error: str) -> list[Any]:
        """The update cannot be applied: NACK it, keeping the last accepted version."""
        return [self._request(update.type_url, error)]

    def reject_response(self, response: Any, error: str) -> list[Any]:
        """A response of a subscribed type that did not even make an :class:`Update`:
        NACK it."""
        self._types[response.type_url].nonce = response.nonce
        return [self._request(response.type_url, error)]


def _eds_services(clusters: dict[str, Any]) -> set[str]:
    return {
        cluster.eds_cluster_config.service_name or cluster.name
        for cluster in clusters.values()
        if cluster.type == 3  # EDS
    }


IDENTITY_KEY = XDS_IDENTITY_KEY
"""The ``node.metadata`` key that reports the sidecar's ``node.identity``."""


def make_node(
    node_id: str, cluster: str, metadata: tuple[tuple[str, str], ...], identity: str
) -> Any:
    """The ``envoy.config.core.v3.Node`` a sidecar reports: :data:`IDENTITY_KEY` is always
    ``identity``, whatever ``metadata`` says (a control plane may trust it to pick the
    node's secrets: a configured value must not make the node report another identity)."""
    fields = {key: struct_pb2.Value(string_value=value) for key, value in metadata}
    given = fields.get(IDENTITY_KEY)
    if given is not None and given.string_value != identity:
        logger.warning(
            "node.metadata %s %r ignored: the sidecar reports its node.identity %r",
            IDENTITY_KEY,
            given.string_value,
            identity,
        )
    fields[IDENTITY_KEY] = struct_pb2.Value(string_value=identity)
    return base_pb2.Node(
        id=node_id,
        cluster=cluster,
        metadata=struct_pb2.Struct(fields=fields),
        user_agent_name="quicmesh",
    )
