"""``quicmesh bench xds``: how long a sidecar takes to apply a large xDS push, and its memory.

What one run does: start the test ADS server (in this process) and one
``quicmesh sidecar --xds`` child process with no listeners; push empty LDS and
CDS so it is ready and read its resident memory (the baseline); then push
``--clusters`` EDS clusters (quic, round robin) and ``--endpoints`` endpoints
spread over them, and time from the CDS push until the server has the
sidecar's ACK of the endpoints (CDS arrives and is applied, the clusters warm,
the EDS subscription grows, the server pushes EDS as soon as it sees it, EDS
is applied through the sidecar's reload path); read the
memory again; then move every endpoint (a new EDS version) and time that ACK.
The sidecar's ``/stats`` must then list every cluster with its endpoints.

Cases: the full size and a tenth of it, interleaved, ``--repeat`` times each;
the table prints medians and the full/tenth ratios (linear scaling gives 10).
``--quick``: 100 clusters and 1,000 endpoints (and a tenth), one repeat.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._signals import scratch_directory
from ..errors import QuicmeshError
from ..outputs import output_file
from ..sidecar.launch import LOOPBACK, SidecarProcess, free_port, terminate_as_exit
from ..tls import DevCA
from ..xds.resources import CLUSTER_TYPE, ENDPOINT_TYPE, LISTENER_TYPE
from ..xds.testing import AdsServer
from ..xds.testing import documents as docs
from . import OneLineParser


@dataclass
class Run:
    """One measured push."""

    clusters: int
    endpoints: int
    apply_seconds: float
    update_seconds: float
    rss_baseline_mib: float
    rss_after_mib: float

    @property
    def rss_delta_mib(self) -> float:
        """Resident memory the resources added."""
        return self.rss_after_mib - self.rss_baseline_mib


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _resources(clusters: int, endpoints: int, shift: int) -> tuple[list[Any], list[Any]]:
    cluster_messages = [
        docs.cluster(docs.cluster_doc(f"c{i:05d}", "quic")) for i in range(clusters)
    ]
    per_cluster, extra = divmod(endpoints, clusters)
    assignments = []
    port = 20000 + shift
    for i in range(clusters):
        count = per_cluster + (1 if i < extra else 0)
        entries: list[tuple[str, int, str, int | None]] = []
        for _ in range(count):
            host = f"10.{(port >> 16) & 255}.{(port >> 8) & 255}.{port & 255}"
            entries.append((host, 15008, "HEALTHY", None))
            port += 1
        assignments.append(docs.assignment(docs.cla_doc(f"c{i:05d}", entries)))
    return cluster_messages, assignments


class XdsBenchError(QuicmeshError):
    """The sidecar refused a push or did not answer it: the run has no number."""


def _acked(server: AdsServer, type_url: str, version: str, timeout: float) -> None:
    """Wait until the sidecar ACKs ``version`` of ``type_url``; stop at a NACK of that
    type (it will not ACK the version it refused: the wait was 600 s before)."""

    def done(requests: list[Any]) -> bool:
        return any(
            r.type_url == type_url and (r.is_nack or r.version_info == version) for r in requests
        )

    try:
        server.wait_for(done, timeout)
    except TimeoutError:
        raise XdsBenchError(
            f"the sidecar did not ACK version {version} of {type_url} within {timeout:g} s"
        ) from None
    _refused(server)


def _refused(server: AdsServer) -> None:
    """Raise if the sidecar NACKed anything."""
    nacks = [r for r in server.requests if r.is_nack]
    if nacks:
        raise XdsBenchError(f"the sidecar NACKed: {nacks[0].error_detail}")


def measure(clusters: int, endpoints: int, workdir: Path) -> Run:
    """One fresh sidecar, one push of ``clusters`` and ``endpoints``, one update."""
    server = AdsServer()
    server.start()
    config = {
        "node": {"name": "bench", "identity": "spiffe://mesh.local/ns/bench/sa/bench"},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": f"{LOOPBACK}:{free_port()}"},
        "access_log": {"path": None},
        "xds": {"address": server.address},
    }
    sidecar = SidecarProcess("bench", config, workdir)
    try:
        server.set_resources(LISTENER_TYPE, [], "0")
        server.set_resources(CLUSTER_TYPE, [], "0")
        server.set_resources(ENDPOINT_TYPE, [], "0")
        sidecar.start("--log-level", "warning")
        sidecar.wait_ready(60)
        assert sidecar.process is not None
        pid = sidecar.process.pid
        baseline = _rss_mib(pid)
        cluster_messages, assignments = _resources(clusters, endpoints, 0)
        started = time.perf_counter()
        server.set_resources(CLUSTER_TYPE, cluster_messages, "1")
        # The clusters warm: the sidecar asks for their endpoints.
        server.wait_for(
            lambda requests: any(
                (r.type_url == ENDPOINT_TYPE and len(r.resource_names) == clusters) or r.is_nack
                for r in requests
            ),
            600,
        )
        _refused(server)  # a NACKed CDS push: no EDS request is coming
        server.set_resources(ENDPOINT_TYPE, assignments, "1")
        _acked(server, ENDPOINT_TYPE, "1", 600)
        applied = time.perf_counter() - started
        after = _rss_mib(pid)
        _, moved = _resources(clusters, endpoints, endpoints)
        started = time.perf_counter()
        server.set_resources(ENDPOINT_TYPE, moved, "2")
        _acked(server, ENDPOINT_TYPE, "2", 600)
        updated = time.perf_counter() - started
        stats = sidecar.stats()
        seen = stats["clusters"]
        total = sum(
            1 for c in seen.values() for e in c["endpoints"].values() if e["health"] != "removed"
        )
        if len(seen) != clusters or total != endpoints:
            raise RuntimeError(
                f"the sidecar holds {len(seen)} clusters and {total} endpoints, "
                f"expected {clusters} and {endpoints}"
            )
        return Run(clusters, endpoints, applied, updated, baseline, after)
    finally:
        sidecar.stop(60)
        server.stop(0)


def main(argv: list[str]) -> int:
    """Run the benchmark; print the table (and ``--json``)."""
    parser = OneLineParser(prog="quicmesh bench xds", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--clusters", type=int, help="clusters of the larger case (default 1000; --quick 100)"
    )
    parser.add_argument(
        "--endpoints", type=int, help="endpoints of the larger case (default 10000; --quick 1000)"
    )
    parser.add_argument("--repeat", type=int, help="runs of both cases (default 3; --quick 1)")
    parser.add_argument(
        "--quick", action="store_true", help="100 clusters, 1,000 endpoints, once (unless given)"
    )
    parser.add_argument("--json", type=output_file, help="write the runs to this file")
    args = parser.parse_args(argv)
    # --quick gives defaults; a value given explicitly stays.
    for option, default, quick_default in (
        ("clusters", 1000, 100),
        ("endpoints", 10000, 1000),
        ("repeat", 3, 1),
    ):
        if getattr(args, option) is None:
            setattr(args, option, quick_default if args.quick else default)
    if args.clusters < 10 or args.endpoints < args.clusters or args.repeat < 1:
        print(
            "quicmesh bench xds: need --clusters >= 10, --endpoints >= --clusters, --repeat >= 1",
            file=sys.stderr,
        )
        return 2
    cases = [(args.clusters // 10, args.endpoints // 10), (args.clusters, args.endpoints)]
    try:
        # ``kill PID`` (SIGTERM) becomes SystemExit: measure() stops its sidecar and
        # the temporary directory goes (and the sidecar dies with this process anyway).
        with terminate_as_exit():
            runs = _measure_all(args, cases)
    except (QuicmeshError, TimeoutError, RuntimeError) as exc:
        print(f"quicmesh bench xds: {exc}", file=sys.stderr)
        return 1
    _report(args, cases, runs)
    return 0


def _measure_all(args: Any, cases: list[tuple[int, int]]) -> list[Run]:
    runs: list[Run] = []
    with scratch_directory("quicmesh-bench-xds-") as workdir:
        DevCA().save(workdir / "ca")
        for repeat in range(args.repeat):
            for clusters, endpoints in cases:
                run = measure(clusters, endpoints, workdir)
                runs.append(run)
                print(
                    f"run {repeat + 1}: {clusters} clusters / {endpoints} endpoints: "
                    f"applied in {run.apply_seconds:.2f}s, endpoints moved in "
                    f"{run.update_seconds:.2f}s, RSS {run.rss_baseline_mib:.1f} -> "
                    f"{run.rss_after_mib:.1f} MiB",
                    flush=True,
                )
    return runs


def _report(args: Any, cases: list[tuple[int, int]], runs: list[Run]) -> None:
    print()
    print(
        "| clusters | endpoints | apply (median s) | move endpoints (s) | RSS idle (MiB) "
        "| RSS after (MiB) | added (MiB) |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    medians: dict[tuple[int, int], dict[str, float]] = {}
    for clusters, endpoints in cases:
        mine = [r for r in runs if (r.clusters, r.endpoints) == (clusters, endpoints)]
        row = {
            "apply": statistics.median(r.apply_seconds for r in mine),
            "update": statistics.median(r.update_seconds for r in mine),
            "idle": statistics.median(r.rss_baseline_mib for r in mine),
            "after": statistics.median(r.rss_after_mib for r in mine),
            "added": statistics.median(r.rss_delta_mib for r in mine),
        }
        medians[(clusters, endpoints)] = row
        print(
            f"| {clusters} | {endpoints} | {row['apply']:.2f} | {row['update']:.2f} | "
            f"{row['idle']:.1f} | {row['after']:.1f} | {row['added']:.1f} |"
        )
    small, full = (medians[c] for c in cases)
    print()
    print(
        f"full / tenth: apply x{full['apply'] / small['apply']:.1f}, "
        f"move x{full['update'] / small['update']:.1f}, "
        f"memory added x{full['added'] / max(small['added'], 0.1):.1f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=2))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
