"""TLS session tickets for QUIC resumption and 0-RTT, with the identity each one stands for.

A resumed (PSK) handshake exchanges no certificates, so neither side can check
the other's SPIFFE ID on it. Each ticket is therefore stored together with the
identity verified in the full handshake that produced it:

* :class:`TicketStore` (server): the tickets this sidecar issued, each recorded
  against the client's verified SPIFFE ID. A ticket is **single use**: redeeming
  it removes it, so a replayed first flight (same ClientHello, same 0-RTT
  packets) finds no ticket, falls back to a full handshake it cannot finish, and
  its 0-RTT data is never decrypted. Tickets also **expire** (``lifetime``).
  The store is server state: replicas behind one address must share one store
  (pass the same object, or implement ``add``/``redeem`` on shared storage).
* :class:`TicketCache` (client): tickets received per peer address, with the
  server's verified SPIFFE ID, in memory and optionally in a JSON file so that a
  restarted sidecar can resume. Tickets are single use here too (the server
  would refuse a second redemption anyway).

Both are sans-IO: the clock is injected and nothing touches the network.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aioquic.tls import CipherSuite, SessionTicket

from ..errors import ConfigError
from .base import ticket_cache_problem

DEFAULT_TICKET_LIFETIME = 3600.0
"""Seconds a server accepts a ticket after issuing it (aioquic announces 24 h; we redeem less)."""

DEFAULT_STORE_CAPACITY = 100_000
"""Outstanding tickets a server keeps; the oldest are dropped (and refused) beyond this."""

TICKETS_PER_PEER = 4
"""Tickets a client keeps per peer address (one is used per connection)."""


@dataclass
class IssuedTicket:
    """A server-side ticket and the client identity it was issued to."""

    ticket: SessionTicket
    identity: str
    issued_at: float
    valid_until: float | None = None
    """When the client's certificate expires (``time.time()`` seconds; None: not
    known): a resumption carries no certificate, so none is accepted after it."""


class TicketStore:
    """Server side: single-use, expiring session tickets with the client's identity.

    :param lifetime: seconds after issuing a ticket during which it is accepted.
    :param capacity: most tickets kept; the oldest are evicted first.
    :param clock: ``time.time``-like function (injected in tests).
    """

    def __init__(
        self,
        *,
        lifetime: float = DEFAULT_TICKET_LIFETIME,
        capacity: int = DEFAULT_STORE_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lifetime = lifetime
        self.capacity = capacity
        self.clock = clock
        self.issued = 0
        self.redeemed = 0
        self.refused = 0
        self._tickets: OrderedDict[bytes, IssuedTicket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._tickets)

    def add(self, ticket: SessionTicket, identity: str, valid_until: float | None = None) -> None:
        """Record a ticket just issued to the client whose verified SPIFFE ID is ``identity``
        and whose certificate is good until ``valid_until`` (``time.time()`` seconds)."""
        self._tickets[ticket.ticket] = IssuedTicket(ticket, identity, self.clock(), valid_until)
        self.issued += 1
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def clear(self) -> None:
        """Forget every ticket: their clients were verified with a trust bundle that
        changed (a CA taken out of it must not let a client it vouched for resume), as
        the native engine's store is replaced with new roots."""
        self._tickets.clear()

    def redeem(self, label: bytes) -> IssuedTicket | None:
        """Take the ticket a ClientHello offers; None if unknown, used already or expired."""
        record = self._tickets.pop(label, None)
        now = self.clock()
        if (
            record is None
            or now - record.issued_at > self.lifetime
            or (record.valid_until is not None and now > record.valid_until)
        ):
            self.refused += 1
            return None
        self.redeemed += 1
        return record


@dataclass
class CachedTicket:
    """A client-side ticket and the server identity verified when it was received."""

    ticket: SessionTicket
    identity: str


class TicketCache:
    """Client side: session tickets per peer address and client identity, optionally
    persisted to a file.

    A ticket resumes a session as the client identity it was issued to (the server
    recorded it, and a resumed handshake presents no certificate): it is kept under the
    SPIFFE ID of the client that received it and handed only to that one, so that a
    client with another certificate, loading the same file, makes a full handshake.

    :param path: a JSON file to load at start and rewrite on every change, or None
        for memory only. The file holds resumption secrets: it is written with
        mode 0600.
    :raises ConfigError: ``path`` holds something else (:func:`.base.ticket_cache_problem`):
        it is refused rather than overwritten.
    :param per_peer: tickets kept per peer (newest first).
    :param clock: ``time.time``-like function; expired tickets are never handed out.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        per_peer: int = TICKETS_PER_PEER,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.per_peer = per_peer
        self.clock = clock
        self._tickets: dict[str, list[CachedTicket]] = {}
        if self.path is not None and self.path.exists():
            self._load(self.path)

    @staticmethod
    def key(address: tuple[str, int], client: str = "") -> str:
        """The cache key of a peer address, for the client identity ``client``."""
        peer = f"{address[0]}:{address[1]}"
        return f"{client} {peer}" if client else peer

    def _keys(self, address: tuple[str, int], client: str | None) -> list[str]:
        """The keys holding tickets for ``address``: the client identity ``client``'s, or
        every client identity's if None."""
        if client is not None:
            return [self.key(address, client)]
        peer = self.key(address)
        return [key for key in self._tickets if key == peer or key.endswith(f" {peer}")]

    def count(self, address: tuple[str, int], client: str | None = None) -> int:
        """Tickets held for ``address`` (for the client identity ``client``; any if None)."""
        return sum(len(self._tickets.get(key, [])) for key in self._keys(address, client))

    def store(
        self, address: tuple[str, int], ticket: SessionTicket, identity: str, client: str = ""
    ) -> None:
        """Keep a ticket the client identity ``client`` received from the peer at
        ``address``, whose identity is ``identity``."""
        tickets = self._tickets.setdefault(self.key(address, client), [])
        tickets.insert(0, CachedTicket(ticket, identity))
        del tickets[self.per_peer :]
        self._save()

    def take(self, address: tuple[str, int], client: str | None = None) -> CachedTicket | None:
        """Remove and return the newest valid ticket the client identity ``client`` holds
        for ``address`` (None if there is none); with ``client`` None, one of any client
        identity's (the transport always names its own)."""
        keys = self._keys(address, client)
        return self._take(keys[0]) if keys else None

    def _take(self, key: str) -> CachedTicket | None:
        tickets = self._tickets.get(key, [])
        now = datetime.datetime.fromtimestamp(self.clock(), datetime.UTC)
        result = None
        while tickets and result is None:
            candidate = tickets.pop(0)
            if candidate.ticket.not_valid_before <= now <= candidate.ticket.not_valid_after:
                result = candidate
        if not tickets:
            self._tickets.pop(key, None)
        self._save()
        return result

    def clear(self) -> None:
        """Forget every ticket."""
        self._tickets.clear()
        self._save()

    # -- persistence -----------------------------------------------------------

    def _save(self) -> None:
        if self.path is None:
            return
        data = {
            key: [_ticket_to_json(entry) for entry in entries]
            for key, entries in self._tickets.items()
        }
        directory = self.path.parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=directory, prefix=".tickets-")
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file)
            os.replace(temporary, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _load(self, path: Path) -> None:
        problem = ticket_cache_problem(path)
        if problem is not None:
            raise ConfigError(f"ticket cache {path}: {problem}")
        try:
            data = json.loads(path.read_text() or "{}")
            self._tickets = {
                key: [_ticket_from_json(entry) for entry in entries]
                for key, entries in data.items()
            }
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            # Entries this version cannot read only cost a full handshake.
            self._tickets = {}


def _ticket_to_json(entry: CachedTicket) -> dict[str, object]:
    ticket = entry.ticket
    return {
        "identity": entry.identity,
        "age_add": ticket.age_add,
        "cipher_suite": int(ticket.cipher_suite),
        "not_valid_after": ticket.not_valid_after.isoformat(),
        "not_valid_before": ticket.not_valid_before.isoformat(),
        "resumption_secret": ticket.resumption_secret.hex(),
        "server_name": ticket.server_name,
        "ticket": ticket.ticket.hex(),
        "max_early_data_size": ticket.max_early_data_size,
        "other_extensions": [[kind, value.hex()] for kind, value in ticket.other_extensions],
    }


def _ticket_from_json(data: dict[str, object]) -> CachedTicket:
    """One saved ticket; ValueError (or KeyError, TypeError) for an entry this version
    cannot read: :meth:`TicketCache._load` then drops them all (a full handshake)."""
    extensions = data["other_extensions"]
    if not isinstance(extensions, list):
        raise ValueError("other_extensions is not a list")
    server_name = data["server_name"]
    early = data["max_early_data_size"]
    if server_name is not None and not isinstance(server_name, str):
        raise ValueError("server_name is not a string")
    if early is not None and (not isinstance(early, int) or isinstance(early, bool)):
        raise ValueError("max_early_data_size is not an integer")
    ticket = SessionTicket(
        age_add=int(str(data["age_add"])),
        cipher_suite=CipherSuite(int(str(data["cipher_suite"]))),
        not_valid_after=_aware_time(data["not_valid_after"]),
        not_valid_before=_aware_time(data["not_valid_before"]),
        resumption_secret=bytes.fromhex(str(data["resumption_secret"])),
        server_name=server_name,  # type: ignore[arg-type]  # (None: no SNI was sent)
        ticket=bytes.fromhex(str(data["ticket"])),
        max_early_data_size=early,
        other_extensions=[(int(kind), bytes.fromhex(value)) for kind, value in extensions],
    )
    return CachedTicket(ticket, str(data["identity"]))


def _aware_time(value: object) -> datetime.datetime:
    """An ISO 8601 time with its UTC offset, as :func:`_ticket_to_json` writes it (one
    without could not be compared with the clock: the first flow failed)."""
    moment = datetime.datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset")
    return moment
