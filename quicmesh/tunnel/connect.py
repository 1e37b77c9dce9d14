"""CONNECT request semantics shared by every transport.

A flow is tunnelled as an HTTP CONNECT request (RFC 9110 section 9.3.6; over HTTP/3
RFC 9114 section 4.4, over HTTP/2 RFC 9113 section 8.5, over HTTP/1.1 as a request
line). This module parses and validates what goes into that request, the target
authority and the extra headers, and builds and reads the response's reason
(``proxy-status``, RFC 9209). It does no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import InvalidHeader, InvalidTarget

MAX_FIELD_SECTION_SIZE = 60 * 1024
"""Decoded size of a request's or response's header section, every transport: names
and values plus 32 bytes per field (RFC 9114 4.2.2; Envoy's 60 KiB default). HTTP/3
(SETTINGS_MAX_FIELD_SECTION_SIZE) and HTTP/2 (SETTINGS_MAX_HEADER_LIST_SIZE) announce
it and refuse larger sections while decoding; HTTP/1.1 bounds the head's bytes."""

MAX_HEADER_COUNT = 64
"""Extra headers one CONNECT request may carry."""

MAX_HEADER_BYTES = 16 * 1024
"""Total size of the extra headers' names and values, in bytes."""

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_HEADER_NAME = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]+$")
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


@dataclass(frozen=True)
class Target:
    """A validated CONNECT target: a DNS name or IP literal and a port."""

    host: str
    port: int

    @property
    def authority(self) -> str:
        """The ``:authority`` form: ``host:port``, with IPv6 literals in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        return self.authority


def parse_target(value: str) -> Target:
    """Parse and validate ``host:port`` (``[v6]:port`` for IPv6).

    Host names are lower-cased and checked against RFC 1123; IP literals are
    normalised. Raises :class:`~quicmesh.errors.InvalidTarget` naming the problem.
    """
    if not isinstance(value, str) or not value:
        raise InvalidTarget("target is empty: expected host:port")
    if len(value) > 300:
        raise InvalidTarget("target is longer than 300 characters")
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise InvalidTarget(f"target {value!r} is not [ipv6]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise InvalidTarget(f"target {value!r} has an invalid IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise InvalidTarget(f"target {value!r} is not host:port")
        host = host.lower()
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            _check_host_name(value, host)
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise InvalidTarget(f"target {value!r} has an invalid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise InvalidTarget(f"target {value!r} has port {port} outside 1-65535")
    return Target(host, port)


def _check_host_name(value: str, host: str) -> None:
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not name:
        raise InvalidTarget(f"target {value!r} has an invalid host name")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise InvalidTarget(f"target {value!r} has an invalid host name label {label!r}")
    if name.rsplit(".", 1)[-1].isdigit():
        raise InvalidTarget(f"target {value!r} is neither an IPv4 address nor a host name")


def validate_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """Validate the extra headers of a CONNECT request and return them lower-cased.

    Names must be HTTP tokens, not pseudo-headers and not connection-specific;
    values must not contain control characters; the count and total size are
    bounded by :data:`MAX_HEADER_COUNT` and :data:`MAX_HEADER_BYTES`.
    """
    if not headers:
        return {}
    if len(headers) > MAX_HEADER_COUNT:
        raise InvalidHeader(f"{len(headers)} headers: at most {MAX_HEADER_COUNT} are allowed")
    result: dict[str, str] = {}
    total = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise InvalidHeader("header names and values must be strings")
        lowered = name.lower()
        if not _HEADER_NAME.match(lowered) or not lowered.isascii():
            raise InvalidHeader(f"header name {name!r} is not a valid HTTP token")
        if lowered in RESERVED_HEADERS:
            raise InvalidHeader(f"header {name!r} is reserved and cannot be set")
        if _HEADER_VALUE_FORBIDDEN.search(value) or not value.isascii():
            raise InvalidHeader(f"header {name!r} has control or non-ASCII characters")
        if value != value.strip(" \t"):
            raise InvalidHeader(f"header {name!r} has leading or trailing white space")
        if lowered in result:
            raise InvalidHeader(f"header {name!r} is given twice")
        total += len(lowered) + len(value)
        result[lowered] = value
    if total > MAX_HEADER_BYTES:
        raise InvalidHeader(f"headers total {total} bytes: at most {MAX_HEADER_BYTES} are allowed")
    return result


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
