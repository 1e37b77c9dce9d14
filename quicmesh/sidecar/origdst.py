"""The address an application dialled before the capture rules redirected it.

Linux keeps it in the connection's conntrack entry and returns it from
``getsockopt(SOL_IP, SO_ORIGINAL_DST)`` (IPv4, a ``sockaddr_in``) or
``getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)`` (IPv6, a ``sockaddr_in6``): what
Envoy's ``original_dst`` listener filter reads. :func:`parse_sockaddr` is the
pure part; :func:`original_destination` the system call.
"""

from __future__ import annotations

import ipaddress
import socket
import struct

from .config import Address

SO_ORIGINAL_DST = 80
"""From ``<linux/netfilter_ipv4.h>``."""
IP6T_SO_ORIGINAL_DST = 80
"""From ``<linux/netfilter_ipv6/ip6_tables.h>``."""
_SOL_IPV6 = 41
_SOCKADDR_IN6 = 28


def parse_sockaddr(data: bytes) -> Address:
    """A ``sockaddr_in`` or ``sockaddr_in6`` (as the kernel returns it) as ``(ip, port)``.

    :raises ValueError: ``data`` is not one of the two.
    """
    if len(data) < 4:
        raise ValueError(f"a sockaddr has at least 4 bytes, got {len(data)}")
    (family,) = struct.unpack_from("=H", data)
    (port,) = struct.unpack_from("!H", data, 2)
    if family == socket.AF_INET and len(data) >= 8:
        return str(ipaddress.IPv4Address(data[4:8])), port
    if family == socket.AF_INET6 and len(data) >= 24:
        return str(ipaddress.IPv6Address(data[8:24])), port
    raise ValueError(f"address family {family} with {len(data)} bytes is not IPv4 or IPv6")


def original_destination(sock: socket.socket) -> Address | None:
    """The dialled address of a redirected TCP connection, or None if it was not redirected.

    None when the kernel has no NAT record for the connection (it reached the
    listener directly), or the socket is neither IPv4 nor IPv6.
    """
    try:
        if sock.family == socket.AF_INET:
            data = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        elif sock.family == socket.AF_INET6:
            data = sock.getsockopt(_SOL_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6)
        else:
            return None
        address = parse_sockaddr(data)
    except (OSError, ValueError):
        return None
    local = sock.getsockname()
    if normalise(address) == normalise((local[0], local[1])):
        return None  # conntrack without NAT: the connection was made to the listener itself
    return address


def normalise(address: Address) -> Address:
    """``address`` with its IP in canonical form (IPv4-mapped IPv6 unmapped)."""
    host, port = address
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), port
