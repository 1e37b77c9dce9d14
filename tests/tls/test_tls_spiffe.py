"""Tests for SPIFFE ID validation and extraction (quicmesh.tls.spiffe)."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from quicmesh.tls import DevCA, spiffe_id_of, validate_spiffe_id

TRUST_DOMAINS = st.from_regex(r"[a-z0-9._-]{1,40}", fullmatch=True)
SEGMENTS = st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True).filter(
    lambda segment: segment not in (".", "..")
)
SPIFFE_IDS = st.builds(
    lambda domain, segments: "spiffe://" + "/".join([domain, *segments]),
    TRUST_DOMAINS,
    st.lists(SEGMENTS, max_size=6),
)
ALLOWED = set(string.ascii_letters + string.digits + "._-/")


@pytest.mark.parametrize(
    "value",
    [
        "spiffe://mesh.local",
        "spiffe://mesh.local/ns/default/sa/reviews",
        "spiffe://a_b-c.d/X.y-Z_9",
        "spiffe://example.org/..a/b..",
    ],
)
def test_valid_ids_are_returned_unchanged(value: str) -> None:
    assert validate_spiffe_id(value) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("", "empty"),
        ("http://mesh.local/a", "must start with 'spiffe://'"),
        ("SPIFFE://mesh.local/a", "must start with 'spiffe://'"),
        ("spiffe://", "trust domain is empty"),
        ("spiffe:///a", "trust domain is empty"),
        ("spiffe://Mesh.local/a", "lowercase letters"),
        ("spiffe://mesh.local:8443/a", "port"),
        ("spiffe://user@mesh.local/a", "userinfo"),
        ("spiffe://mesh.local/a?x=1", "query or fragment"),
        ("spiffe://mesh.local/a#frag", "query or fragment"),
        ("spiffe://mesh.local/", "empty segment"),
        ("spiffe://mesh.local/a//b", "empty segment"),
        ("spiffe://mesh.local/a/", "empty segment"),
        ("spiffe://mesh.local/a/./b", "'.' or '..'"),
        ("spiffe://mesh.local/a/..", "'.' or '..'"),
        ("spiffe://mesh.local/a%20b", "path segments may only contain"),
        ("spiffe://mesh.local/caf\u00e9", "path segments may only contain"),
        ("spiffe://mesh.local/" + "a" * 2048, "longer than 2048 bytes"),
    ],
)
def test_invalid_ids_are_rejected_with_a_reason(value: str, why: str) -> None:
    with pytest.raises(ValueError, match="invalid SPIFFE ID") as info:
        validate_spiffe_id(value)
    assert why in str(info.value)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 200  # the value is cut (a 3,000-character one was echoed)


def test_exactly_2048_bytes_is_allowed() -> None:
    prefix = "spiffe://mesh.local/"
    value = prefix + "a" * (2048 - len(prefix))
    assert validate_spiffe_id(value) == value


@given(SPIFFE_IDS)
def test_generated_valid_ids_are_accepted(value: str) -> None:
    assert validate_spiffe_id(value) == value


@given(st.text())
def test_arbitrary_text_only_ever_raises_value_error(value: str) -> None:
    try:
        result = validate_spiffe_id(value)
    except ValueError as exc:
        assert str(exc).startswith("invalid SPIFFE ID")
    else:
        assert result == value


@given(SPIFFE_IDS, st.characters().filter(lambda c: c not in ALLOWED), st.data())
def test_ids_mutated_with_a_bad_character_are_rejected(
    value: str, bad: str, data: st.DataObject
) -> None:
    position = data.draw(st.integers(min_value=len("spiffe://"), max_value=len(value)))
    with pytest.raises(ValueError, match="invalid SPIFFE ID"):
        validate_spiffe_id(value[:position] + bad + value[position:])


@given(SPIFFE_IDS, st.sampled_from(string.ascii_uppercase), st.data())
def test_uppercase_in_trust_domain_is_rejected(value: str, upper: str, data: st.DataObject) -> None:
    domain_end = value.find("/", len("spiffe://"))
    end = len(value) if domain_end == -1 else domain_end
    position = data.draw(st.integers(min_value=len("spiffe://"), max_value=end))
    with pytest.raises(ValueError, match="lowercase"):
        validate_spiffe_id(value[:position] + upper + value[position:])


@given(SPIFFE_IDS, st.sampled_from([".", ".."]))
def test_dot_segments_are_rejected(value: str, dots: str) -> None:
    assume(len(value) < 2000)
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        validate_spiffe_id(f"{value}/{dots}")


def test_spiffe_id_of_reads_the_uri_san() -> None:
    ca = DevCA()
    identity = ca.issue("spiffe://mesh.local/ns/default/sa/reviews")
    assert spiffe_id_of(identity.certificate) == "spiffe://mesh.local/ns/default/sa/reviews"
    assert spiffe_id_of(ca.certificate) == "spiffe://mesh.local"
