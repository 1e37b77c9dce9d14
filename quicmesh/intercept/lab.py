"""Two network namespaces joined by a veth pair, with sidecars and a backend: for tests and bench.

Layout (addresses exist only inside the two namespaces)::

    [app namespace]                                  [service namespace]
    client, sidecar A (gid 1337)                     sidecar B (gid 1337), backends
    veth 10.79.0.1/24 fd79::1/64  <--- veth --->     veth 10.79.0.2/24, 10.79.0.3/24, fd79::2/64
    default routes via the service side              HTTP [::]:9080, echo 127.0.0.1:7007,
                                                     echo 0.0.0.0:7008 and :7009

The app namespace has default routes so that a service VIP nobody owns
(10.96.0.10) can be dialled at all; the capture rules redirect it before it
leaves. Sidecars run as child processes (``ip netns exec``) with group ID
:data:`~quicmesh.intercept.rules.DEFAULT_PROXY_ID`, which the rules exclude. The
backends are threads of this process whose listening sockets live in the
service namespace. Namespace names carry the process ID, and stale ones of dead
processes are deleted on the next set-up. Needs root.
"""

from __future__ import annotations

import contextlib
import http.server
import itertools
import os
import re
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

from .._signals import signals_deferred
from ..netem import system
from ..netem.system import NetemError
from ..sidecar.launch import SidecarProcess
from . import nft
from .rules import DEFAULT_PROXY_ID

APP_ADDRESS = "10.79.0.1"
SERVICE_ADDRESS = "10.79.0.2"
OTHER_ADDRESS = "10.79.0.3"
"""A second address of the service namespace that no cluster knows (for passthrough)."""
APP_ADDRESS6 = "fd79::1"
SERVICE_ADDRESS6 = "fd79::2"
HTTP_PORT = 9080
ECHO_PORT = 7007
"""Echo on the service namespace's loopback: reachable only through sidecar B."""
PLAIN_ECHO_PORT = 7008
"""Echo on every address of the service namespace."""
EXCLUDED_ECHO_PORT = 7009
"""Echo on every address, on a port the tests exclude from capture."""
HTTP_BODY = b"hello from the backend behind sidecar B\n"
INTERFACE = "veth0"
_PREFIX = "qmicpt"
_PATTERN = re.compile(rf"{_PREFIX}-(\d+)-\d+-(app|svc)")
_counter = itertools.count()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)


class _Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(HTTP_BODY)))
        self.end_headers()
        self.wfile.write(HTTP_BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Threading(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


class _Http6(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True


class NamespacedSidecar(SidecarProcess):
    """A :class:`SidecarProcess` run inside a namespace with the proxy group ID (or, with
    ``proxy_group=False``, as the caller's group: a sidecar the rules do not exempt)."""

    def __init__(
        self,
        name: str,
        config: dict[str, Any],
        workdir: str | Path,
        namespace: str,
        *,
        proxy_group: bool = True,
    ) -> None:
        super().__init__(name, config, workdir)
        self.namespace = namespace
        self.proxy_group = proxy_group

    def start(self, *extra: str) -> None:
        """Start ``quicmesh sidecar`` in the namespace, as group :data:`DEFAULT_PROXY_ID`
        unless ``proxy_group`` is False."""
        self.write_config()
        argv = [sys.executable, "-m", "quicmesh", "sidecar", "-c", str(self.config_path), *extra]
        group: dict[str, Any] = {}
        if self.proxy_group:
            group = {"group": DEFAULT_PROXY_ID, "extra_groups": []}
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                system.namespace_argv(self.namespace, argv),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                **group,
            )

    def _request(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        """One admin request, made from inside the namespace (``request`` and
        ``wait_ready`` both come here)."""
        with system.in_namespace(self.namespace):
            return super()._request(method, path, timeout)


class InterceptLab:
    """The two namespaces, their veth pair and the backends; sidecars are added by the caller.

    Use as a context manager; everything is torn down on exit.
    """

    def __init__(self) -> None:
        tag = f"{_PREFIX}-{os.getpid()}-{next(_counter)}"
        self.app_ns = f"{tag}-app"
        self.service_ns = f"{tag}-svc"
        self.sidecars: list[NamespacedSidecar] = []
        self._namespaces: list[str] = []
        self._servers: list[socketserver.BaseServer] = []

    def __enter__(self) -> InterceptLab:
        reason = system.missing_privileges() or nft.missing_privileges()
        if reason is not None:
            raise NetemError(f"interception lab {reason}")
        cleanup_stale_namespaces()
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def _set_up(self) -> None:
        for name in (self.app_ns, self.service_ns):
            with signals_deferred():  # made and recorded, or neither (see netem's Link)
                system.ip("netns", "add", name)
                self._namespaces.append(name)
            system.ip("link", "set", "dev", "lo", "up", namespace=name)
        system.ip(
            "link", "add", INTERFACE, "netns", self.app_ns,
            "type", "veth", "peer", "name", INTERFACE, "netns", self.service_ns,
        )  # fmt: skip
        app, svc = self.app_ns, self.service_ns
        system.ip("addr", "add", f"{APP_ADDRESS}/24", "dev", INTERFACE, namespace=app)
        system.ip(
            "-6", "addr", "add", f"{APP_ADDRESS6}/64", "dev", INTERFACE, "nodad", namespace=app
        )
        for address in (SERVICE_ADDRESS, OTHER_ADDRESS):
            system.ip("addr", "add", f"{address}/24", "dev", INTERFACE, namespace=svc)
        system.ip(
            "-6", "addr", "add", f"{SERVICE_ADDRESS6}/64", "dev", INTERFACE, "nodad", namespace=svc
        )
        for name in (app, svc):
            system.ip("link", "set", "dev", INTERFACE, "up", namespace=name)
        system.ip("route", "add", "default", "via", SERVICE_ADDRESS, namespace=app)
        system.ip("-6", "route", "add", "default", "via", SERVICE_ADDRESS6, namespace=app)
        with system.in_namespace(svc):
            self._serve(_Http6(("::", HTTP_PORT), _Http))  # dual-stack: IPv4 too
            self._serve(_Threading(("127.0.0.1", ECHO_PORT), _Echo))
            self._serve(_Threading(("0.0.0.0", PLAIN_ECHO_PORT), _Echo))
            self._serve(_Threading(("0.0.0.0", EXCLUDED_ECHO_PORT), _Echo))

    def _serve(self, server: socketserver.BaseServer) -> None:
        self._servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    def sidecar(
        self,
        name: str,
        config: dict[str, Any],
        workdir: Path,
        namespace: str,
        *,
        proxy_group: bool = True,
    ) -> NamespacedSidecar:
        """Start a sidecar in ``namespace`` and wait until it is ready."""
        sidecar = NamespacedSidecar(name, config, workdir, namespace, proxy_group=proxy_group)
        self.sidecars.append(sidecar)
        sidecar.start()
        sidecar.wait_ready()
        return sidecar

    def intercept(self, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``quicmesh intercept ARGS --netns NAMESPACE`` (the console entry, as a user does)."""
        return subprocess.run(
            [sys.executable, "-m", "quicmesh", "intercept", *args, "--netns", namespace],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    @contextlib.contextmanager
    def entered(self, namespace: str) -> Iterator[None]:
        """Switch the calling thread into ``namespace``: sockets made in the block stay there."""
        with system.in_namespace(namespace):
            yield

    def close(self) -> None:
        """Stop the sidecars and backends, delete the namespaces (and the rules with them).

        Interrupted (Ctrl-C while a sidecar drains), it still kills what runs and deletes
        the namespaces before the interrupt goes on: none is left behind."""
        try:
            for sidecar in self.sidecars:
                with contextlib.suppress(Exception):
                    sidecar.stop(timeout=5.0)
            for server in self._servers:
                server.shutdown()
                server.server_close()
        finally:
            for sidecar in self.sidecars:
                if sidecar.process is not None and sidecar.process.poll() is None:
                    sidecar.process.kill()
                    sidecar.process.wait()
            self.sidecars.clear()
            self._servers.clear()
            with signals_deferred():  # (a SystemExit half-way left the rest behind)
                for name in reversed(self._namespaces):
                    with contextlib.suppress(NetemError):
                        system.delete_namespace(name)
                self._namespaces.clear()


def cleanup_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by processes that no longer exist; returns their names."""
    deleted = []
    for name in system.list_namespaces():
        match = _PATTERN.fullmatch(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        with contextlib.suppress(NetemError):
            system.delete_namespace(name)
            deleted.append(name)
    return deleted
