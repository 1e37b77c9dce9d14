"""Decrypt a relay trace with a TLS key log and summarise what happened on the wire.

This is how the test cases are checked independently of what either endpoint
says about itself (the Interop Runner does the same with tshark): quicmesh is
on one side of every pair and writes its TLS secrets (``SSLKEYLOGFILE``), so
every packet of the trace can be opened. Initial packets are opened with the
keys derived from the client's destination connection ID; the ClientHello's
random names the connection in the key log; Handshake, 0-RTT and 1-RTT packets
are opened with the logged secrets (trying the cipher suites the secret's
length allows), following key updates. Frames are parsed far enough to count
STREAM bytes per packet type, read CRYPTO data (to tell a resumed handshake,
without a Certificate message, from a full one), and find PATH_CHALLENGE,
NEW_CONNECTION_ID and DATAGRAM frames.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic.crypto import CryptoContext, CryptoPair, next_key_phase
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from aioquic.tls import CipherSuite

from .relay import TO_CLIENT, TO_SERVER

_SUITES_BY_SECRET_LENGTH = {
    32: (CipherSuite.AES_128_GCM_SHA256, CipherSuite.CHACHA20_POLY1305_SHA256),
    48: (CipherSuite.AES_256_GCM_SHA384,),
}
_TLS_CERTIFICATE = 11
_VERSION_1 = 0x00000001


def parse_key_log(text: str) -> dict[bytes, dict[str, bytes]]:
    """``{client_random: {label: secret}}`` from NSS key log lines."""
    secrets: dict[bytes, dict[str, bytes]] = defaultdict(dict)
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and not line.startswith("#"):
            try:
                secrets[bytes.fromhex(parts[1])][parts[0]] = bytes.fromhex(parts[2])
            except ValueError:
                continue
    return dict(secrets)


@dataclass
class Connection:
    """What the trace shows of one QUIC connection."""

    client_cids: set[bytes] = field(default_factory=set)
    server_cids: set[bytes] = field(default_factory=set)
    original_dcid: bytes = b""
    client_random: bytes | None = None
    cipher_suite: CipherSuite | None = None
    token_sent: bool = False
    """The client's Initial carried a token (after a Retry, or from NEW_TOKEN)."""
    handshake_messages: dict[int, list[int]] = field(
        default_factory=lambda: {TO_SERVER: [], TO_CLIENT: []}
    )
    """TLS handshake message types seen in Initial and Handshake CRYPTO data."""
    stream_bytes: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    """STREAM frame payload bytes by (direction, packet type)."""
    key_phases: dict[int, set[int]] = field(
        default_factory=lambda: {TO_SERVER: set(), TO_CLIENT: set()}
    )
    key_updates: dict[int, int] = field(default_factory=lambda: {TO_SERVER: 0, TO_CLIENT: 0})
    path_challenges: dict[int, set[int]] = field(
        default_factory=lambda: {TO_SERVER: set(), TO_CLIENT: set()}
    )
    """Paths (relay upstream numbers) on which each side sent PATH_CHALLENGE."""
    open_paths: dict[int, set[int]] = field(
        default_factory=lambda: {TO_SERVER: set(), TO_CLIENT: set()}
    )
    """Paths on which each side sent a packet without CONNECTION_CLOSE (a path the
    peer first used for its CONNECTION_CLOSE gets the answering close, RFC 9000
    10.2.2, and needs no validation)."""
    paths: set[int] = field(default_factory=set)
    datagram_frames: dict[int, int] = field(default_factory=lambda: {TO_SERVER: 0, TO_CLIENT: 0})
    undecryptable: int = 0
    _crypto_data: dict[tuple[int, str], dict[int, bytes]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    _contexts: dict[tuple[int, str], CryptoContext] = field(default_factory=dict)
    _previous: dict[int, CryptoContext] = field(default_factory=dict)
    _largest_pn: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))

    @property
    def resumed(self) -> bool:
        """The server sent no Certificate message: a PSK (resumed) handshake."""
        return bool(self.handshake_messages[TO_CLIENT]) and (
            _TLS_CERTIFICATE not in self.handshake_messages[TO_CLIENT]
        )

    def client_stream_bytes(self, packet_type: str) -> int:
        """STREAM payload bytes the client sent in packets of ``packet_type``."""
        return self.stream_bytes[(TO_SERVER, packet_type)]


@dataclass
class TraceSummary:
    """Connections and packet counts of one trace."""

    connections: list[Connection] = field(default_factory=list)
    retries: int = 0
    version_negotiations: int = 0
    packets: dict[tuple[int, str], int] = field(default_factory=lambda: defaultdict(int))
    bytes_by_path: dict[tuple[int, int], int] = field(default_factory=lambda: defaultdict(int))
    unparsed: int = 0

    @property
    def handshakes(self) -> int:
        """Connections whose client Initial was seen."""
        return len(self.connections)


_TYPE_NAMES = {
    QuicPacketType.INITIAL: "initial",
    QuicPacketType.ZERO_RTT: "0rtt",
    QuicPacketType.HANDSHAKE: "handshake",
    QuicPacketType.RETRY: "retry",
    QuicPacketType.ONE_RTT: "1rtt",
    QuicPacketType.VERSION_NEGOTIATION: "vn",
}


def _ungreased(packet: bytes) -> bytes:
    """``packet`` with the fixed bit set, for parsing its header only.

    A peer that announced ``grease_quic_bit`` (RFC 9287) may receive packets
    with the fixed bit (0x40) cleared: quinn and ngtcp2 both grease it then.
    aioquic's header parser refuses such a packet; the bit is outside header
    protection but inside the AEAD's associated data, so decryption keeps the
    packet as it was on the wire.
    """
    return packet if packet[0] & 0x40 else bytes([packet[0] | 0x40]) + packet[1:]


class TraceAnalyzer:
    """Feed datagrams in order with :meth:`datagram`; read :attr:`summary`."""

    def __init__(self, key_log: dict[bytes, dict[str, bytes]]) -> None:
        self.key_log = key_log
        self.summary = TraceSummary()
        self._by_cid: dict[tuple[int, bytes], Connection] = {}

    def datagram(self, direction: int, path: int, data: bytes) -> None:
        """Account for one datagram going in ``direction`` on relay path ``path``."""
        self.summary.bytes_by_path[(direction, path)] += len(data)
        offset = 0
        while offset < len(data):
            packet = data[offset:]
            if not any(packet):
                break  # padding after coalesced packets
            try:
                consumed = self._packet(direction, path, packet)
            except (ValueError, BufferReadError):
                self.summary.unparsed += 1
                break
            offset += consumed

    # -- packets -----------------------------------------------------------------

    def _packet(self, direction: int, path: int, packet: bytes) -> int:
        if packet[0] & 0x80:
            buf = Buffer(data=_ungreased(packet))
            header = pull_quic_header(buf)
        else:
            connection, cid = self._short_header_connection(direction, packet)
            buf = Buffer(data=_ungreased(packet))
            header = pull_quic_header(buf, host_cid_length=len(cid))
            if connection is None:
                self.summary.packets[(direction, "1rtt-unknown")] += 1
                return header.packet_length
        kind = _TYPE_NAMES[header.packet_type]
        self.summary.packets[(direction, kind)] += 1
        if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
            self.summary.version_negotiations += 1
            return len(packet)
        if header.packet_type == QuicPacketType.RETRY:
            self.summary.retries += 1
            connection = self._by_cid.get((TO_CLIENT, header.destination_cid))
            if connection is not None:
                # The client starts over with a new ClientHello (new random).
                connection.client_random = None
                connection._crypto_data.clear()
                connection._largest_pn.clear()
                connection.server_cids.add(header.source_cid)
                self._by_cid[(TO_SERVER, header.source_cid)] = connection
            return len(packet)
        if header.packet_type != QuicPacketType.ONE_RTT:
            connection = self._long_header_connection(direction, header)
        connection.paths.add(path)
        encrypted_offset = buf.tell()
        raw = packet[: header.packet_length]
        payload, key_phase, updated = self._decrypt(
            connection, direction, kind, raw, encrypted_offset
        )
        if payload is None:
            connection.undecryptable += 1
            return header.packet_length
        if kind == "1rtt":
            connection.key_phases[direction].add(key_phase)
            if updated:
                connection.key_updates[direction] += 1
        self._frames(connection, direction, path, kind, payload)
        return header.packet_length

    def _short_header_connection(
        self, direction: int, packet: bytes
    ) -> tuple[Connection | None, bytes]:
        for (cid_direction, cid), connection in self._by_cid.items():
            if cid_direction == direction and cid and packet[1 : 1 + len(cid)] == cid:
                return connection, cid
        for (cid_direction, cid), connection in self._by_cid.items():
            if cid_direction == direction and not cid:
                return connection, cid
        return None, b""

    def _long_header_connection(self, direction: int, header: object) -> Connection:
        dcid: bytes = header.destination_cid  # type: ignore[attr-defined]
        scid: bytes = header.source_cid  # type: ignore[attr-defined]
        connection = self._by_cid.get((direction, dcid))
        if connection is None and direction == TO_SERVER:
            connection = self._by_cid.get((TO_CLIENT, scid))
        if connection is None:
            connection = Connection(original_dcid=dcid)
            self.summary.connections.append(connection)
        if direction == TO_SERVER:
            connection.client_cids.add(scid)
            self._by_cid[(TO_CLIENT, scid)] = connection
            self._by_cid.setdefault((TO_SERVER, dcid), connection)
            if header.token and header.packet_type == QuicPacketType.INITIAL:  # type: ignore[attr-defined]
                connection.token_sent = True
        else:
            connection.server_cids.add(scid)
            self._by_cid[(TO_SERVER, scid)] = connection
        return connection

    # -- decryption --------------------------------------------------------------

    def _decrypt(
        self, connection: Connection, direction: int, kind: str, packet: bytes, offset: int
    ) -> tuple[bytes | None, int, bool]:
        key = (direction, kind)
        expected = connection._largest_pn[key] + 1
        if kind == "initial":
            pair = CryptoPair()
            dcid = Buffer(data=_ungreased(packet))
            header = pull_quic_header(dcid)
            cid = header.destination_cid if direction == TO_SERVER else connection.original_dcid
            candidates = [cid]
            if direction == TO_CLIENT:
                candidates += [c for c in connection.server_cids if c != cid]
            for candidate in candidates:
                pair.setup_initial(candidate, is_client=direction == TO_CLIENT, version=_VERSION_1)
                try:
                    _, payload, number, _ = pair.recv.decrypt_packet(packet, offset, expected)
                except Exception:
                    continue
                if direction == TO_SERVER:
                    connection.original_dcid = connection.original_dcid or candidate
                connection._largest_pn[key] = max(connection._largest_pn[key], number)
                return payload, 0, False
            return None, 0, False
        context = connection._contexts.get(key) or self._context(connection, direction, kind)
        if context is None:
            return None, 0, False
        for attempt in (context, connection._previous.get(direction) if kind == "1rtt" else None):
            if attempt is None:
                continue
            try:
                plain_header, payload, number, updated = attempt.decrypt_packet(
                    packet, offset, expected
                )
            except Exception:
                continue
            connection._largest_pn[key] = max(connection._largest_pn[key], number)
            updated = updated and attempt is context
            if updated:
                current = connection._contexts.get(key, context)
                connection._previous[direction] = current
                connection._contexts[key] = next_key_phase(current)
            return payload, (plain_header[0] & 4) >> 2, updated
        return None, 0, False

    def _context(self, connection: Connection, direction: int, kind: str) -> CryptoContext | None:
        side = "CLIENT" if direction == TO_SERVER else "SERVER"
        label = {
            "handshake": f"{side}_HANDSHAKE_TRAFFIC_SECRET",
            "0rtt": "CLIENT_EARLY_TRAFFIC_SECRET",
            "1rtt": f"{side}_TRAFFIC_SECRET_0",
        }[kind]
        if connection.client_random is None:
            return None
        secret = self.key_log.get(connection.client_random, {}).get(label)
        if secret is None:
            return None
        suites = _SUITES_BY_SECRET_LENGTH.get(len(secret), ())
        if connection.cipher_suite is not None:
            suites = (connection.cipher_suite,)
        if len(suites) == 1 or kind == "0rtt":
            context = CryptoContext()
            context.setup(cipher_suite=suites[0], secret=secret, version=_VERSION_1)
            connection._contexts[(direction, kind)] = context
            if kind != "0rtt":
                connection.cipher_suite = suites[0]
            return context
        return _TrialContext(connection, direction, kind, secret, suites)  # type: ignore[return-value]

    # -- frames ------------------------------------------------------------------

    def _frames(
        self, connection: Connection, direction: int, path: int, kind: str, payload: bytes
    ) -> None:
        buf = Buffer(data=payload)
        closes = False
        try:
            while not buf.eof():
                frame_type = buf.pull_uint_var()
                closes = closes or frame_type in (0x1C, 0x1D)
                if frame_type == 0x00 or frame_type == 0x01 or frame_type == 0x1E:
                    continue
                if frame_type in (0x02, 0x03):
                    buf.pull_uint_var()
                    buf.pull_uint_var()
                    ranges = buf.pull_uint_var()
                    buf.pull_uint_var()
                    for _ in range(ranges * 2 + (3 if frame_type == 0x03 else 0)):
                        buf.pull_uint_var()
                elif frame_type == 0x04:
                    for _ in range(3):
                        buf.pull_uint_var()
                elif frame_type == 0x05:
                    buf.pull_uint_var()
                    buf.pull_uint_var()
                elif frame_type == 0x06:
                    offset = buf.pull_uint_var()
                    data = buf.pull_bytes(buf.pull_uint_var())
                    if kind in ("initial", "handshake"):
                        connection._crypto_data[(direction, kind)][offset] = data
                        self._handshake_messages(connection, direction, kind)
                elif frame_type == 0x07:
                    buf.pull_bytes(buf.pull_uint_var())
                elif 0x08 <= frame_type <= 0x0F:
                    buf.pull_uint_var()
                    if frame_type & 0x04:
                        buf.pull_uint_var()
                    length = buf.pull_uint_var() if frame_type & 0x02 else len(payload) - buf.tell()
                    buf.pull_bytes(length)
                    connection.stream_bytes[(direction, kind)] += length
                elif frame_type in (0x10, 0x12, 0x13, 0x14, 0x16, 0x17, 0x19):
                    buf.pull_uint_var()
                elif frame_type in (0x11, 0x15):
                    buf.pull_uint_var()
                    buf.pull_uint_var()
                elif frame_type == 0x18:
                    buf.pull_uint_var()
                    buf.pull_uint_var()
                    cid = buf.pull_bytes(buf.pull_uint8())
                    buf.pull_bytes(16)
                    # Issued by the sender, used by the other side as destination.
                    receiver_direction = TO_CLIENT if direction == TO_SERVER else TO_SERVER
                    self._by_cid[(receiver_direction, cid)] = connection
                    issuer = connection.client_cids if direction == TO_SERVER else None
                    (issuer if issuer is not None else connection.server_cids).add(cid)
                elif frame_type == 0x1A:
                    buf.pull_bytes(8)
                    connection.path_challenges[direction].add(path)
                elif frame_type == 0x1B:
                    buf.pull_bytes(8)
                elif frame_type in (0x1C, 0x1D):
                    buf.pull_uint_var()
                    if frame_type == 0x1C:
                        buf.pull_uint_var()
                    buf.pull_bytes(buf.pull_uint_var())
                elif frame_type in (0x30, 0x31):
                    connection.datagram_frames[direction] += 1
                    if frame_type == 0x31:
                        buf.pull_bytes(buf.pull_uint_var())
                    else:
                        buf.pull_bytes(len(payload) - buf.tell())
                else:
                    return  # an extension frame we do not parse; the rest is skipped
        except BufferReadError:
            return
        finally:
            if not closes:
                connection.open_paths[direction].add(path)

    def _handshake_messages(self, connection: Connection, direction: int, kind: str) -> None:
        initial = _contiguous(connection._crypto_data[(direction, "initial")])
        # ClientHello: type, length (3), version (2), random (32)
        if direction == TO_SERVER and connection.client_random is None and initial[:1] == b"\x01":
            connection.client_random = initial[6:38] if len(initial) >= 38 else None
        connection.handshake_messages[direction] = _message_types(initial) + _message_types(
            _contiguous(connection._crypto_data[(direction, "handshake")])
        )


def _contiguous(pieces: dict[int, bytes]) -> bytes:
    data = b""
    while len(data) in pieces:
        data += pieces[len(data)]
    return data


def _message_types(data: bytes) -> list[int]:
    types = []
    offset = 0
    while offset + 4 <= len(data):
        types.append(data[offset])
        offset += 4 + int.from_bytes(data[offset + 1 : offset + 4], "big")
    return types


class _TrialContext:
    """A 1-RTT or Handshake context whose cipher suite is found by trial decryption."""

    def __init__(
        self,
        connection: Connection,
        direction: int,
        kind: str,
        secret: bytes,
        suites: tuple[CipherSuite, ...],
    ) -> None:
        self._connection = connection
        self._key = (direction, kind)
        self._candidates = []
        for suite in suites:
            context = CryptoContext()
            context.setup(cipher_suite=suite, secret=secret, version=_VERSION_1)
            self._candidates.append(context)

    def decrypt_packet(
        self, packet: bytes, offset: int, expected: int
    ) -> tuple[bytes, bytes, int, bool]:
        for context in self._candidates:
            try:
                result = context.decrypt_packet(packet, offset, expected)
            except Exception:
                continue
            self._connection.cipher_suite = context.cipher_suite
            self._connection._contexts[self._key] = context
            return result
        raise ValueError("no cipher suite opens the packet")


def analyze(records: list[tuple[float, int, int, bytes]], key_log_text: str) -> TraceSummary:
    """Summarise a relay trace (see :func:`interop.relay.read_trace`)."""
    analyzer = TraceAnalyzer(parse_key_log(key_log_text))
    for _, direction, path, data in records:
        analyzer.datagram(direction, path, data)
    return analyzer.summary
