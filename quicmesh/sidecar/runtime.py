"""The running sidecar: builds listeners and clusters from a config, reloads, drains.

:class:`Sidecar` is the asyncio glue around the sans-IO pieces. It owns the
admin server, the outbound and inbound listeners, the clusters and their
counters, the access log and the live-flow tracker. :meth:`Sidecar.reload`
applies a new configuration without dropping live flows (a flow holds on to the
cluster and pool it started on); :meth:`Sidecar.drain` stops taking flows, lets
live ones finish within the grace period and closes peer connections cleanly
(:meth:`~quicmesh.PeerConnection.aclose`: the last bytes are acknowledged first).
:meth:`Sidecar.migrate` moves every QUIC peer connection to a new local port.

Transports are built by name through one per-sidecar
:func:`~quicmesh.transport.base.transport_registry`, whose QUIC transports share
one session-ticket cache (kept in ``tls.ticket_cache`` if given), so
``early_data`` clusters resume with 0-RTT, after a restart too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, QuicmeshError
from ..tls import Identity, TrustBundle
from ..transport.base import (
    BUILT_IN_DEFAULT_ENGINE,
    DEFAULT_ENGINE_VARIABLE,
    Transport,
    default_quic_engine,
    transport_registry,
)
from .accesslog import AccessLog, FlowRecord, Outcome
from .admin import AdminServer
from .capture import (
    INBOUND_NAME,
    OUTBOUND_NAME,
    CaptureInboundListener,
    CaptureOutboundListener,
    DestinationCounts,
)
from .certs import CertificateSource, check_transports_take_identity, load_identity
from .cluster import Cluster
from .config import (
    INBOUND_LIVE_KEYS,
    Address,
    ClusterConfig,
    SidecarConfig,
    check_files,
    format_address,
    load_endpoints_document,
    merge_services,
)
from .destinations import ClusterDestinations, DestinationTable, DuplicateService
from .flows import ACK_TIMEOUT, FlowTracker
from .inbound import InboundListener, check_overload_limits
from .metrics import Metrics
from .outbound import OutboundListener
from .stats import ClusterStats, ListenerStats, retire_counters, sum_counters

if TYPE_CHECKING:
    from ..transport.base import TransportRegistry

logger = logging.getLogger("quicmesh.sidecar")

WATCH_INTERVAL = 0.5
"""Seconds between checks of watched endpoints files."""


def cluster_transport(
    config: ClusterConfig,
    identity: Identity,
    trust: TrustBundle,
    registry: TransportRegistry | None = None,
) -> Transport:
    """The client-side transport a cluster dials with.

    :param registry: builds it; the sidecar's, whose QUIC transports share one
        ticket cache (by default a new one).
    """
    registry = registry if registry is not None else transport_registry()
    # Every transport notices a dead or hung peer (h2: PINGs and the kernel's TCP
    # keepalive; tcp: the TCP keepalive alone). Until 2026-12-07 only QUIC did: an auto
    # cluster that fell back to HTTP/2 kept a SIGSTOPped peer's flows open for ever.
    liveness: dict[str, Any] = {
        "keepalive_interval": config.liveness.keepalive_interval,
        "dead_after": config.liveness.dead_after,
    }
    options: dict[str, Any] = liveness
    if config.transport in ("quic", "auto"):
        quic = {
            "congestion_control": config.congestion_control,
            "max_datagram_size": config.max_datagram_size,
            "ack_eliciting_threshold": config.ack_eliciting_threshold,
            # The QUIC max_idle_timeout; the transport keeps a live connection open by
            # PINGing at least every half of it, whatever keepalive_interval says.
            "idle_timeout": config.idle_timeout,
            "max_probe_timeouts": config.liveness.max_probe_timeouts,
            "engine": config.engine,
            **liveness,
        }
        options = quic
        if config.transport == "auto":
            options = {
                "quic": quic,
                "h2": liveness,
                "fallback_delay": config.fallback.delay,
                "broken_backoff": config.fallback.broken_backoff,
                "max_broken_backoff": config.fallback.max_broken_backoff,
            }
    return registry.build(config.transport, identity=identity, trust=trust, options=options)


MIGRATE_INTERVAL = 1.0
"""The least time between two migrations asked for (``POST /migrate``)."""


class MigrationRefused(QuicmeshError):
    """``POST /migrate`` came too soon after the last one (429, with ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds until a migration is taken again."""


class Sidecar:
    """One sidecar process's state.

    :param config: the validated configuration.
    :param config_path: the file to re-read on :meth:`reload` (None: reload is refused).
    """

    def __init__(self, config: SidecarConfig, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        check_files(config)
        self.identity, self.trust = load_identity(config)
        self.certs = CertificateSource(config, self.identity, self.trust)
        self.transports = transport_registry(ticket_cache=config.tls.ticket_cache)
        """Builds the clusters' and listeners' transports; its QUIC ones share a ticket cache."""
        self.ticket_cache = self.transports.ticket_cache
        self.flows = FlowTracker()
        self.access_log = AccessLog(config.access_log.path, config.access_log.format)
        self.metrics = Metrics(self.snapshot)
        self.admin = AdminServer(self, config.admin.address)
        self.clusters: dict[str, Cluster] = {}
        self.cluster_stats: dict[str, ClusterStats] = {}
        self.listener_stats: dict[str, ListenerStats] = {}
        self.outbound: dict[str, OutboundListener] = {}
        self.inbound: dict[str, InboundListener] = {}
        self.capture: list[CaptureOutboundListener | CaptureInboundListener] = []
        self.destination_counts = DestinationCounts()
        self.services: dict[str, tuple[Address, ...]] = {
            c.name: c.all_services for c in config.clusters
        }
        self.destinations = DestinationTable((), "registry_only")
        self.retired_clusters: list[Cluster] = []
        self._preparing: dict[str, Cluster] = {}
        """Clusters a reload under way made and has not put in place yet."""
        self._removed_handshake_failures: Counter[str] = Counter()
        """(client) Handshake failures counted by clusters since removed."""
        self.reloads = {"ok": 0, "rejected": 0}
        self.ready = False
        self.draining = False
        self.started_at = time.time()
        self._drained = asyncio.Event()
        self._grace_ended = asyncio.Event()
        self._cut_by = ""
        """Set once a drain's grace period ended with flows live: the reason prefix of
        the flows it cut."""
        self._quitting = False
        """(:meth:`quit`) The drain closes peer connections without waiting for acks."""
        self._last_migration = float("-inf")
        self._drain_task: asyncio.Task[None] | None = None
        self._graceful_period: asyncio.TimerHandle | None = None
        """(a graceful drain, until ``drain.min_duration``) Inbound flows are still taken."""
        self._outbound_with_inbound = False
        """(``/drain_listeners`` without ``inboundonly``, graceful) The outbound listeners
        stop when the graceful period ends."""
        self._watch_task: asyncio.Task[None] | None = None
        self._watched: dict[str, tuple[int, int, int] | None] = {}
        self._reload_lock = asyncio.Lock()
        self._background_tasks: set[asyncio.Task[None]] = set()
        self.xds: Any = None
        """The :class:`~quicmesh.xds.client.AdsClient` driving this sidecar, if any."""

    # -- start -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind the admin address and every listener, start the clusters.

        :raises QuicmeshError: an address cannot be bound; everything opened is closed.
        """
        # A key a transport in use cannot load fails here in one line naming its type
        # and size, not later as the engine's own words at the first listen.
        await check_transports_take_identity(self.config, self.identity, self.trust)
        try:
            await self._bind(self.admin.start, "admin", self.config.admin.address)
            for cluster_config in self.config.clusters:
                self.clusters[cluster_config.name] = self._make_cluster(cluster_config)
            for out in self.config.outbound:
                await self._start_outbound(out)
            for index, inb in enumerate(self.config.inbound):
                # At the start only (not on a reload: a busy sidecar may be over a limit).
                check_overload_limits(self.config, index)
                await self._start_inbound(inb)
            self.destinations = self._destination_table(self.config, self.services)
            await self._start_capture()
        except BaseException:
            await self._close_everything()
            raise
        self._remember_watched()
        self._watch_task = asyncio.get_running_loop().create_task(self._watch_loop())
        self.certs.start(self._rotate_identity)
        problem = self.certs.problem()
        if problem is not None:
            logger.error("not ready: %s", problem)
        self.ready = True
        for warning in self.config.warnings:
            logger.warning("%s", warning)
        waiting = self.not_ready_reason()
        intercept = self.config.intercept
        captured = (
            f", intercept outbound *:{intercept.outbound_port}"
            + (f" inbound *:{intercept.inbound_port}" if intercept.inbound_port else "")
            if intercept is not None
            else ""
        )
        logger.info(
            "sidecar %s (%s) %s: admin %s, outbound %s, inbound %s%s",
            self.config.node.name,
            self.identity.spiffe_id,
            f"started, not ready ({waiting})" if waiting else "ready",
            format_address(self.config.admin.address),
            ", ".join(f"{o.name}={format_address(o.address)}" for o in self.config.outbound) or "-",
            ", ".join(
                f"{i.name}={format_address(i.address)}/{'+'.join(i.transports)}"
                for i in self.config.inbound
            )
            or "-",
            captured,
        )
        _log_default_engine()

    async def _bind(self, start: Any, what: str, address: tuple[str, int]) -> None:
        try:
            await start()
        except OSError as exc:
            raise QuicmeshError(
                f"cannot listen on {format_address(address)} ({what}): {exc.strerror or exc}"
            ) from None

    def _make_cluster(self, config: ClusterConfig) -> Cluster:
        stats = self.cluster_stats.setdefault(config.name, ClusterStats(config.name))
        cluster = Cluster(
            config,
            cluster_transport(config, self.identity, self.trust, self.transports),
            stats,
            headers={"x-quicmesh-source": self.config.node.name},
        )
        cluster.start()
        return cluster

    def _listener_stats(self, name: str, kind: str) -> ListenerStats:
        stats = self.listener_stats.get(name)
        if stats is None or stats.kind != kind:
            stats = self.listener_stats[name] = ListenerStats(name, kind)
        return stats

    async def _start_outbound(self, config: Any) -> None:
        listener = OutboundListener(
            config,
            self.clusters.__getitem__,
            self._listener_stats(config.name, "outbound"),
            self.flows,
            self._log_flow,
        )
        await self._bind(listener.start, f"listener {config.name}", config.address)
        self.outbound[config.name] = listener

    def own_addresses(self) -> list[Address]:
        """The addresses this sidecar listens on (admin, listeners, capture ports): never a
        destination of an inbound flow (:func:`.policy.refusal_reason`)."""
        config = self.config
        own = [config.admin.address]
        own += [listener.address for listener in config.outbound]
        own += [listener.address for listener in config.inbound]
        if config.intercept is not None:
            own += [("127.0.0.1", config.intercept.outbound_port)]
            if config.intercept.inbound_port is not None:
                own += [("127.0.0.1", config.intercept.inbound_port)]
        return own

    async def _start_inbound(self, config: Any) -> None:
        listener = InboundListener(
            config,
            self.identity,
            self.trust,
            self._listener_stats(config.name, "inbound"),
            self.flows,
            self._log_flow,
            self.own_addresses,
        )
        try:
            await listener.start()
        except QuicmeshError as exc:
            raise QuicmeshError(f"listener {config.name}: {exc}") from None
        self.inbound[config.name] = listener

    async def _start_capture(self) -> None:
        intercept = self.config.intercept
        if intercept is None:
            return
        outbound = CaptureOutboundListener(
            intercept,
            lambda: self.destinations,
            self.clusters.__getitem__,
            self._listener_stats(OUTBOUND_NAME, "intercept_outbound"),
            self.flows,
            self.destination_counts,
            self._log_flow,
        )
        self.capture.append(outbound)
        await self._bind(outbound.start, OUTBOUND_NAME, ("*", intercept.outbound_port))
        if intercept.inbound_port is not None:
            inbound = CaptureInboundListener(
                intercept,
                self._listener_stats(INBOUND_NAME, "intercept_inbound"),
                self.flows,
                self.destination_counts,
                self._log_flow,
            )
            self.capture.append(inbound)
            await self._bind(inbound.start, INBOUND_NAME, ("*", intercept.inbound_port))

    def _destination_table(
        self, config: SidecarConfig, services: dict[str, tuple[Address, ...]]
    ) -> DestinationTable:
        """The table for ``config``'s clusters with the live endpoints and ``services``.

        :raises DuplicateService: two clusters list one service address.
        """
        policy = config.intercept.outbound_policy if config.intercept else "registry_only"
        entries = []
        for cluster_config in config.clusters:
            live = self.clusters.get(cluster_config.name)
            endpoints = tuple(live.endpoints) if live is not None else cluster_config.endpoints
            entries.append(
                ClusterDestinations(
                    cluster_config.name,
                    services.get(cluster_config.name, ()),
                    endpoints,
                    # Its tunnel is a TCP connection to the endpoint (auto: its h2 fallback).
                    tunnels_over_tcp=cluster_config.transport != "quic",
                )
            )
        return DestinationTable(entries, policy)

    def _log_flow(self, record: FlowRecord) -> None:
        if self._cut_by and record.outcome is Outcome.RESET:
            # A flow still live when the drain's grace period ended: its reason says so
            # (what follows is how its connection or socket went).
            record.reason = f"{self._cut_by}: {record.reason}" if record.reason else self._cut_by
        self.access_log.write(record)

    def reopen_logs(self) -> None:
        """Reopen the access log file by its path (SIGUSR1, as Envoy: after logrotate)."""
        self.access_log.reopen()

    # -- reload ----------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the configuration file, check it and the files it names (as the start
        does: :func:`.config.check_files`) and apply it; keep the running one if invalid.

        Returns True if the new configuration was applied.
        """
        if self.config_path is None:
            return False
        if self.draining:
            # Said, not silent: an operator's SIGHUP (a config tool's) would otherwise
            # look applied (reloads_total does not count it).
            logger.warning("%s: reload ignored: the sidecar is draining", self.config_path)
            return False
        if self.config.xds is not None:
            # Not a rejected file: there is nothing a reload may apply (docs/xds.md).
            logger.warning(
                "%s: listeners and clusters come from xDS: a reload applies nothing "
                "(restart to change the file)",
                self.config_path,
            )
            return False
        async with self._reload_lock:
            # The versions of the files as the load reads them, or older (read again).
            read = {path: _file_version(path) for path in self._watched}
            try:
                from ..xds.bootstrap import load_any_config

                new = load_any_config(self.config_path)
                if new.xds is not None:
                    raise ConfigError(
                        f"{self.config_path}: an xds section cannot be added on reload: restart"
                    )
                for fixed in (("node", "tls"), ("admin", "access_log")):
                    changed = [k for k in fixed if getattr(new, k) != getattr(self.config, k)]
                    if changed:
                        raise ConfigError(
                            f"{self.config_path}: {' and '.join(changed)} changed: "
                            f"{' and '.join(fixed)} cannot change on reload: restart"
                        )
                if _capture_ports(new) != _capture_ports(self.config):
                    raise ConfigError(
                        f"{self.config_path}: intercept ports cannot change on reload: restart"
                    )
                # The files the sidecar writes or reads a key from, as at start and with
                # --check (a stateless_reset_key naming the configuration file itself, or
                # the CA's private key, was applied on reload). Its warning (a reset key
                # others may read) is the transport's to log as it loads the key.
                check_files(new)
                await self._apply(new, read)
                for warning in new.warnings:
                    logger.warning("%s", warning)
            except QuicmeshError as exc:
                self.reloads["rejected"] += 1
                logger.error("reload rejected, keeping the running configuration: %s", exc)
                return False
        self.reloads["ok"] += 1
        logger.info("reloaded %s", self.config_path)
        return True

    async def apply_config(self, new: SidecarConfig) -> None:
        """Apply a configuration from elsewhere (xDS) through the reload path.

        :raises QuicmeshError: it cannot be applied (an address cannot be bound);
            the running configuration stays.
        """
        if self.draining:
            raise QuicmeshError("the sidecar is draining")
        async with self._reload_lock:
            try:
                await self._apply(new)
            except QuicmeshError:
                self.reloads["rejected"] += 1
                raise
        self.reloads["ok"] += 1

    async def _reopen_outbound(self, names: list[str]) -> None:
        """Listen again on the outbound listeners ``names``, closed for a reload that
        failed (best effort: one whose address was taken meanwhile is logged)."""
        for name in names:
            running = self.outbound[name]
            listener = OutboundListener(
                running.config, self.clusters.__getitem__, running.stats, self.flows, self._log_flow
            )
            try:
                await self._bind(listener.start, f"listener {name}", running.config.address)
            except QuicmeshError as exc:
                logger.error("cannot listen again after the failed reload: %s", exc)
                continue
            self.outbound[name] = listener

    def attach_xds(self, client: Any) -> None:
        """Let an ADS client drive this sidecar; not ready until it has synced."""
        self.xds = client
        client.start()

    async def _apply(self, new: SidecarConfig, read: dict[str, Any] | None = None) -> None:
        # ``read``: the endpoints files' versions before they were read (_remember_watched).
        # New listeners are bound first, so a port that cannot be bound leaves everything as is.
        started_out: list[OutboundListener] = []
        started_in: list[InboundListener] = []
        old_out = {o.name: o for o in self.config.outbound}
        old_in = {i.name: i for i in self.config.inbound}
        new_clusters: dict[str, Cluster] = {}
        self._preparing = new_clusters  # (they share their name's counters already)
        # An outbound listener renamed at its address (LDS often does that): the removed
        # one lets go of the address before the new one binds it, as Envoy removes
        # listeners before it adds; its flows carry on. Put back if the reload fails.
        kept_names = {o.name for o in new.outbound}
        moving_in = {
            o.address
            for o in new.outbound
            if o.name not in old_out or old_out[o.name].address != o.address
        }
        handed_over = [
            name
            for name, old in old_out.items()
            if name not in kept_names and old.address in moving_in and name in self.outbound
        ]
        for name in handed_over:
            self.outbound[name].close()
        try:
            for cluster_config in new.clusters:
                current = self.clusters.get(cluster_config.name)
                if current is None or not current.config.same_except_endpoints(cluster_config):
                    new_clusters[cluster_config.name] = self._make_cluster(cluster_config)
            for out in new.outbound:
                previous = old_out.get(out.name)
                if previous is None or previous.address != out.address:
                    listener = OutboundListener(
                        out,
                        self.clusters.__getitem__,
                        self._listener_stats(out.name, "outbound"),
                        self.flows,
                        self._log_flow,
                    )
                    await self._bind(listener.start, f"listener {out.name}", out.address)
                    started_out.append(listener)
            for inb in new.inbound:
                previous_in = old_in.get(inb.name)
                changed = [] if previous_in is None else previous_in.start_keys_changed(inb)
                if changed and "address" not in changed:
                    # Its sockets are bound to that address and made with these settings;
                    # a second listener cannot bind it while the first drains.
                    raise ConfigError(
                        f"{self.config_path or 'the new configuration'}: listeners.inbound "
                        f"{inb.name}: {', '.join(changed)} cannot change on"
                        f" a running listener at the same address ({format_address(inb.address)}):"
                        " restart the sidecar, or give the listener a new address; live on"
                        f" reload: {', '.join(INBOUND_LIVE_KEYS)}"
                    )
                if previous_in is None or changed:
                    in_listener = InboundListener(
                        inb,
                        self.identity,
                        self.trust,
                        self._listener_stats(inb.name, "inbound"),
                        self.flows,
                        self._log_flow,
                        self.own_addresses,
                    )
                    try:
                        await in_listener.start()
                    except QuicmeshError as exc:
                        raise QuicmeshError(f"listener {inb.name}: {exc}") from None
                    started_in.append(in_listener)
        except BaseException:
            for listener in started_out:
                listener.close()
            for in_listener in started_in:
                in_listener.close()
            for cluster in new_clusters.values():
                await cluster.close()
                retire_counters(cluster.stats.quic_counters, cluster.transport.counters)
            self._preparing = {}
            await self._reopen_outbound(handed_over)
            raise
        self._preparing = {}
        # Commit: swap clusters, then listeners. Live flows keep their own objects.
        for cluster_config in new.clusters:
            if cluster_config.name in new_clusters:
                old = self.clusters.get(cluster_config.name)
                if old is not None:
                    self._retire_cluster(old)
                self.clusters[cluster_config.name] = new_clusters[cluster_config.name]
            else:
                self.clusters[cluster_config.name].set_endpoints(cluster_config.endpoints)
        for name in set(self.clusters) - {c.name for c in new.clusters}:
            self._retire_cluster(self.clusters.pop(name))
        started_by_name = {listener.config.name: listener for listener in started_out}
        for out in new.outbound:
            if out.name in started_by_name:
                if out.name in self.outbound:
                    self.outbound[out.name].close()
                self.outbound[out.name] = started_by_name[out.name]
            # (Also for one started above: it chose how to accept by the clusters of then.)
            self.outbound[out.name].config = out
        for name in set(self.outbound) - {o.name for o in new.outbound}:
            removed = self.outbound.pop(name)
            removed.close()
            if self.listener_stats.get(name) is removed.stats:  # (not an inbound one's now)
                del self.listener_stats[name]
        started_in_by_name = {listener.config.name: listener for listener in started_in}
        grace = new.drain.grace_period
        for inb in new.inbound:
            if inb.name in started_in_by_name:
                if inb.name in self.inbound:
                    self._background(self.inbound[inb.name].drain_and_close(grace))
                self.inbound[inb.name] = started_in_by_name[inb.name]
            else:
                self.inbound[inb.name].config = inb
        for name in set(self.inbound) - {i.name for i in new.inbound}:
            self._background(self._drain_removed(self.inbound.pop(name), grace))
        self.config = new
        self.services = {c.name: c.all_services for c in new.clusters}
        self.destinations = self._destination_table(new, self.services)
        if new.intercept is not None:
            for capture in self.capture:
                capture.config = new.intercept
        self._remember_watched(read)

    def _rotate_identity(self, identity: Identity, trust: TrustBundle) -> None:
        """A new certificate: every transport presents it from the next handshake on, or
        none does.

        Each QUIC engine and TLS library in use must load it first
        (:meth:`Transport.identity_problem`: a client endpoint of the native engine reads the key
        only when it dials); a transport that still refuses it puts every transport
        switched so far back on the identity in use. Pools then dial new connections for
        new flows and close the old ones as their last flow ends
        (:meth:`.pool.EndpointPool.is_stale`).

        :raises ConfigError: it cannot be used here (the line says where and why);
            nothing changed.
        """
        holders = self._identity_holders()
        for holder in holders:
            problem = holder.identity_problem(identity, trust)
            if problem is not None:
                raise ConfigError(problem)
        switched: list[Transport | InboundListener] = []
        try:
            for holder in holders:
                switched.append(holder)  # (one that fails may have switched in part)
                holder.set_identity(identity, trust)
        except Exception as exc:
            self._restore_identity(switched)
            raise ConfigError(f"the new certificate cannot be used here: {exc}") from None
        # (Not on a new trust bundle alone, which comes with the same certificate.)
        ours_changed = identity.cert_chain_pem() != self.identity.cert_chain_pem()
        self.identity, self.trust = identity, trust
        if ours_changed:
            for cluster in [*self.clusters.values(), *self.retired_clusters]:
                cluster.our_identity_changed()

    def _restore_identity(self, switched: list[Transport | InboundListener]) -> None:
        """Put ``switched`` back on the identity and trust bundle in use (they loaded it
        before)."""
        for holder in switched:
            try:
                holder.set_identity(self.identity, self.trust)
            except Exception:
                logger.exception("cannot put %r back on the running certificate", holder)

    def _identity_holders(self) -> list[Transport | InboundListener]:
        """What presents our certificate: the clusters' transports (retired ones too)
        and the inbound listeners."""
        holders: list[Transport | InboundListener] = [
            c.transport for c in [*self.clusters.values(), *self.retired_clusters]
        ]
        holders += self.inbound.values()
        return holders

    def _retire_cluster(self, cluster: Cluster) -> None:
        """Keep an old cluster until its live flows end, then close its connections."""
        self.retired_clusters.append(cluster)

        async def close_when_idle() -> None:
            while cluster.stats.streams_active > 0 and any(
                e.pool.active_streams for e in cluster.endpoints.values()
            ):
                await asyncio.sleep(1.0)
            await cluster.close(ACK_TIMEOUT)
            with contextlib.suppress(ValueError):
                self.retired_clusters.remove(cluster)
            self._forget_counters(cluster)

        self._background(close_when_idle())

    def _forget_counters(self, cluster: Cluster) -> None:
        """A retired cluster closed: its transport's counts stay in the cluster's totals,
        folded; a cluster gone for good (no live one of its name) takes its counters with
        it, and otherwise the endpoints only it had go from the counters its name shares."""
        retire_counters(cluster.stats.quic_counters, cluster.transport.counters)
        name = cluster.config.name
        alive = [*self.clusters.values(), *self.retired_clusters, *self._preparing.values()]
        sharing = [c for c in alive if c.stats is cluster.stats]
        if not sharing and self.cluster_stats.get(name) is cluster.stats:
            # The sidecar's handshake-failure counters keep what it counted.
            self._removed_handshake_failures.update(cluster.stats.handshake_failures)
            del self.cluster_stats[name]
            return
        kept = {e.name for c in sharing for e in [*c.endpoints.values(), *c.retired]}
        for endpoint in [*cluster.endpoints.values(), *cluster.retired]:
            if endpoint.name not in kept:
                cluster.stats.endpoints.pop(endpoint.name, None)

    async def _drain_removed(self, listener: InboundListener, grace: float) -> None:
        """Drain an inbound listener a reload removed; then its counters go (unless a
        listener of its name came back meanwhile)."""
        await listener.drain_and_close(grace)
        name = listener.config.name
        if name not in self.inbound and self.listener_stats.get(name) is listener.stats:
            del self.listener_stats[name]

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background_tasks.add(task)
        task.add_done_callback(self._background_tasks.discard)

    # -- endpoints files -------------------------------------------------------

    def _remember_watched(self, read: dict[str, Any] | None = None) -> None:
        """Note the version of each endpoints file the configuration uses, as of when it
        was read where ``read`` knows it (taken before a reload read the files): a file
        rewritten while the reload was under way is read again by the watcher, where
        its version taken after the reload hid the change until the next one."""
        read = read or {}
        self._watched = {
            c.endpoints_file: read.get(c.endpoints_file) or _file_version(c.endpoints_file)
            for c in self.config.clusters
            if c.endpoints_file is not None
        }

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            for path, seen in list(self._watched.items()):
                version = _file_version(path)
                if version == seen:
                    continue
                self._watched[path] = version
                self._reload_endpoints(path)

    def _reload_endpoints(self, path: str) -> None:
        try:
            document = load_endpoints_document(path)
            services = dict(self.services)
            for cluster in self.clusters.values():
                if cluster.config.endpoints_file == path:
                    services[cluster.config.name] = merge_services(
                        cluster.config.services, document.services
                    )
            table = self._destination_table(self.config, services)
        except (ConfigError, DuplicateService) as exc:
            self.reloads["rejected"] += 1
            logger.error("endpoints file rejected, keeping the running endpoints: %s", exc)
            return
        endpoints = document.endpoints
        self.services = services
        self.destinations = table
        for cluster in self.clusters.values():
            if cluster.config.endpoints_file == path:
                cluster.set_endpoints(endpoints)
                logger.info(
                    "cluster %s: endpoints now %s",
                    cluster.config.name,
                    ", ".join(format_address(e) for e in endpoints) or "none",
                )
        # Endpoint hosts route captured traffic too: rebuild with the new endpoints.
        self.destinations = self._destination_table(self.config, self.services)
        self.reloads["ok"] += 1

    # -- drain -----------------------------------------------------------------

    def begin_drain(self, outbound_now: bool = False, graceful: bool | None = None) -> bool:
        """Start a drain in the background; False if one is already running.

        ``outbound_now``: the outbound listeners (and interception's captures) stop taking
        connections when the inbound ones start refusing new flows (Envoy's
        ``/drain_listeners`` without ``inboundonly``), rather than when the drain's wait
        ends; their live flows carry on, as every flow does. ``graceful`` (its
        ``graceful``): that moment is ``drain.min_duration`` after the start, not the
        start (the peer connections open then are told to go away at once, those made
        meanwhile at its end). ``graceful=False`` (``/drain_listeners`` without it) ends a
        graceful period under way, which None (a signal, ``/drain``) leaves to run."""
        if self._graceful_period is not None and graceful is False:
            # Envoy's drain without ``graceful`` stops the listeners at once: the
            # graceful period under way ends now.
            self._outbound_with_inbound = self._outbound_with_inbound or outbound_now
            self._graceful_period.cancel()
            self._end_graceful_period("asked to drain without graceful")
            return False
        if outbound_now:
            starting_graceful = not self.draining and self._graceful(bool(graceful))
            if self._graceful_period is not None or starting_graceful:
                self._outbound_with_inbound = True  # (stopped when the graceful period ends)
            else:
                self._stop_outbound_listeners()
        if self.draining:
            return False
        self._drain_task = asyncio.get_running_loop().create_task(self.drain(bool(graceful)))
        return True

    def _graceful(self, asked: bool) -> bool:
        """Whether a drain asked to be graceful is: with a minimum, and not a quit."""
        return asked and self.config.drain.min_duration > 0 and not self._quitting

    def quit(self) -> None:
        """Stop now (Envoy's ``/quitquitquit``): a drain with its grace period ended at
        once, so live flows are cut (their peer connections closed without waiting for
        them), and the process exits."""
        self._quitting = True
        if not self.begin_drain():  # (one under way: else drain() ends it, once it said so)
            self.end_grace_period("asked to quit")

    async def drain(self, graceful: bool = False) -> None:
        """Stop taking flows, let live ones finish within the grace period, close cleanly.
        ``graceful``: inbound flows are still taken for ``drain.min_duration``."""
        if self.draining:
            await self._drained.wait()
            return
        self.draining = True
        self.ready = False
        grace, minimum = self.config.drain.grace_period, self.config.drain.min_duration
        graceful = self._graceful(graceful)
        at_least = f", for at least {minimum:g}s" if minimum else ""
        if graceful:
            at_least += " (graceful: inbound flows taken until then)"
        logger.info(
            "draining: %d live flows, grace period %gs%s", self.flows.active, grace, at_least
        )
        # Inbound only, as Istio drains a sidecar: peers are told to go away and new
        # inbound flows are refused (graceful: once the minimum is over), while the
        # outbound listeners keep taking the application's connections until the wait
        # below ends (an application that is stopping too may still call out: to finish
        # its work, to deregister).
        for inb in self.inbound.values():
            inb.begin_drain(refuse=not graceful)
        if graceful:
            self._graceful_period = asyncio.get_running_loop().call_later(
                minimum, self._end_graceful_period, "graceful period over"
            )
        else:
            self._refuse_inbound_flows()
        if self._quitting:
            self.end_grace_period("asked to quit")
        started = time.monotonic()
        await self._wait_for_the_drain(started)
        if self._graceful_period is not None:  # (the grace period was ended early)
            self._graceful_period.cancel()
            self._end_graceful_period("graceful period ended early")
        self._stop_outbound_listeners()
        if self.flows.active:
            why = "grace period ended early" if self._grace_ended.is_set() else "grace period over"
            logger.warning("%s: closing %d live flows", why, self.flows.active)
            self._cut_by = f"cut by the drain ({why})"
        # Flows are done (or out of time): close every peer connection gracefully, so
        # the last bytes of finished flows are acknowledged before CONNECTION_CLOSE;
        # asked to quit, at once (the live flows carried on for those 2 s; a review).
        acks = 0.0 if self._quitting else ACK_TIMEOUT
        await asyncio.gather(
            *(inb.drain_and_close(0.0, acks) for inb in self.inbound.values()),
            *(
                cluster.close(acks)
                for cluster in list(self.clusters.values()) + self.retired_clusters
            ),
            return_exceptions=True,
        )
        await self._close_everything()
        logger.info("drained in %.2fs", time.monotonic() - started)
        self._drained.set()

    def _end_graceful_period(self, why: str) -> None:
        """A graceful drain's inbound listeners refuse new flows from now on, and the
        outbound ones stop too if ``/drain_listeners`` asked without ``inboundonly``."""
        self._graceful_period = None
        logger.info("draining: %s, new inbound flows are refused", why)
        self._refuse_inbound_flows()
        if self._outbound_with_inbound:
            self._stop_outbound_listeners()

    def _refuse_inbound_flows(self) -> None:
        """The inbound listeners refuse new flows, the inbound capture takes no new
        connection; again is harmless."""
        for capture in self.capture:
            if capture.direction == "inbound":
                capture.close()
        for inb in self.inbound.values():
            inb.refuse_new_flows()

    def _stop_outbound_listeners(self) -> None:
        """The outbound listeners and interception's captures take no new connection
        (their live flows carry on); again is harmless."""
        for out in self.outbound.values():
            out.close()
        for capture in self.capture:
            capture.close()

    async def _wait_for_the_drain(self, started: float) -> None:
        """Until the live flows are over and ``drain.min_duration`` has passed, within
        the grace period; at once when it is ended early (a second signal, a quit).
        Flows the outbound listeners take meanwhile count: the wait for them starts
        again once the minimum is over."""
        drain = self.config.drain
        ended = asyncio.ensure_future(self._grace_ended.wait())
        try:
            while not ended.done():
                left = started + drain.grace_period - time.monotonic()
                if left <= 0:
                    return
                idle = asyncio.ensure_future(self.flows.wait_idle())
                await asyncio.wait((idle, ended), timeout=left, return_when=asyncio.FIRST_COMPLETED)
                idle.cancel()
                if not idle.done() or ended.done():
                    return  # the grace period is over, or was ended
                minimum = started + drain.min_duration - time.monotonic()
                if minimum <= 0:
                    return
                await asyncio.wait((ended,), timeout=minimum)
                if not self.flows.active:
                    return
        finally:
            ended.cancel()

    def end_grace_period(self, why: str = "asked again to stop") -> None:
        """(draining) Close the live flows now rather than at the grace period's end (a
        second SIGTERM or SIGINT: an operator's way out of a long grace period)."""
        begun = self.draining or self._drain_task is not None  # (its task may not have run)
        if begun and not self._grace_ended.is_set():
            logger.warning("%s: ending the grace period now", why)
            self._grace_ended.set()

    async def wait_drained(self) -> None:
        """Wait until a drain has finished."""
        await self._drained.wait()

    async def _close_everything(self) -> None:
        await self.certs.close()
        if self.xds is not None:
            await self.xds.close()
        if self._watch_task is not None:
            self._watch_task.cancel()
        self._stop_outbound_listeners()
        for inb in self.inbound.values():
            inb.close()
        for cluster in list(self.clusters.values()) + self.retired_clusters:
            with contextlib.suppress(QuicmeshError, OSError):
                await cluster.close()
        for inb in self.inbound.values():
            await inb.wait_closed()
        await self.admin.close()
        self.access_log.close()

    # -- migration -------------------------------------------------------------

    async def migrate(self) -> dict[str, Any]:
        """Move every QUIC peer connection of every cluster to a new local UDP port.

        Returns ``{"migrated": n, "failed": n, "connections": [...]}``, one entry
        per connection (see :meth:`Cluster.migrate`).

        :raises MigrationRefused: one ran less than :data:`MIGRATE_INTERVAL` ago (each
            keeps its old sockets for a while: a loop of them filled the descriptors).
        """
        now = time.monotonic()
        if now - self._last_migration < MIGRATE_INTERVAL:
            raise MigrationRefused(
                f"a migration ran {now - self._last_migration:.2f}s ago: at most one every "
                f"{MIGRATE_INTERVAL:g}s",
                retry_after=MIGRATE_INTERVAL - (now - self._last_migration),
            )
        self._last_migration = now
        clusters = list(self.clusters.values()) + self.retired_clusters
        reports = await asyncio.gather(*(cluster.migrate() for cluster in clusters))
        connections = [entry for report in reports for entry in report]
        failed = sum(1 for entry in connections if entry["error"])
        logger.info("migrated %d QUIC peer connections", len(connections) - failed)
        return {
            "migrated": len(connections) - failed,
            "failed": failed,
            "connections": connections,
        }

    # -- views -----------------------------------------------------------------

    def is_ready(self) -> bool:
        """Whether the sidecar takes traffic (started and not draining)."""
        return (
            self.ready
            and not self.draining
            and self.certs.problem() is None
            and not self._waits_for_control_plane()
        )

    def _waits_for_control_plane(self) -> bool:
        """Configured for xDS and not synced yet (also before its client started)."""
        if self.xds is None:
            return self.config.xds is not None
        return not self.xds.synced.is_set()

    def not_ready_reason(self) -> str:
        """Why :meth:`is_ready` is False, in one line ("" when ready)."""
        if self.draining:
            return "draining"
        if not self.ready:
            return "starting"
        if self._waits_for_control_plane():
            if self.xds is not None and self.xds.warming:
                return f"waiting for the control plane (endpoints of {', '.join(self.xds.warming)})"
            return "waiting for the control plane (LDS and CDS)"
        return self.certs.problem() or ""

    def _clusters_snapshot(self) -> dict[str, Any]:
        """Each cluster's view, with the connections of its retired versions (a reload
        that made it again: their flows run on to their end) counted in: they left the
        metrics while they still carried flows. An endpoint only a retired version has
        is ``removed``, as one removed in place is. A removed cluster is shown while it
        has connections open."""
        views = {name: c.snapshot() for name, c in self.clusters.items()}
        for retired in self.retired_clusters:
            view = retired.snapshot()
            for endpoint in view["endpoints"].values():
                # Its transport may not be the current version's (its connections keep
                # their labels: numbered in one count for the process, pool.py).
                endpoint["connections"] = [
                    {**conn, "cluster_transport": retired.config.transport}
                    for conn in endpoint["connections"]
                ]
            current = views.get(retired.config.name)
            if current is None:
                if view["connections_active"]:
                    for endpoint in view["endpoints"].values():
                        endpoint["health"] = "removed"  # (with its cluster)
                    views[retired.config.name] = view
                continue
            current["connections_active"] += view["connections_active"]
            for name, endpoint in view["endpoints"].items():
                if not endpoint["connections"]:
                    continue
                # One the current version lacks was removed by the reload that retired
                # this one (whose health for it, kept from before, says nothing now).
                kept = current["endpoints"].setdefault(
                    name, {**endpoint, "health": "removed", "connections": []}
                )
                kept["connections"] = [*kept["connections"], *endpoint["connections"]]
        return views

    def snapshot(self) -> dict[str, Any]:
        """Counters and live state: ``/stats``, and the source of ``/metrics``."""
        listeners: dict[str, Any] = {}
        for name, out in self.outbound.items():
            listeners[name] = {
                **out.stats.to_dict(),
                "address": format_address(out.config.address),
                "cluster": out.config.cluster,
            }
        for name, inb in self.inbound.items():
            listeners[name] = {
                **inb.stats.to_dict(),
                "address": format_address(inb.config.address),
                "transports": list(inb.config.transports),
            }
        for capture in self.capture:
            listeners[capture.name] = {
                **capture.stats.to_dict(),
                "address": format_address(("*", capture.port)),
            }
        intercept: dict[str, Any] = {}
        if self.config.intercept is not None:
            intercept = {
                "outbound_policy": self.config.intercept.outbound_policy,
                "services": len(self.destinations),
                "destinations": self.destination_counts.to_list(),
            }
        return {
            "node": self.config.node.name,
            "identity": self.identity.spiffe_id,
            "ready": self.is_ready(),
            "draining": self.draining,
            "uptime": round(time.time() - self.started_at, 3),
            "started_at": round(self.started_at, 3),
            "flows_active": self.flows.active,
            "reloads": dict(self.reloads),
            "access_log": {"suppressed": dict(self.access_log.refusals.suppressed)},
            "certificate": self.certs.snapshot(),
            "handshake_failures": self._handshake_failures(),
            **({"xds": self.xds.snapshot()} if self.xds is not None else {}),
            "listeners": listeners,
            "clusters": self._clusters_snapshot(),
            "intercept": intercept,
        }

    def _handshake_failures(self) -> dict[str, dict[str, int]]:
        """TLS handshakes that failed, by our role (client: dialling a cluster;
        server: a peer dialling an inbound listener) and reason."""
        client = sum_counters(
            [self._removed_handshake_failures]
            + [stats.handshake_failures for stats in self.cluster_stats.values()]
        )
        server = sum_counters(inbound.handshake_failures() for inbound in self.inbound.values())
        return {"client": client, "server": server}

    def certificates(self) -> dict[str, Any]:
        """``/certs``: the certificate presented and the trust bundle, as Envoy's."""
        return self.certs.envoy_certs()

    def metrics_text(self) -> bytes:
        """The Prometheus exposition of :meth:`snapshot`."""
        return self.metrics.exposition()

    def config_dump(self) -> dict[str, Any]:
        """The running configuration, with the live endpoint lists and the services the
        endpoints files list now."""
        dump = self.config.to_dict()
        for cluster in dump["clusters"]:
            live = self.clusters.get(cluster["name"])
            if live is not None:
                cluster["endpoints"] = [format_address(e) for e in live.endpoints]
                own = set(live.config.services)
                cluster["file_services"] = [
                    format_address(s)
                    for s in self.services.get(live.config.name, ())
                    if s not in own
                ]
        return dump


def _capture_ports(config: SidecarConfig) -> tuple[int, int | None] | None:
    intercept = config.intercept
    return None if intercept is None else (intercept.outbound_port, intercept.inbound_port)


def _file_version(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(Path(path))
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _log_default_engine() -> None:
    """Say which QUIC engine the clusters and listeners that name none run on, once
    started: the transports' own note of a fallback to aioquic is below the sidecar's
    log level. (Never raises: the sidecar is up by now.)"""
    try:
        engine = default_quic_engine()
    except QuicmeshError:  # an unknown name in the environment: the configuration said so
        return
    named = os.environ.get(DEFAULT_ENGINE_VARIABLE, "").strip()
    logger.info(
        "QUIC engine where none is named: %s%s",
        engine,
        " (the native engine is not built: no quicmesh._native)"
        if engine != BUILT_IN_DEFAULT_ENGINE and not named
        else "",
    )
