"""The admin endpoint: ``/metrics``, ``/stats``, ``/clusters``, ``/listeners``, ``/config_dump``,
``/server_info``, ``/certs``, ``/ready``, and the actions ``POST /drain`` (and Envoy's
``/drain_listeners``), ``/quitquitquit``, ``/logging`` and ``/migrate``.

:func:`route` is sans-IO: it maps a method and path to a :class:`Response`
using an :class:`AdminView` of the runtime, or to a :class:`Deferred` response
when the answer needs I/O first (``POST /migrate``). :class:`AdminServer` is the
asyncio side: it reads one HTTP/1.1 request per connection (with h11), awaits a
deferred response, and writes it, ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import importlib
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import h11

from .._timeouts import wait_within
from ..errors import QuicmeshError, peer_text
from ..logs import RateLimitedLog, check_log_level, quicmesh_loggers, set_log_level
from .config import format_address, ip_address_of, loopback_only
from .envoy_stats import envoy_stats, envoy_stats_text, server_state
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

logger = logging.getLogger("quicmesh.sidecar.admin")
WEB_REFUSALS = RateLimitedLog(logger)
"""Requests refused as a web page's (:func:`web_refusal`): one line per 10 s at most."""

MAX_REQUEST_BYTES = 64 * 1024
"""Largest admin request (headers and body) read."""

_RE_PARSER: Any = importlib.import_module("re._parser")
"""The ``re`` module's own parser (Python 3.11+), to look at a filter's structure."""

_REASONS = {400: "Bad Request", 413: "Content Too Large", 431: "Request Header Fields Too Large"}
"""The client errors the admin server answers by itself."""


class AdminView(Protocol):
    """What the admin endpoint asks of the runtime."""

    def metrics_text(self) -> bytes:
        """The Prometheus exposition."""

    def snapshot(self) -> dict[str, Any]:
        """Counters and live state (``/stats``)."""

    def config_dump(self) -> dict[str, Any]:
        """The running configuration."""

    def is_ready(self) -> bool:
        """Whether the sidecar takes traffic."""

    def certificates(self) -> dict[str, Any]:
        """The certificate presented and the trust bundle (``/certs``, Envoy's shape)."""

    def begin_drain(self, outbound_now: bool = False, graceful: bool | None = None) -> bool:
        """Start draining; False if a drain was already under way. ``outbound_now``: the
        outbound listeners close at once, not at the drain's end; ``graceful``: inbound
        flows are still taken for ``drain.min_duration``."""

    def quit(self) -> None:
        """Stop now: a drain whose grace period is over at once."""

    async def migrate(self) -> dict[str, Any]:
        """Move every QUIC peer connection to a new local port; what moved, as JSON.

        :raises QuicmeshError: not now (too soon after the last one): answered 429.
        """


@dataclass(frozen=True)
class Response:
    """An admin response."""

    status: int
    content_type: str
    body: bytes
    allow: str = ""
    """The methods the path takes (the ``allow`` header of a 405)."""
    retry_after: int = 0
    """Seconds to wait before asking again (the ``retry-after`` header of a 429)."""


@dataclass(frozen=True)
class Deferred:
    """A response that needs I/O first: the server awaits :attr:`respond`."""

    respond: Callable[[], Awaitable[Response]]


def _json(status: int, value: object) -> Response:
    body = json.dumps(value, indent=2, sort_keys=True, default=str).encode() + b"\n"
    return Response(status, "application/json", body)


def _text(status: int, text: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", text.encode() + b"\n")


ROUTES = {
    "/metrics": "GET",
    "/stats/prometheus": "GET",
    "/stats": "GET",
    "/clusters": "GET",
    "/listeners": "GET",
    "/config_dump": "GET",
    "/server_info": "GET",
    "/certs": "GET",
    "/ready": "GET",
    "/drain": "POST",
    "/drain_listeners": "POST",
    "/quitquitquit": "POST",
    "/logging": "POST",
    "/migrate": "POST",
}
"""Admin paths and the method each takes."""


def web_refusal(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why a request that a web page made a browser send is refused, or None.

    The admin API has no authentication (as Envoy's): whoever reaches it may drain the
    sidecar. A web page cannot reach a loopback port by itself, but it can make the
    browser of someone on the host send a request there: a cross-site form or script,
    or the page's own site resolved to 127.0.0.1 (DNS rebinding). Browsers put an
    ``Origin`` on every such POST (same-origin ones too) and tools (curl, probes,
    Prometheus) send none, so a request with an ``Origin`` is refused (403). A rebound
    page can still read what a GET returns (``/config_dump`` holds no secrets)."""
    for name, _ in headers:
        if name.lower() == b"origin":
            return "requests from web pages (with an Origin header) are refused"
    return None


MAX_FILTER_LENGTH = 256
"""Longest ``filter=`` pattern taken."""


def stats_filter(query: str) -> re.Pattern[str] | Response | None:
    """The ``filter=`` of a stats query, compiled (None: every stat), or the 400 naming
    what is wrong with it. As Envoy's ``/stats?filter=``: a regular expression searched
    for in each stat's name (here Python's ``re``, not RE2)."""
    patterns = parse_qs(query, keep_blank_values=True).get("filter")
    if not patterns:
        return None
    if len(patterns) > 1:
        return _text(400, "stats filter given more than once")
    pattern = patterns[0]
    shown = peer_text(pattern, 64)
    if len(pattern) > MAX_FILTER_LENGTH:
        return _text(400, f"stats filter {shown!r} is longer than {MAX_FILTER_LENGTH} characters")
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return _text(400, f"stats filter {shown!r} is not a regular expression: {exc}")
    problem = _backtracking_problem(pattern)
    if problem:
        return _text(400, f"stats filter {shown!r} {problem}")
    return compiled


def _backtracking_problem(pattern: str) -> str:
    """Why ``pattern`` could take Python's backtracking ``re`` very long, or "". Envoy's
    RE2 runs in linear time; ``re`` runs on the event loop, and a 27-character
    ``(.*)(.*)(.*)(.*)(.*)!`` took 14 s on one series (a review): so at most one
    repetition that can take more than one character, with no alternation or repetition
    inside it, and no backreference (searched over a few hundred characters, at worst
    quadratic)."""
    repeats = 0

    def walk(items: Any, inside_repeat: bool) -> str:
        nonlocal repeats
        for op, arg in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                _, most, body = arg
                if most > 1:
                    if inside_repeat:
                        return "nests one repetition in another"
                    repeats += 1
                if why := walk(body, inside_repeat or most > 1):
                    return why
            elif name == "BRANCH":
                if inside_repeat:
                    return "repeats an alternation"
                for alternative in arg[1]:
                    if why := walk(alternative, inside_repeat):
                        return why
            elif name == "SUBPATTERN":
                if why := walk(arg[3], inside_repeat):
                    return why
            elif name in ("ASSERT", "ASSERT_NOT"):
                if why := walk(arg[1], inside_repeat):
                    return why
            elif name.startswith("GROUPREF"):
                return "has a backreference"
        return ""

    why = walk(_RE_PARSER.parse(pattern), False)
    if not why and repeats > 1:
        why = "has more than one repetition (*, + or {m,n})"
    return f"{why} (Python's backtracking re could hold the sidecar's event loop)" if why else ""


def filter_exposition(text: bytes, pattern: re.Pattern[str]) -> bytes:
    """The Prometheus text with only the samples whose series (name and labels,
    ``quicmesh_cluster_flows_total{cluster="reviews",...}``) ``pattern`` finds, and the
    ``# HELP``/``# TYPE`` lines of the metrics they belong to."""
    out: list[str] = []
    comments: list[str] = []  # the current metric's, held until a sample of it is kept
    after_samples = False
    for line in text.decode().split("\n"):  # (not splitlines: \x1c-\x1e, \x85 in labels)
        if not line:
            continue
        if line.startswith("#"):
            if after_samples:  # the next metric's
                comments, after_samples = [], False
            comments.append(line)
            continue
        after_samples = True
        # name{labels} value [timestamp]: a label value may hold spaces and braces, the
        # value and timestamp never do.
        series = line[: line.rindex("}") + 1] if "{" in line else line.split(" ", 1)[0]
        if pattern.search(series):
            out.extend(comments)
            comments = []
            out.append(line)
    return "".join(f"{line}\n" for line in out).encode()


def filter_snapshot(value: object, pattern: re.Pattern[str], name: str = "") -> object:
    """The ``/stats`` JSON with only the values whose dotted name
    (``clusters.reviews.streams_total``; list items by index; an empty list or object is
    a value) ``pattern`` finds, in their place; a branch with nothing left goes.
    :data:`_NOTHING` if nothing is left."""
    if isinstance(value, dict) and value:
        kept = {}
        for key, item in value.items():
            left = filter_snapshot(item, pattern, f"{name}.{key}" if name else str(key))
            if left is not _NOTHING:
                kept[key] = left
        return kept if kept else _NOTHING
    if isinstance(value, list) and value:
        items = [filter_snapshot(item, pattern, f"{name}.{i}") for i, item in enumerate(value)]
        kept_items = [item for item in items if item is not _NOTHING]
        return kept_items if kept_items else _NOTHING
    return value if pattern.search(name) else _NOTHING


_NOTHING = object()
"""What :func:`filter_snapshot` leaves of a branch none of whose stats match."""


def _stats(view: AdminView, query: str, prometheus: bool, envoy_text: bool = False) -> Response:
    pattern = stats_filter(query)
    if isinstance(pattern, Response):
        return pattern
    if envoy_text:
        stats = envoy_stats(view.snapshot())
        if pattern is not None:
            stats = {name: value for name, value in stats.items() if pattern.search(name)}
        return Response(200, "text/plain; charset=utf-8", envoy_stats_text(stats).encode())
    if prometheus:
        text = view.metrics_text()
        return Response(
            200, METRICS_CONTENT_TYPE, text if pattern is None else filter_exposition(text, pattern)
        )
    snapshot: object = view.snapshot()
    if pattern is not None:
        snapshot = filter_snapshot(snapshot, pattern)
        if snapshot is _NOTHING:
            snapshot = {}
    return _json(200, snapshot)


def route(view: AdminView, method: str, target: str) -> Response | Deferred:
    """The response to ``method target`` (query strings are ignored but for the stats'
    ``format`` and ``filter``; an absolute-form target, ``http://host/ready`` as a client
    set to use a proxy sends it, is its path, as RFC 9112 3.2.2 asks of a server)."""
    if target.lower().startswith(("http://", "https://")):
        split = urlsplit(target)
        path, query = split.path or "/", split.query
    else:
        path, _, query = target.partition("?")
    if path == "/":
        return _text(200, "\n".join(f"{m} {p}" for p, m in ROUTES.items()))
    expected = ROUTES.get(path)
    if expected is None:
        return _text(404, f"no admin path {path}; try {', '.join(ROUTES)}")
    allowed = {expected, "HEAD"} if expected == "GET" else {expected}
    if method not in allowed:
        return replace(_text(405, f"{path} takes {expected}"), allow=", ".join(sorted(allowed)))
    if path in ("/metrics", "/stats/prometheus"):  # (Envoy's path, which Istio scrapes)
        return _stats(view, query, prometheus=True)
    if path == "/stats":
        # Envoy's /stats?format=prometheus is its /stats/prometheus. Its default is the
        # text, quicmesh's its JSON, but for Envoy's usedonly (Istio's agent sends it).
        if "usedonly" in parse_qs(query, keep_blank_values=True):
            chosen = _format(path, query, "text", "json", "prometheus")
        else:
            chosen = _format(path, query, "json", "prometheus", "text")
        if isinstance(chosen, Response):
            return chosen
        prometheus, envoy_text = chosen == "prometheus", chosen == "text"
        return _stats(view, query, prometheus=prometheus, envoy_text=envoy_text)
    if path in ("/clusters", "/listeners"):
        chosen = _format(path, query, "text", "json")
        if isinstance(chosen, Response):
            return chosen
        snapshot = view.snapshot()
        if path == "/clusters":
            clusters = snapshot.get("clusters", {})
            if chosen == "json":
                return _json(200, cluster_statuses(clusters))
            return _text(200, "\n".join(cluster_lines(clusters)))
        listeners = snapshot.get("listeners", {})
        if chosen == "json":
            return _json(200, listener_statuses(listeners))
        return _text(200, "\n".join(f"{n}::{v.get('address', '')}" for n, v in listeners.items()))
    if path == "/config_dump":
        return _json(200, view.config_dump())
    if path == "/server_info":
        return _json(200, server_info(view.snapshot()))
    if path == "/ready":
        if view.is_ready():
            return _text(200, "ready")
        reason = getattr(view, "not_ready_reason", lambda: "")()
        return _text(503, f"not ready: {reason}" if reason else "not ready")
    if path == "/certs":
        return _json(200, view.certificates())
    if path == "/migrate":
        return Deferred(lambda: _migrated(view))
    if path == "/drain_listeners":
        return _drain_listeners(view, query)
    if path == "/quitquitquit":
        view.quit()
        return _text(200, "OK")
    if path == "/logging":
        return _logging(query)
    started = view.begin_drain()
    return _text(202, "draining" if started else "already draining")


DRAIN_FLAGS = ("inboundonly", "graceful", "skip_exit")
"""The flags ``/drain_listeners`` takes (Envoy's)."""


def _drain_listeners(view: AdminView, query: str) -> Response:
    """Envoy's ``POST /drain_listeners[?inboundonly][&graceful][&skip_exit]``, as Istio's
    agent sends it before it stops the proxy: the sidecar's drain (``/drain``: peers told
    to go away, then ``drain.grace_period`` and ``drain.min_duration``), which ends with
    the process's exit (``skip_exit`` is taken, for the agent's sake, and changes nothing:
    the agent's later ``/quitquitquit`` finds the sidecar gone or ends it). Without
    ``inboundonly`` the outbound listeners also stop taking connections at once; with
    ``graceful`` the inbound listeners take new flows until ``drain.min_duration`` is
    over, else they refuse them at once. 200 ``OK``, as Envoy."""
    flags = parse_qs(query, keep_blank_values=True)
    unknown = sorted(set(flags) - set(DRAIN_FLAGS))
    if unknown:
        shown = peer_text(",".join(unknown), 64)
        return _text(400, f"drain_listeners: unknown flag {shown!r}: {', '.join(DRAIN_FLAGS)}")
    view.begin_drain(outbound_now="inboundonly" not in flags, graceful="graceful" in flags)
    return _text(200, "OK")


def _logging(query: str) -> Response:
    """Envoy's ``POST /logging``: ``?level=L`` sets every quicmesh logger to L,
    ``?<logger>=L`` or ``?paths=<logger>:L,<logger>:L`` some of them; then (or with no
    query) the loggers and their levels, ``active loggers:`` and a line each. 400 names
    an unknown level or logger, and then nothing was changed."""
    changes: list[tuple[str, str | None]] = []  # (level, logger or None: all)
    try:
        for name, values in parse_qs(query, keep_blank_values=True).items():
            for level in values:
                if name == "paths":  # Envoy's ?paths=logger:level,logger:level
                    for pair in level.split(","):
                        logger_name, sep, path_level = pair.rpartition(":")
                        if not sep or not logger_name:
                            raise ValueError(f"paths: {pair!r} is not logger:level")
                        changes.append((path_level, logger_name))
                else:
                    changes.append((level, None if name == "level" else name))
        for level, which in changes:  # all checked before any is made
            check_log_level(level, which)
    except ValueError as exc:
        return _text(400, peer_text(f"logging: {exc}", 512))
    for level, which in changes:
        set_log_level(level, which)
    lines = [f"  {name}: {level}" for name, level in quicmesh_loggers().items()]
    return _text(200, "\n".join(["active loggers:", *lines]))


def server_info(snapshot: dict[str, Any]) -> dict[str, Any]:
    """``/server_info`` in the shape of Envoy's: the version, the state (``LIVE`` once
    ready, ``DRAINING`` once draining, else ``INITIALIZING``: starting, or not ready,
    ``/ready`` saying why), the uptime as a protobuf Duration's JSON (``"12s"``; there are
    no hot restarts, so both epochs are one), and the node (its SPIFFE ID in the node's
    ``metadata``), each field one of ``envoy.admin.v3.ServerInfo``'s."""
    from .. import __version__

    state = server_state(snapshot)
    uptime = f"{int(snapshot.get('uptime', 0))}s"
    return {
        "version": f"quicmesh/{__version__}",
        "state": state,
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        # (The identity in the node's metadata: Envoy's Node has no other field for it,
        # and a client parsing with Envoy's protos refused an "identity" field.)
        "node": {
            "id": snapshot.get("node", ""),
            "metadata": {"identity": snapshot.get("identity", "")},
        },
    }


def _format(path: str, query: str, default: str, *others: str) -> str | Response:
    """The ``format=`` a path was asked for (``default`` or one of ``others``), or the 400."""
    formats = parse_qs(query).get("format", [default])
    if len(formats) == 1 and formats[0] in (default, *others):
        return formats[0]
    shown = peer_text(",".join(formats), 64)
    return _text(400, f"{path} format {shown!r}: {default} (the default) or {' or '.join(others)}")


_HEALTH_FLAGS = {
    "healthy": "healthy",
    "unhealthy": "/failed_active_hc",
    "ejected": "/failed_outlier_check",
    "removed": "/pending_dynamic_removal",
}
"""Envoy's ``health_flags`` for each endpoint health of ``/stats``."""


def cluster_lines(clusters: dict[str, Any]) -> list[str]:
    """``/clusters`` as Envoy's text: ``cluster::endpoint::stat::value`` per endpoint
    (``cx_active``, ``cx_total``, ``cx_connect_fail``, ``rq_active``, ``rq_total``,
    ``health_flags``, plus ``ejections``), after the cluster's own lines."""
    lines = []
    for name, cluster in clusters.items():
        lines.append(f"{name}::observability_name::{name}")
        lines.append(f"{name}::transport::{cluster.get('transport', '')}")
        lines.append(f"{name}::panic::{str(bool(cluster.get('panic'))).lower()}")
        for address, endpoint in cluster.get("endpoints", {}).items():
            health = str(endpoint.get("health", ""))
            for stat, value in [
                *_endpoint_stats(endpoint),
                ("health_flags", _HEALTH_FLAGS.get(health, health)),
            ]:
                lines.append(f"{name}::{address}::{stat}::{value}")
    return lines


_GAUGES = {"cx_active", "rq_active"}
"""The endpoint stats that are gauges (Envoy's ``SimpleMetric`` type; the rest count)."""

_HEALTH_FIELDS = {
    "unhealthy": "failed_active_health_check",
    "ejected": "failed_outlier_check",
    "removed": "pending_dynamic_removal",
}
"""The ``HostHealthStatus`` flag set for each endpoint health but healthy."""


def cluster_statuses(clusters: dict[str, Any]) -> dict[str, Any]:
    """``/clusters?format=json`` as Envoy's ``envoy.admin.v3.Clusters`` in protobuf's
    JSON mapping (what ``istioctl proxy-config endpoint`` parses): per cluster its
    ``host_statuses``, each endpoint's address, the stats of the text form as
    ``SimpleMetric`` (64-bit values as strings, gauges typed) and its health."""
    statuses = []
    for name, cluster in clusters.items():
        hosts = []
        for address, endpoint in cluster.get("endpoints", {}).items():
            stats = [
                {"name": stat, "value": str(value)} | ({"type": "GAUGE"} if stat in _GAUGES else {})
                for stat, value in _endpoint_stats(endpoint)
            ]
            health: dict[str, Any] = {"eds_health_status": "HEALTHY"}
            flag = _HEALTH_FIELDS.get(str(endpoint.get("health", "")))
            if flag is not None:
                health[flag] = True
            host = {"address": _address_json(address), "stats": stats, "health_status": health}
            hostname = _socket_address(address)["address"]
            if ip_address_of(hostname) is None:
                host["hostname"] = hostname
            hosts.append(host)
        statuses.append({"name": name, "observability_name": name, "host_statuses": hosts})
    return {"cluster_statuses": statuses}


def _endpoint_stats(endpoint: dict[str, Any]) -> list[tuple[str, Any]]:
    """An endpoint's stats by Envoy's names, in the order of ``/clusters``'s text."""
    return [
        ("cx_active", len(endpoint.get("connections", []))),
        ("cx_total", endpoint.get("connections_total", 0)),
        ("cx_connect_fail", endpoint.get("connect_failures", 0)),
        ("rq_active", endpoint.get("streams_active", 0)),
        ("rq_total", endpoint.get("streams_total", 0)),
        ("ejections", endpoint.get("ejections", 0)),
    ]


def listener_statuses(listeners: dict[str, Any]) -> dict[str, Any]:
    """``/listeners?format=json`` in the shape of Envoy's ``listener_statuses``."""
    return {
        "listener_statuses": [
            {"name": name, "local_address": _address_json(str(listener.get("address", "")))}
            for name, listener in listeners.items()
        ]
    }


def _address_json(address: str) -> dict[str, Any]:
    """``host:port`` as an ``envoy.config.core.v3.Address`` in protobuf's JSON mapping."""
    return {"socket_address": _socket_address(address)}


def _socket_address(address: str) -> dict[str, Any]:
    host, _, port = address.rpartition(":")
    socket_address: dict[str, Any] = {"address": host.strip("[]")}
    if port.isdigit():
        socket_address["port_value"] = int(port)
    return socket_address


async def _migrated(view: AdminView) -> Response:
    try:
        return _json(200, await view.migrate())
    except QuicmeshError as exc:  # MigrationRefused: too soon after the last one
        wait = math.ceil(getattr(exc, "retry_after", 1.0))
        return replace(_text(429, str(exc)), retry_after=max(1, wait))


class AdminServer:
    """Serves :func:`route` over HTTP/1.1 on the admin address."""

    def __init__(self, view: AdminView, address: tuple[str, int]) -> None:
        self.view = view
        self.address = address
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Bind the admin address.

        :raises OSError: the address cannot be bound.
        """
        self._server = await asyncio.start_server(
            self._handle, self.address[0], self.address[1], reuse_address=True
        )
        if not loopback_only(self.address[0]):
            # As Envoy's admin: no authentication, so say where it can be reached from.
            logger.warning(
                "admin on %s is reachable from other hosts, and its POST actions (/drain, "
                "/drain_listeners, /quitquitquit, /logging, /migrate) need no authentication "
                "(Istio keeps it on 127.0.0.1)",
                format_address(self.address),
            )

    async def close(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await wait_within(self._serve(reader, writer), 10.0)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            logger.debug("admin connection failed: %s", exc)
        except asyncio.CancelledError:
            # The loop is shutting down with this connection open (a lingering close,
            # say): ended here, as asyncio's start_server callback of Python 3.11 calls
            # a cancelled handler task's exception(), which logs "Exception in callback".
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_BYTES)
        request: h11.Request | None = None
        received = 0
        head = b""  # the request's bytes up to the end of its head (bounded)
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await reader.read(65536)
                    received += len(data)
                    if b"\r\n\r\n" not in head:
                        head = (head + data)[: MAX_REQUEST_BYTES + 4]
                    if received > MAX_REQUEST_BYTES:
                        # Its head (431), or a body after a head that fit (413).
                        status = 413 if b"\r\n\r\n" in head else 431
                        raise h11.RemoteProtocolError("request too large", status)
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as exc:
            # The client's fault: said in one answer (h11 cannot frame one any more).
            status = exc.error_status_hint if exc.error_status_hint in _REASONS else 400
            body = f"bad request: {_protocol_error_text(exc)}\n".encode()
            reason = _REASONS[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            await _lingering_close(reader, writer)
            return
        if request is None:
            return
        method = request.method.decode("ascii", "replace")
        target = request.target.decode("ascii", "replace")
        refusal = web_refusal(request.headers)
        try:
            if refusal is not None:
                WEB_REFUSALS.log(
                    logging.WARNING,
                    "web",
                    "admin: refused %s %s: %s",
                    peer_text(method, 16),
                    peer_text(target, 128),
                    refusal,
                )
                response: Response | Deferred = _text(403, refusal)
            elif request.http_version not in (b"1.0", b"1.1"):
                # h11 takes any HTTP/d.d (RFC 9110 15.6.6).
                version = request.http_version.decode("ascii", "replace")
                response = _text(505, f"HTTP/{version} is not supported: HTTP/1.1")
            else:
                response = route(self.view, method, target)
            if isinstance(response, Deferred):
                response = await response.respond()
        except Exception:
            logger.exception("admin %s %s failed", method, target)
            response = _text(500, "internal error")
        headers = [
            ("content-type", response.content_type),
            ("content-length", str(len(response.body))),
            ("connection", "close"),
        ]
        if response.allow:
            headers.append(("allow", response.allow))
        if response.retry_after:
            headers.append(("retry-after", str(response.retry_after)))
        answer = h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )
        writer.write(conn.send(answer) or b"")
        if method != "HEAD":
            writer.write(conn.send(h11.Data(data=response.body)) or b"")
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()


def _protocol_error_text(error: h11.RemoteProtocolError) -> str:
    """h11's words for a malformed request, fit to send back: it quotes the client's
    bytes as a Python ``bytearray(b'...')`` repr; the quoted bytes alone, bounded."""
    text = re.sub(r"bytearray\((b(['\"]).*\2)\)", r"\1", str(error))
    return peer_text(text, 200)


LINGER_SECONDS = 2.0
"""How long a refused request's unread bytes are read and dropped before the close."""


async def _lingering_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close after an answer sent before the request was read whole (431, 413), and
    drop what the client still sends for a while: closing a socket with unread bytes
    resets the connection, and the reset can reach the client before it read the answer
    (RFC 9112 9.6, "lingering close", as nginx does)."""
    if writer.can_write_eof():
        writer.write_eof()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(LINGER_SECONDS):
            while await reader.read(65536):
                pass


def _reason(status: int) -> bytes:
    """The status line's reason phrase (h11 sends none unless given one)."""
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
