"""A sidecar's h2 and tcp inbound listeners out of file descriptors (a review, 2026-12).

Under uvloop (the sidecar's loop where installed) libuv accepted every connection
waiting and closed it at once, and nothing was logged: the peer sidecar read "server
closed the connection before it was ready (it may not trust our certificate)". Now
the listener pauses (the connections wait in the backlog, as asyncio's servers do)
and logs one line naming it and the limit, under either loop.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from quicmesh.sidecar.launch import SidecarProcess, free_ports
from tests.sidecar.conftest import IDENTITY_B, addr, wait_until


def _config(workdir: Path, h2: int, tcp: int, admin: int, destination: int) -> dict[str, Any]:
    return {
        "node": {"name": "b", "identity": IDENTITY_B},
        "tls": {"ca_dir": str(workdir / "ca")},
        "admin": {"address": addr(admin)},
        "drain": {"grace_period": "1s"},
        "listeners": {
            "inbound": [
                {
                    "name": "mesh",
                    "address": addr(h2),
                    "transports": ["h2"],
                    "destinations": [addr(destination)],
                },
                {
                    "name": "mesh_tcp",
                    "address": addr(tcp),
                    "transports": ["tcp"],
                    "destinations": [addr(destination)],
                },
            ]
        },
    }


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["uvloop", "asyncio"]


@pytest.mark.parametrize("loop", _loops())
def test_an_inbound_listener_out_of_descriptors_logs_one_line_and_keeps_its_clients(
    workdir: Path, tmp_path: Path, loop: str
) -> None:
    h2, tcp, admin, destination = free_ports(4)
    b = SidecarProcess("b", _config(workdir, h2, tcp, admin, destination), tmp_path)
    b.start("--event-loop", loop)
    clients: list[socket.socket] = []
    assert b.process is not None
    pid = b.process.pid
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    try:
        b.wait_ready(30)
        # Room for 3 descriptors more than the sidecar holds (its highest one: the
        # kernel hands out the lowest free number, which must stay below the limit).
        highest = max(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (highest + 4, hard))
        for port in (h2, tcp):
            for _ in range(6):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        wait_until(
            lambda: (
                sum("cannot accept a connection" in line for line in b.stderr().splitlines()) >= 2
            ),
            timeout=10,
            what="the listeners' lines",
        )
        time.sleep(1.5)  # another pause or two of each: not logged again
        for client in clients:
            # Every one waits (in the backlog, or for its TLS handshake): none was closed.
            client.settimeout(0.05)
            with pytest.raises(TimeoutError):
                client.recv(1)
        lines = [line for line in b.stderr().splitlines() if "cannot accept" in line]
        assert len(lines) == 2, lines  # one a listener
        for kind, port in (("h2", h2), ("tcp", tcp)):
            (line,) = [line for line in lines if f"{kind} listener on 127.0.0.1:{port}:" in line]
            assert line.endswith(
                f"{kind} listener on 127.0.0.1:{port}: cannot accept a connection: Too many "
                f"open files (the process's nofile limit {highest + 4}); accepting paused "
                "for 1s, new connections wait"
            ), line
        assert "Traceback" not in b.stderr()
    finally:
        for client in clients:
            client.close()
        if b.process.poll() is None:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            b.stop()
