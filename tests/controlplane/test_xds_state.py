"""The ADS protocol state, sans-IO: what the client sends for each response."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from quicmesh.xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE, SECRET_TYPE
from quicmesh.xds.state import AdsState, ProtocolError, make_node
from quicmesh.xds.testing import documents as docs


def _state() -> AdsState:
    return AdsState(make_node("a", "mesh", (("zone", "z1"),), "spiffe://mesh.local/a"))


def _response(type_url: str, version: str, nonce: str, messages: list[Any]) -> Any:
    packed = []
    for message in messages:
        wrapper = any_pb2.Any()
        wrapper.Pack(message)
        packed.append(wrapper)
    return discovery_pb2.DiscoveryResponse(
        version_info=version, nonce=nonce, type_url=type_url, resources=packed
    )


def test_first_requests_carry_the_node_once_and_subscribe_cds_first() -> None:
    state = _state()
    requests = state.requests_for_new_stream()
    assert [r.type_url for r in requests] == [CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE]
    assert requests[0].node.id == "a" and requests[0].node.cluster == "mesh"
    assert requests[0].node.metadata.fields["zone"].string_value == "z1"
    assert requests[0].node.metadata.fields["quicmesh.identity"].string_value
    assert all(not r.HasField("node") for r in requests[1:])
    assert list(requests[2].resource_names) == ["default", "ROOTCA"]
    assert all(r.version_info == "" and r.response_nonce == "" for r in requests)


def test_ack_nack_versions_and_eds_subscription() -> None:
    state = _state()
    state.requests_for_new_stream()
    clusters = [docs.cluster(docs.cluster_doc(n, "quic")) for n in ("b", "a")]
    update = state.on_response(_response(CLUSTER_TYPE, "v1", "n1", clusters))
    ack, eds = state.accept(update)
    assert (ack.type_url, ack.version_info, ack.response_nonce) == (CLUSTER_TYPE, "v1", "n1")
    assert not ack.HasField("error_detail")
    assert eds.type_url == ENDPOINT_TYPE and list(eds.resource_names) == ["a", "b"]
    # A bad version is NACKed with the last good version and the new nonce.
    update = state.on_response(_response(CLUSTER_TYPE, "v2", "n2", clusters[:1]))
    assert update.removed == ("a",)
    (nack,) = state.reject(update, "Cluster 'b': no")
    assert (nack.version_info, nack.response_nonce) == ("v1", "n2")
    assert nack.error_detail.message == "Cluster 'b': no"
    assert set(state.resources.clusters) == {"a", "b"}
    # Removal when accepted: the EDS subscription shrinks.
    update = state.on_response(_response(CLUSTER_TYPE, "v3", "n3", clusters[:1]))
    ack, eds = state.accept(update)
    assert list(eds.resource_names) == ["b"] and set(state.resources.clusters) == {"b"}


def test_named_subscriptions_keep_resources_a_response_leaves_out() -> None:
    state = _state()
    state.requests_for_new_stream()
    clusters = [docs.cluster(docs.cluster_doc(n, "h2")) for n in ("a", "b")]
    state.accept(state.on_response(_response(CLUSTER_TYPE, "1", "n1", clusters)))
    a = docs.assignment(docs.cla_doc("a", [("127.0.0.1", 1, "HEALTHY", None)]))
    b = docs.assignment(docs.cla_doc("b", [("127.0.0.1", 2, "HEALTHY", None)]))
    state.accept(state.on_response(_response(ENDPOINT_TYPE, "1", "n2", [a, b])))
    state.accept(state.on_response(_response(ENDPOINT_TYPE, "2", "n3", [a])))
    assert set(state.resources.assignments) == {"a", "b"}


def test_reconnect_resends_accepted_versions_without_nonces() -> None:
    state = _state()
    state.requests_for_new_stream()
    state.accept(state.on_response(_response(LISTENER_TYPE, "L7", "n1", [])))
    requests = state.requests_for_new_stream()
    by_type = {r.type_url: r for r in requests}
    assert by_type[LISTENER_TYPE].version_info == "L7"
    assert all(r.response_nonce == "" for r in requests)
    assert requests[0].HasField("node")


@pytest.mark.parametrize(
    "response",
    [
        _response("type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "1", "n", []),
        _response(CLUSTER_TYPE, "1", "n", [docs.assignment(docs.cla_doc("x", []))]),
        _response(
            CLUSTER_TYPE,
            "1",
            "n",
            [docs.cluster(docs.cluster_doc("x", "h2")), docs.cluster(docs.cluster_doc("x", "h2"))],
        ),
    ],
)
def test_malformed_responses_are_protocol_errors(response: Any) -> None:
    state = _state()
    state.requests_for_new_stream()
    with pytest.raises(ProtocolError):
        state.on_response(response)


@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sets(st.sampled_from("abcdef")), st.booleans()), min_size=1, max_size=12
    )
)
def test_accepted_state_follows_only_accepted_responses(steps: list[tuple[set[str], bool]]) -> None:
    state = _state()
    state.requests_for_new_stream()
    accepted: set[str] = set()
    version = ""
    for index, (names, ok) in enumerate(steps):
        clusters = [docs.cluster(docs.cluster_doc(n, "quic")) for n in sorted(names)]
        update = state.on_response(_response(CLUSTER_TYPE, f"v{index}", f"n{index}", clusters))
        if ok:
            requests = state.accept(update)
            accepted, version = names, f"v{index}"
        else:
            requests = state.reject(update, "no")
        assert requests[0].version_info == version
        assert requests[0].response_nonce == f"n{index}"
        assert set(state.resources.clusters) == accepted
        assert state.names(ENDPOINT_TYPE) == tuple(sorted(accepted)) or not any(
            s[1] for s in steps[: index + 1]
        )


def test_a_resource_whose_bytes_do_not_decode_is_nacked_not_raised() -> None:
    """A packed resource of the right type whose bytes are not that message: a NACK
    naming it (it escaped as protobuf's DecodeError and tore the stream down)."""
    state = _state()
    state.requests_for_new_stream()
    broken = any_pb2.Any(type_url=CLUSTER_TYPE, value=b"\xff\xff\xff\xff")
    response = discovery_pb2.DiscoveryResponse(
        version_info="v1", nonce="n1", type_url=CLUSTER_TYPE, resources=[broken]
    )
    with pytest.raises(ProtocolError, match=r"resources\[0\] does not decode"):
        state.on_response(response)
    (nack,) = state.reject_response(response, "resources[0] does not decode")
    assert (nack.version_info, nack.response_nonce) == ("", "n1")


def test_eds_is_asked_for_only_while_a_cluster_needs_endpoints() -> None:
    """An empty EDS subscription would be a wildcard (every assignment the server has):
    no EDS request until a cluster uses EDS, an explicit empty list once none does, and
    no EDS on a new stream then; an EDS response meanwhile is not subscribed to."""
    state = _state()
    state.requests_for_new_stream()
    static = [docs.static_cluster_doc("s", "quic", [("127.0.0.1", 1)])]
    (ack,) = _accept(state, "1", static)
    assert ack.type_url == CLUSTER_TYPE and not state.subscribed(ENDPOINT_TYPE)
    assert ENDPOINT_TYPE not in [r.type_url for r in state.requests_for_new_stream()]
    eds = [docs.cluster_doc("a", "quic")]
    _, subscribe = _accept(state, "2", eds)
    assert list(subscribe.resource_names) == ["a"] and state.subscribed(ENDPOINT_TYPE)
    assert ENDPOINT_TYPE in [r.type_url for r in state.requests_for_new_stream()]
    _, unsubscribe = _accept(state, "3", static)
    assert unsubscribe.type_url == ENDPOINT_TYPE and list(unsubscribe.resource_names) == []
    assert not state.subscribed(ENDPOINT_TYPE)
    assert ENDPOINT_TYPE not in [r.type_url for r in state.requests_for_new_stream()]


def _accept(state: AdsState, version: str, documents: list[dict[str, Any]]) -> list[Any]:
    """Accept a CDS response of these clusters; the requests that answer it."""
    clusters = [docs.cluster(document) for document in documents]
    return state.accept(state.on_response(_response(CLUSTER_TYPE, version, version, clusters)))
