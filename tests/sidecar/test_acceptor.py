"""The outbound listener's server (:class:`quicmesh.sidecar.acceptor.SocketServer`):
accepted connections arrive as plain sockets, binding fails with asyncio's message,
a closed server refuses, and running out of descriptors pauses accepting instead of
failing or spinning (the connections wait in the backlog)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import pytest

from quicmesh.sidecar.acceptor import ACCEPT_RETRY_DELAY, SocketServer


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_connections_arrive_as_plain_non_blocking_sockets_without_delay() -> None:
    async def main() -> None:
        accepted: asyncio.Queue[tuple[socket.socket, Any]] = asyncio.Queue()

        async def handle(sock: socket.socket, peer: Any) -> None:
            await accepted.put((sock, peer))

        server = await SocketServer.start("127.0.0.1", 0, handle)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        local = writer.get_extra_info("sockname")
        sock, peer = await accepted.get()
        assert isinstance(sock, socket.socket)
        assert peer == local
        assert sock.getblocking() is False
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        writer.write(b"hello")
        await writer.drain()
        loop = asyncio.get_running_loop()
        assert await loop.sock_recv(sock, 5) == b"hello"
        sock.close()
        writer.close()
        server.close()
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection("127.0.0.1", port)

    run(main())


def test_an_address_in_use_fails_with_asyncios_message() -> None:
    async def main() -> None:
        async def handle(sock: socket.socket, peer: Any) -> None:
            sock.close()

        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            with pytest.raises(OSError, match="error while attempting to bind on address"):
                await SocketServer.start("127.0.0.1", port, handle)

    run(main())


SERVER = textwrap.dedent(
    """
    import asyncio, logging, resource, socket, sys
    from quicmesh.sidecar.acceptor import SocketServer, report_loop_exception

    logging.basicConfig(level=logging.INFO)

    async def main(kind):
        asyncio.get_running_loop().set_exception_handler(report_loop_exception)
        held = []
        done = asyncio.Event()
        served = 0

        async def handle(sock, peer):
            nonlocal served
            served += 1
            held.append(sock)
            if served == 12:
                done.set()

        if kind == "asyncio":  # asyncio's own server, as the h2 and tcp listeners use
            server = await asyncio.start_server(lambda r, w: handle(w, None), "127.0.0.1", 0)
        else:
            server = await SocketServer.start("127.0.0.1", 0, handle)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        probe = socket.socket()
        # Room for 4 more descriptors only.
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe.fileno() + 5, hard))
        probe.close()
        print(server.sockets[0].getsockname()[1], flush=True)
        while len(held) < 4:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # accepts fail now (EMFILE)
        for sock in held:  # free them: the paused server accepts the rest
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        await asyncio.wait_for(done.wait(), 10)
        print("served", served, flush=True)

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.parametrize("kind", ["socket-server", "asyncio"])
def test_running_out_of_descriptors_pauses_accepting_then_serves_the_backlog(kind: str) -> None:
    # asyncio's servers (the h2 and tcp listeners, the admin) report it to the loop's
    # exception handler: the sidecar's (report_loop_exception) logs SocketServer's line
    # rather than asyncio's traceback.
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER, kind],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(12)]
        started = time.monotonic()
        out, err = server.communicate(timeout=30)
        assert server.returncode == 0, err
        assert "served 12" in out
        assert "accepting paused" in err and "Too many open files" in err
        assert "Traceback" not in err, err
        assert time.monotonic() - started >= ACCEPT_RETRY_DELAY * 0.5
        for client in clients:
            client.close()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
