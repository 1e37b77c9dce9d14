"""CONNECT request semantics shared by every transport.

A flow is tunnelled as an HTTP CONNECT request (RFC 9110 section 9.3.6; over HTTP/3
RFC 9114 section 4.4, over HTTP/2 RFC 9113 section 8.5, over HTTP/1.1 as a request
line). This module parses and validates what goes into that request, the target
authority and the extra headers, and builds and reads the response's reason
(``proxy-status``, RFC 9209). It does no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..errors import InvalidHeader, InvalidTarget, TunnelUsageError

MAX_FIELD_SECTION_SIZE = 60 * 1024
"""Decoded size of a request's or response's header section, every transport: names
and values plus 32 bytes per field (RFC 9114 4.2.2; Envoy's 60 KiB default). HTTP/3
(SETTINGS_MAX_FIELD_SECTION_SIZE) and HTTP/2 (SETTINGS_MAX_HEADER_LIST_SIZE) announce
it and refuse larger sections while decoding; HTTP/1.1 bounds the head's bytes."""

MAX_HEADER_COUNT = 64
"""Extra headers one CONNECT request may carry."""

MAX_HEADER_BYTES = 16 * 1024
"""Total size of the extra headers' names and values, in bytes."""

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
HEADER_NAME_PATTERN = r"[a-z0-9!#$%&'*+.^_`|~-]+"
"""(fullmatch) An extra header's name: an RFC 9110 token in lower case."""
HEADER_VALUE_PATTERN = r"(?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?"
"""(fullmatch) An extra header's value: visible ASCII, inner spaces and tabs."""
_HEADER_NAME = re.compile(HEADER_NAME_PATTERN)
_HEADER_VALUE = re.compile(HEADER_VALUE_PATTERN)
_HEADER_VALUE_FORBIDDEN = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

RESERVED_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "host",
        "keep-alive",
        "proxy-connection",
        "proxy-status",
        "te",
        "transfer-encoding",
        "upgrade",
    }
)
"""Headers a caller may not set: connection-specific in HTTP/2 and HTTP/3, or ours."""


class Target(str):
    """A validated CONNECT target: the authority ``host:port`` (``[v6]:port``) with its
    parsed :attr:`host` and :attr:`port`.

    Parsed once, by :func:`parse_target`, and carried as is from there (a cluster's
    configured target, the request a session decoded, :attr:`MeshStream.target
    <quicmesh.transport.stream.MeshStream.target>`). It is the authority string
    itself, so code that treats a target as text keeps working; build one with
    :func:`parse_target` or ``Target(host, port)`` from already-validated parts.
    """

    host: str
    """A lower-case DNS name or a normalised IP literal (IPv6 without brackets)."""
    port: int
    """1-65535."""

    def __new__(cls, host: str, port: int) -> Target:
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        target = super().__new__(cls, authority)
        target.host = host
        target.port = port
        return target

    def __getnewargs__(self) -> tuple[str, int]:  # type: ignore[override]
        return (self.host, self.port)

    @property
    def authority(self) -> str:
        """The ``:authority`` form as a plain string: ``host:port``, IPv6 in brackets."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Target({self.host!r}, {self.port})"


def parse_target(value: str) -> Target:
    """Parse and validate a CONNECT target, ``host:port`` (``[v6]:port`` for IPv6).

    The grammar is :func:`parse_authority`'s. A :class:`Target` is returned as is:
    it was parsed already. Raises :class:`~quicmesh.errors.InvalidTarget` naming
    the target and the problem.
    """
    if isinstance(value, Target):
        return value
    if not isinstance(value, str):
        raise InvalidTarget(
            f"target must be a host:port string, got {type(value).__name__} {value!r:.60}"
        )
    if not value:
        raise InvalidTarget("target is empty: expected host:port")
    if len(value) > 300:
        raise InvalidTarget("target is longer than 300 characters")
    try:
        host, port = parse_authority(value)
    except InvalidTarget as exc:
        raise InvalidTarget(f"target {value!r}: {exc}") from None
    return Target(host, port)


def parse_authority(value: str) -> tuple[str, int]:
    """The one ``host:port`` grammar of quicmesh, as ``(host, port)``.

    ``host`` is an RFC 1123 host name (lower-cased; a last label that is all digits
    is refused, so ``10.0.0.999`` is neither an address nor a name), a dotted IPv4
    address, or an IPv6 address in brackets (normalised, brackets removed); the
    port is 1 to 5 ASCII digits, 1-65535. CONNECT targets (:func:`parse_target`)
    and the sidecar's configured addresses (listeners, endpoints, admin) use it.
    Raises :class:`~quicmesh.errors.InvalidTarget` with a one-line message naming
    the part at fault.
    """
    if not isinstance(value, str) or not value:
        raise InvalidTarget("expected host:port")
    if len(value) > 300:
        raise InvalidTarget("longer than 300 characters")
    return _parse_authority(value)


@functools.lru_cache(maxsize=1024)
def _parse_authority(value: str) -> tuple[str, int]:
    """:func:`parse_authority` of a string of at most 300 characters; a peer's flows
    name the same few targets again and again, so the answers are kept (bounded;
    refusals are not kept)."""
    if not value.isprintable():  # (a CR/LF read as a misplaced IPv6 address's colon)
        raise InvalidTarget(f"{value!r} holds a control character")
    if "://" in value:
        raise InvalidTarget(f"{value!r} is a URL: give host:port")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise InvalidTarget(f"{value!r} is not [ipv6]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidTarget(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise InvalidTarget(f"{value!r} is not host:port")
        if ":" in host:
            raise InvalidTarget(f"{value!r}: write IPv6 addresses as [address]:port")
        if not host.isascii():  # (before lower(): the Kelvin sign lower-cases to "k")
            raise InvalidTarget(f"host {host!r} is not ASCII")
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            _check_host_name(host)
    return host, parse_port(port_text)


def parse_port(text: str) -> int:
    """A port, 1 to 5 ASCII digits within 1-65535; InvalidTarget says what is wrong."""
    if not (text.isascii() and text.isdigit()):
        raise InvalidTarget(f"port {text!r} is not a number")
    if len(text) > 5:
        raise InvalidTarget(f"port {text!r} has more than 5 digits")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidTarget(f"port {port} is outside 1-65535")
    return port


def parse_host_name(host: str) -> str:
    """A DNS host name as :func:`parse_authority` reads it: lower-cased, RFC 1123
    labels, the last one not all digits; InvalidTarget says what is wrong."""
    host = host.lower()
    _check_host_name(host)
    return host


def _check_host_name(host: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not name:
        raise InvalidTarget(f"{host!r} is not a host name or IP address")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise InvalidTarget(f"host name {host!r} has an invalid label {label!r}")
    if name.rsplit(".", 1)[-1].isdigit():
        raise InvalidTarget(f"{host!r} is neither an IPv4 address nor a host name")


def validate_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """Validate the extra headers of a CONNECT request and return them lower-cased.

    Names must be HTTP tokens, not pseudo-headers and not connection-specific;
    values must not contain control characters; the count and total size are
    bounded by :data:`MAX_HEADER_COUNT` and :data:`MAX_HEADER_BYTES`.
    """
    if not headers:
        return {}
    if not isinstance(headers, Mapping):
        raise InvalidHeader(
            f"headers must be a mapping of names to values, got {type(headers).__name__}"
        )
    if len(headers) > MAX_HEADER_COUNT:
        raise InvalidHeader(f"{len(headers)} headers: at most {MAX_HEADER_COUNT} are allowed")
    result: dict[str, str] = {}
    total = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidHeader("header names and values must be strings")
        lowered = name.lower()
        if not name.isascii() or not _HEADER_NAME.fullmatch(lowered):
            raise InvalidHeader(f"header name {name!r} is not a valid HTTP token")
        if lowered in RESERVED_HEADERS:
            raise InvalidHeader(f"header {name!r} is reserved and cannot be set")
        if not _HEADER_VALUE.fullmatch(value):
            if _HEADER_VALUE_FORBIDDEN.search(value) or not value.isascii():
                raise InvalidHeader(f"header {name!r} has control or non-ASCII characters")
            raise InvalidHeader(f"header {name!r} has leading or trailing white space")
        if lowered in result:
            raise InvalidHeader(f"header {name!r} is given twice")
        total += len(lowered) + len(value)
        result[lowered] = value
    if total > MAX_HEADER_BYTES:
        raise InvalidHeader(f"headers total {total} bytes: at most {MAX_HEADER_BYTES} are allowed")
    return result


@dataclass(frozen=True)
class ConnectRequest:
    """A valid CONNECT request, as :func:`parse_connect_request` read it."""

    target: Target
    headers: dict[str, str]
    """The extra headers, validated and lower-cased."""


_EXTENDED_CONNECT = (":path", ":scheme", ":protocol")


def parse_connect_request(fields: Iterable[tuple[bytes, bytes]]) -> ConnectRequest:
    """Read a CONNECT request's header fields, every transport alike.

    ``fields`` is the decoded header list in HTTP/2 and HTTP/3 form: the
    ``:method`` and ``:authority`` pseudo-headers and the extra headers (an
    HTTP/1.1 session passes its request line's method and target that way and
    leaves out ``Host``). A field given twice, a method other than ``CONNECT``,
    extended CONNECT (``:path``, ``:scheme``, ``:protocol``), a bad target or bad
    extra headers are refused; the session answers 400 with the message.

    :raises ~quicmesh.errors.TunnelUsageError: (an :class:`~quicmesh.errors.InvalidTarget`
        or :class:`~quicmesh.errors.InvalidHeader` for those) one line naming the problem.
    """
    pseudo: dict[str, str] = {}
    extra: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name = bytes(raw_name).decode("ascii", "replace")
        value = bytes(raw_value).decode("utf-8", "replace")
        into = pseudo if name.startswith(":") else extra
        if name in into:
            raise InvalidHeader(f"header {name!r} is given twice")
        into[name] = value
    method = pseudo.get(":method")
    if method != "CONNECT":
        raise TunnelUsageError(f"method {method!r} is not CONNECT")
    if any(name in pseudo for name in _EXTENDED_CONNECT):
        raise TunnelUsageError("extended CONNECT is not supported: send :authority only")
    return ConnectRequest(parse_target(pseudo.get(":authority", "")), validate_headers(extra))


def connect_request_fields(target: Target, headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 and HTTP/3 header list of a CONNECT for ``target`` with ``headers``."""
    fields = [(b":method", b"CONNECT"), (b":authority", target.authority.encode())]
    fields += [(name.encode(), value.encode()) for name, value in headers.items()]
    return fields


def read_connect_response(fields: Iterable[tuple[bytes, bytes]]) -> tuple[int, str] | None:
    """The status and reason (from ``proxy-status``) of a CONNECT's answer, from its header
    list in HTTP/2 and HTTP/3 form; None for an interim (1xx) answer. A status that is not
    three digits (RFC 9110 15) reads as 502."""
    status_text = ""
    proxy_status = None
    for raw_name, raw_value in fields:
        name = bytes(raw_name)
        if name == b":status":
            status_text = bytes(raw_value).decode("ascii", "replace")
        elif name == b"proxy-status":
            proxy_status = bytes(raw_value).decode("utf-8", "replace")
    if len(status_text) != 3 or not status_text.isdigit():  # (a 4,301-digit one raised)
        return 502, decode_proxy_status(proxy_status)
    if status_text.startswith("1"):
        return None
    return int(status_text), decode_proxy_status(proxy_status)


def response_fields(status: int, reason: str = "") -> list[tuple[bytes, bytes]]:
    """The HTTP/2 and HTTP/3 header list answering a CONNECT; a refusal's reason
    goes in ``proxy-status``."""
    fields = [(b":status", str(status).encode())]
    if status != 200 and reason:
        fields.append((b"proxy-status", encode_proxy_status(reason).encode()))
    return fields


def encode_proxy_status(reason: str) -> str:
    """The ``proxy-status`` value (RFC 9209) carrying a refusal's reason."""
    details = "".join(ch if " " <= ch <= "~" else "?" for ch in reason)[:512]
    details = details.replace("\\", "\\\\").replace('"', '\\"')
    return f'quicmesh; details="{details}"'


def decode_proxy_status(value: str | None) -> str:
    """The reason carried in a ``proxy-status`` value, or ``""``."""
    if not value:
        return ""
    match = re.search(r'details="((?:[^"\\]|\\.)*)"', value)
    if match is None:
        return ""
    return re.sub(r"\\(.)", r"\1", match.group(1))


STATUS_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
