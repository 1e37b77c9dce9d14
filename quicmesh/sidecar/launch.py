"""Running sidecar processes on loopback: what ``quicmesh demo`` and the tests share.

:class:`SidecarProcess` writes a configuration (a dict) as YAML, starts
``quicmesh sidecar -c FILE`` as a child process (``python -c`` with a launcher that
first asks to die with its parent), waits for ``/ready``
with a bounded deadline, reads ``/metrics`` and the access log, and stops the
process with a signal. :func:`free_port` finds a port number free on both TCP
and UDP, since an inbound listener binds the same number on both.

A parent that runs sidecars (the demo, the benchmarks) must leave none behind
when it is stopped: :func:`terminate_as_exit` turns SIGTERM and SIGHUP into
:class:`SystemExit` so its ``finally`` blocks stop them and remove its temporary
directory; and on Linux a sidecar started from the main thread gets SIGTERM from
the kernel when that thread ends, however it ends, SIGKILL included
(:func:`die_with_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import http.client
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml
from prometheus_client.parser import text_string_to_metric_families

from .._child import child_environment, python_command
from .._signals import signal_handlers, signals_deferred
from ..errors import QuicmeshError

LOOPBACK = "127.0.0.1"

T = TypeVar("T")


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def terminate_as_exit(
    handler: Callable[[int, FrameType | None], None] = _exit_on_signal,
) -> Iterator[None]:
    """Turn SIGTERM (``kill PID``) and SIGHUP (the terminal hung up) into
    ``SystemExit(128 + signal)`` for the block, so that its ``finally`` blocks run:
    child processes are stopped, temporary directories removed (SIGINT is
    KeyboardInterrupt already); or call ``handler`` instead. Outside the main thread
    it does nothing. In asyncio code use :func:`run_async`, which cancels the main
    task rather than raising in whatever task happens to run.

    A SystemExit raised where Python discards exceptions (a ``__del__``, a weakref
    callback: "Exception ignored in ...") would lose the signal, and the command ran
    on to exit 0: when the block ends, without an exception or with another one, the
    SystemExit is raised again there. A signal the process was started with ignored
    (``nohup``: SIGHUP) stays ignored."""
    taken = _not_ignored(signal.SIGTERM, signal.SIGHUP)
    received: list[int] = []

    def exit_on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise SystemExit(128 + signum)

    try:
        with signal_handlers(taken, exit_on_signal if handler is _exit_on_signal else handler):
            yield
    except Exception:
        if received:  # (discarded, then the block failed for another reason)
            raise SystemExit(128 + received[0]) from None
        raise
    if received:
        raise SystemExit(128 + received[0])


def _not_ignored(*signums: signal.Signals) -> tuple[signal.Signals, ...]:
    """The signals of ``signums`` the process does not ignore (outside the main thread,
    where no handler can be set, all of them: nothing is set there anyway)."""
    try:
        return tuple(s for s in signums if signal.getsignal(s) is not signal.SIG_IGN)
    except ValueError:
        return signums


def _python_handles_sigint() -> tuple[signal.Signals, ...]:
    """SIGINT, where Python's own handler (KeyboardInterrupt) is in place; else none."""
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        return (signal.SIGINT,)
    return ()


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, except that SIGTERM and SIGHUP cancel the main task as
    asyncio does on SIGINT, so that its ``finally`` blocks run in the loop (stop the
    sidecars, close the servers), and then raise ``SystemExit(128 + signal)``; after
    SIGINT, KeyboardInterrupt. Whatever the cancelled task ends with, the signal ends the
    command: a ``finally`` whose clean-up failed replaced the CancelledError, the signal
    was forgotten, and ``timeout`` ran a benchmark's every case on. A second signal, or
    one before the loop runs, raises at once (:func:`terminate_as_exit`)."""
    received: list[int] = []
    main_task: list[asyncio.Task[T]] = []

    async def wrapper() -> T:
        task = asyncio.current_task()
        assert task is not None
        main_task.append(task)
        return await main

    def ending() -> BaseException:
        if received[0] == signal.SIGINT:
            return KeyboardInterrupt()
        return SystemExit(128 + received[0])

    with asyncio.Runner() as runner:

        def handler(signum: int, frame: FrameType | None) -> None:
            if received or not main_task or main_task[0].done():
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            received.append(signum)
            main_task[0].cancel()
            runner.get_loop().call_soon_threadsafe(lambda: None)  # wake the loop up

        # (SIGINT too, in place of asyncio.Runner's own handler, which does the same but
        # lets another exception from the cancelled task win over the KeyboardInterrupt;
        # as Runner, only where Python's own handler is in place: a job a shell started
        # in the background has it ignored, and keeps it so.)
        with terminate_as_exit(handler), signal_handlers(_python_handles_sigint(), handler):
            try:
                result = runner.run(wrapper())
            except (Exception, asyncio.CancelledError):
                if received:
                    raise ending() from None
                raise
            if received:
                raise ending()
            return result


class HandlerTasks:
    """The connection handlers of an ``asyncio.start_server`` as tasks of one's own:
    ``start_server(tasks.wrap(handler), ...)``, then ``await tasks.close()`` in a
    ``finally``. A handler that asyncio itself ran and that ended cancelled (Ctrl-C:
    ``asyncio.run`` cancels every task) is logged as an ERROR with a traceback."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def wrap(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
        """A ``client_connected_cb`` that runs ``handler`` in a task kept here."""

        def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.ensure_future(handler(reader, writer))
            self.tasks.add(task)
            task.add_done_callback(self._done)

        return connected

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logging.getLogger(__name__).debug("connection handler failed: %r", task.exception())

    async def close(self, server: asyncio.Server | None = None) -> None:
        """Close ``server`` (no new connections), then cancel and await every handler."""
        if server is not None:
            server.close()
        pending = list(self.tasks)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


def die_with_parent(parent_pid: int, signum: int = signal.SIGTERM) -> None:
    """In a child process (Linux only; elsewhere nothing): ask the kernel for ``signum``
    when the parent's thread that started this process ends, however it ends, SIGKILL
    included (``prctl(PR_SET_PDEATHSIG)``); exit at once if ``parent_pid`` is gone
    already (it died before the request took effect)."""
    prctl = _libc_prctl()
    if prctl is None:
        return
    prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


_PARENT_VARIABLE = "QUICMESH_DIE_WITH_PARENT"
"""Set (to the parent's pid) in a sidecar's environment by :meth:`SidecarProcess.start`
from the main thread: :func:`_sidecar_main` then applies :func:`die_with_parent`."""

_SIDECAR_MAIN = (
    "import sys; from quicmesh.sidecar.launch import _sidecar_main; sys.exit(_sidecar_main())"
)


def _sidecar_main() -> int:
    """``python -c _SIDECAR_MAIN sidecar ...``: ``python -m quicmesh sidecar ...`` that
    first asks to die with its parent (not with a ``preexec_fn``: Python code run
    between fork and exec runs the at-fork handlers of gRPC, which the xDS demo's
    server has loaded, and the child aborted)."""
    parent = os.environ.pop(_PARENT_VARIABLE, "")
    if parent.isdigit():
        die_with_parent(int(parent))
    from ..cli import main

    return main(sys.argv[1:])


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for ports it picks itself (``bind`` to 0, ``connect``)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _candidate_ports() -> Iterator[int]:
    """Port numbers to try, below the kernel's ephemeral range where there is room:
    a port chosen there cannot be taken, between being chosen and being bound, by
    a connection the kernel gives a local port of its own (CI's demo lost a port
    that way). Random, so that processes choosing at once rarely meet; then 0
    (the kernel's choice) if none of those is free, or if the range leaves less
    than 1000 ports below it (then that race is possible again)."""
    low, _ = _ephemeral_range()
    floor = 10000
    if low - floor >= 1000:
        generator = random.SystemRandom()
        for _ in range(64):
            yield generator.randrange(floor, low)
    for _ in range(64):
        yield 0


@contextlib.contextmanager
def held_port(host: str = LOOPBACK) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A port number bound on ``host`` for both TCP and UDP for the block: the two
    sockets (neither listening nor connected), closed at its end."""
    for candidate in _candidate_ports():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            try:
                tcp.bind((host, candidate))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise  # not a port taken: the host (its family, a name that does not resolve)
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind((host, port))
                except OSError:
                    continue
                yield tcp, udp
                return
    raise QuicmeshError("no port free on both TCP and UDP")


def free_port(host: str = LOOPBACK) -> int:
    """A port number that is free on ``host`` for both TCP and UDP right now."""
    with held_port(host) as (tcp, _):
        return int(tcp.getsockname()[1])


def free_ports(count: int, host: str = LOOPBACK) -> list[int]:
    """``count`` different port numbers, each free on ``host`` for TCP and UDP right now
    (held together while chosen: :func:`free_port` twice may give the same one)."""
    with contextlib.ExitStack() as held:
        return [int(held.enter_context(held_port(host))[0].getsockname()[1]) for _ in range(count)]


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Samples of a Prometheus exposition keyed by ``(name, labels)``."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return samples


def metric(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= set(ls))


class SidecarProcess:
    """One ``quicmesh sidecar`` child process.

    :param name: used for file names in ``workdir``.
    :param config: the configuration as a dict (written as ``<name>.yaml``).
    :param workdir: where the configuration, access log and stderr log go.
    """

    def __init__(self, name: str, config: dict[str, Any], workdir: str | Path) -> None:
        self.name = name
        self.config = config
        self.workdir = Path(workdir)
        self.config_path = self.workdir / f"{name}.yaml"
        self.stdout_path = self.workdir / f"{name}.access.log"
        self.stderr_path = self.workdir / f"{name}.stderr.log"
        self.process: subprocess.Popen[bytes] | None = None
        host, _, port = str(config["admin"]["address"]).rpartition(":")
        self.admin = (host, int(port))

    def write_config(self, config: dict[str, Any] | None = None) -> None:
        """Write the configuration file (atomically: a reload never reads half a file)."""
        if config is not None:
            self.config = config
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config, sort_keys=False), encoding="utf-8")
        os.replace(tmp, self.config_path)

    def start(self, *extra: str) -> None:
        """Start the process (does not wait for it to be ready).

        The child imports this process's quicmesh whatever the working directory
        holds (:mod:`quicmesh._child`). Started from the main thread on Linux, it gets
        SIGTERM when this process ends without stopping it (:func:`die_with_parent`).
        """
        self.write_config()
        env = child_environment()
        # The kernel's signal comes when the *thread* that started the child ends: only
        # the main thread lives as long as the process.
        if threading.current_thread() is threading.main_thread():
            env[_PARENT_VARIABLE] = str(os.getpid())
        # A signal that becomes SystemExit (terminate_as_exit) acts once the child is
        # known here, so that stop() ends it: raised inside Popen it left the sidecar
        # running after the command had exited, until its parent-death signal came.
        with (
            signals_deferred(),
            open(self.stdout_path, "ab") as out,
            open(self.stderr_path, "ab") as err,
        ):
            self.process = subprocess.Popen(
                python_command("-c", _SIDECAR_MAIN, "sidecar", "-c", str(self.config_path), *extra),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
            )

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll ``/ready`` until it answers 200, the process exits, or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise QuicmeshError(
                    f"sidecar {self.name} exited with {self.process.returncode}: "
                    f"{self.last_error()}"
                )
            with contextlib.suppress(OSError, http.client.HTTPException):
                status, _ = self._request("GET", "/ready", 1.0)
                if status == 200:
                    return
            time.sleep(0.05)
        raise QuicmeshError(
            f"sidecar {self.name} not ready after {timeout:g}s: {self.last_error()}"
        )

    def request(self, method: str, path: str, *, timeout: float = 5.0) -> tuple[int, bytes]:
        """One admin request; returns the status and body.

        :raises QuicmeshError: the request failed because the process has exited (it
            names the sidecar, its exit code and the last line it wrote on stderr).
        :raises OSError: the request failed, the process still runs.
        """
        try:
            return self._request(method, path, timeout)
        except (OSError, http.client.HTTPException) as exc:
            self._raise_if_exited(exc)
            raise

    def _request(self, method: str, path: str, timeout: float) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(*self.admin, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _raise_if_exited(self, cause: BaseException) -> None:
        """Raise a one-line QuicmeshError if the process has exited (or exits within a
        second: a refused connection may come while it is on its way out)."""
        if self.process is None:
            return
        try:
            code = self.process.wait(1.0)
        except subprocess.TimeoutExpired:
            return
        how = f"{code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                how += f" (killed by {signal.Signals(-code).name})"
        error = self.last_error()
        raise QuicmeshError(f"sidecar {self.name} exited with {how}: {error}") from cause

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """The parsed ``/metrics``."""
        status, body = self.request("GET", "/metrics")
        if status != 200:
            raise QuicmeshError(f"sidecar {self.name}: /metrics answered {status}")
        return parse_metrics(body.decode())

    def stats(self) -> dict[str, Any]:
        """The ``/stats`` JSON."""
        _, body = self.request("GET", "/stats")
        return json.loads(body)  # type: ignore[no-any-return]

    def access_log(self) -> list[dict[str, Any]]:
        """The access-log lines written so far."""
        if not self.stdout_path.exists():
            return []
        lines = self.stdout_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def stderr(self) -> str:
        """What the process wrote on stderr so far."""
        if not self.stderr_path.exists():
            return ""
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def last_error(self) -> str:
        """The last line the process wrote on stderr (a traceback's is the exception), or
        ``"no output"``: a child's failure is reported in one line."""
        lines = [line.strip() for line in self.stderr().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the process."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM (a drain) and wait for the exit code; kill after ``timeout``."""
        if self.process is None:
            return 0
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return -9
