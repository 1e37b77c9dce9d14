"""quicmesh.errors' helpers."""

from __future__ import annotations

import errno

from quicmesh.errors import os_error_text


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
