"""The ADS client: one gRPC stream to a control plane driving a running sidecar.

:class:`AdsClient` keeps one ``StreamAggregatedResources`` stream open
(``grpc.aio``, plaintext HTTP/2). For each response it asks
:class:`~quicmesh.xds.state.AdsState` for the update, maps the resources
(:func:`~quicmesh.xds.mapping.map_resources`), applies the result with the
sidecar's own reload path (:meth:`~quicmesh.sidecar.runtime.Sidecar.apply_config`:
live flows finish on the clusters they started on), then ACKs; a mapping error
or an apply that fails is NACKed with the one-line reason as ``error_detail``,
and the running configuration stays. SDS secrets go to the sidecar's
certificates (:meth:`~quicmesh.sidecar.certs.CertificateSource.deliver`): an
identity is taken by every transport or by none (NACKed, the one in use kept),
and once delivered it is the control plane's (the dev CA no longer renews it).

When the stream breaks the client reconnects with exponential backoff
(:data:`BACKOFF_INITIAL` doubling to :data:`BACKOFF_MAX`, with jitter); the
last good configuration keeps serving meanwhile. HTTP/2 keepalive pings
(:data:`KEEPALIVE_TIME`, :data:`KEEPALIVE_TIMEOUT`) notice a control plane that went
silent without closing the connection (a partition, a hung host), as Envoy's
``connection_keepalive`` on the xDS cluster does: an idle ADS stream otherwise
waits on a dead connection for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from ..errors import QuicmeshError
from ..sidecar.config import XdsConfig, format_address, wide_outbound_listener
from ..tls import Identity, TrustBundle
from ..transport.stream import check_seconds
from .mapping import (
    MappedConfig,
    MappingError,
    check_ports,
    data_source_bytes,
    map_resources,
    secrets_by_kind,
    with_static,
)
from .resources import CLUSTER_TYPE, LISTENER_TYPE, SECRET_TYPE, SHORT_NAMES
from .state import SECRET_NAMES, AdsState, ProtocolError, Update, make_node

if TYPE_CHECKING:
    from ..sidecar.runtime import Sidecar

logger = logging.getLogger("quicmesh.xds")

BACKOFF_INITIAL = 0.25
"""Seconds before the first reconnect attempt."""

BACKOFF_MAX = 10.0
"""Longest wait between reconnect attempts."""

KEEPALIVE_TIME = 300.0
"""Seconds between HTTP/2 pings on the ADS connection: gRPC servers' default policy
refuses pings more often than every 5 minutes on an idle stream (GOAWAY
``too_many_pings``, and the stream ends: a new channel starts again at this time, so
it would every few minutes for ever), as Istio keeps its xDS connection alive with
TCP keepalive every 300 s. A control plane gone silent is noticed within about
5 minutes and :data:`KEEPALIVE_TIMEOUT`."""

KEEPALIVE_TIMEOUT = 10.0
"""Seconds a ping may go unanswered before the connection counts as dead (and the
client reconnects)."""

MAX_RECEIVE_MESSAGE_LENGTH = -1
"""No limit on a response's size (gRPC's default is 4 MiB), as Envoy has none on its
xDS stream: a response over a limit is never applied, and the sidecar would reconnect
for ever to be sent it again. A control plane is trusted as much as the config file."""


@contextlib.contextmanager
def _named(where: str) -> Iterator[None]:
    """Turn a certificate or key's error into a :class:`MappingError` naming ``where``
    (the Secret and its field)."""
    try:
        yield
    except QuicmeshError as exc:
        raise MappingError(f"{where}: {exc}") from None


class AdsClient:
    """Drives ``sidecar`` from the ADS server in ``config``.

    :param sidecar: a started sidecar; its listeners and clusters are replaced by
        what the control plane sends.
    :param config: the server address and what to report as ``node``.
    :param rng: randomness for the backoff jitter.
    :param keepalive_time: seconds between HTTP/2 pings (:data:`KEEPALIVE_TIME`).
    :param keepalive_timeout: seconds a ping may go unanswered (:data:`KEEPALIVE_TIMEOUT`).
    """

    def __init__(
        self,
        sidecar: Sidecar,
        config: XdsConfig,
        *,
        rng: random.Random | None = None,
        keepalive_time: float = KEEPALIVE_TIME,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
    ) -> None:
        check_seconds("keepalive_time", keepalive_time)
        check_seconds("keepalive_timeout", keepalive_timeout)
        self.sidecar = sidecar
        self.config = config
        self._channel_options = (
            ("grpc.keepalive_time_ms", round(keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", round(keepalive_timeout * 1000)),
            # (grpc 1.85's client waits for a ping's ack this long, not keepalive_timeout:
            # without it a silent connection is noticed a minute after a ping.)
            ("grpc.http2.ping_timeout_ms", round(keepalive_timeout * 1000)),
            # An ADS stream is idle between updates: ping on it all the same, and with
            # no call (between reconnects) too.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_LENGTH),
        )
        """gRPC channel options: keepalive, and no limit on a response's size."""
        base = sidecar.config
        self.static = MappedConfig(base.outbound, base.inbound, base.clusters)
        """The listeners and clusters of the file (a bootstrap's ``static_resources``):
        they stay, as Envoy's static resources, beside what LDS and CDS give."""
        self.state = AdsState(
            make_node(
                sidecar.config.node.name,
                config.cluster,
                config.metadata,
                sidecar.config.node.identity,
            )
        )
        self.synced = asyncio.Event()
        """Set once LDS and CDS were both applied and no cluster is warming, or
        ``config.initial_fetch_timeout`` after LDS and CDS if one still is (the
        sidecar is then ready)."""
        self.counters = {"acks": 0, "nacks": 0, "streams": 0, "stream_failures": 0}
        self.updates: dict[str, dict[str, int]] = {}
        """Per discovery service (``LDS``, ``CDS``, ...) the responses applied
        (``success``) and refused (``rejected``): Envoy's ``update_success`` and
        ``update_rejected``."""
        self.connected = False
        self.last_error = ""
        self.warming: tuple[str, ...] = ()
        self._refused_secrets: dict[str, Any] = {}
        """SDS secrets (by name) of refused responses, tried again with later ones."""
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._initial_fetch_timer: asyncio.TimerHandle | None = None
        self._first_fetch_timer: asyncio.TimerHandle | None = None
        self._fetched_types: set[str] = set()
        """LDS and CDS types answered at least once (applied or NACKed: as Envoy's
        initialization, a rejected first update still counts as fetched)."""
        self._answered = False
        """The current stream delivered a response (the backoff starts again)."""

    def start(self) -> None:
        """Start the stream (and its reconnects) in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._arm_first_fetch_timer()

    async def close(self) -> None:
        """Close the stream; the sidecar keeps its configuration."""
        self._cancel_fetch_timers()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def snapshot(self) -> dict[str, Any]:
        """The client's state for ``/stats``."""
        return {
            "server": format_address(self.config.address),
            "connected": self.connected,
            "synced": self.synced.is_set(),
            "versions": {
                SHORT_NAMES[t]: self.state.version(t) for t in sorted(SHORT_NAMES, key=str)
            },
            "warming": list(self.warming),
            "last_error": self.last_error,
            **self.counters,
            "updates": {kind: dict(counts) for kind, counts in sorted(self.updates.items())},
        }

    # -- the stream -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = BACKOFF_INITIAL
        target = format_address(self.config.address)
        failing_since: float | None = None  # (attempts that failed in a row, and why)
        attempts, last_reason = 0, ""
        while True:
            started = time.monotonic()
            self._answered = False
            try:
                async with grpc.aio.insecure_channel(
                    target, options=self._channel_options
                ) as channel:
                    await self._stream(channel, attempts, failing_since)
                reason = "the control plane closed the stream"
            except grpc.aio.AioRpcError as exc:
                reason = f"{exc.code().name}: {exc.details()}"
                if exc.code() is grpc.StatusCode.INTERNAL and "SendMessage" in (
                    exc.debug_error_string() or ""
                ):
                    # grpc's own status for a message written to a call the server had
                    # just finished (its status, OK or not, is lost): our ACK came late.
                    reason = "the control plane closed the stream before our ACK"
            except (OSError, QuicmeshError) as exc:
                reason = str(exc)
            except Exception as exc:  # a bug here must not end the stream for good
                logger.exception("ADS stream to %s failed", target)
                reason = f"{type(exc).__name__}: {exc}"
            self.connected = False
            self.counters["stream_failures"] += 1
            if self._answered or time.monotonic() - started > 30:
                # As Envoy: a stream that carried a response was a working one.
                backoff = BACKOFF_INITIAL
                failing_since, attempts, last_reason = None, 0, ""
            delay = backoff * (0.5 + self._rng.random())
            attempts += 1
            # One warning when the stream ends or its failure changes, not one for every
            # attempt while the control plane is away (one a few seconds, for hours).
            level = logging.WARNING if reason != last_reason else logging.DEBUG
            logger.log(
                level,
                "ADS stream to %s ended (%s): keeping the running configuration, "
                "reconnecting in %.2fs",
                target,
                reason,
                delay,
            )
            if failing_since is None:
                failing_since = started
            last_reason = reason
            self.last_error = reason
            await asyncio.sleep(delay)
            backoff = min(BACKOFF_MAX, backoff * 2)

    async def _stream(
        self, channel: grpc.aio.Channel, failed: int, failing_since: float | None
    ) -> None:
        """One ADS stream, until it ends; ``failed``: the attempts that failed in a row
        before it, since ``failing_since`` (said when it opens)."""
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        call = stub.StreamAggregatedResources()
        self.counters["streams"] += 1
        await call.wait_for_connection()  # (raises AioRpcError when it cannot)
        self.connected = True
        again = ""
        if failed > 1 and failing_since is not None:
            again = f" again after {failed} attempts in {time.monotonic() - failing_since:.0f}s"
        logger.info("ADS stream to %s open%s", format_address(self.config.address), again)
        writable = True

        async def send(request: Any) -> None:
            # A server that finished the call right after its last responses refuses our
            # requests (ACKs): what it sent before is still read and applied, and the
            # next stream states the versions accepted.
            nonlocal writable
            if writable:
                try:
                    await call.write(request)
                except asyncio.InvalidStateError:
                    writable = False

        for request in self.state.requests_for_new_stream():
            await send(request)
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._answered = True
            for request in await self._handle(response):
                await send(request)

    async def _handle(self, response: Any) -> list[Any]:
        kind = SHORT_NAMES.get(response.type_url, response.type_url)
        if not self.state.subscribed(response.type_url):
            # As Envoy: a type nobody subscribed to is ignored, not NACKed.
            logger.warning(
                "ignored a response of type %s (version %s): not subscribed to",
                kind,
                response.version_info,
            )
            return []
        try:
            update = self.state.on_response(response)
        except ProtocolError as exc:
            self._fetched(response.type_url)
            return self._nack_response(response, kind, str(exc))
        try:
            await self._apply(update)
        except Exception as exc:
            if not isinstance(exc, (MappingError, QuicmeshError)):
                # A bug of ours, not the resource's: NACKed all the same, so that the
                # stream and the running configuration carry on.
                logger.exception("applying %s version %s failed", kind, update.version)
                exc = MappingError(f"cannot apply it here ({type(exc).__name__}: {exc})")
            self._count(kind, ack=False)
            self.last_error = f"{kind} version {update.version}: {exc}"
            logger.error("NACK %s version %s: %s", kind, update.version, exc)
            self._fetched(update.type_url)
            return self.state.reject(update, str(exc))
        self._count(kind, ack=True)
        logger.info(
            "ACK %s version %s (%d resources%s)",
            kind,
            update.version,
            len(response.resources),
            f", removed {', '.join(update.removed)}" if update.removed else "",
        )
        return self.state.accept(update)

    def _count(self, kind: str, *, ack: bool) -> None:
        self.counters["acks" if ack else "nacks"] += 1
        counts = self.updates.setdefault(kind, {"success": 0, "rejected": 0})
        counts["success" if ack else "rejected"] += 1

    def _nack_response(self, response: Any, kind: str, error: str) -> list[Any]:
        self._count(kind, ack=False)
        self.last_error = f"{kind} version {response.version_info}: {error}"
        logger.error("NACK %s version %s: %s", kind, response.version_info, error)
        return self.state.reject_response(response, error)

    # -- applying -------------------------------------------------------------

    async def _apply(self, update: Update) -> None:
        """Map and apply an update; MappingError or QuicmeshError to NACK it."""
        if update.type_url == SECRET_TYPE:
            self._apply_secrets(update)
            return
        base = self.sidecar.config
        serving = {cluster.name: cluster for cluster in base.clusters}
        dynamic = map_resources(update.resources, serving, self.static.clusters)
        mapped = with_static(self.static, dynamic)
        check_ports(mapped, base.admin.address[1])
        new = replace(
            base, outbound=mapped.outbound, inbound=mapped.inbound, clusters=mapped.clusters
        )
        await self.sidecar.apply_config(new)
        serving_before = {(listener.name, listener.address) for listener in base.outbound}
        for listener in new.outbound:
            wide = wide_outbound_listener(listener.address)
            if wide is not None and (listener.name, listener.address) not in serving_before:
                logger.warning("Listener %r from the control plane: %s", listener.name, wide)
        self.warming = mapped.warming
        self._fetched(update.type_url)

    def _fetched(self, type_url: str) -> None:
        """A response of ``type_url`` was applied or NACKed: once LDS and CDS both were,
        the first sync is over (the warming clusters' endpoints aside)."""
        self._fetched_types.add(type_url)
        if {LISTENER_TYPE, CLUSTER_TYPE} <= self._fetched_types:
            self._note_initial_sync()

    def _arm_first_fetch_timer(self) -> None:
        """As Envoy's ``initial_fetch_timeout`` for LDS and CDS: a control plane that
        answers neither within it (from the client's start, reachable or not) leaves the
        sidecar ready with what it has (its static resources), not unready for ever."""
        timeout = self.config.initial_fetch_timeout
        if self.synced.is_set() or self._first_fetch_timer is not None or timeout is None:
            return

        def timed_out() -> None:
            missing = {LISTENER_TYPE, CLUSTER_TYPE} - self._fetched_types
            if self.synced.is_set() or not missing:
                return
            logger.warning(
                "no %s from the control plane after %.0f s: ready without them",
                " and ".join(SHORT_NAMES[t] for t in sorted(missing)),
                timeout,
            )
            self._fetched_types |= missing
            self._note_initial_sync()

        self._first_fetch_timer = asyncio.get_running_loop().call_later(timeout, timed_out)

    def _note_initial_sync(self) -> None:
        # As Envoy's init manager: not ready while a cluster of the first sync still
        # waits for its endpoints (its listener is not bound yet), for at most
        # config.initial_fetch_timeout.
        if self.synced.is_set():
            return
        if not self.warming:
            self._cancel_fetch_timers()
            self.synced.set()
        elif self._initial_fetch_timer is None and self.config.initial_fetch_timeout is not None:
            self._initial_fetch_timer = asyncio.get_running_loop().call_later(
                self.config.initial_fetch_timeout, self._initial_fetch_timed_out
            )

    def _cancel_fetch_timers(self) -> None:
        for timer in (self._initial_fetch_timer, self._first_fetch_timer):
            if timer is not None:
                timer.cancel()

    def _initial_fetch_timed_out(self) -> None:
        if not self.synced.is_set():
            logger.warning(
                "no endpoints for %s after %.0f s: ready without them",
                ", ".join(self.warming),
                self.config.initial_fetch_timeout or 0,
            )
            self.synced.set()

    def _apply_secrets(self, update: Update) -> None:
        """Check the secrets and hand them to the sidecar's certificates, all or nothing:
        an identity that a transport in use cannot load raises (a NACK) with the one in
        use kept, so the same secret pushed again is refused again, never taken as
        already applied.

        A secret refused only for want of its partner (a CA change sent as two responses,
        the new ``ROOTCA`` first, which the certificate in use fails, then the new
        ``default``, which the bundle in use fails) is kept aside: a later response is
        tried with it too, and applied with it if the two agree (state-of-the-world SDS
        may send only the secret that changed)."""
        secrets = update.resources.secrets
        accepted = self.state.resources.secrets
        received = {name for name, secret in secrets.items() if accepted.get(name) is not secret}
        try:
            self._deliver_secrets(secrets)
        except MappingError:
            partners = {n: m for n, m in self._refused_secrets.items() if n not in received}
            self._refused_secrets.update({name: secrets[name] for name in received})
            if not partners:
                raise
            try:
                self._deliver_secrets({**secrets, **partners})
            except MappingError:
                pass
            else:
                logger.info(
                    "SDS: %s applied with %s of a response refused before",
                    ", ".join(sorted(received)),
                    ", ".join(sorted(partners)),
                )
                secrets.update(partners)  # accepted with this version
                self._refused_secrets.clear()
                return
            raise
        for name in received:
            self._refused_secrets.pop(name, None)

    def _deliver_secrets(self, secrets: dict[str, Any]) -> None:
        """:meth:`_apply_secrets`'s check and hand-over of one set of secrets.

        :raises MappingError: they cannot be used (nothing changed).
        """
        certificate, validation = secrets_by_kind(secrets, SECRET_NAMES)
        if certificate is None and validation is None:
            return
        source = self.sidecar.certs
        identity: Identity | None = None
        trust: TrustBundle | None = None
        if validation is not None:
            where = f"Secret {validation.name!r}: validation_context.trusted_ca"
            pem = data_source_bytes(validation.validation_context.trusted_ca, where)
            with _named(where):
                trust = TrustBundle.from_pem(pem)
        if certificate is not None:
            where = f"Secret {certificate.name!r}: tls_certificate"
            chain = data_source_bytes(
                certificate.tls_certificate.certificate_chain, f"{where}.certificate_chain"
            )
            key = data_source_bytes(certificate.tls_certificate.private_key, f"{where}.private_key")
            with _named(where):
                identity = Identity.from_pem(chain, key)
        try:
            # (The same as in use: nothing rotates, but it is the control plane's now.)
            source.deliver(identity, trust)
        except QuicmeshError as exc:
            raise MappingError(f"SDS: {exc}") from None
