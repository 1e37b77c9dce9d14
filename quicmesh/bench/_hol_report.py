"""Statistics, tables and plots of the head-of-line benchmark (no I/O but the plot files).

:func:`summarize_run` turns one run's raw client measurements (see
:mod:`quicmesh.bench._hol_worker`) into latency percentiles, bulk goodput and a
split of each response's time; :func:`aggregate` pools the runs of one point
(every seed) so percentiles come from all their samples; :func:`markdown` and
:func:`plot` render the result.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile of sorted ``values``, interpolated linearly (numpy's default)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def distribution(values: Iterable[float]) -> dict[str, Any]:
    """Count, mean, p50/p90/p99 and max of ``values`` (milliseconds in, milliseconds out)."""
    ordered = sorted(values)
    result: dict[str, Any] = {"count": len(ordered)}
    result["mean"] = _round(sum(ordered) / len(ordered)) if ordered else None
    for p in PERCENTILES:
        result[f"p{p}"] = _round(percentile(ordered, p))
    result["max"] = _round(ordered[-1]) if ordered else None
    return result


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def counter_at(series: Sequence[Sequence[float]], column: int, when: float) -> float:
    """A byte counter sampled over time (rows ``[time, counter...]``), interpolated at ``when``."""
    times = [row[0] for row in series]
    index = bisect.bisect_left(times, when)
    if index <= 0:
        return float(series[0][column]) if series else 0.0
    if index >= len(series):
        return float(series[-1][column])
    (t0, v0), (t1, v1) = (
        (series[index - 1][0], series[index - 1][column]),
        (
            series[index][0],
            series[index][column],
        ),
    )
    if t1 == t0:
        return float(v1)
    return v0 + (v1 - v0) * (when - t0) / (t1 - t0)


def goodput_mbps(series: Sequence[Sequence[float]], column: int, start: float, end: float) -> float:
    """Mbit/s of the counter in ``column`` between ``start`` and ``end``."""
    if end <= start or not series:
        return 0.0
    received = counter_at(series, column, end) - counter_at(series, column, start)
    return received * 8 / (end - start) / 1e6


class _Probes:
    """The link's one-way server-to-client delay over time, from the UDP probes."""

    def __init__(self, probes: Sequence[Sequence[float]]) -> None:
        pairs = sorted((p[2], p[2] - p[1]) for p in probes)
        self.arrivals = [a for a, _ in pairs]
        self.delays = [d for _, d in pairs]

    def delay_near(self, arrival: float) -> float | None:
        """One-way delay of the probe that arrived closest to ``arrival``."""
        if not self.arrivals:
            return None
        index = bisect.bisect_left(self.arrivals, arrival)
        best = min(
            (i for i in (index - 1, index) if 0 <= i < len(self.arrivals)),
            key=lambda i: abs(self.arrivals[i] - arrival),
        )
        return self.delays[best]

    def window(self, start: float, end: float) -> list[float]:
        low = bisect.bisect_left(self.arrivals, start)
        high = bisect.bisect_left(self.arrivals, end)
        return self.delays[low:high]


def summarize_run(
    raw: dict[str, Any],
    *,
    one_way_delay: float,
    rate_bps: float,
    response_size: int,
    slow_threshold: float,
    windows: dict[str, tuple[float, float]] | None = None,
) -> dict[str, Any]:
    """Statistics of one run, over the measurement window (or each of ``windows``).

    Windows are offsets in seconds from the start of the measurement; the default is
    the whole measurement. For every window: interactive latency (scheduled send to
    last response byte), the count slower than ``slow_threshold`` s, bulk goodput per
    flow, and the split of the response's time (see :func:`_split`).
    """
    start, end = raw["measure_start"], raw["measure_end"]
    if windows is None:
        windows = {"measure": (0.0, end - start)}
    probes = _Probes(raw["probes"])
    result: dict[str, Any] = {}
    for name, (offset_start, offset_end) in windows.items():
        w_start, w_end = start + offset_start, start + offset_end
        samples = [s for s in raw["samples"] if w_start <= s[2] < w_end]
        unanswered = [s for s in raw["unanswered"] if w_start <= s[2] < w_end]
        latencies = [(s[6] - s[2]) * 1e3 for s in samples]
        # Unanswered requests count at the time we stopped waiting (a lower bound).
        latencies += [(raw["finished"] - s[2]) * 1e3 for s in unanswered]
        series = raw["bulk_series"]
        flows = len(series[0]) - 1 if series else 0
        bulk = [round(goodput_mbps(series, 1 + i, w_start, w_end), 3) for i in range(flows)]
        link = [d * 1e3 for d in probes.window(w_start, w_end)]
        result[name] = {
            "latency_ms": distribution(latencies),
            "slow": sum(1 for value in latencies if value > slow_threshold * 1e3),
            "unanswered": len(unanswered),
            "bulk_mbps": bulk,
            "bulk_total_mbps": round(sum(bulk), 3),
            "link_one_way_ms": distribution(link),
            "split_ms": _split(samples, probes, one_way_delay, rate_bps, response_size),
            "latencies": [round(value, 2) for value in latencies],
        }
    return result


def _split(
    samples: Sequence[Sequence[float]],
    probes: _Probes,
    one_way_delay: float,
    rate_bps: float,
    response_size: int,
) -> dict[str, Any]:
    """Where each answered request's time went, per sample, as distributions (ms).

    * ``client_lag``: scheduled to actual send (the client's event loop).
    * ``request``: client send to server read (request path, incl. its sender queue).
    * ``server``: server read to the response being handed to the stream.
    * ``response``: response handed to the stream to its last byte read by the client.
    * ``link_queue``: the bottleneck queue the response's last packet met: the one-way
      delay of the UDP probe that arrived nearest to it, minus the propagation delay.
    * ``sender_and_recovery``: ``response`` minus that probe's one-way delay and the
      response's own transmission time at the link rate: what the response spent in
      the sender's buffers (transport, TLS, socket, kernel; pacing and congestion
      window) and waiting for retransmissions, its own or (head-of-line) others'.
    """
    transmission = response_size * 8 / rate_bps
    parts: dict[str, list[float]] = {
        "client_lag": [],
        "request": [],
        "server": [],
        "response": [],
        "link_queue": [],
        "sender_and_recovery": [],
    }
    for s in samples:
        _, _, scheduled, sent, received, written, done = s
        parts["client_lag"].append((sent - scheduled) * 1e3)
        parts["request"].append((received - sent) * 1e3)
        parts["server"].append((written - received) * 1e3)
        parts["response"].append((done - written) * 1e3)
        link = probes.delay_near(done)
        if link is not None:
            parts["link_queue"].append(max(0.0, link - one_way_delay) * 1e3)
            parts["sender_and_recovery"].append((done - written - link - transmission) * 1e3)
    return {name: distribution(values) for name, values in parts.items()}


def cpu_summary(
    client: dict[str, Any],
    server: dict[str, Any],
    host: Sequence[Sequence[float]],
    start: float,
    end: float,
) -> dict[str, Any]:
    """CPU over ``[start, end]``: each worker's event-loop lag (ms) and CPU use (fraction of a
    core), and the whole machine's busy fraction (all cores; rows ``[time, busy, total]``)."""
    result: dict[str, Any] = {}
    for side, monitor in (("client", client), ("server", server)):
        lag = [value * 1e3 for t, value in monitor.get("lag", []) if start <= t < end]
        result[f"{side}_loop_lag_ms"] = distribution(lag)
        cpu = monitor.get("cpu", [])
        used = counter_at(cpu, 1, end) - counter_at(cpu, 1, start) if len(cpu) > 1 else None
        result[f"{side}_cpu"] = (
            None if used is None or end <= start else round(used / (end - start), 3)
        )
    queues = {"client": client.get("queues", []), "server": server.get("queues", [])}
    columns = {"udp_rx": 1, "udp_tx": 2, "tcp_rx": 3, "tcp_tx": 4}
    for side, rows in queues.items():
        window = [row for row in rows if start <= row[0] < end]
        for name, column in columns.items():
            values = [row[column] / 1024 for row in window]
            result[f"{side}_{name}_kib"] = {
                "p50": _round(percentile(sorted(values), 50), 1),
                "p99": _round(percentile(sorted(values), 99), 1),
            }
    if len(host) > 1:
        busy = counter_at(host, 1, end) - counter_at(host, 1, start)
        total = counter_at(host, 2, end) - counter_at(host, 2, start)
        result["host_busy"] = round(busy / total, 3) if total > 0 else None
    else:
        result["host_busy"] = None
    return result


def aggregate(runs: Sequence[dict[str, Any]], window: str = "measure") -> dict[str, Any]:
    """Pool the runs of one point (one per seed): percentiles over all their samples."""
    latencies = [v for run in runs for v in run["summary"][window]["latencies"]]
    per_seed_p99 = [run["summary"][window]["latency_ms"]["p99"] for run in runs]
    bulk = [run["summary"][window]["bulk_total_mbps"] for run in runs]
    split: dict[str, Any] = {}
    for part in ("link_queue", "sender_and_recovery", "response", "request", "client_lag"):
        # Percentiles of pooled parts would need the raw parts; the median of seeds' values
        # is what the tables show.
        values = [run["summary"][window]["split_ms"][part] for run in runs]
        split[part] = {
            key: _median([v[key] for v in values if v[key] is not None]) for key in ("p50", "p99")
        }
    lag = [run["summary"][window]["cpu"]["server_loop_lag_ms"]["p99"] for run in runs]
    busy = [run["summary"][window]["cpu"]["host_busy"] for run in runs]
    return {
        "seeds": [run["seed"] for run in runs],
        "server_loop_lag_p99_ms": _median([v for v in lag if v is not None]),
        "host_busy": _median([v for v in busy if v is not None]),
        "latency_ms": distribution(latencies),
        "p99_per_seed": per_seed_p99,
        "slow": sum(run["summary"][window]["slow"] for run in runs),
        "unanswered": sum(run["summary"][window]["unanswered"] for run in runs),
        "samples": len(latencies),
        "bulk_mbps_mean": _round(sum(bulk) / len(bulk)) if bulk else None,
        "bulk_mbps_per_seed": bulk,
        "split_ms": split,
        "congestion_control": runs[0]["congestion_control"] if runs else {},
    }


def _median(values: Sequence[float]) -> float | None:
    return _round(percentile(sorted(values), 50))


# -- rendering -----------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _cc_label(cc: dict[str, Any]) -> str:
    client, server = cc.get("client", {}), cc.get("server", {})
    if cc.get("transport") == "quic":
        return f"{client.get('quic', '?')}/{server.get('quic', '?')} (QUIC)"
    sockets_c = "+".join(sorted(set(client.get("sockets", [])))) or client.get("sysctl", "?")
    sockets_s = "+".join(sorted(set(server.get("sockets", [])))) or server.get("sysctl", "?")
    return f"{sockets_c}/{sockets_s} (kernel)"


def markdown(result: dict[str, Any]) -> str:
    """The tables of ``hol.json`` as markdown."""
    lines: list[str] = []
    settings = result["settings"]
    lines.append(
        f"Interactive flows: {settings['interactive_flows']} x ({settings['request_size']} B "
        f"request, {settings['response_size']} B response every "
        f"{settings['interval'] * 1e3:g} ms), {settings['bulk_flows']} bulk flow; "
        f"{settings['measure']:g} s measured after {settings['warmup']:g} s warm-up; "
        f"seeds {settings['seeds']}. Latency in ms, pooled over seeds; "
        "p99 range = lowest-highest seed p99; >2RTT = responses slower than twice the base RTT."
    )
    lines.append("")
    lines.append(
        "| link | transport | CC client/server | p50 | p90 | p99 | p99 range | max "
        "| >2RTT | bulk Mbit/s | samples | host CPU | srv lag p99 |"
    )
    lines.append("|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for point in result["points"]:
        lat = point["latency_ms"]
        seeds = [v for v in point["p99_per_seed"] if v is not None]
        spread = f"{min(seeds):.0f}-{max(seeds):.0f}" if seeds else "-"
        slow = f"{point['slow']} ({100 * point['slow'] / max(1, point['samples']):.1f}%)"
        lines.append(
            f"| {point['link']} | {point['variant']} | {_cc_label(point['congestion_control'])} "
            f"| {_fmt(lat['p50'])} | {_fmt(lat['p90'])} | {_fmt(lat['p99'])} | {spread} "
            f"| {_fmt(lat['max'])} | {slow} | {_fmt(point['bulk_mbps_mean'], 1)} "
            f"| {point['samples']} | {_pct(point['host_busy'])} "
            f"| {_fmt(point['server_loop_lag_p99_ms'], 1)} |"
        )
    lines.append("")
    lines.append(
        "host CPU = busy share of all the machine's cores during the measurement (other "
        "work on the machine included); srv lag p99 = the server process's event-loop lag "
        "(oversleep of a 5 ms timer), median over seeds: CPU starvation shows up here."
    )
    lines.append("")
    lines.append(
        "Where the response time goes (ms, median over seeds of each run's p50 / p99): "
        "link queue = bottleneck queue met by the response (UDP probes); sender+recovery = "
        "response time minus the link's one-way delay and its own transmission time, i.e. "
        "waiting in the sender's buffers plus waiting for retransmissions."
    )
    lines.append("")
    lines.append(
        "| link | transport | request p50 | response p50 | response p99 | link queue p50 "
        "| link queue p99 | sender+recovery p50 | sender+recovery p99 |"
    )
    lines.append("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for point in result["points"]:
        split = point["split_ms"]
        lines.append(
            f"| {point['link']} | {point['variant']} | {_fmt(split['request']['p50'], 1)} "
            f"| {_fmt(split['response']['p50'], 1)} | {_fmt(split['response']['p99'], 1)} "
            f"| {_fmt(split['link_queue']['p50'], 1)} | {_fmt(split['link_queue']['p99'], 1)} "
            f"| {_fmt(split['sender_and_recovery']['p50'], 1)} "
            f"| {_fmt(split['sender_and_recovery']['p99'], 1)} |"
        )
    if result.get("stall"):
        lines.append("")
        lines.append(
            "Stall isolation (no loss): bulk-0's reader stops; phase 'before' is the "
            "measurement up to then, 'stalled' starts 1 s after it."
        )
        lines.append("")
        lines.append(
            "| transport | phase | interactive p50 | p99 | max | bulk-0 Mbit/s | bulk-1 Mbit/s "
            "| all bulk Mbit/s |"
        )
        lines.append("|---|---|--:|--:|--:|--:|--:|--:|")
        for point in result["stall"]:
            for phase in ("before", "stalled"):
                data = point["phases"][phase]
                lat = data["latency_ms"]
                bulk = data["bulk_mbps"] + [None, None]
                lines.append(
                    f"| {point['variant']} | {phase} | {_fmt(lat['p50'])} | {_fmt(lat['p99'])} "
                    f"| {_fmt(lat['max'])} | {_fmt(bulk[0], 1)} | {_fmt(bulk[1], 1)} "
                    f"| {_fmt(data['bulk_total_mbps'], 1)} |"
                )
    return "\n".join(lines) + "\n"


def plot(
    result: dict[str, Any], latencies: dict[str, dict[str, list[float]]], out: Path
) -> list[Path]:
    """Write the PNG plots; return their paths. Needs matplotlib (ImportError otherwise).

    :param latencies: pooled latencies (ms) by link name, then by transport variant.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    links = list(latencies)
    columns = min(3, len(links)) or 1
    rows = math.ceil(len(links) / columns) or 1
    figure, axes = plt.subplots(
        rows, columns, figsize=(5 * columns, 3.8 * rows), squeeze=False, sharey=True
    )
    threshold = result["settings"]["slow_threshold_ms"]
    link_text = describe_link(result["settings"])
    for index, link in enumerate(links):
        axis = axes[index // columns][index % columns]
        for variant, values in sorted(latencies[link].items()):
            ordered = sorted(values)
            if not ordered:
                continue
            fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
            axis.plot(ordered, fractions, label=variant, linewidth=1.4, **_style(variant))
        axis.axvline(threshold.get(link, 80.0), color="grey", linestyle=":", linewidth=1)
        _log_axis(axis.xaxis)
        axis.set_title(link)
        axis.set_xlabel("interactive latency (ms, log scale)")
        axis.set_ylabel("fraction of responses (0-1)")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7, loc="lower right")
    for index in range(len(links), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.suptitle(
        f"Interactive response latency CDF per link and loss: {link_text} (dotted: 2 x base RTT)"
    )
    figure.tight_layout()
    path = out / "hol-cdf.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)

    main_points = [p for p in result["points"] if p["loss"] is not None]
    if main_points:
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        variants = sorted({p["variant"] for p in main_points})
        for variant in variants:
            points = sorted(
                (p for p in main_points if p["variant"] == variant), key=lambda p: p["loss"]
            )
            losses = [p["loss"] * 100 for p in points]
            # A point without a p99 (no answer measured) is a gap in its line.
            left.plot(
                losses,
                [_or_nan(p["latency_ms"]["p99"]) for p in points],
                marker="o",
                label=variant,
                **_style(variant),
            )
            right.plot(
                losses,
                [_or_nan(p["bulk_mbps_mean"]) for p in points],
                marker="o",
                label=variant,
                **_style(variant),
            )
            if variant.endswith("-bbr") and not variant.startswith("h2lowbuf"):
                # The BBR rows are the comparison that means something: their values are
                # written on the points, so each series can be read off the log axis.
                for loss, point in zip(losses, points, strict=True):
                    if point["latency_ms"]["p99"] is None:
                        continue
                    left.annotate(
                        f"{point['latency_ms']['p99']:.0f}",
                        (loss, point["latency_ms"]["p99"]),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=7,
                        color=_style(variant).get("color"),
                    )
        _log_axis(left.yaxis)
        left.set_xlabel("random loss (%, both directions)")
        left.set_ylabel("interactive p99 latency (ms, log scale)")
        left.set_title("interactive p99 (BBR rows labelled in ms)")
        right.set_xlabel("random loss (%, both directions)")
        right.set_ylabel("bulk goodput (Mbit/s)")
        right.set_title("bulk goodput (same runs)")
        # From 0 with a tenth of headroom over the highest point: the autoscaled top was
        # the highest point plus 5 % of the points' spread, and cut its marker in half.
        goodputs = [p["bulk_mbps_mean"] for p in main_points if p["bulk_mbps_mean"] is not None]
        right.set_ylim(0, 1.1 * max(goodputs, default=0.0) or 1.0)
        for axis in (left, right):
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
        figure.suptitle(f"Interactive p99 and bulk goodput vs random loss: {link_text}")
        figure.tight_layout()
        path = out / "hol-p99.png"
        figure.savefig(path, dpi=110)
        plt.close(figure)
        written.append(path)
    return written


def describe_link(settings: dict[str, Any]) -> str:
    """The emulated link of a run in words, for plot titles: rate, RTT and queue."""
    parts = []
    if settings.get("rate_bps"):
        parts.append(f"{settings['rate_bps'] / 1e6:g} Mbit/s")
    if settings.get("rtt"):
        parts.append(f"{settings['rtt'] * 1e3:g} ms RTT")
    queue = settings.get("queue") or {}
    if queue.get("queue_delay"):
        parts.append(f"{queue['queue_delay'] * 1e3:g} ms drop-tail queue")
    elif queue.get("queue_packets"):
        parts.append(f"{queue['queue_packets']}-packet drop-tail queue")
    elif queue.get("queue_bytes"):
        parts.append(f"{queue['queue_bytes'] / 1e3:g} kB drop-tail queue")
    return ", ".join(parts) or "emulated link"


def _or_nan(value: float | None) -> float:
    """``value``, or NaN (a gap in a plotted line) for a point that has none."""
    return math.nan if value is None else value


def _log_axis(axis: Any) -> None:
    """A log scale with plain millisecond labels (50, 100, 200, 500, ...)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    scale_owner = axis.axes
    if axis is scale_owner.xaxis:
        scale_owner.set_xscale("log")
    else:
        scale_owner.set_yscale("log")
    ticks = [10, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 2000, 3000, 5000, 10000]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _style(variant: str) -> dict[str, Any]:
    colours = {"quic": "tab:blue", "h2": "tab:red", "tcp": "tab:green", "h2lowbuf": "tab:purple"}
    transport, _, cc = variant.partition("-")
    return {
        "color": colours.get(transport, "black"),
        "linestyle": "-" if cc == "bbr" else "--",
    }
