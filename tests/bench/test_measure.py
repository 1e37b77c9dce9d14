"""The parsers behind ``quicmesh bench overhead``: h2load, ab, /proc, nft (property tests)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.bench._measure import (
    CLOCK_TICKS,
    CpuReading,
    MeasureError,
    cpu_reading,
    parse_ab,
    parse_h2load_log,
    parse_h2load_summary,
    parse_nft_counters,
    parse_proc_stat,
    parse_snmp,
    percentile,
    process_cpu_seconds,
    process_tree,
)
from quicmesh.bench.overhead import (
    PathSpec,
    Plan,
    Sample,
    engine_of,
    ratios,
    render,
    sidecar_configs,
    summarise,
)

H2LOAD_SAMPLE = """starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for measurements.
Application protocol: http/1.1

finished in 2.00s, 104.00 req/s, 128.38KB/s
requests: 208 total, 208 started, 208 done, 208 succeeded, 0 failed, 0 errored, 0 timeout
status codes: 208 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 256.75KB (262912) total, 38.39KB (39312) headers (space savings 0.00%), 208.00KB (212992) data
                     min         max         mean         sd        +/- sd
time for request:      261us      5.16ms      1.03ms      1.22ms    92.31%
"""  # noqa: E501


def test_h2load_sample_from_nghttp2_1_52() -> None:
    summary = parse_h2load_summary(H2LOAD_SAMPLE)
    assert summary.seconds == 2.0
    assert summary.requests_per_second == 104.0
    assert (summary.total, summary.done, summary.succeeded, summary.failed) == (208, 208, 208, 0)
    assert summary.status_2xx == 208
    assert summary.data_bytes == 212992


@given(
    value=st.decimals(min_value=0, max_value=10**6, places=2),
    unit=st.sampled_from(["s", "ms", "us"]),
    rps=st.decimals(min_value=0, max_value=10**7, places=2),
    counts=st.lists(st.integers(0, 10**9), min_size=6, max_size=6),
    data=st.integers(0, 2**40),
)
def test_h2load_summary_round_trip(
    value: object, unit: str, rps: object, counts: list[int], data: int
) -> None:
    total, done, ok, failed, errored, timeout = counts
    text = (
        f"finished in {value}{unit}, {rps} req/s, 1.00MB/s\n"
        f"requests: {total} total, {total} started, {done} done, {ok} succeeded, "
        f"{failed} failed, {errored} errored, {timeout} timeout\n"
        f"status codes: {ok} 2xx, 0 3xx, 0 4xx, 0 5xx\n"
        f"traffic: 1KB (1) total, 1KB (1) headers (space savings 0.00%), 1KB ({data}) data\n"
    )
    summary = parse_h2load_summary(text)
    scale = {"s": 1.0, "ms": 1e-3, "us": 1e-6}[unit]
    assert math.isclose(summary.seconds, float(str(value)) * scale)
    assert summary.requests_per_second == float(str(rps))
    assert (summary.total, summary.done, summary.succeeded) == (total, done, ok)
    assert (summary.failed, summary.errored, summary.timeout) == (failed, errored, timeout)
    assert summary.data_bytes == data


@given(st.text(max_size=300))
def test_h2load_summary_rejects_or_parses_any_text(text: str) -> None:
    try:
        parse_h2load_summary(text)
    except MeasureError as exc:
        assert "h2load" in str(exc)


@given(
    st.lists(
        st.tuples(st.integers(0, 2**62), st.integers(100, 599), st.integers(0, 10**9)),
        max_size=50,
    )
)
def test_h2load_log_keeps_2xx_latencies_in_seconds(rows: list[tuple[int, int, int]]) -> None:
    text = "\n".join(f"{start}\t{status}\t{micros}" for start, status, micros in rows)
    latencies = parse_h2load_log(text + "\n")
    expected = [micros / 1e6 for _, status, micros in rows if 200 <= status < 300]
    assert latencies == expected


@pytest.mark.parametrize("line", ["1\t200", "1\tOK\t5", "x"])
def test_h2load_log_bad_lines_name_their_number(line: str) -> None:
    with pytest.raises(MeasureError, match="h2load log line 2"):
        parse_h2load_log("1\t200\t5\n" + line)


AB_SAMPLE = """Concurrency Level:      8
Time taken for tests:   1.005 seconds
Complete requests:      8489
Failed requests:        3
Non-2xx responses:      2
Total transferred:      10687651 bytes
Requests per second:    8446.07 [#/sec] (mean)
Time per request:       0.947 [ms] (mean)
"""


def test_ab_sample() -> None:
    report = parse_ab(AB_SAMPLE)
    assert (report.complete, report.failed, report.non_2xx) == (8489, 3, 2)
    assert report.requests_per_second == 8446.07
    assert report.seconds == 1.005


def test_ab_without_its_totals_is_refused() -> None:
    with pytest.raises(MeasureError, match="Complete requests"):
        parse_ab("apr_socket_recv: Connection reset by peer (104)\n")


@given(
    comm=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\x00")),
    ppid=st.integers(0, 2**22),
    utime=st.integers(0, 2**40),
    stime=st.integers(0, 2**40),
)
def test_proc_stat_counts_fields_after_the_last_parenthesis(
    comm: str, ppid: int, utime: int, stime: int
) -> None:
    middle = " ".join(str(n) for n in range(5, 14))
    line = f"4242 ({comm}) S {ppid} {middle} {utime} {stime} 0 0 20 0 1 0\n"
    assert parse_proc_stat(line) == (ppid, utime, stime)


@pytest.mark.parametrize("line", ["", "1 (x) S 1 2 3", "1 (x) S one 2 3 4 5 6 7 8 9 10 11 12 13"])
def test_proc_stat_bad_lines(line: str) -> None:
    with pytest.raises(MeasureError):
        parse_proc_stat(line)


def test_this_process_in_proc() -> None:
    own = Path(f"/proc/{os.getpid()}/stat").read_text()
    assert parse_proc_stat(own)[0] == os.getppid()
    before = cpu_reading([os.getpid()])
    while cpu_reading([os.getpid()]) - before < 3 / CLOCK_TICKS:
        sum(range(10000))  # burn a few ticks of CPU
    assert cpu_reading([os.getpid(), 2**22 + 1]) - before >= 3 / CLOCK_TICKS  # gone: zero
    assert os.getpid() in process_tree(os.getppid())


def test_cpu_reading_sees_less_than_one_tick() -> None:
    before = cpu_reading([os.getpid()])
    sum(range(20000))  # well under one 10 ms tick
    assert 0 < cpu_reading([os.getpid()]) - before < 1


def test_a_thread_that_exits_between_readings_is_still_counted() -> None:
    """A thread started and ended between two readings (stunnel4's thread per connection)
    counts in full, not only to within the ticks' 10 ms."""
    import threading

    before = cpu_reading([os.getpid()])
    tids: list[int] = []
    burned: list[float] = []

    def burn() -> None:
        tids.append(threading.get_native_id())
        start = time.thread_time()
        while time.thread_time() - start < 0.015:  # under two ticks
            sum(range(10000))
        burned.append(time.thread_time() - start)

    thread = threading.Thread(target=burn)
    thread.start()
    thread.join()
    task = Path(f"/proc/self/task/{tids[0]}")
    while task.exists():  # until the kernel has reaped it
        os.sched_yield()
    assert cpu_reading([os.getpid()]) - before >= burned[0]


_BURN_THEN_WAIT = """
import time
start = time.process_time()
while time.process_time() - start < 0.05:
    pass
print(1, flush=True)
input()
"""


def test_another_process_is_read_and_a_gone_one_counts_zero() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _BURN_THEN_WAIT,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "1\n"
        used = process_cpu_seconds(child.pid)
        assert used is not None and used >= 0.05
    finally:
        child.communicate("")
    assert process_cpu_seconds(child.pid) is None
    assert cpu_reading([child.pid]) - CpuReading(0.0) == 0.0


def test_reading_difference() -> None:
    assert CpuReading(1.5) - CpuReading(1.0) == pytest.approx(0.5)


@given(
    st.dictionaries(
        st.from_regex(r"[A-Z][a-z]{1,8}", fullmatch=True),
        st.dictionaries(
            st.from_regex(r"[A-Za-z]{1,12}", fullmatch=True), st.integers(0, 2**63), min_size=1
        ),
        max_size=5,
    )
)
def test_snmp_round_trip(tables: dict[str, dict[str, int]]) -> None:
    text = "".join(
        f"{proto}: {' '.join(counters)}\n{proto}: {' '.join(map(str, counters.values()))}\n"
        for proto, counters in tables.items()
    )
    assert parse_snmp(text) == tables


def test_snmp_mismatched_pair_is_refused() -> None:
    with pytest.raises(MeasureError):
        parse_snmp("Udp: InDatagrams OutDatagrams\nTcp: 1 2\n")


def test_this_namespaces_snmp_has_udp_and_tcp() -> None:
    tables = parse_snmp(Path("/proc/net/snmp").read_text())
    assert "OutDatagrams" in tables["Udp"] and "OutSegs" in tables["Tcp"]


def _nft_rule(comment: str | None, packets: int | None) -> dict[str, object]:
    expr: list[dict[str, object]] = [{"match": {"op": "==", "right": 1}}]
    if packets is not None:
        expr.append({"counter": {"packets": packets, "bytes": 0}})
    rule: dict[str, object] = {"family": "inet", "table": "t", "chain": "out", "expr": expr}
    if comment is not None:
        rule["comment"] = comment
    return {"rule": rule}


@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.sampled_from(["hop-tcp", "hop-udp", "other"])),
            st.one_of(st.none(), st.integers(0, 2**63)),
        ),
        max_size=8,
    )
)
def test_nft_counters_sum_per_comment(rules: list[tuple[str | None, int | None]]) -> None:
    items: list[object] = [{"metainfo": {"version": "1.0.6"}}, {"chain": {"name": "out"}}]
    items += [_nft_rule(comment, packets) for comment, packets in rules]
    counts = parse_nft_counters(json.dumps({"nftables": items}))
    expected: dict[str, int] = {}
    for comment, packets in rules:
        if comment is not None and packets is not None:
            expected[comment] = expected.get(comment, 0) + packets
    assert counts == expected


@pytest.mark.parametrize("text", ["", "[]", '{"tables": []}', "nft: command not found"])
def test_nft_counters_refuse_other_text(text: str) -> None:
    with pytest.raises(MeasureError):
        parse_nft_counters(text)


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=200), st.floats(0, 1))
def test_percentile_is_an_element_and_monotonic(values: list[float], q: float) -> None:
    value = percentile(values, q)
    assert value in values
    assert percentile(values, 0.0) == min(values)
    assert percentile(values, 1.0) == max(values)
    assert percentile(values, min(1.0, q + 0.1)) >= value
    # nearest rank: at least a fraction q of the values are <= it
    assert sum(v <= value for v in values) >= q * len(values)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 0.5))


def _sample(p90: float, cpu: float, max_rps: float, number: int = 0) -> Sample:
    sample = Sample(
        round=number,
        vcpu_per_krps=cpu,
        max_rps=max_rps,
        conn_per_request_rps=max_rps / 10,
        bulk_mbps=max_rps / 100,
        cpu_seconds_per_gb=cpu * 10,
        packets_per_request=2.0,
        new_flow_packets=6.0,
    )
    sample.latency_ms[1000] = [p90 / 2, p90, p90 * 2]
    sample.achieved_rps[1000] = 1000.0
    return sample


def test_summary_takes_added_latency_per_round_and_ratios_in_the_same_run() -> None:
    plan = Plan((1000,), 1.0, 0.5, 1.0, 1.0, 10**6, 2)
    specs = [PathSpec.parse(p) for p in ("direct", "h2", "h2/asyncio", "nghttpx", "stunnel")]
    samples = {
        "direct": [_sample(1.0, 0.0, 20000, 1), _sample(3.0, 0.0, 20000, 2)],
        "h2": [_sample(2.0, 0.3, 2000, 1), _sample(5.0, 0.3, 2000, 2)],  # added p90 1 and 2
        "h2/asyncio": [_sample(3.0, 0.4, 1000, 1), _sample(6.0, 0.4, 1000, 2)],  # 2 and 3
        "nghttpx": [_sample(1.5, 0.1, 8000, 1), _sample(3.5, 0.1, 8000, 2)],  # 0.5 twice
    }
    rows = summarise(specs, samples, plan, {"stunnel": "not installed: apt-get install stunnel4"})
    by_path = {row.path: row for row in rows}
    assert by_path["h2"].values["added_p90_ms@1000"] == 1.5
    assert by_path["h2/asyncio"].values["added_p90_ms@1000"] == 2.5
    assert by_path["stunnel"].status.startswith("not installed") and not by_path["stunnel"].values
    against_h2 = ratios(rows, "h2", 1000)
    assert against_h2["h2"]["p90"] == 1.0
    assert against_h2["h2/asyncio"]["p90"] == 2.5 / 1.5
    assert math.isclose(against_h2["nghttpx"]["vCPU"], 0.1 / 0.3)
    assert against_h2["nghttpx"]["max"] == 4.0
    assert "direct" not in against_h2
    table = render(rows, plan, namespace=True)
    assert "| stunnel | not installed: apt-get install stunnel4 |" in table
    # Every line of each table has its header's cells (the rule line had one more, and
    # a Markdown viewer showed no table).
    for block in table.split("\n\n"):
        widths = {line.count("|") for line in block.splitlines() if line.startswith("|")}
        assert len(widths) <= 1, block
    assert "Ratios against h2 (same run" in table and "Ratios against nghttpx" in table
    # The L4 floor's table only when that pair ran; h2's and nghttpx's always.
    assert "haproxy" not in table
    with_floor = summarise(
        [*specs, PathSpec.parse("haproxy")],
        {**samples, "haproxy": [_sample(1.2, 0.05, 6000), _sample(3.2, 0.05, 6000)]},
        plan,
        {},
    )
    floor_table = render(with_floor, plan, namespace=True)
    assert "Ratios against haproxy (same run" in floor_table
    assert ratios(with_floor, "haproxy", 1000)["nghttpx"]["cpr"] == 8000 / 6000
    # A round a path failed: its others are paired with their own round's direct path
    # (zipped in order, round 2's sample met round 1's direct: added 4.0, not 2.0).
    gap = summarise(specs[:2], {**samples, "h2": [_sample(5.0, 0.3, 2000, 2)]}, plan, {})
    assert {row.path: row for row in gap}["h2"].values["added_p90_ms@1000"] == 2.0
    # Without the direct path there is no added latency: shown as "-", never a crash.
    no_direct = summarise(specs[1:4], {k: v for k, v in samples.items() if k != "direct"}, plan, {})
    assert "| h2 | - / - / - |" in render(no_direct, plan, namespace=False)
    assert math.isnan(ratios(no_direct, "h2", 1000)["h2"]["p90"])


def test_each_quic_path_names_its_engine() -> None:
    """``quic-aioquic`` ran on the sidecars' default engine (native, where built): its
    row measured the native engine."""
    assert engine_of("quic-aioquic") == "aioquic"
    assert engine_of("quic-native") == engine_of("quic-native-pump") == "native"
    assert engine_of("h2") is None and engine_of("tcp") is None
    a, b = sidecar_configs("quic", engine_of("quic-aioquic"), "ca", 1, 2, 3)
    assert a["clusters"][0]["engine"] == "aioquic"
    assert b["listeners"]["inbound"][0]["engine"] == "aioquic"
