"""Running sidecar processes on loopback: what ``quicmesh demo`` and the tests share.

:class:`SidecarProcess` writes a configuration (a dict) as YAML, starts
``python -m quicmesh sidecar -c FILE`` as a child process, waits for ``/ready``
with a bounded deadline, reads ``/metrics`` and the access log, and stops the
process with a signal. :func:`free_port` finds a port number free on both TCP
and UDP, since an inbound listener binds the same number on both.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from .._child import child_environment, python_command
from ..errors import QuicmeshError

LOOPBACK = "127.0.0.1"


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (``bind`` to 0, ``connect``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports() -> Iterator[int]:
    """Port numbers to try, below the kernel's ephemeral range where there is room:
    a port chosen there cannot be taken, between being chosen and being bound, by
    a connection the kernel gives a local port of its own (CI's demo lost a port
    that way). Random, so that processes choosing at once rarely meet; then 0
    (the kernel's choice) if none of those is free, or if the range leaves less
    than 1000 ports below it (then that race is possible again)."""
    low, _ = _ephemeral_range()
    floor = 10000
    if low - floor >= 1000:
        generator = random.SystemRandom()
        for _ in range(64):
            yield generator.randrange(floor, low)
    for _ in range(64):
        yield 0


@contextlib.contextmanager
def held_port(host: str = LOOPBACK) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A port number bound on ``host`` for both TCP and UDP for the block: the two
    sockets (neither listening nor connected), closed at its end."""
    for candidate in _candidate_ports():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind((host, candidate))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise  # not a port taken: the host (its family, a name that does not resolve)
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                yield tcp, udp
                return
    raise QuicmeshError("no port free on both TCP and UDP")


def free_port(host: str = LOOPBACK) -> int:
    """A port number that is free on ``host`` for both TCP and UDP right now."""
    with held_port(host) as (tcp, _):
        return int(tcp.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` different port numbers, each free on ``host`` for TCP and UDP right now
    (held together while chosen: :func:`free_port` twice may give the same one)."""
    with contextlib.ExitStack() as held:
        return [int(held.enter_context(held_port(host))[0].getsockname()[1]) for _ in range(count)]


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus exposition keyed by ``(name, labels)``."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


class SidecarProcess:
    """One ``quicmesh sidecar`` child process.

    :param name: used for file names in ``workdir``.
    :param config: the configuration as a dict (written as ``<name>.yaml``).
    :param workdir: where the configuration, access log and stderr log go.
    """

    def __init__(self, name: str, config: dict[str, Any], workdir: str | Path) -> None:
        self.name = name
        self.config = config
        self.workdir = Path(workdir)
        self.config_path = self.workdir / f"{name}.yaml"
        self.stdout_path = self.workdir / f"{name}.access.log"
        self.stderr_path = self.workdir / f"{name}.stderr.log"
        self.process: subprocess.Popen[bytes] | None = None
        host, _, port = str(config["admin"]["address"]).rpartition(":")
        self.admin = (host, int(port))

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        """Write the configuration file (atomically: a reload never reads half a file)."""
        if config is not None:
            self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.config_path)

    def start(self, *extra: str) -> None:
        """Start the process (does not wait for it to be ready).

        The child imports this process's quicmesh whatever the working directory
        holds (:mod:`quicmesh._child`).
        """
        self.write_config()
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                python_command("-m", "quicmesh", "sidecar", "-c", str(self.config_path), *extra),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=child_environment(),
            )

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll ``/ready`` until it answers 200, the process exits, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise QuicmeshError(
                    f"sidecar {self.name} exited with {self.process.returncode}: "
                    f"{self.last_error()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self.request("GET", "/ready", timeout=1.0)
                if status == 200:
                    return
            time.sleep(0.05)
        raise QuicmeshError(
            f"sidecar {self.name} not ready after {timeout:g}s: {self.last_error()}"
        )

    def request(self, method: str, path: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        """One admin request; returns the status and body."""
        conn = http.client.HTTPConnection(*self.admin, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The parsed ``/metrics``."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise QuicmeshError(f"sidecar {self.name}: /metrics answered {status}")
        return parse_metrics(body.decode())

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` JSON."""
        _, body = self.request("GET", "/stats")
        return json.loads(body)  # type: ignore[no-any-return]

    def access_log(self) -> list[dict[str, Any]]:
        """The access-log lines written so far."""
        if not self.stdout_path.exists():
            return []
        lines = self.stdout_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stderr(self) -> str:
        """What the process wrote on stderr so far."""
        if not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def last_error(self) -> str:
        """The last line the process wrote on stderr (a traceback's is the exception), or
        ``"no output"``: a child's failure is reported in one line."""
        lines = [line.strip() for line in self.stderr().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a drain) and wait for the exit code; kill after ``timeout``."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9
