"""Readers for what ``quicmesh bench overhead`` measures with other programs.

Pure functions over text: h2load's summary and ``--log-file``, ApacheBench's
report, ``/proc/<pid>/stat`` and ``/proc/net/snmp``; plus the thin readers of
the live ``/proc`` files. Each parser raises :class:`MeasureError` (one line
naming the program and what is missing) on text it does not recognise.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import QuicmeshError


class MeasureError(QuicmeshError):
    """A load generator's output or a /proc file did not have the expected shape."""


_DURATION_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_SIZE_UNITS = {"B": 1.0, "KB": 2.0**10, "MB": 2.0**20, "GB": 2.0**30}


@dataclass(frozen=True)
class H2loadSummary:
    """The totals h2load prints at the end of a run."""

    seconds: float
    """``finished in``: the measured duration (the main duration with ``-D``)."""
    requests_per_second: float
    total: int
    done: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int
    """Response body bytes (``traffic: ... data``)."""


_FINISHED = re.compile(
    r"^finished in (?P<value>[0-9.]+)(?P<unit>ns|us|ms|s), (?P<rps>[0-9.]+) req/s", re.M
)
_REQUESTS = re.compile(
    r"^requests: (?P<total>\d+) total, \d+ started, (?P<done>\d+) done, (?P<ok>\d+) succeeded, "
    r"(?P<failed>\d+) failed, (?P<errored>\d+) errored, (?P<timeout>\d+) timeout",
    re.M,
)
_STATUS = re.compile(r"^status codes: (?P<ok>\d+) 2xx", re.M)
_TRAFFIC_DATA = re.compile(r"\((?P<bytes>\d+)\) data\s*$", re.M)


def parse_h2load_summary(text: str) -> H2loadSummary:
    """Parse h2load's closing report (``finished in``, ``requests:``, ``status codes:``,
    ``traffic:`` lines).

    :raises MeasureError: if the ``finished`` or ``requests`` line is missing.
    """
    finished = _FINISHED.search(text)
    requests = _REQUESTS.search(text)
    if finished is None or requests is None:
        raise MeasureError("h2load printed no 'finished in' / 'requests:' summary")
    status = _STATUS.search(text)
    data = _TRAFFIC_DATA.search(text)
    return H2loadSummary(
        seconds=float(finished["value"]) * _DURATION_UNITS[finished["unit"]],
        requests_per_second=float(finished["rps"]),
        total=int(requests["total"]),
        done=int(requests["done"]),
        succeeded=int(requests["ok"]),
        failed=int(requests["failed"]),
        errored=int(requests["errored"]),
        timeout=int(requests["timeout"]),
        status_2xx=int(status["ok"]) if status else 0,
        data_bytes=int(data["bytes"]) if data else 0,
    )


def parse_h2load_log(text: str) -> list[float]:
    """Latencies in seconds from h2load's ``--log-file`` (tab-separated: start time in
    µs since the epoch, HTTP status, µs until the end of the response; more
    columns may follow). Only 2xx responses count; blank lines are skipped.

    :raises MeasureError: on a line with fewer than three columns or non-numbers.
    """
    latencies: list[float] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        try:
            status, micros = int(fields[1]), int(fields[2])
        except (IndexError, ValueError):
            raise MeasureError(f"h2load log line {number}: not 'start<TAB>status<TAB>µs'") from None
        if 200 <= status < 300:
            latencies.append(micros / 1e6)
    return latencies


@dataclass(frozen=True)
class AbSummary:
    """ApacheBench's totals."""

    complete: int
    failed: int
    non_2xx: int
    requests_per_second: float
    seconds: float


def parse_ab(text: str) -> AbSummary:
    """Parse ``ab``'s report (``Complete requests``, ``Failed requests``,
    ``Non-2xx responses`` when present, ``Requests per second``, ``Time taken for tests``).

    :raises MeasureError: if a required line is missing.
    """

    def number(label: str, pattern: str = r"(\d+)") -> str:
        found = re.search(rf"^{label}:\s+{pattern}", text, re.M)
        if found is None:
            raise MeasureError(f"ab printed no '{label}' line")
        return found.group(1)

    non_2xx = re.search(r"^Non-2xx responses:\s+(\d+)", text, re.M)
    return AbSummary(
        complete=int(number("Complete requests")),
        failed=int(number("Failed requests")),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        requests_per_second=float(number("Requests per second", r"([0-9.]+)")),
        seconds=float(number("Time taken for tests", r"([0-9.]+)")),
    )


def parse_proc_stat(text: str) -> tuple[int, int, int]:
    """``(ppid, utime, stime)`` in clock ticks from one ``/proc/<pid>/stat`` line.

    The command name (field 2) is in parentheses and may itself hold spaces and
    parentheses, so the fields are counted from the last ``)``.

    :raises MeasureError: if the line is too short or a field is not a number.
    """
    head, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or "(" not in head or len(fields) < 13:
        raise MeasureError("/proc/<pid>/stat: not 'pid (comm) state ppid ...'")
    try:
        # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15.
        return int(fields[1]), int(fields[11]), int(fields[12])
    except ValueError:
        raise MeasureError("/proc/<pid>/stat: ppid, utime or stime is not a number") from None


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """``/proc/net/snmp`` as ``{protocol: {counter: value}}`` (each protocol is a pair of
    lines: the counter names, then their values).

    :raises MeasureError: if a pair does not match up.
    """
    tables: dict[str, dict[str, int]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names or names[0] != values[0] or len(names) != len(values):
            raise MeasureError("/proc/net/snmp: a header line and its values do not match")
        try:
            tables[names[0].rstrip(":")] = {
                name: int(value) for name, value in zip(names[1:], values[1:], strict=True)
            }
        except ValueError:
            raise MeasureError(f"/proc/net/snmp: {names[0]} has a non-integer value") from None
    return tables


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; NaN if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(root: int, proc: Path = Path("/proc")) -> list[int]:
    """``root`` and its live descendants (a master process and its workers)."""
    children: dict[int, list[int]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, _, _ = parse_proc_stat((entry / "stat").read_text())
        except (OSError, MeasureError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


@dataclass(frozen=True)
class CpuReading:
    """The CPU time of some processes at one moment: subtract two for the seconds used in
    between.

    Each process's CPU-time clock (``clock_gettime`` on the clock Linux names
    ``MAKE_PROCESS_CPUCLOCK(pid, CPUCLOCK_SCHED)``) counts every thread, those that have
    exited too, in nanoseconds. ``/proc/<pid>/stat`` counts them too, but in 10 ms
    ticks: too coarse for a native proxy that moves a test's bulk in a few ms; and the
    live threads' ``schedstat`` forgets a thread that exited, such as the thread per
    connection of stunnel4, which started and ended between two readings (its bulk was
    read as 0.13 ms of CPU). The ticks remain where the clock cannot be read."""

    seconds: float

    def __sub__(self, earlier: CpuReading) -> float:
        return self.seconds - earlier.seconds


def process_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """The CPU seconds process ``pid`` used so far, all its threads (exited ones too);
    None when it has gone."""
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EINVAL):
            return None  # gone (an invalid clock is a process that is not there)
    try:  # the clock cannot be read here: the ticks
        _, utime, stime = parse_proc_stat((proc / str(pid) / "stat").read_text())
    except OSError:
        return None
    return (utime + stime) / CLOCK_TICKS


_CPUCLOCK_SCHED = 2
"""The clock type of a process's total run time, in Linux's CPU-clock IDs."""


def cpu_reading(pids: Iterable[int]) -> CpuReading:
    """The CPU time of the processes ``pids`` now; a process that has gone counts zero."""
    return CpuReading(sum(filter(None, (process_cpu_seconds(pid) for pid in pids))))


def udp_datagrams_sent(proc: Path = Path("/proc")) -> int:
    """UDP OutDatagrams of this network namespace."""
    return parse_snmp((proc / "net" / "snmp").read_text())["Udp"]["OutDatagrams"]


def parse_nft_counters(text: str) -> dict[str, int]:
    """Packets per rule comment from ``nft -j list chain ...``: ``{comment: packets}``,
    summed over rules with the same comment; rules without a counter or comment are
    left out.

    :raises MeasureError: if the text is not nft's JSON.
    """
    try:
        document = json.loads(text)
        items = document["nftables"]
    except (ValueError, KeyError, TypeError):
        raise MeasureError("nft -j printed no 'nftables' list") from None
    counts: dict[str, int] = {}
    for item in items if isinstance(items, list) else ():
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or not isinstance(rule.get("comment"), str):
            continue
        for expr in rule.get("expr", ()):
            counter = expr.get("counter") if isinstance(expr, dict) else None
            if isinstance(counter, dict) and isinstance(counter.get("packets"), int):
                counts[rule["comment"]] = counts.get(rule["comment"], 0) + counter["packets"]
    return counts
