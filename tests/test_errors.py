"""quicmesh.errors' helpers."""

from __future__ import annotations

import errno

from hypothesis import given
from hypothesis import strategies as st

from quicmesh.errors import os_error_text, peer_text


def test_an_os_error_is_told_in_the_systems_words_whatever_it_carries() -> None:
    """uvloop raises bind errors with ``errno`` alone: messages said "None" before."""
    assert os_error_text(OSError(errno.EADDRINUSE, "Address already in use")) == (
        "Address already in use"
    )
    only_errno = OSError()
    only_errno.errno = errno.EADDRINUSE
    assert only_errno.strerror is None
    assert os_error_text(only_errno) == "Address already in use"
    assert os_error_text(OSError("something odd")) == "something odd"
    assert os_error_text(OSError()) == "OSError"


def test_a_datagram_bind_error_of_uvloop_says_its_reason() -> None:
    """uvloop's ``create_datagram_endpoint`` raises "could not bind to local_addr (...)"
    with neither ``errno`` nor ``strerror``, the reason in its cause: it was left out."""
    import asyncio
    import gc
    import socket
    import warnings

    import pytest

    uvloop = pytest.importorskip("uvloop")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        address = taken.getsockname()

        async def bind() -> OSError:
            loop = asyncio.get_running_loop()
            with pytest.raises(OSError) as refused:
                await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=address)
            return refused.value

        # (uvloop leaves the failed transport to the collector, with a ResourceWarning.)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            error = uvloop.run(bind())
            gc.collect()
    assert os_error_text(error).endswith(": Address already in use"), os_error_text(error)


@given(st.one_of(st.binary(max_size=3000), st.text(max_size=3000)), st.integers(1, 400))
def test_a_peers_words_come_out_printable_and_bounded(text: str | bytes, limit: int) -> None:
    out = peer_text(text, limit)
    assert len(out) <= limit and out.isprintable()


def test_a_peers_plain_words_are_kept_and_a_forged_log_line_is_not() -> None:
    assert peer_text(b"peer certificate expired") == "peer certificate expired"
    assert peer_text("bye\nERROR forged\x1b[31m") == "bye?ERROR forged?[31m"
