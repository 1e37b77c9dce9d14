"""The capture ruleset as a pure function, its option parsers, and (as root) nft's verdict on it."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import uuid

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from quicmesh.intercept.rules import (
    TABLE,
    InterceptRules,
    parse_cidrs,
    parse_ids,
    parse_port_ranges,
    render_install,
    render_remove,
)
from quicmesh.netem import system

ports = st.integers(1, 65535)
port_ranges = st.tuples(ports, ports).map(lambda p: (min(p), max(p)))
networks = st.one_of(
    st.builds(
        lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv4Address(a)}/{n}", strict=False),
        st.integers(0, 2**32 - 1),
        st.integers(0, 32),
    ),
    st.builds(
        lambda a, n: ipaddress.ip_network(f"{ipaddress.IPv6Address(a)}/{n}", strict=False),
        st.integers(0, 2**128 - 1),
        st.integers(0, 128),
    ),
)
ids = st.integers(0, 2**32 - 2)


@st.composite
def rule_sets(draw: st.DrawFn) -> InterceptRules:
    outbound = draw(ports)
    inbound = draw(st.none() | ports.filter(lambda p: p != outbound))
    uids = tuple(draw(st.lists(ids, max_size=3)))
    gids = tuple(draw(st.lists(ids, min_size=0 if uids else 1, max_size=3)))
    include_ports = tuple(draw(st.lists(port_ranges, max_size=4)))
    inbound_ports = tuple(draw(st.lists(port_ranges, max_size=4)))
    own = {outbound, inbound}
    for ranges in (include_ports, inbound_ports):
        # (Lists of the capture ports alone are refused: they would capture nothing.)
        assume(not ranges or not all(a == b and a in own for a, b in ranges))
    return InterceptRules(
        outbound_port=outbound,
        inbound_port=inbound,
        proxy_uids=uids,
        proxy_gids=gids,
        include_cidrs=tuple(draw(st.lists(networks, max_size=4))),
        exclude_cidrs=tuple(draw(st.lists(networks, max_size=4))),
        include_ports=include_ports,
        exclude_ports=tuple(draw(st.lists(port_ranges, max_size=4))),
        inbound_ports=inbound_ports,
        exclude_inbound_ports=tuple(draw(st.lists(port_ranges, max_size=4))),
    )


def chain(script: str, name: str) -> list[str]:
    match = re.search(rf"chain {name} {{\n(.*?)\n  }}", script, re.S)
    assert match is not None, f"no chain {name}"
    return [line.strip() for line in match.group(1).splitlines()]


def test_default_rules_capture_tcp_only_and_skip_the_sidecar() -> None:
    script = render_install(InterceptRules())
    assert script.startswith(render_remove())  # atomic replace: create, delete, define
    output = chain(script, "output")
    assert output[0] == "type nat hook output priority -100; policy accept;"
    assert output[1] == "meta l4proto != tcp return"  # UDP (DNS, QUIC) is never captured
    assert "meta skuid @proxy_uids return" in output
    assert "meta skgid @proxy_gids return" in output
    assert output[-1] == "meta l4proto tcp redirect to :15001"
    assert "elements = { 1337 }" in script
    assert "elements = { 127.0.0.0/8 }" in script
    # IPv6 link-local is left alone: redirected, its SYN was dropped (a link-local source
    # to ::1), and the sidecar could not dial its scope anyway.
    assert "elements = { ::1/128, fe80::/10 }" in script
    # An application calling itself on its own address stays local (istio-iptables'
    # -o lo RETURN): before the sets, after the sidecar's own exemption.
    assert output.index("fib daddr type local return") == 4
    inbound = chain(script, "prerouting")
    assert inbound[-1] == "meta l4proto tcp redirect to :15006"
    assert re.search(r"set exclude_inbound_ports \{[^}]*elements = \{ 22, 15001, 15006 \}", script)


def test_no_inbound_capture_means_no_prerouting_chain() -> None:
    script = render_install(InterceptRules(inbound_port=None))
    assert "prerouting" not in script and "15006" not in script


@given(rule_sets())
def test_every_option_lands_in_a_set_and_the_chains_stay_flat(rules: InterceptRules) -> None:
    script = render_install(rules)
    assert script.count("{") == script.count("}")
    assert script.count(f"table inet {TABLE} {{") == 2
    # One rule per list whatever its length: lookups are set lookups.
    assert len(chain(script, "output")) == 12
    for network in (*rules.include_cidrs, *rules.exclude_cidrs):
        assert str(network) in script
    for first, last in (*rules.exclude_ports, *rules.include_ports):
        assert (f"{first}-{last}" if first != last else str(first)) in script
    assert f"redirect to :{rules.outbound_port}" in script
    if rules.inbound_port is None:
        assert "prerouting" not in script
    else:
        assert len(chain(script, "prerouting")) == 6
    if rules.include_cidrs and not any(n.version == 6 for n in rules.include_cidrs):
        # Only IPv4 included: the IPv6 include set is empty, so no IPv6 is captured.
        assert re.search(r"set include_v6 \{ type ipv6_addr; flags interval; \}", script)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"outbound_port": 0}, "outside 1-65535"),
        ({"inbound_port": 15001}, "must differ"),
        ({"proxy_uids": (), "proxy_gids": ()}, "would loop"),
        ({"exclude_ports": ((10, 5),)}, "not within"),
        ({"proxy_uids": (2**32,)}, "outside"),
    ],
)
def test_contradictory_rules_are_refused(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        InterceptRules(**kwargs)  # type: ignore[arg-type]


@given(st.lists(port_ranges, max_size=8))
def test_port_ranges_round_trip(ranges: list[tuple[int, int]]) -> None:
    text = ",".join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)
    assert parse_port_ranges(text) == tuple(ranges)


@given(st.text(max_size=20))
def test_port_parser_accepts_or_names_the_bad_item(text: str) -> None:
    try:
        parsed = parse_port_ranges(text)
    except ValueError as exc:
        assert "port" in str(exc)
    else:
        assert all(1 <= a <= b <= 65535 for a, b in parsed)


@pytest.mark.parametrize("text", ["0", "65536", "80-70", "http", "1-2-3", "99999999", "²", "٣"])
def test_bad_ports_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_port_ranges(text)


@given(st.lists(networks, max_size=6))
def test_cidrs_round_trip(items: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
    assert parse_cidrs(", ".join(str(n) for n in items)) == tuple(items)


@pytest.mark.parametrize("text", ["10.0.0.0/33", "example.com", "10.0.0.1/8/8", "fd00::/129"])
def test_bad_cidrs_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not an IP address or CIDR block"):
        parse_cidrs(text)


def test_ids() -> None:
    assert parse_ids("1337, 0") == (1337, 0)
    assert parse_ids("") == ()
    for bad in ("-1", "root", "4294967295", "²"):
        with pytest.raises(ValueError, match="not a numeric user or group ID"):
            parse_ids(bad)


@pytest.mark.netns
@settings(max_examples=15, deadline=None)
@given(rule_sets())
def test_nft_accepts_every_rendered_ruleset_and_install_is_idempotent(
    rules: InterceptRules,
) -> None:
    name = f"qmicpt-rules-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    system.ip("netns", "add", name)
    try:

        def nft(*args: str, script: str = "") -> str:
            done = subprocess.run(
                ["ip", "netns", "exec", name, "nft", *args],
                input=script,
                capture_output=True,
                text=True,
                check=False,
            )
            assert done.returncode == 0, f"{done.stderr}\n{script}"
            return done.stdout

        nft("-f", "-", script=render_install(rules))
        first = nft("list", "ruleset")
        nft("-f", "-", script=render_install(rules))
        assert nft("list", "ruleset") == first
        nft("-f", "-", script=render_remove())
        assert nft("list", "ruleset").strip() == ""
    finally:
        system.delete_namespace(name)


def test_an_ipv4_mapped_exclusion_excludes_the_ipv4_address() -> None:
    """``--exclude-cidrs ::ffff:192.0.2.1`` went into the IPv6 set, which the IPv4 packets
    it meant never match: it excluded nothing."""
    assert parse_cidrs("::ffff:192.0.2.1, ::ffff:10.0.0.0/104, ::/0") == (
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::/0"),  # wider than the mapped range: stays IPv6
    )
