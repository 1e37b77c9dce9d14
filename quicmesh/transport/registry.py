"""Transports built by name from per-transport options: the one place that knows them all.

A proxy names a transport (``"quic"``, ``"h2"``, ``"tcp"``, ``"auto"``) and gives
its options as a mapping of the transport's own keyword arguments (see each
class), and gets a :class:`~quicmesh.transport.base.Transport`; it reaches this
module through :func:`quicmesh.transport.base.transport_registry` and never imports
an implementation. Options that name things rather than hold them are resolved
here:

* ``quic``: an unknown ``engine`` is a :class:`ConfigError` (``QuicTransport``'s
  own is a ``ValueError``); ``admission`` may be a mapping of
  :class:`~quicmesh.transport._admission.AdmissionConfig` fields;
  ``stateless_reset_key_file`` is a path read (or created, mode 0600) with
  :func:`~quicmesh.transport.quic.load_stateless_reset_key`; ``ticket_cache``
  defaults to the registry's, shared by every QUIC transport it builds.
* ``auto``: ``quic`` and ``h2`` are the options of the two transports it races.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..errors import ConfigError
from ..tls import Identity, TrustBundle
from .base import Transport
from .tickets import TicketCache

T = TypeVar("T")

TRANSPORT_NAMES = ("quic", "h2", "tcp", "auto")
"""The names :meth:`TransportRegistry.build` knows."""


class TransportRegistry:
    """Builds transports by name, holding what they share.

    :param ticket_cache: the file where the QUIC transports keep their session
        tickets (None: in memory only); one
        :class:`~quicmesh.transport.tickets.TicketCache` serves every QUIC (and
        auto) transport built here, so clients resume with 0-RTT across them.
    """

    def __init__(self, *, ticket_cache: str | None = None) -> None:
        self.ticket_cache = TicketCache(ticket_cache)
        self._builders: dict[str, Callable[[Identity, TrustBundle, dict[str, Any]], Transport]] = {
            "quic": self._quic,
            "h2": self._h2,
            "tcp": self._tcp,
            "auto": self._auto,
        }

    def build(
        self,
        name: str,
        *,
        identity: Identity,
        trust: TrustBundle,
        options: Mapping[str, Any] | None = None,
    ) -> Transport:
        """A new transport ``name`` presenting ``identity`` and trusting ``trust``.

        :param options: the transport's keyword arguments (see the module docstring).
        :raises ConfigError: an unknown transport or option, or a bad value.
        """
        builder = self._builders.get(name)
        if builder is None:
            raise ConfigError(
                f"unknown transport {name!r}: expected one of {', '.join(TRANSPORT_NAMES)}"
            )
        return builder(identity, trust, dict(options or {}))

    def _quic(self, identity: Identity, trust: TrustBundle, options: dict[str, Any]) -> Transport:
        from ._admission import AdmissionConfig
        from .base import quic_engine_problem
        from .quic import QuicTransport, load_stateless_reset_key

        engine = options.get("engine")
        if isinstance(engine, str) and (problem := quic_engine_problem(engine)) is not None:
            # (QuicTransport raises ValueError for an unknown name, as documented; an
            # option here is configuration.)
            raise ConfigError(f"quic transport: engine: {problem}")
        admission = options.get("admission")
        if isinstance(admission, Mapping):
            options["admission"] = _construct("quic admission", AdmissionConfig, admission)
        key_file = options.pop("stateless_reset_key_file", None)
        if key_file is not None:
            options["stateless_reset_key"] = load_stateless_reset_key(key_file)
        options.setdefault("ticket_cache", self.ticket_cache)
        return _construct("quic", QuicTransport, options, identity=identity, trust=trust)

    def _h2(self, identity: Identity, trust: TrustBundle, options: dict[str, Any]) -> Transport:
        from .h2 import H2Transport

        return _construct("h2", H2Transport, options, identity=identity, trust=trust)

    def _tcp(self, identity: Identity, trust: TrustBundle, options: dict[str, Any]) -> Transport:
        from .tcp import TcpTransport

        return _construct("tcp", TcpTransport, options, identity=identity, trust=trust)

    def _auto(self, identity: Identity, trust: TrustBundle, options: dict[str, Any]) -> Transport:
        from .auto import AutoTransport

        options["quic"] = self._quic(identity, trust, dict(options.get("quic") or {}))
        options["h2"] = self._h2(identity, trust, dict(options.get("h2") or {}))
        return _construct("auto", AutoTransport, options, identity=identity, trust=trust)


def _construct(what: str, cls: Callable[..., T], options: Mapping[str, Any], **fixed: Any) -> T:
    """``cls(**fixed, **options)``; an option ``cls`` does not take is a :class:`ConfigError`."""
    unknown = sorted(set(options) - (set(inspect.signature(cls).parameters) - set(fixed)))
    if unknown:
        raise ConfigError(f"{what} transport: unknown option {', '.join(unknown)}")
    return cls(**fixed, **options)
