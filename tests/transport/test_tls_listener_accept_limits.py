"""An h2 or tcp listener out of file descriptors (a review, 2026-12).

The listeners were asyncio servers (``loop.create_server``). Under uvloop (the sidecar's
loop where installed) libuv, out of descriptors, accepted every waiting connection and
closed it at once, logging nothing: the client read "server closed the connection
before it was ready (it may not trust our certificate)", the server's log was silent.
Under asyncio the loop's exception handler was called up to 100 times a second. Now
the listener accepts itself: out of descriptors it pauses a second, the connections
wait in the backlog, and one line names the listener and the limit, whatever the loop.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from quicmesh import DevCA, H2Transport, TcpTransport
from quicmesh._accept import AcceptPauseLog

ROOT = Path(__file__).resolve().parents[2]

SERVER = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from quicmesh import DevCA, H2Transport, TcpTransport

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")

    async def main(kind, ca_dir):
        ca = DevCA.load(ca_dir)
        identity = ca.issue("spiffe://mesh.local/ns/default/sa/server")
        cls = H2Transport if kind == "h2" else TcpTransport
        transport = cls(identity=identity, trust=ca.trust_bundle)

        async def handler(stream):
            while data := await stream.read(65536):
                stream.write(data)
                await stream.drain()
            stream.write_eof()

        listener = await transport.listen(("127.0.0.1", 0), handler)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = socket.socket()
        # Room for 3 more descriptors only.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe.fileno() + 4, hard))
        probe.close()
        print(listener.address[1], flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))  # descriptors again
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        listener.close()

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main(sys.argv[2], sys.argv[3]))
    else:
        asyncio.run(main(sys.argv[2], sys.argv[3]))
    """
)


def _loops() -> list[str]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return ["asyncio"]
    return ["asyncio", "uvloop"]


@pytest.mark.parametrize("loop", _loops())
@pytest.mark.parametrize("kind", ["h2", "tcp"])
def test_a_listener_out_of_descriptors_says_so_once_and_its_clients_wait(
    loop: str, kind: str, tmp_path: Path
) -> None:
    ca = DevCA()
    ca.save(tmp_path)
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, loop, kind, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    clients: list[socket.socket] = []
    try:
        assert server.stdin is not None and server.stdout is not None
        port = int(server.stdout.readline())
        # More connections than descriptors: those accepted hold them (no handshake).
        for _ in range(8):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(2.5)  # the listener out of descriptors, pausing (twice at least)
        for client in clients:
            # Each waits (in the backlog, or for its handshake): none was closed.
            client.settimeout(0.05)
            with pytest.raises(TimeoutError):
                client.recv(1)
        for client in clients:
            client.close()
        server.stdin.write("descriptors again\n")
        server.stdin.flush()

        async def main() -> None:
            # The listener serves again, without a restart.
            client = ca.issue("spiffe://mesh.local/ns/default/sa/client")
            cls = H2Transport if kind == "h2" else TcpTransport
            transport = cls(identity=client, trust=ca.trust_bundle)
            connection = await transport.connect(("127.0.0.1", port), timeout=10)
            stream = await connection.open_stream("echo:1")
            stream.write(b"hello")
            stream.write_eof()
            assert await asyncio.wait_for(stream.read(-1), 10) == b"hello"
            await connection.aclose()

        asyncio.run(main())
        server.stdin.write("done\n")
        server.stdin.flush()
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0, err[-3000:]
        lines = [line for line in err.splitlines() if "cannot accept" in line]
        assert len(lines) == 1, err[-3000:]  # rate-limited: one, not one per try
        assert lines[0] == (
            f"ERROR quicmesh.accept {kind} listener on 127.0.0.1:{port}: cannot accept"
            f" a connection: Too many open files (the process's nofile limit "
            f"{lines[0].split('nofile limit ')[1].split(')')[0]}); accepting paused for 1s,"
            " new connections wait"
        ), lines
        assert "Traceback" not in err and "out of system resource" not in err, err[-3000:]
    finally:
        for client in clients:
            client.close()
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_pause_line_is_rate_limited_and_counts_what_it_did_not_say(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    log = AcceptPauseLog("h2 listener on 127.0.0.1:1", logging.getLogger("test.accept"))
    error = OSError(24, "Too many open files")
    with caplog.at_level(logging.ERROR, logger="test.accept"):
        for _ in range(5):
            log.report(error)
            now[0] += 1.0
        now[0] += 30.0
        log.report(error)
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2, messages
    assert messages[0].startswith(
        "h2 listener on 127.0.0.1:1: cannot accept a connection: Too many open files"
        " (the process's nofile limit "
    )
    assert messages[1].endswith("new connections wait (4 more pauses in the last 35s)")
