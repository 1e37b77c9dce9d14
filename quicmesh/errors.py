"""The exceptions quicmesh raises.

Every error quicmesh raises derives from :class:`QuicmeshError`. Library
exceptions (aioquic, h2, ssl, OSError) are translated at the edge of the
package, so callers only ever catch this family.
"""

from __future__ import annotations

import errno
import os
import resource


class QuicmeshError(Exception):
    """Root of every error quicmesh raises."""


class ConfigError(QuicmeshError):
    """A configuration, CLI argument or file is invalid; the message names what and where."""


class TunnelError(QuicmeshError):
    """A tunnel (peer connection or stream) failed."""


class ConnectError(TunnelError):
    """A peer connection could not be established (unreachable, handshake failed, timed out)."""


class PeerVerificationError(ConnectError):
    """The peer's certificate chain or SPIFFE identity was not accepted."""


class StreamRefused(TunnelError):
    """The peer sidecar answered the CONNECT with an error status.

    :param status: the HTTP status the peer returned (400 malformed, 403 not allowed,
        502/503 the destination could not be reached).
    :param reason: the reason the peer gave, if any.
    :param peer_identity: the refusing peer's SPIFFE ID, where known.
    """

    def __init__(self, status: int, reason: str = "", *, peer_identity: str = "") -> None:
        self.status = status
        self.reason = reason
        self.peer_identity = peer_identity
        text = f"peer refused the stream with status {status}"
        super().__init__(f"{text}: {reason}" if reason else text)


class StreamReset(TunnelError):
    """The stream was reset (aborted) by the peer or because its connection was lost.

    :param error_code: the transport's error code (an HTTP/3 or HTTP/2 error code),
        or ``None`` when the connection itself was lost.
    """

    def __init__(self, message: str, error_code: int | None = None) -> None:
        self.error_code = error_code
        super().__init__(message)


class StreamWriteStopped(StreamReset):
    """Our side of the stream stopped: the peer said it needs no more of our bytes (it
    answered: QUIC STOP_SENDING, an HTTP/2 RST_STREAM with NO_ERROR) and we wrote on for
    longer than a lingering close allows (:meth:`~quicmesh.MeshStream.drain`). Reading
    goes on: the peer's answer can still be read."""


class ConnectionLost(TunnelError):
    """The peer connection closed or failed while it was in use."""


class PeerUnresponsive(ConnectionLost):
    """The peer stopped acknowledging packets (dead, hung, or the path drops them):
    the connection was failed by its liveness checks, this side's or the peer's
    (which then heard nothing from here: a path dropping packets one way)."""


class TunnelUsageError(QuicmeshError, ValueError):
    """A request the caller built is malformed: refused before anything is sent.

    Not a :class:`TunnelError`: nothing failed on the network or at the peer, so a
    sidecar never counts one against an endpoint (no outlier ejection, no retry).
    """


class InvalidTarget(TunnelUsageError):
    """A CONNECT target (``host:port``) is malformed."""


class InvalidHeader(InvalidTarget):
    """An extra CONNECT header is malformed, reserved, repeated or over the limits.

    A subclass of :class:`InvalidTarget` because header errors were raised as
    ``InvalidTarget`` before this class existed; catch :class:`TunnelUsageError`
    for both."""


def os_error_text(exc: OSError) -> str:
    """What went wrong, in the system's words: ``strerror``, which an ``OSError`` may lack
    (uvloop raises bind errors with only ``errno`` set: "None" in messages before), else
    the text of its ``errno``, else the exception itself with its cause's reason (uvloop's
    datagram bind error has neither, and the reason as its cause)."""
    if exc.strerror:
        return str(exc.strerror)
    if exc.errno:
        return os.strerror(exc.errno)
    cause = exc.__cause__
    if isinstance(cause, OSError) and (cause.strerror or cause.errno):
        # uvloop's "could not bind to local_addr (...)" carries the reason as its cause
        return f"{exc}: {os_error_text(cause)}"
    return str(exc) or type(exc).__name__


OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""The errors of an ``accept()`` that failed for want of descriptors or memory: the
connection waits in the listen backlog, and accepting pauses a while."""


def accept_failure_text(exc: OSError) -> str:
    """Why ``accept()`` failed, in the system's words and, when a descriptor limit was
    hit, with the limit: "Too many open files (the process's nofile limit 1024)"."""
    text = os_error_text(exc)
    if exc.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        return f"{text} (the process's nofile limit {limit})"
    if exc.errno == errno.ENFILE:
        try:
            with open("/proc/sys/fs/file-max") as file:
                return f"{text} (the system's fs.file-max {int(file.read())})"
        except (OSError, ValueError):
            return f"{text} (the system's limit)"
    return text


def peer_text(text: str | bytes, limit: int = 256) -> str:
    """Words a peer sent (a close reason, a GOAWAY's debug data), made fit for our logs
    and errors: at most ``limit`` characters, printable ones only (a peer's newline or
    escape sequence would forge a log line of its own or colour the terminal)."""
    if isinstance(text, bytes):
        text = text[: 4 * limit].decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text[: 4 * limit])[:limit]
