"""A destination that answers and closes while the client still sends, on asyncio's own
event loop (``quicmesh sidecar --event-loop asyncio``): the Python copy paths end the flow
as the native engine and uvloop do (a review: on asyncio's loop B's half-close,
``write_eof``, raised "[Errno 107] Transport endpoint is not connected" and B logged the
orderly flow ``reset``, where uvloop drops the shutdown's error and logged it
``completed``).

The scenario, destinations and client are :mod:`.test_splice_destination_close`'s; here
both sidecars run asyncio's loop, and only the paths that copy in Python are taken (QUIC
on the aioquic engine, h2 and TLS-over-TCP: the native engine splices the flow itself,
whatever Python's loop). The half-close rule itself (:func:`quicmesh.splice.splice`'s,
the twin of the native ``shut_write``) is also tried on a socket pair.
"""

from __future__ import annotations

import asyncio
import errno
import select
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from quicmesh.sidecar.launch import LOOPBACK, SidecarProcess
from quicmesh.splice import _write_eof

from . import test_splice_destination_close as scenario

PYTHON_PATHS = ("aioquic", "h2", "tcp")
"""The listeners and clusters (:data:`scenario.LISTENERS`) whose flows Python copies."""

ASYNCIO = ("--event-loop", "asyncio")

destinations = scenario.destinations


@pytest.fixture(scope="module")
def sidecars(
    workdir: Path, destinations: dict[str, scenario._Destination]
) -> Iterator[tuple[SidecarProcess, SidecarProcess, dict[str, int]]]:
    label = "destination-close-asyncio"
    with scenario.running_sidecars(workdir, destinations, PYTHON_PATHS, label, *ASYNCIO) as up:
        yield up


def outcomes(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destination: scenario._Destination,
    later: int,
) -> dict[str, tuple[str, str]]:
    """:func:`scenario.outcomes` over the Python copy paths alone."""
    return scenario.outcomes(sidecars, destination, later, PYTHON_PATHS)


def test_a_destination_closing_while_the_client_sends_completes_on_asyncio(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, scenario._Destination],
) -> None:
    # The client's bytes after the answer are reset by the destination's kernel; the
    # client's FIN then meets ENOTCONN at B's write_eof, with EPIPE pending: an orderly end.
    found = outcomes(sidecars, destinations["fin"], later=1)
    assert found == {name: ("completed", "completed") for name in PYTHON_PATHS}, found


def test_a_write_after_the_destination_closed_and_reset_is_a_reset_on_asyncio(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, scenario._Destination],
) -> None:
    found = outcomes(sidecars, destinations["fin"], later=4)
    assert scenario.first_words(found) == {name: ("reset", "reset") for name in PYTHON_PATHS}, found


@pytest.mark.parametrize("later", [0, 1])
def test_a_destination_resetting_is_a_reset_on_asyncio(
    sidecars: tuple[SidecarProcess, SidecarProcess, dict[str, int]],
    destinations: dict[str, scenario._Destination],
    later: int,
) -> None:
    found = outcomes(sidecars, destinations["rst"], later)
    assert scenario.first_words(found) == {name: ("reset", "reset") for name in PYTHON_PATHS}, found


# The half-close rule alone, on a socket pair and asyncio's own loop (as the native
# shut_write's tests).


def _wait_pending_error(sock: socket.socket) -> None:
    """Wait until ``sock`` has a pending error (poll's POLLERR: without taking it)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(events & select.POLLERR for _, events in poller.poll(50)):
            return
    raise AssertionError("no error came on the socket")


async def _half_close_after(peer_close: str) -> None:
    """Connect, have the peer close (``fin``: in order, then our write meets its RST;
    ``rst``: a reset with no FIN first), then half-close as the splice does."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        reader, writer = await asyncio.open_connection(LOOPBACK, listener.getsockname()[1])
        peer, _ = listener.accept()
        try:
            if peer_close == "fin":
                peer.close()
                assert await reader.read() == b""  # its FIN
                writer.write(b"after the close")  # its kernel answers with RST
                await writer.drain()
            else:
                writer.transport.pause_reading()  # (a read would take the error)
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()
            _wait_pending_error(writer.get_extra_info("socket"))
            _write_eof(writer)
        finally:
            peer.close()
            writer.transport.abort()


def _on_asyncio(peer_close: str) -> None:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(_half_close_after(peer_close))


def test_a_half_close_to_a_peer_that_closed_in_order_and_reset_is_no_failure() -> None:
    _on_asyncio("fin")  # ENOTCONN with EPIPE pending: an orderly end


def test_a_half_close_to_a_peer_that_reset_without_a_fin_is_a_failure_named() -> None:
    with pytest.raises(ConnectionResetError) as raised:
        _on_asyncio("rst")
    assert raised.value.errno == errno.ECONNRESET
