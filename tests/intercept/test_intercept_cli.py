"""``quicmesh intercept`` as a user runs it: the console script in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid

import pytest

from quicmesh.netem import system


def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "quicmesh", "intercept", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,  # type: ignore[call-overload]
    )


def test_console_script_help() -> None:
    script = shutil.which("quicmesh")
    assert script is not None, "the quicmesh console script is not installed"
    done = subprocess.run(
        [script, "intercept", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert "install" in done.stdout and "remove" in done.stdout
    top = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert "intercept" in top.stdout


def test_install_help_lists_the_options() -> None:
    done = run("install", "--help")
    assert done.returncode == 0
    for option in (
        "--dry-run",
        "--netns",
        "--outbound-port",
        "--inbound-port",
        "--no-inbound",
        "--proxy-uid",
        "--proxy-gid",
        "--include-cidrs",
        "--exclude-cidrs",
        "--include-ports",
        "--exclude-ports",
        "--inbound-ports",
        "--exclude-inbound-ports",
    ):
        assert option in done.stdout


def test_dry_run_prints_the_script_without_privileges() -> None:
    done = run(
        "install",
        "--dry-run",
        "--outbound-port",
        "16001",
        "--exclude-ports",
        "5432,8000-8080",
        "--include-cidrs",
        "10.0.0.0/8,fd00::/8",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("table inet quicmesh {}\ndelete table inet quicmesh\n")
    assert "redirect to :16001" in done.stdout
    assert "5432, 8000-8080, 15006, 16001" in done.stdout
    assert "10.0.0.0/8" in done.stdout and "fd00::/8" in done.stdout
    removal = run("remove", "--dry-run")
    assert removal.returncode == 0
    assert removal.stdout == "table inet quicmesh {}\ndelete table inet quicmesh\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["install", "--exclude-ports", "70000"], "--exclude-ports: '70000' is not a port"),
        (["install", "--include-cidrs", "nope"], "'nope' is not an IP address or CIDR block"),
        (["install", "--outbound-port", "15006"], "must differ"),
        (["install", "--proxy-uid", "", "--proxy-gid", ""], "would loop"),
        # An empty include list (an unset shell variable) captured everything.
        (["install", "--include-cidrs", ""], "--include-cidrs: lists nothing"),
        (["install", "--include-ports", ",,"], "--include-ports: lists nothing"),
        (["install", "--inbound-ports", ""], "--inbound-ports: lists nothing"),
        # Only the capture ports, never redirected: rules that captured nothing, exit 0.
        (["install", "--include-ports", "15001"], "--include-ports 15001: only the capture"),
        (["install", "--inbound-ports", "15006"], "--inbound-ports 15006: only the capture"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args: list[str], needle: str) -> None:
    done = run(*args, "--dry-run") if args[0] == "install" else run(*args)
    assert done.returncode == 2
    assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "quicmesh intercept" in line]) == 1


def test_without_nft_one_line_says_so() -> None:
    env = {**os.environ, "PATH": "/nonexistent"}
    done = run("install", env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "quicmesh intercept install: needs the nft command (Debian package nftables), "
        "which is not on PATH"
    )


def test_without_cap_net_admin_one_line_says_so() -> None:
    argv = [sys.executable, "-m", "quicmesh", "intercept", "remove"]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop CAP_NET_ADMIN as root")
        argv = ["setpriv", "--bounding-set=-net_admin", *argv]
    elif shutil.which("nft") is None:
        pytest.skip("nft is not installed here (the line about it is tested above)")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "quicmesh intercept remove: needs CAP_NET_ADMIN to change nftables rules (run as root)"
    )


@pytest.mark.netns
def test_install_and_remove_in_a_named_namespace() -> None:
    name = f"qmicpt-cli-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    system.ip("netns", "add", name)
    try:
        done = run("install", "--netns", name)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == (
            f"quicmesh intercept: rules installed in network namespace {name} (table inet quicmesh)"
        )
        listed = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "list", "table", "inet", "quicmesh"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "redirect to :15001" in listed and "redirect to :15006" in listed
        assert run("remove", "--netns", name).returncode == 0
        empty = subprocess.run(
            ["ip", "netns", "exec", name, "nft", "list", "ruleset"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert empty.strip() == ""
    finally:
        system.delete_namespace(name)
    missing = run("install", "--netns", name)
    assert missing.returncode == 1
    assert f"nft in network namespace {name}: Cannot open network namespace" in missing.stderr


@pytest.mark.parametrize("name", ["", "a/b", "..", "two words"])
def test_a_bad_namespace_name_is_a_usage_error_not_the_current_namespace(name: str) -> None:
    """``--netns ""`` (an unset shell variable) installed the rules in the current
    namespace, the host's; it is a usage error, as any name ``ip netns`` cannot take."""
    done = run("install", "--netns", name, "--dry-run")
    assert done.returncode == 2, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--netns" in lines[0], lines
    assert done.stdout == ""
