"""Fixtures shared by every test.

Tests marked ``netns`` (link emulator, HOL/congestion/ttfb benchmarks) build real
namespaces and TUN devices. Without root they are skipped with the reason, unless
``QUICMESH_REQUIRE_NETNS=1`` (set by CI), in which case they fail: CI must not pass
by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from quicmesh.netem.system import missing_privileges
from quicmesh.sidecar.launch import LOOPBACK
from quicmesh.transport.native import HANDSHAKE_FAILURE_LOG as NATIVE_HANDSHAKE_FAILURE_LOG
from quicmesh.transport.quic.connection import HANDSHAKE_FAILURE_LOG, PEER_VIOLATION_LOG

# Tests signal the commands they start as a terminal would (Ctrl-C, a hang-up) and expect
# what that does; the commands leave a signal they were started with ignored alone (a
# shell's background job, nohup), so a test run started that way hands its children the
# defaults back.
with contextlib.suppress(ValueError):  # (not the main thread: nothing to hand on)
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _fresh_rate_limited_logs() -> None:
    """Each test sees the first line of each kind of the process-wide rate-limited logs
    (a test that looks for one is not silenced by another test's line before it)."""
    for log in (NATIVE_HANDSHAKE_FAILURE_LOG, HANDSHAKE_FAILURE_LOG, PEER_VIOLATION_LOG):
        log._next.clear()
        log._suppressed.clear()


@pytest.fixture(autouse=True)
def _netns_privileges(request: pytest.FixtureRequest) -> None:
    if request.node.get_closest_marker("netns") is None:
        return
    reason = missing_privileges()
    if reason is None:
        return
    if os.environ.get("QUICMESH_REQUIRE_NETNS") == "1":
        pytest.fail(f"QUICMESH_REQUIRE_NETNS=1 but the link emulator {reason}")
    pytest.skip(f"link emulator {reason}; set QUICMESH_REQUIRE_NETNS=1 to make this fail")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        try:
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256


@pytest.fixture(scope="session")
def echo_port() -> Iterator[int]:
    """A TCP echo app on loopback (echoes until EOF, then half-closes)."""
    server = _EchoServer((LOOPBACK, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
