"""``Link``: two network namespaces joined through TUN devices and a forwarder process.

Layout of one link (addresses are private to the two namespaces it creates)::

    [client namespace]                    root namespace                  [server namespace]
    netem0 10.77.0.1/30 <-TUN fd-> forwarder process (the model) <-TUN fd-> netem0 10.77.0.2/30

Set-up creates both namespaces, brings ``lo`` up in each, disables IPv6 in them (so
the counters only see the traffic under test), creates the TUN devices in the root
namespace and moves one into each namespace, then starts the forwarder. Tear-down
runs on every exit from the ``with`` block, exceptions and Ctrl-C included: it stops
the commands and threads started through the link, stops the forwarder (which
destroys the TUN devices with it) and deletes the namespaces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

from quicmesh.netem import system
from quicmesh.netem.config import LinkConfig
from quicmesh.netem.model import DirectionStats
from quicmesh.netem.system import NetemError

from .._child import child_environment, python_command
from .._signals import signals_deferred

__all__ = [
    "CLIENT_ADDRESS",
    "INTERFACE",
    "SERVER_ADDRESS",
    "Link",
    "LinkStats",
    "Side",
    "cleanup_stale_namespaces",
]

logger = logging.getLogger("quicmesh.netem")

Side = Literal["client", "server"]

#: Address of the client namespace's interface (a /30 that exists only inside the link).
CLIENT_ADDRESS = "10.77.0.1"
#: Address of the server namespace's interface.
SERVER_ADDRESS = "10.77.0.2"
#: Name of the TUN interface inside each namespace.
INTERFACE = "netem0"
_PREFIX_LENGTH = 30
_NAMESPACE_PREFIX = "qmnetem"
_NAMESPACE_PATTERN = re.compile(rf"{_NAMESPACE_PREFIX}-(\d+)-\d+-(client|server)")
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_counter = itertools.count()


@dataclass(frozen=True)
class LinkStats:
    """Forwarder counters for both directions of a link."""

    client_to_server: DirectionStats
    server_to_client: DirectionStats


class Link:
    """An emulated link between a client and a server network namespace.

    Use as a context manager (or call :meth:`open` and :meth:`close`)::

        with Link(LinkConfig.symmetric(delay=0.020, loss=0.01, rate_bps=20e6)) as link:
            server = link.popen("server", ["python", "-m", "http.server", "8000"])
            future = link.run_in_thread("client", fetch, link.server_address)

    :param config: the impairments; the default is a perfect link.

    Raises :class:`~quicmesh.netem.system.NetemError` (a :class:`QuicmeshError`) with a
    one-line message when it lacks root or the set-up fails.
    """

    client_address = CLIENT_ADDRESS
    """IP address of the client side, reachable from the server namespace."""
    server_address = SERVER_ADDRESS
    """IP address of the server side, reachable from the client namespace."""
    interface = INTERFACE
    """Name of the link's interface in each namespace."""

    def __init__(self, config: LinkConfig | None = None) -> None:
        self.config = config if config is not None else LinkConfig()
        number = next(_counter)
        tag = f"{_NAMESPACE_PREFIX}-{os.getpid()}-{number}"
        self.client_ns = f"{tag}-client"
        """Name of the client network namespace (usable with ``ip netns exec``)."""
        self.server_ns = f"{tag}-server"
        """Name of the server network namespace."""
        self._tun_names = {  # at most 15 characters, unique on the host
            side: f"qm{os.getpid() % 10**7}-{number % 1000}{side[0]}"
            for side in ("client", "server")
        }
        self._tun_fds: list[int] = []
        self._namespaces: list[str] = []
        self._forwarder: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._control_lock = threading.Lock()
        self._control_buffer = b""
        self._processes: list[tuple[subprocess.Popen[Any], bool]] = []
        self._threads: list[_NamespaceThread] = []
        self._final_stats: LinkStats | None = None
        self._opened = False
        self._closed = False

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Link:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetemError:
            if exc is None:
                raise
            logger.exception("tear-down failed while handling another exception")

    def open(self) -> None:
        """Create the namespaces, the TUN devices and the forwarder."""
        if self._opened:
            raise NetemError("this Link was already opened; create a new one")
        self._opened = True
        reason = system.missing_privileges()
        if reason is not None:
            raise NetemError(f"link emulator {reason}")
        cleanup_stale_namespaces()
        try:
            self._set_up()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Tear everything down; safe to call more than once and after a failed open."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        # Signals held back for the whole tear-down, acted on at its end: a second Ctrl-C
        # or a SIGTERM while the server process was being stopped (up to _STOP_TIMEOUT)
        # left the namespaces and that process behind (a review).
        with signals_deferred():
            for step in (self._stop_threads, self._stop_processes, self._stop_forwarder):
                try:
                    step()
                except Exception as exc:  # keep tearing down; report at the end
                    errors.append(str(exc))
            for fd in self._tun_fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._tun_fds.clear()
            for name in reversed(self._namespaces):
                try:
                    system.delete_namespace(name)
                except NetemError as exc:
                    errors.append(str(exc))
            self._namespaces.clear()
        if errors:
            raise NetemError("tear-down incomplete: " + "; ".join(errors))

    def _set_up(self) -> None:
        sides: tuple[tuple[Side, str, str], ...] = (
            ("client", self.client_ns, CLIENT_ADDRESS),
            ("server", self.server_ns, SERVER_ADDRESS),
        )
        for _side, namespace, _address in sides:
            # Recorded first, made with signals held: a SystemExit while `ip` made it left
            # it behind (`ip` ran on after the tear-down had looked).
            self._namespaces.append(namespace)
            with signals_deferred():
                system.ip("netns", "add", namespace)
            for key in ("net.ipv6.conf.all.disable_ipv6", "net.ipv6.conf.default.disable_ipv6"):
                with contextlib.suppress(FileNotFoundError):
                    system.write_sysctl(namespace, key, "1")
        for side, namespace, address in sides:
            tun = self._tun_names[side]
            self._tun_fds.append(system.create_tun(tun))
            system.ip("link", "set", "dev", tun, "netns", namespace)
            system.ip("link", "set", "dev", "lo", "up", namespace=namespace)
            system.ip("link", "set", "dev", tun, "name", INTERFACE, namespace=namespace)
            system.ip(
                "addr", "add", f"{address}/{_PREFIX_LENGTH}", "dev", INTERFACE,
                namespace=namespace,
            )  # fmt: skip
            system.ip(
                "link", "set", "dev", INTERFACE, "mtu", str(self.config.mtu), "up",
                namespace=namespace,
            )  # fmt: skip
        self._start_forwarder()

    def _start_forwarder(self) -> None:
        parent, child = socket.socketpair()
        client_fd, server_fd = self._tun_fds
        env = child_environment()
        argv = python_command(
            "-m", "quicmesh.netem.forwarder",
            "--client-fd", str(client_fd), "--server-fd", str(server_fd),
            "--control-fd", str(child.fileno()),
            "--config", json.dumps(self.config.to_dict()),
        )  # fmt: skip
        try:
            self._forwarder = subprocess.Popen(
                argv,
                pass_fds=(client_fd, server_fd, child.fileno()),
                env=env,
                start_new_session=True,  # Ctrl-C goes to us; we stop it in order
            )
        except OSError as exc:
            parent.close()
            raise NetemError(f"cannot start the forwarder: {exc}") from None
        finally:
            child.close()
        self._control = parent
        parent.settimeout(_START_TIMEOUT)
        if self._read_control_line() != "ready":
            raise NetemError("the forwarder did not start (see its error output above)")

    def _stop_forwarder(self) -> None:
        if self._control is not None:
            with contextlib.suppress(NetemError):
                self._final_stats = self.stats()
            self._control.close()
            self._control = None
        process = self._forwarder
        if process is None:
            return
        try:
            process.wait(timeout=_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self._forwarder = None

    # -- running things inside the namespaces -----------------------------------------

    def namespace(self, side: Side) -> str:
        """The name of the ``"client"`` or ``"server"`` namespace."""
        if side == "client":
            return self.client_ns
        if side == "server":
            return self.server_ns
        raise NetemError(f"side must be 'client' or 'server', not {side!r}")

    def address(self, side: Side) -> str:
        """The IP address of the ``"client"`` or ``"server"`` side."""
        self.namespace(side)
        return CLIENT_ADDRESS if side == "client" else SERVER_ADDRESS

    def popen(self, side: Side, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside a namespace (``ip netns exec``); it is stopped at tear-down.

        :param side: ``"client"`` or ``"server"``.
        :param argv: the command and its arguments.
        :param kwargs: passed to :class:`subprocess.Popen`. ``start_new_session``
            defaults to ``True`` so that tear-down can stop the whole process group;
            pass ``False`` to keep the command in the terminal's foreground group.
        """
        self._check_open()
        kwargs.setdefault("start_new_session", True)
        # Signals held until the process is recorded: a Ctrl-C (KeyboardInterrupt) raised
        # inside Popen after the command had started left it unknown to the tear-down,
        # running on with this process's stderr open (a CI run's double Ctrl-C test).
        with signals_deferred():
            try:
                process: subprocess.Popen[Any] = subprocess.Popen(
                    system.namespace_argv(self.namespace(side), argv), **kwargs
                )
            except OSError as exc:
                raise NetemError(f"cannot run {argv[0] if argv else '?'}: {exc}") from None
            self._processes.append((process, bool(kwargs["start_new_session"])))
        return process

    def run_in_thread(
        self, side: Side, function: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        """Call ``function(*args)`` in a new thread inside a namespace.

        If the call returns a coroutine (``function`` is an ``async def``), it runs on
        the thread's own event loop. Any socket it opens belongs to the namespace.
        Use ``await asyncio.wrap_future(future)`` to wait from an event loop. Threads
        still running at tear-down are cancelled (coroutines) and joined.
        """
        self._check_open()
        thread = _NamespaceThread(self.namespace(side), function, args)
        self._threads.append(thread)
        thread.start()
        return thread.future

    @contextlib.contextmanager
    def entered(self, side: Side) -> Iterator[None]:
        """Switch the calling thread into a namespace for the block.

        Sockets created in the block stay in that namespace afterwards, so one event
        loop can hold sockets of both sides::

            with link.entered("server"):
                listener = socket.create_server((link.server_address, 0))
        """
        self._check_open()
        with system.in_namespace(self.namespace(side)):
            yield

    # -- observing --------------------------------------------------------------------

    def stats(self) -> LinkStats:
        """Counters of both directions (after tear-down: the last counters read)."""
        if self._control is None:
            if self._final_stats is None:
                raise NetemError("the link is not running")
            return self._final_stats
        with self._control_lock:
            self._control.settimeout(_STOP_TIMEOUT)
            try:
                self._control.sendall(b"stats\n")
            except OSError as exc:
                raise NetemError(f"the forwarder is not answering: {exc}") from None
            data = json.loads(self._read_control_line())
        return LinkStats(
            client_to_server=DirectionStats(**data["client_to_server"]),
            server_to_client=DirectionStats(**data["server_to_client"]),
        )

    def _read_control_line(self) -> str:
        assert self._control is not None
        while b"\n" not in self._control_buffer:
            try:
                chunk = self._control.recv(65536)
            except OSError as exc:
                raise NetemError(f"the forwarder is not answering: {exc}") from None
            if not chunk:
                raise NetemError("the forwarder exited")
            self._control_buffer += chunk
        line, self._control_buffer = self._control_buffer.split(b"\n", 1)
        return line.decode()

    def _check_open(self) -> None:
        if not self._opened or self._closed:
            raise NetemError("the link is not running (use it inside its with block)")

    # -- tear-down helpers ------------------------------------------------------------

    def _stop_threads(self) -> None:
        stuck = []
        for thread in self._threads:
            thread.cancel()
        deadline = time.monotonic() + _STOP_TIMEOUT
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                stuck.append(thread.name)
        self._threads.clear()
        if stuck:
            raise NetemError(f"threads still running in the namespaces: {', '.join(stuck)}")

    def _stop_processes(self) -> None:
        for process, own_group in self._processes:
            if process.poll() is None:
                _signal(process, own_group, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        for process, own_group in self._processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(process, own_group, signal.SIGKILL)
                process.wait()
        self._processes.clear()


def _signal(process: subprocess.Popen[Any], own_group: bool, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if own_group:
            os.killpg(process.pid, signum)
        else:
            process.send_signal(signum)


class _NamespaceThread(threading.Thread):
    """A thread that enters a namespace, runs one call (or coroutine) and resolves a future."""

    def __init__(self, namespace: str, function: Callable[..., Any], args: tuple[Any, ...]):
        super().__init__(name=f"netem-{namespace}-{getattr(function, '__name__', 'call')}")
        self.daemon = True
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._namespace = namespace
        self._function = function
        self._args = args
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._lock = threading.Lock()
        self._cancelled = False

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            with system.in_namespace(self._namespace):
                result = self._function(*self._args)
                if asyncio.iscoroutine(result):
                    result = asyncio.run(self._run_coroutine(result))
        except BaseException as exc:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)

    async def _run_coroutine(self, coroutine: Any) -> Any:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()
            if self._cancelled:
                coroutine.close()
                raise asyncio.CancelledError
        return await coroutine

    def cancel(self) -> None:
        """Cancel the coroutine, if any (a plain call cannot be interrupted)."""
        with self._lock:
            self._cancelled = True
            if self._loop is not None and self._task is not None:
                with contextlib.suppress(RuntimeError):  # loop already closed
                    self._loop.call_soon_threadsafe(self._task.cancel)


def cleanup_stale_namespaces() -> list[str]:
    """Delete namespaces left by links of processes that no longer exist (e.g. killed -9).

    Returns the names deleted. Namespaces of live processes are left alone.
    """
    deleted = []
    for name in system.list_namespaces():
        match = _NAMESPACE_PATTERN.fullmatch(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(NetemError):
            system.delete_namespace(name)
            deleted.append(name)
    return deleted


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
