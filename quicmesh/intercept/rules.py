"""The capture ruleset: a pure function from :class:`InterceptRules` to an ``nft -f`` script.

Everything quicmesh writes lives in one table, ``inet quicmesh`` (the ``inet``
family covers IPv4 and IPv6 with one set of chains). A script starts by creating
the table empty and deleting it, then defines it whole, so that ``nft -f`` replaces
the previous version in one transaction: installing twice leaves the same ruleset,
and :func:`render_remove` leaves nothing, whether or not the table existed.

Outbound (hook ``output``, NAT priority): TCP from local processes is redirected
to the sidecar's outbound capture port, except traffic of the sidecar's own user
or group IDs (so the sidecar's upstream connections never loop back into it),
destinations outside the included CIDRs or inside the excluded ones (loopback
is excluded by default), and excluded destination ports. Inbound (hook
``prerouting``): TCP to a local address on an application port is redirected to
the inbound capture port, except excluded ports (22 by default). UDP is never
captured (DNS and the QUIC tunnel pass untouched). Every list is an nft set, so
a packet costs one hash or interval-tree lookup per list however long it is.

Like any NAT rule, these run for the first packet of a connection only; the
rest of the connection follows conntrack.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

TABLE = "quicmesh"
"""Name of the nft table (family ``inet``) that quicmesh owns."""

DEFAULT_OUTBOUND_PORT = 15001
DEFAULT_INBOUND_PORT = 15006
DEFAULT_PROXY_ID = 1337
"""User and group ID the sidecar runs with, as in Istio."""
DEFAULT_EXCLUDE_CIDRS = ("127.0.0.0/8", "::1/128", "fe80::/10")
"""Loopback, and IPv6 link-local: a link-local destination redirected to the capture port
was dropped (its source stays link-local while its destination becomes ::1), and its scope
would be lost on the way through the sidecar anyway."""
DEFAULT_EXCLUDE_INBOUND_PORTS = ((22, 22),)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
PortRange = tuple[int, int]
"""An inclusive range of TCP ports, ``(first, last)``."""


@dataclass(frozen=True)
class InterceptRules:
    """What to capture and where to send it.

    Port lists are tuples of inclusive ranges; an empty ``include_*`` tuple means
    everything.
    """

    outbound_port: int = DEFAULT_OUTBOUND_PORT
    inbound_port: int | None = DEFAULT_INBOUND_PORT
    """None: inbound traffic is not captured."""
    proxy_uids: tuple[int, ...] = (DEFAULT_PROXY_ID,)
    proxy_gids: tuple[int, ...] = (DEFAULT_PROXY_ID,)
    include_cidrs: tuple[Network, ...] = ()
    exclude_cidrs: tuple[Network, ...] = tuple(
        ipaddress.ip_network(c) for c in DEFAULT_EXCLUDE_CIDRS
    )
    include_ports: tuple[PortRange, ...] = ()
    exclude_ports: tuple[PortRange, ...] = ()
    inbound_ports: tuple[PortRange, ...] = ()
    exclude_inbound_ports: tuple[PortRange, ...] = DEFAULT_EXCLUDE_INBOUND_PORTS

    def __post_init__(self) -> None:
        for port in (self.outbound_port, self.inbound_port):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"port {port} is outside 1-65535")
        if self.inbound_port == self.outbound_port:
            raise ValueError("the outbound and inbound capture ports must differ")
        for ident in (*self.proxy_uids, *self.proxy_gids):
            if not 0 <= ident < 2**32 - 1:
                raise ValueError(f"user or group ID {ident} is outside 0-4294967294")
        if not self.proxy_uids and not self.proxy_gids:
            raise ValueError("give the sidecar's user or group ID, or its traffic would loop")
        for ranges in (
            self.include_ports,
            self.exclude_ports,
            self.inbound_ports,
            self.exclude_inbound_ports,
        ):
            for first, last in ranges:
                if not 1 <= first <= last <= 65535:
                    raise ValueError(f"port range {first}-{last} is not within 1-65535")
        # The capture ports are never redirected: a list of them alone captures nothing
        # (an empty list is refused where it is parsed, for the same reason).
        own = {self.outbound_port, self.inbound_port} - {None}
        for name, ranges in (
            ("include-ports", self.include_ports),
            ("inbound-ports", self.inbound_ports),
        ):
            if ranges and all(first == last and first in own for first, last in ranges):
                ports = ", ".join(str(first) for first, _ in ranges)
                raise ValueError(
                    f"--{name} {ports}: only the capture ports, which are never redirected, "
                    "so nothing would be captured"
                )


def render_install(rules: InterceptRules) -> str:
    """The ``nft -f`` script that installs (or atomically replaces) the quicmesh table."""
    v4 = [n for n in rules.include_cidrs if n.version == 4]
    v6 = [n for n in rules.include_cidrs if n.version == 6]
    if not rules.include_cidrs:
        v4, v6 = [ipaddress.IPv4Network("0.0.0.0/0")], [ipaddress.IPv6Network("::/0")]
    # The capture ports themselves are never redirected again.
    own = [(rules.outbound_port, rules.outbound_port)]
    if rules.inbound_port is not None:
        own.append((rules.inbound_port, rules.inbound_port))
    lines = [
        *render_remove().splitlines(),
        f"table inet {TABLE} {{",
        _set("proxy_uids", "uid", [str(u) for u in sorted(set(rules.proxy_uids))]),
        _set("proxy_gids", "gid", [str(g) for g in sorted(set(rules.proxy_gids))]),
        _set("include_v4", "ipv4_addr", _cidrs(v4), interval=True),
        _set("include_v6", "ipv6_addr", _cidrs(v6), interval=True),
        _set(
            "exclude_v4",
            "ipv4_addr",
            _cidrs(n for n in rules.exclude_cidrs if n.version == 4),
            interval=True,
        ),
        _set(
            "exclude_v6",
            "ipv6_addr",
            _cidrs(n for n in rules.exclude_cidrs if n.version == 6),
            interval=True,
        ),
        _set("include_ports", "inet_service", _ports(rules.include_ports or [(1, 65535)]), True),
        _set("exclude_ports", "inet_service", _ports([*rules.exclude_ports, *own]), True),
        "  chain output {",
        "    type nat hook output priority -100; policy accept;",
        "    meta l4proto != tcp return",
        "    meta skuid @proxy_uids return",
        "    meta skgid @proxy_gids return",
        # An application calling itself on its own address stays local, as with
        # istio-iptables (its -o lo RETURN): a health check on the pod IP, say.
        "    fib daddr type local return",
        "    ip daddr != @include_v4 return",
        "    ip6 daddr != @include_v6 return",
        "    ip daddr @exclude_v4 return",
        "    ip6 daddr @exclude_v6 return",
        "    tcp dport != @include_ports return",
        "    tcp dport @exclude_ports return",
        f"    meta l4proto tcp redirect to :{rules.outbound_port}",
        "  }",
    ]
    if rules.inbound_port is not None:
        inbound_excluded = [*rules.exclude_inbound_ports, *own]
        lines += [
            _set(
                "inbound_ports", "inet_service", _ports(rules.inbound_ports or [(1, 65535)]), True
            ),
            _set("exclude_inbound_ports", "inet_service", _ports(inbound_excluded), True),
            "  chain prerouting {",
            "    type nat hook prerouting priority -100; policy accept;",
            "    meta l4proto != tcp return",
            "    fib daddr type != local return",
            "    tcp dport != @inbound_ports return",
            "    tcp dport @exclude_inbound_ports return",
            f"    meta l4proto tcp redirect to :{rules.inbound_port}",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_remove() -> str:
    """The ``nft -f`` script that removes the quicmesh table (a no-op if it is absent)."""
    return f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\n"


def _set(name: str, kind: str, elements: list[str], interval: bool = False) -> str:
    flags = " flags interval;" if interval else ""
    body = f" elements = {{ {', '.join(elements)} }};" if elements else ""
    # auto-merge lets overlapping ranges and CIDRs coexist in one interval set.
    merge = " auto-merge;" if interval and elements else ""
    return f"  set {name} {{ type {kind};{flags}{merge}{body} }}"


def _cidrs(networks: Iterable[Network]) -> list[str]:
    return [str(n) for n in sorted(set(networks), key=lambda n: (n.network_address, n.prefixlen))]


def _ports(ranges: Iterable[PortRange]) -> list[str]:
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in sorted(set(ranges))]


# -- parsing the command line's lists ------------------------------------------------


def parse_port_ranges(text: str) -> tuple[PortRange, ...]:
    """``"22,8000-8080"`` -> ``((22, 22), (8000, 8080))``; ``""`` -> ``()``.

    :raises ValueError: naming the item that is not a port or a range of ports.
    """
    ranges: list[PortRange] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        first_text, sep, last_text = item.partition("-")
        first = _port(first_text, item)
        last = _port(last_text, item) if sep else first
        if first > last:
            raise ValueError(f"port range {item!r} ends before it starts")
        ranges.append((first, last))
    return tuple(ranges)


def _port(text: str, item: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 5 or not 1 <= int(text) <= 65535:
        raise ValueError(f"{item!r} is not a port (1-65535) or a range such as 8000-8080")
    return int(text)


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, fd00::/8"`` -> networks (host bits may be set); ``""`` -> ``()``.

    :raises ValueError: naming the item that is not an IP address or CIDR block.
    """
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or CIDR block") from None
        networks.append(_unmapped(network))
    return tuple(networks)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _unmapped(network: Network) -> Network:
    """An IPv4-mapped IPv6 block (``::ffff:10.0.0.1``) as the IPv4 block it names: the
    packets it means are IPv4 ones, which an IPv6 set never matches. A wider block
    (``::/0``) stays IPv6."""
    if not isinstance(network, ipaddress.IPv6Network) or not network.subnet_of(_MAPPED):
        return network
    mapped = network.network_address.ipv4_mapped
    assert mapped is not None
    return ipaddress.IPv4Network((mapped, network.prefixlen - 96))


def parse_ids(text: str) -> tuple[int, ...]:
    """``"1337,1338"`` -> user or group IDs; ``""`` -> ``()``.

    :raises ValueError: naming the item that is not a numeric ID.
    """
    ids: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if not (item.isascii() and item.isdigit()) or len(item) > 10 or int(item) >= 2**32 - 1:
            raise ValueError(f"{item!r} is not a numeric user or group ID")
        ids.append(int(item))
    return tuple(ids)
