"""Flow ids across the hop (W3C traceparent), access-log formats, reopening the file."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.errors import ConfigError
from quicmesh.sidecar.accesslog import (
    FIELDS,
    REFUSED_OUTCOMES,
    TEXT,
    AccessLog,
    FlowRecord,
    Outcome,
    RefusalLogLimit,
    parse_log_format,
)
from quicmesh.sidecar.config import parse_config
from quicmesh.sidecar.tracing import (
    TraceContext,
    continue_or_start,
    parse_traceparent,
)

W3C_EXAMPLE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def record(**changes: Any) -> FlowRecord:
    values: dict[str, Any] = dict(
        start=0.0, duration=0.0123, listener="app", direction="inbound",
        downstream="127.0.0.1:5", target="127.0.0.1:80", transport="quic",
        peer_identity="spiffe://mesh.local/ns/default/sa/a", endpoint="127.0.0.1:80",
        bytes_sent=10, bytes_received=20, outcome=Outcome.COMPLETED,
        flow_id="4bf92f3577b34da6a3ce929d0e0e4736",
    )  # fmt: skip
    values.update(changes)
    return FlowRecord(**values)


# -- traceparent ---------------------------------------------------------------------


def test_the_w3c_example_parses() -> None:
    context = parse_traceparent(W3C_EXAMPLE)
    assert context == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01")
    assert context.header() == W3C_EXAMPLE
    child = context.child(random.Random(1))
    assert child.trace_id == context.trace_id and child.parent_id != context.parent_id


@pytest.mark.parametrize(
    "value",
    [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has 4 fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_invalid_traceparents_are_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_traceparent(value)


def test_a_later_version_may_carry_more_fields() -> None:
    context = parse_traceparent(W3C_EXAMPLE.replace("00-", "01-", 1) + "-future")
    assert context.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"


@given(st.integers(min_value=0, max_value=2**32))
def test_new_contexts_round_trip(seed: int) -> None:
    context = TraceContext.new(random.Random(seed))
    assert parse_traceparent(context.header()) == context


def test_new_contexts_from_the_system_source_are_valid_and_distinct() -> None:
    contexts = [TraceContext.new() for _ in range(200)]
    assert all(parse_traceparent(c.header()) == c for c in contexts)
    assert len({c.trace_id for c in contexts}) == len({c.parent_id for c in contexts}) == 200


@given(st.text(max_size=80))
def test_any_header_value_parses_or_is_a_value_error(value: str) -> None:
    try:
        context = parse_traceparent(value)
    except ValueError:
        return
    assert len(context.trace_id) == 32 and len(context.parent_id) == 16


def test_a_received_flow_keeps_a_valid_trace_or_starts_one() -> None:
    assert continue_or_start({"traceparent": W3C_EXAMPLE}).trace_id == (
        "4bf92f3577b34da6a3ce929d0e0e4736"
    )
    fresh = continue_or_start({"traceparent": "garbage"}, random.Random(3))
    assert fresh == continue_or_start({}, random.Random(3))
    assert fresh.trace_id != "4bf92f3577b34da6a3ce929d0e0e4736"


# -- formats -----------------------------------------------------------------------


def test_json_line_carries_the_flow_id_first_after_start() -> None:
    data = json.loads(record().to_json())
    assert list(data) == list(FIELDS)
    assert data["flow_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"


def test_text_format_is_one_line_with_dashes_for_empty_fields() -> None:
    line = record(endpoint="", reason="bad\nthing\u2028here").to_text(TEXT)
    assert len(line.splitlines()) == 1
    assert " 4bf92f3577b34da6a3ce929d0e0e4736 inbound app 127.0.0.1:5 -> " in line
    assert line.startswith("[1970-01-01T00:00:00.000Z] ")
    assert "quic - spiffe://" in line
    assert line.endswith(" 10 20 12.3ms bad\\x0athing\\x2028here")


def test_templates() -> None:
    assert parse_log_format("json") == "json"
    assert parse_log_format("text") == TEXT
    template = parse_log_format("{flow_id} {outcome} {{literal}}")
    assert record().to_text(template) == "4bf92f3577b34da6a3ce929d0e0e4736 completed {literal}"


@pytest.mark.parametrize(
    "value, message",
    [
        ("{flowid}", "unknown field {flowid}"),
        ("{bytes_sent:>10}", "not allowed"),
        ("{target!r}", "not allowed"),
        ("no fields", "at least one {field}"),
        ("{start}\n{target}", "one line"),
        ("{start", "invalid template"),
        ("", "expected json, text"),
        (7, "expected json, text"),
    ],
)
def test_bad_formats_are_refused(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("{", r"\{")):
        parse_log_format(value)


@given(st.text(max_size=60))
def test_any_template_is_refused_or_renders_one_line(value: str) -> None:
    try:
        template = parse_log_format(value)
    except ValueError:
        return
    line = AccessLog(None, template).format(record(reason="x\ny"))
    assert len(line.splitlines()) <= 1


CONFIG = """
node: {name: b, identity: spiffe://mesh.local/ns/default/sa/b}
tls: {ca_dir: ca}
admin: {address: 127.0.0.1:15100}
access_log: ACCESS
listeners:
  inbound:
    - {name: mesh, address: 127.0.0.1:15008, transports: [quic], destinations: ["127.0.0.1:80"]}
"""


def test_config_chooses_the_format() -> None:
    def load(access: str) -> Any:
        return parse_config(CONFIG.replace("ACCESS", access), source="b.yaml").access_log

    assert (load("{path: '-'}").path, load("{path: '-'}").format) == ("-", "json")
    assert load("{format: text}").format == TEXT and load("{format: text}").path == "-"
    assert load("{path: null}").path is None
    assert load("{format: '{flow_id} {outcome}'}").format == "{flow_id} {outcome}"
    with pytest.raises(ConfigError, match=r"^b.yaml: access_log.format: unknown field \{nope\}"):
        load("{format: '{nope}'}")


# -- reopening ------------------------------------------------------------------------


def test_reopen_follows_the_path_after_a_rotation(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    log = AccessLog(str(path))
    log.write(record(flow_id="a" * 32))
    path.rename(tmp_path / "access.log.1")
    log.write(record(flow_id="b" * 32))  # still the old file, as with any open file
    log.reopen()
    log.write(record(flow_id="c" * 32))
    log.close()
    old = [json.loads(x)["flow_id"][0] for x in (tmp_path / "access.log.1").read_text().split()]
    new = [json.loads(x)["flow_id"][0] for x in path.read_text().split()]
    assert (old, new) == (["a", "b"], ["c"])


def test_a_log_that_cannot_be_written_says_so_once_not_once_a_flow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Found by a review: an access log on a closed pipe (or a full disk) logged one
    # warning a flow.
    log = AccessLog("/dev/full")
    with caplog.at_level(logging.WARNING, logger="quicmesh.sidecar.accesslog"):
        for _ in range(50):
            log.write(record())
    lines = [r for r in caplog.records if "cannot write the access log" in r.getMessage()]
    assert len(lines) == 1 and "No space left on device" in lines[0].getMessage()
    log.close()


def test_reopen_keeps_the_old_file_when_the_path_cannot_be_opened(tmp_path: Path) -> None:
    folder = tmp_path / "logs"
    folder.mkdir()
    log = AccessLog(str(folder / "access.log"))
    (folder / "access.log").rename(tmp_path / "moved.log")
    folder.rmdir()
    log.reopen()  # logs a warning, keeps writing to the file it has
    log.write(record())
    log.close()
    assert len((tmp_path / "moved.log").read_text().splitlines()) == 1


# -- refused flows: a line per refusal, rate-limited per identity and outcome (issue 13) --


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_refused_lines_are_limited_per_identity_and_say_how_many_were_left_out(
    tmp_path: Path,
) -> None:
    clock = Clock()
    log = AccessLog(str(tmp_path / "access.log"))
    log.refusals = RefusalLogLimit(rate=10, burst=5, clock=clock)
    churner = "spiffe://mesh.local/ns/default/sa/churner"
    for _ in range(1000):  # a churning identity refused 1,000 times in the same instant
        log.write(record(peer_identity=churner, outcome=Outcome.REFUSED))
    log.write(record(outcome=Outcome.REFUSED))  # another identity has its own bucket
    log.write(record(peer_identity=churner, outcome=Outcome.OVERFLOW))  # another outcome too
    for _ in range(50):  # completed flows are never left out
        log.write(record(peer_identity=churner))
    clock.now += 0.15  # one more token (and a half)
    log.write(record(peer_identity=churner, outcome=Outcome.REFUSED))
    log.close()
    lines = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
    refused = [x for x in lines if x["peer_identity"] == churner and x["outcome"] == "refused"]
    assert len(refused) == 6
    assert [x["suppressed"] for x in refused] == [0, 0, 0, 0, 0, 995]
    assert sum(x["outcome"] == "completed" for x in lines) == 50
    assert sum(x["outcome"] == "overflow" for x in lines) == 1
    assert sum(x["peer_identity"] != churner for x in lines) == 1
    assert log.refusals.suppressed == {"refused": 995}


@given(
    st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(0, 3), st.sampled_from(sorted(Outcome, key=str))),
        max_size=300,
    )
)
def test_refused_lines_never_exceed_the_bucket_and_every_flow_is_accounted(
    flows: list[tuple[float, int, Outcome]],
) -> None:
    clock = Clock()
    limit = RefusalLogLimit(rate=20, burst=4, clock=clock, max_keys=2)
    start = clock.now
    written: dict[tuple[int, Outcome], int] = {}
    reported = 0
    for delay, who, outcome in flows:
        clock.now += delay
        flow = record(peer_identity=f"spiffe://mesh.local/ns/a/sa/{who}", outcome=outcome)
        if limit.admit(flow):
            written[who, outcome] = written.get((who, outcome), 0) + 1
            reported += flow.suppressed
        else:
            assert outcome in REFUSED_OUTCOMES
    elapsed = clock.now - start
    for (_, outcome), count in written.items():
        if outcome in REFUSED_OUTCOMES:
            # max_keys=2 may forget a bucket (a fresh burst), never more than once per flow
            assert count <= len(flows)
    left_out = sum(limit.suppressed.values())
    assert left_out == len(flows) - sum(written.values())
    assert reported <= left_out
    refused_written = sum(c for (_, o), c in written.items() if o in REFUSED_OUTCOMES)
    keys = {(w, o) for _, w, o in flows if o in REFUSED_OUTCOMES}
    if len(keys) <= 2:  # no pruning possible: the token bucket holds exactly
        assert refused_written <= len(keys) * (4 + 20 * elapsed) + 1e-9
