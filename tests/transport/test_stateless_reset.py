"""Issue 13, findings 1 and 4: a restarted listener tells its old peers at once.

The listener derives each connection ID's stateless reset token from a key kept
in a 0600 file; after a restart (SIGKILL, then the same key) a client's next
packet on its old connection is answered with a stateless reset, and the client
drops the connection then, instead of after its idle timeout (60 s).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from quic_helpers import QUIC_ENGINES, require_engine, run

import quicmesh
from quicmesh import DevCA, QuicTransport
from quicmesh.transport.quic import load_stateless_reset_key

SERVER = textwrap.dedent(
    """
    import asyncio, sys
    from quicmesh import DevCA, QuicTransport
    from quicmesh.transport.quic import load_stateless_reset_key

    async def echo(stream):
        while data := await stream.read(65536):
            stream.write(data)
        stream.write_eof()

    async def main():
        ca = DevCA.load(sys.argv[1])
        identity = ca.issue("spiffe://mesh.local/ns/default/sa/server")
        transport = QuicTransport(
            identity=identity, trust=ca.trust_bundle,
            stateless_reset_key=load_stateless_reset_key(sys.argv[2]), engine=sys.argv[4],
        )
        listener = await transport.listen(("127.0.0.1", int(sys.argv[3])), echo)
        print(listener.address[1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def _start(
    ca_dir: Path, key: Path, port: int, engine: str = "aioquic"
) -> tuple[subprocess.Popen[str], int]:
    child = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(ca_dir), str(key), str(port), engine],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    line = child.stdout.readline()
    if not line:
        child.kill()
        raise AssertionError("server did not start")
    return child, int(line)


def test_key_file_is_created_private_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "reset.key"
    key = load_stateless_reset_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_stateless_reset_key(path) == key
    assert "readable by others" not in caplog.text
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="quicmesh.transport.quic"):
        assert load_stateless_reset_key(path) == key
    assert "is readable by others (mode 644)" in caplog.text
    (tmp_path / "short.key").write_bytes(b"x")
    with pytest.raises(quicmesh.ConfigError, match="shorter than 16 bytes"):
        load_stateless_reset_key(tmp_path / "short.key")
    with pytest.raises(quicmesh.ConfigError, match="longer than 4096 bytes"):
        load_stateless_reset_key("/dev/zero")  # (read until memory ran out)


@pytest.mark.parametrize("engine", QUIC_ENGINES)
def test_client_learns_of_a_restart_from_the_first_packet(tmp_path: Path, engine: str) -> None:
    require_engine(engine)
    ca = DevCA()
    ca.save(tmp_path / "ca")
    key = tmp_path / "reset.key"
    first, port = _start(tmp_path / "ca", key, 0, engine)
    second = None
    try:

        async def main() -> None:
            nonlocal second
            # No keepalive: nothing is sent while the server restarts, so the first packet
            # after it meets the new listener. (With keepalives, a killed peer is noticed
            # during the restart already, by ICMP port unreachable: test_liveness.py. The
            # native engine's thread keeps sending while _start blocks this event loop.)
            client = QuicTransport(
                identity=ca.issue("spiffe://mesh.local/ns/default/sa/client"),
                trust=ca.trust_bundle,
                engine=engine,
                keepalive_interval=None,
            )
            # What the client's engine still sends after the kill (its delayed ACK of the
            # echo, a flow-control update: Python's commands reach the native engine at the
            # end of the loop's turn, after the kill) meets a closed port; ICMP errors for
            # it are not what this test is about, so they do not end the connection here.
            client.liveness = dataclasses.replace(client.liveness, unreachable_limit=1000)
            conn = await client.connect(("127.0.0.1", port))
            stream = await conn.open_stream("a.svc:1")
            stream.write(b"before")
            stream.write_eof()
            assert await stream.read() == b"before"
            first.send_signal(signal.SIGKILL)  # no CONNECTION_CLOSE: a crash
            first.wait()
            second, _ = _start(tmp_path / "ca", key, port, engine)
            # The next packet meets a listener that does not know the connection.
            with pytest.raises(quicmesh.TunnelError, match="stateless reset"):
                await asyncio.wait_for(conn.open_stream("a.svc:1"), 5)
            assert conn.is_closed
            # A new connection to the restarted sidecar works.
            fresh = await client.connect(("127.0.0.1", port))
            stream = await fresh.open_stream("a.svc:1")
            stream.write(b"after")
            stream.write_eof()
            assert await stream.read() == b"after"
            fresh.close()
            await fresh.wait_closed()

        run(main())
    finally:
        for child in (first, second):
            if child is not None:
                if child.poll() is None:
                    child.kill()
                    child.wait()
                assert child.stdout is not None
                child.stdout.close()
