"""Thin adaptors to the OS: ``ip`` commands, named network namespaces, TUN devices, ``setns``.

Everything here is Linux-only and, except :func:`missing_privileges`, needs root.
Failures are translated into :class:`NetemError` with the command and its message.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import functools
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from quicmesh.errors import QuicmeshError, os_error_text

__all__ = [
    "NETNS_DIR",
    "NetemError",
    "create_tun",
    "delete_namespace",
    "in_namespace",
    "ip",
    "list_namespaces",
    "missing_privileges",
]

NETNS_DIR = "/run/netns"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000


class NetemError(QuicmeshError):
    """The link emulator could not set up, run or tear down a link."""


_CAP_NET_ADMIN = 12
_CAP_SYS_ADMIN = 21


def _has_capability(number: int) -> bool:
    """Whether this process's effective capabilities hold ``number`` (True where
    ``/proc`` cannot say)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> number & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def missing_privileges() -> str | None:
    """Why this process cannot build links (one line), or ``None`` if it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and TUN devices)"
    for capability, name in ((_CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (_CAP_NET_ADMIN, "CAP_NET_ADMIN")):
        if not _has_capability(capability):
            # Root in a default container: every case failed at `mount --make-shared`.
            return f"needs {name} (network namespaces), which this root lacks"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (TUN devices), which this system lacks"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    return None


def ip(*args: str, namespace: str | None = None) -> None:
    """Run ``ip [-n namespace] args...``; raise :class:`NetemError` if it fails."""
    argv = ["ip", *(("-n", namespace) if namespace else ()), *args]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise NetemError(f"{' '.join(argv)}: {exc}") from None
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit status {result.returncode}"
        raise NetemError(f"{' '.join(argv)}: {message}")


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (those ``ip netns`` knows)."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def delete_namespace(name: str) -> None:
    """Delete a named namespace if it exists (no error if it does not)."""
    if name in list_namespaces():
        ip("netns", "delete", name)


def create_tun(name: str) -> int:
    """Create a TUN device ``name`` (no packet-info header, no virtio-net header).

    Without ``IFF_VNET_HDR`` the kernel never hands the device GSO super-packets,
    so every read is one IP packet of at most the MTU. The device lives as long
    as the returned non-blocking file descriptor stays open.
    """
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", name.encode(), _IFF_TUN | _IFF_NO_PI))
    except OSError as exc:
        os.close(fd)
        raise NetemError(f"cannot create TUN device {name}: {os_error_text(exc)}") from None
    return fd


@functools.cache
def _libc_setns() -> Callable[[int, int], int]:
    """libc's setns (``os.setns`` only exists from Python 3.12)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    function = libc.setns
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int], int], function)


def _setns(fd: int) -> None:
    if _libc_setns()(fd, _CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise NetemError(f"setns failed: {os.strerror(error)}")


@contextlib.contextmanager
def in_namespace(name: str) -> Iterator[None]:
    """Switch the *calling thread* into network namespace ``name`` for the block.

    Sockets created inside the block belong to that namespace for their whole
    life, even after the thread switches back; other threads are not affected.
    """
    try:
        target = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetemError(f"no network namespace {name}: {os_error_text(exc)}") from None
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(original)
        finally:
            os.close(original)
    finally:
        os.close(target)


def write_sysctl(namespace: str, key: str, value: str) -> None:
    """Set ``net.*`` sysctl ``key`` inside ``namespace`` (via /proc/sys, per thread)."""
    path = "/proc/sys/" + key.replace(".", "/")
    with in_namespace(namespace), open(path, "w") as file:
        file.write(value)


def namespace_argv(namespace: str, argv: Sequence[str]) -> list[str]:
    """``argv`` prefixed so that it runs inside ``namespace``."""
    return ["ip", "netns", "exec", namespace, *argv]
