"""The benchmarks' loss lists (``bench hol --loss``, ``bench congestion --losses``): one
parser, the link emulator's (a bare number is a percentage, as ``netem --loss`` reads it)."""

from __future__ import annotations

import argparse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.bench import loss_percentages

percent = st.floats(min_value=0, max_value=99.99, allow_nan=False).map(lambda v: round(v, 2))


@given(st.lists(st.tuples(percent, st.booleans()), min_size=1, max_size=6))
def test_percentages_with_or_without_the_sign_read_as_fractions(
    parts: list[tuple[float, bool]],
) -> None:
    text = ",".join(f"{value}{'%' if sign else ''}" for value, sign in parts)
    assert loss_percentages(text) == pytest.approx(tuple(value / 100 for value, _ in parts))


@given(st.text(max_size=20))
def test_any_text_is_fractions_below_one_or_a_one_line_error(text: str) -> None:
    try:
        values = loss_percentages(text)
    except argparse.ArgumentTypeError as exc:
        assert "\n" not in str(exc)
    else:
        assert values and all(0 <= value < 1 for value in values)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("abc", "cannot read percentage 'abc'"),
        ("2,", "cannot read percentage ''"),
        ("100", "loss must be below 100 %, not '100'"),
        ("-1", "cannot read percentage '-1'"),
        ("nan", "cannot read percentage 'nan'"),
    ],
)
def test_what_is_not_a_loss_rate_is_named(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        loss_percentages(text)
