"""The one duration grammar (quicmesh.duration) and the two configs that use it."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.duration import DURATION_UNITS, parse_duration
from quicmesh.errors import ConfigError
from quicmesh.netem import parse_duration as netem_duration
from quicmesh.sidecar.config import parse_duration as sidecar_duration

# The grammars each config had before they shared one: both must still be accepted,
# with the same value.
SIDECAR_BEFORE = r"\A\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m)?\s*\Z"
NETEM_BEFORE = r"\A\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(s|ms|us|µs|)\s*\Z"


def _value_before(pattern: str, text: str) -> float:
    match = re.match(pattern, text.strip().lower() if pattern is NETEM_BEFORE else text)
    assert match is not None
    unit = match.group(2) or "s"
    return float(match.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "us": 1e-6, "µs": 1e-6}[unit]


@given(st.from_regex(SIDECAR_BEFORE))
def test_what_the_sidecar_accepted_parses_to_the_same_seconds(text: str) -> None:
    expected = _value_before(SIDECAR_BEFORE, text)
    assert parse_duration(text) == pytest.approx(expected)
    if expected <= 86400:
        assert sidecar_duration(text) == pytest.approx(expected)


@given(st.from_regex(NETEM_BEFORE))
def test_what_netem_accepted_parses_to_the_same_seconds(text: str) -> None:
    expected = _value_before(NETEM_BEFORE, text)
    if not math.isfinite(expected):
        with pytest.raises(ConfigError):
            netem_duration(text)
        return
    assert netem_duration(text) == pytest.approx(expected)


@given(
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
    st.sampled_from(sorted(DURATION_UNITS)),
    st.sampled_from(["", " "]),
)
def test_a_number_and_a_unit_round_trip(number: float, unit: str, space: str) -> None:
    text = f"{number!r}{space}{unit}"
    assert parse_duration(text) == pytest.approx(number * DURATION_UNITS[unit])
    if unit.isascii():
        assert parse_duration(text.upper()) == parse_duration(text)


@given(st.text(max_size=20))
def test_any_text_parses_or_fails_with_one_line(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        assert "\n" not in str(exc) and str(exc)
        with pytest.raises(ConfigError, match=r"^cannot read duration: "):
            netem_duration(text)
    else:
        assert math.isfinite(seconds) and seconds >= 0


@pytest.mark.parametrize("text", ["-3ms", "20 parsecs", "ms", "", "1..5s", "1h", "1e999s", "5 m s"])
def test_nonsense_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_the_configs_keep_their_own_ranges() -> None:
    with pytest.raises(ValueError, match="outside 0-86400 seconds"):
        sidecar_duration("1441m")
    with pytest.raises(ValueError, match="outside 0-86400 seconds"):
        sidecar_duration(10**400)  # too large for a float: OverflowError before
    assert netem_duration("1m") == 60.0  # netem's DirectionConfig bounds delays to 1 hour
