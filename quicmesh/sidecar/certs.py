"""The sidecar's own identity over time: loaded, checked, renewed, reloaded.

:class:`CertificateSource` owns the identity and trust bundle a sidecar
presents and verifies with, and where they come from:

- ``tls.ca_dir`` (the development CA): the sidecar issues itself a certificate
  for ``node.identity`` valid ``tls.certificate_lifetime``, and issues a new one
  two thirds into that lifetime;
- ``tls.cert``/``key``/``trust_bundle`` (PEM files, kept up to date by an agent
  as Envoy's ``watched_directory`` expects): the files are polled and read again
  when any of them changes; a half-written or mismatched set, or one a transport
  in use cannot load (a key type the native QUIC engine does not know), is logged
  and ignored until the next change; a set that loads but cannot be used (expired,
  not yet valid, not trusted by its own bundle, or refused by peers:
  :func:`~quicmesh.tls.check.own_certificate_problem`) is logged and waits while the
  current certificate can be used;
- :meth:`CertificateSource.deliver` (SDS): a control plane pushes a new identity,
  trust bundle or both. What it delivered is the control plane's from then on:
  the dev CA issues no more certificates once SDS delivered the identity, and a
  certificate it issues keeps the trust bundle SDS delivered. A secret SDS sends again
  as it delivered it last (a control plane that reconnects) changes nothing.

Each change calls ``on_rotated(identity, trust)`` before it is taken; the runtime
hands the new identity to every transport (new handshakes use it at once) and
pools replace connections made with the old one. A change is all or nothing: if
``on_rotated`` raises (a QUIC engine cannot load the key, say), the identity and
trust bundle in use stay, and the change is refused (SDS: NACKed; files: logged
until they change again; dev CA: tried again later).
:meth:`CertificateSource.problem` says in one line why the current certificate
cannot be used (expired, not yet valid, not trusted by our own bundle, refused by
peers); the sidecar is then not ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import math
import os
from collections.abc import Callable
from typing import TypeVar

from cryptography import x509

from ..errors import ConfigError, QuicmeshError
from ..tls import DevCA, Identity, TrustBundle
from ..tls.ca import CA_CERT_FILE
from ..tls.check import RENEW_FRACTION, key_refusal, own_certificate_problem, renewal_time
from ..transport.base import transport_registry
from .config import SidecarConfig

T = TypeVar("T")

logger = logging.getLogger("quicmesh.sidecar.certs")

POLL_INTERVAL = 0.25
"""Seconds between checks of watched certificate files."""

WAITING_CHECK = datetime.timedelta(seconds=1)
"""How often certificate files waiting to be usable are checked again."""

Rotated = Callable[[Identity, TrustBundle], None]


def load_identity(config: SidecarConfig) -> tuple[Identity, TrustBundle]:
    """This sidecar's identity and trust bundle, from a dev CA directory or PEM files.

    :raises ConfigError: a file is missing or invalid, or the identity does not match.
    """
    tls = config.tls
    source = config.source
    if tls.ca_dir is not None:
        ca = _named(source, "tls.ca_dir", DevCA.load, tls.ca_dir)
        try:
            identity = _issue(ca, config)
        except ValueError as exc:
            raise ConfigError(f"{source}: node.identity: {exc}") from None
        return identity, ca.trust_bundle
    assert tls.cert is not None and tls.key is not None and tls.trust_bundle is not None
    identity = _named(source, "tls.cert, tls.key", Identity.from_files, tls.cert, tls.key)
    trust = _named(source, "tls.trust_bundle", TrustBundle.from_file, tls.trust_bundle)
    try:
        spiffe_id = identity.spiffe_id
    except ConfigError as exc:
        raise ConfigError(f"{source}: tls.cert: {tls.cert}: {exc}") from None
    if spiffe_id != config.node.identity:
        raise ConfigError(
            f"{source}: node.identity: {config.node.identity} does not match the certificate "
            f"{tls.cert} ({spiffe_id})"
        )
    return identity, trust


def _named(source: str, keys: str, load: Callable[..., T], *paths: str) -> T:
    """``load(*paths)``, with a ConfigError (which names the file) prefixed by the
    configuration file and its keys, as every other configuration error is."""
    try:
        return load(*paths)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {keys}: {exc}") from None


def _lifetime(config: SidecarConfig) -> datetime.timedelta:
    seconds = config.tls.certificate_lifetime
    return datetime.timedelta(seconds=seconds)


def _issue(ca: DevCA, config: SidecarConfig) -> Identity:
    """Our certificate from the dev CA: valid from a second before now, for peers whose
    clock is a little behind, but no more (a short-lived certificate must not be mostly
    past), until at least ``certificate_lifetime`` from now. X.509 keeps whole seconds:
    the end is rounded up, not down (a 1 s certificate was valid for anything between
    0 and 1 s, and renewed two thirds into that: 31 rotations in 5 s)."""
    now = datetime.datetime.now(datetime.UTC)
    start = now.replace(microsecond=0) - datetime.timedelta(seconds=1)
    end = math.ceil(now.timestamp() + config.tls.certificate_lifetime)
    return ca.issue(
        config.node.identity,
        not_before=start,
        not_after=datetime.datetime.fromtimestamp(end, datetime.UTC),
    )


async def check_transports_take_identity(
    config: SidecarConfig, identity: Identity, trust: TrustBundle
) -> None:
    """Refuse an identity a transport the configuration uses (its listeners' and
    clusters') cannot load, in one line naming the key's type and size.

    It is the probe a rotation runs (:meth:`Transport.identity_problem`: the native QUIC
    engine loads the key into a listener on a loopback port, OpenSSL into a context):
    without it, a P-521 or RSA-1024 key passed ``--check`` and the start then failed to
    listen ("failed to parse private key as RSA, ECDSA, or EdDSA", "EE_KEY_TOO_SMALL").
    One transport is built for each kind (and QUIC engine) in use, then closed.

    :raises ConfigError: ``<source>: the native QUIC engine cannot use this key: ...``.
    """
    kinds: set[tuple[str, str]] = set()
    for listener in config.inbound:
        kinds.update(
            (name, listener.engine if name == "quic" else "") for name in listener.transports
        )
    for cluster in config.clusters:
        if cluster.transport in ("quic", "auto"):
            kinds.add(("quic", cluster.engine))
        if cluster.transport != "quic":
            kinds.add(("h2" if cluster.transport == "auto" else cluster.transport, ""))
    registry = transport_registry()
    for name, engine in sorted(kinds):
        options = {"engine": engine} if engine else {}
        transport = registry.build(name, identity=identity, trust=trust, options=options)
        try:
            problem = transport.identity_problem(identity, trust)
        finally:
            await transport.aclose()
        if problem is None:
            continue
        who = f"the {engine} QUIC engine" if engine else f"the {name} transport (OpenSSL)"
        reason = key_refusal(identity, "rustls" if engine == "native" else "openssl")
        raise ConfigError(
            f"{config.source}: {who} cannot use this key: {reason}"
            if reason
            else f"{config.source}: {problem}"
        )


def certificate_details(
    certificate: x509.Certificate, path: str, now: datetime.datetime
) -> dict[str, object]:
    """One certificate as Envoy's ``admin.v3.CertificateDetails`` (JSON: the serial
    number in hex, 64-bit counts as strings, times in RFC 3339 UTC)."""
    expires = certificate.not_valid_after_utc
    sans: list[dict[str, str]] = []
    with contextlib.suppress(x509.ExtensionNotFound):
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        for uri in names.value.get_values_for_type(x509.UniformResourceIdentifier):
            sans.append({"uri": uri})
        for dns in names.value.get_values_for_type(x509.DNSName):
            sans.append({"dns": dns})
        for ip in names.value.get_values_for_type(x509.IPAddress):
            sans.append({"ip_address": str(ip)})
    return {
        "path": path,
        "serial_number": format(certificate.serial_number, "x"),
        "subject_alt_names": sans,
        "days_until_expiration": str(max(0, (expires - now).days)),
        "valid_from": _rfc3339(certificate.not_valid_before_utc),
        "expiration_time": _rfc3339(expires),
    }


def _rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CertificateSource:
    """The sidecar's current identity and trust bundle, and the task that renews them.

    :param config: the sidecar configuration (``tls`` and ``node`` sections).
    :param identity: the identity already loaded (see :func:`load_identity`).
    :param trust: the trust bundle already loaded.
    """

    def __init__(self, config: SidecarConfig, identity: Identity, trust: TrustBundle) -> None:
        self.config = config
        self.identity = identity
        self.trust = trust
        self.rotations = 0
        self.failures = 0
        self._retry_at: datetime.datetime | None = None
        self._issued_at = datetime.datetime.now(datetime.UTC)
        self._on_rotated: Rotated | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._logged_problem: str | None = None
        """The problem last logged (:meth:`_watch_problem`), so each one is said once."""
        self._versions = self._file_versions()
        self._waiting: tuple[Identity, TrustBundle] | None = None
        """Files that loaded but cannot be used yet (expired, not yet valid, not trusted
        by their own bundle) while the current certificate can: taken once they can be,
        or once the current one cannot (checked every :data:`WAITING_CHECK`)."""
        self._waiting_checked: datetime.datetime | None = None
        self.delivered: frozenset[str] = frozenset()
        """What SDS delivered (``identity``, ``trust``): the dev CA no longer replaces it."""
        self._last_delivered: dict[str, bytes] = {}
        """The content SDS delivered last and was taken, per secret (``identity``: chain and
        key; ``trust``: the bundle): a control plane that reconnects re-sends what it sent
        before, which is no change, and must not put it back over newer files."""

    # -- state -----------------------------------------------------------------

    def problem(self, now: datetime.datetime | None = None) -> str | None:
        """Why the current certificate cannot be presented, in one line, or None."""
        return own_certificate_problem(self.identity, self.trust, now)

    def next_renewal(self) -> datetime.datetime | None:
        """When the dev CA will issue the next certificate (None: not from ``ca_dir``, or
        SDS delivered the identity)."""
        if self.config.tls.ca_dir is None or "identity" in self.delivered:
            return None
        if self._retry_at is not None:
            return self._retry_at
        # Two thirds of the way from when we issued it to its expiry.
        not_after = self.identity.certificate.not_valid_after_utc
        return self._issued_at + (not_after - self._issued_at) * RENEW_FRACTION

    def snapshot(self) -> dict[str, object]:
        """The certificate's state for ``/stats``."""
        certificate = self.identity.certificate
        renewal = self.next_renewal() or renewal_time(self.identity)
        return {
            "spiffe_id": self.identity.spiffe_id,
            "serial": format(certificate.serial_number, "x"),
            "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(),
            "expires_in": round(
                (
                    certificate.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
                ).total_seconds(),
                3,
            ),
            "renewal": renewal.isoformat(),
            "rotations": self.rotations,
            "failures": self.failures,
            "problem": self.problem() or "",
        }

    def envoy_certs(self, now: datetime.datetime | None = None) -> dict[str, object]:
        """``/certs`` in the shape of Envoy's ``admin.v3.Certificates``: one entry whose
        ``ca_cert`` is the trust bundle's roots and whose ``cert_chain`` is the leaf then
        the intermediates presented, each with where it came from (``path``: the file, or
        ``<inline>`` for what SDS delivered, or the development CA's directory), serial
        number, SANs, validity and whole days until it expires. No private key."""
        now = now or datetime.datetime.now(datetime.UTC)
        tls = self.config.tls
        if tls.ca_dir is not None:
            chain_path = f"<issued by the development CA in {tls.ca_dir}>"
            ca_path = os.path.join(tls.ca_dir, CA_CERT_FILE)
        else:
            chain_path, ca_path = tls.cert or "", tls.trust_bundle or ""
        chain_path = "<inline>" if "identity" in self.delivered else chain_path
        ca_path = "<inline>" if "trust" in self.delivered else ca_path
        leaf_and_chain = [self.identity.certificate, *self.identity.chain]
        return {
            "certificates": [
                {
                    "ca_cert": [
                        certificate_details(c, ca_path, now) for c in self.trust.certificates
                    ],
                    "cert_chain": [certificate_details(c, chain_path, now) for c in leaf_and_chain],
                }
            ]
        }

    # -- changes ---------------------------------------------------------------

    def replace(self, identity: Identity, trust: TrustBundle | None = None) -> None:
        """Use a new identity (and trust bundle) from now on, everywhere or nowhere.

        ``on_rotated`` hears of it first; only once it returned are the new identity and
        trust bundle this source's (and counted as a rotation).

        :raises ConfigError: the certificate is for another SPIFFE ID than ``node.identity``.
        :raises QuicmeshError: ``on_rotated`` refused it (the runtime: a transport cannot
            use it); nothing changed.
        """
        if identity.spiffe_id != self.config.node.identity:
            raise ConfigError(
                f"new certificate is for {identity.spiffe_id}, not node.identity "
                f"{self.config.node.identity}"
            )
        trust = trust if trust is not None else self.trust
        if self._on_rotated is not None:
            self._on_rotated(identity, trust)
        if identity.cert_chain_pem() != self.identity.cert_chain_pem():
            self._waiting = None  # (files waiting to be usable lose to a newer certificate)
        self.identity = identity
        self.trust = trust
        self.rotations += 1
        certificate = identity.certificate
        logger.info(
            "certificate rotated: %s serial %x valid until %s",
            identity.spiffe_id,
            certificate.serial_number,
            certificate.not_valid_after_utc,
        )
        problem = self.problem()
        if problem is not None:
            logger.error("%s", problem)
        self._logged_problem = problem

    def deliver(self, identity: Identity | None, trust: TrustBundle | None) -> None:
        """A control plane's (SDS) identity, trust bundle, or both: used as :meth:`replace`
        does (not at all if the same as in use), once it can be (every rule peers apply
        to it: :func:`own_certificate_problem`), and the control plane's from then on.

        A secret with the content SDS delivered last is no change, only acknowledged:
        what is in use stays, even when watched files replaced it since (the newest
        change wins; a control plane that reconnects sends everything again).

        :raises QuicmeshError: it cannot be used, or as :meth:`replace`; nothing changed,
            nothing is the control plane's yet.
        """
        contents = {}
        if identity is not None:
            contents["identity"] = identity.cert_chain_pem() + identity.private_key_pem()
        if trust is not None:
            contents["trust"] = trust.pem
        if identity is not None and self._last_delivered.get("identity") == contents["identity"]:
            identity = None  # re-sent as it was: keep what is in use
        if trust is not None and self._last_delivered.get("trust") == contents["trust"]:
            trust = None
        self._take_delivered(identity, trust)
        self._last_delivered.update(contents)

    def _take_delivered(self, identity: Identity | None, trust: TrustBundle | None) -> None:
        new_identity = identity if identity is not None else self.identity
        new_trust = trust if trust is not None else self.trust
        if (
            new_identity.cert_chain_pem() != self.identity.cert_chain_pem()
            or new_trust.pem != self.trust.pem
        ):
            problem = own_certificate_problem(new_identity, new_trust)
            if problem is not None:
                raise ConfigError(problem)
            self.replace(new_identity, new_trust)
        if identity is not None:
            self.delivered |= {"identity"}
        if trust is not None:
            self.delivered |= {"trust"}

    def start(self, on_rotated: Rotated) -> None:
        """Start renewing (``ca_dir``) or watching the files; ``on_rotated`` hears of changes."""
        self._on_rotated = on_rotated
        loop = asyncio.get_running_loop()
        if self.config.tls.ca_dir is not None or self.config.tls.cert is not None:
            self._task = loop.create_task(self._run())
        self._logged_problem = self.problem()  # (the runtime says it as it starts)
        self._watch = loop.create_task(self._watch_problem())

    async def close(self) -> None:
        """Stop the background tasks."""
        for task in (self._task, self._watch):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._watch = None

    async def _watch_problem(self) -> None:
        """Say when the certificate in use turns unusable as time passes (it expired, or
        a certificate of its chain or trust bundle did), or usable again: ``/ready``
        answered 503 with the reason and nothing was logged. Wakes at the next validity
        boundary of those certificates (at least every minute: a rotation may bring
        earlier ones)."""
        while True:
            now = datetime.datetime.now(datetime.UTC)
            problem = self.problem(now)
            if problem != self._logged_problem:
                if problem is not None:
                    logger.error("not ready: %s", problem)
                else:
                    logger.info("ready again: the certificate in use can be presented")
                self._logged_problem = problem
            certificates = [self.identity.certificate, *self.identity.chain]
            boundaries = [
                moment
                for certificate in [*certificates, *self.trust.certificates]
                for moment in (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
                if moment >= now
            ]
            wait = min([60.0, *((moment - now).total_seconds() for moment in boundaries)])
            # A second past it: "expired" is after not_after, and the trust bundle's
            # check (cryptography's verifier) reads the time in whole seconds.
            await asyncio.sleep(wait + 1.0)

    async def _run(self) -> None:
        while True:
            if self.config.tls.ca_dir is not None:
                renewal = self.next_renewal()
                if renewal is None:
                    return  # SDS delivered the identity: the dev CA's part is over
                delay = (renewal - datetime.datetime.now(datetime.UTC)).total_seconds()
                await asyncio.sleep(max(0.0, delay))
                self._renew_from_ca()
            else:
                await asyncio.sleep(POLL_INTERVAL)
                self._reload_files_if_changed()

    def _renew_from_ca(self) -> None:
        tls = self.config.tls
        assert tls.ca_dir is not None
        if "identity" in self.delivered:
            # (Delivered while this renewal was waiting.)
            logger.info(
                "not renewing the certificate from %s: the identity comes from SDS now",
                tls.ca_dir,
            )
            return
        try:
            ca = DevCA.load(tls.ca_dir)
            identity = _issue(ca, self.config)
            # A trust bundle SDS delivered stays (ours must then chain to it).
            self.replace(identity, None if "trust" in self.delivered else ca.trust_bundle)
        except (QuicmeshError, ValueError) as exc:
            self.failures += 1
            logger.error("cannot renew the certificate from %s: %s", tls.ca_dir, exc)
            # Keep the current certificate and try again after a tenth of the lifetime.
            self._retry_at = datetime.datetime.now(datetime.UTC) + _lifetime(self.config) / 10
            return
        self._retry_at = None
        self._issued_at = datetime.datetime.now(datetime.UTC)

    def _file_versions(self) -> tuple[tuple[int, int, int] | None, ...]:
        tls = self.config.tls
        return tuple(_version(path) for path in (tls.cert, tls.key, tls.trust_bundle) if path)

    def _reload_files_if_changed(self) -> None:
        versions = self._file_versions()
        if versions == self._versions:
            if self._waiting is not None:
                self._take_when_usable(*self._waiting)
            return
        self._versions = versions
        self._waiting = None
        try:
            identity, trust = load_identity(self.config)
        except ConfigError as exc:
            # An agent may be half way through writing the set: wait for the next change.
            self.failures += 1
            logger.warning("certificate files changed but cannot be used yet: %s", exc)
            return
        if (
            identity.cert_chain_pem() == self.identity.cert_chain_pem()
            and trust.pem == self.trust.pem
        ):
            return
        problem = own_certificate_problem(identity, trust)
        if problem is not None and own_certificate_problem(self.identity, trust) is None:
            # Swapping a working certificate for one known not to work would refuse
            # every new handshake: keep it while it lasts (a CA rolled out in the
            # wrong order, a stale file, a certificate issued a little ahead). Only
            # the certificate waits: a new trust bundle is taken at once (a CA taken
            # out of it, after a compromise, must stop being trusted now).
            self.failures += 1
            if trust.pem != self.trust.pem and not self._replace_from_files(self.identity, trust):
                return
            self._waiting = (identity, trust)
            logger.error(
                "certificate files changed but not taken: %s; the current certificate "
                "(valid until %s) is kept until they can be used or it cannot",
                problem,
                self.identity.certificate.not_valid_after_utc,
            )
            return
        self._replace_from_files(identity, trust)

    def _take_when_usable(self, identity: Identity, trust: TrustBundle) -> None:
        now = datetime.datetime.now(datetime.UTC)
        if self._waiting_checked is not None and now - self._waiting_checked < WAITING_CHECK:
            return
        self._waiting_checked = now
        if own_certificate_problem(identity, trust, now) is None or self.problem(now) is not None:
            self._waiting = None
            self._replace_from_files(identity, trust)

    def _replace_from_files(self, identity: Identity, trust: TrustBundle) -> bool:
        """:meth:`replace` with what the files hold; False (logged, the running identity
        kept until the files change again) if it cannot be used here."""
        try:
            self.replace(identity, trust)
        except QuicmeshError as exc:
            self.failures += 1
            logger.error(
                "certificate files changed but cannot be used: %s; keeping the running "
                "certificate (valid until %s) until they change again",
                exc,
                self.identity.certificate.not_valid_after_utc,
            )
            return False
        return True


def _version(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_mtime_ns, info.st_size, info.st_ino)
