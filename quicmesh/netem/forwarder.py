"""The forwarder process: moves packets between the two TUN devices through the model.

Run by :class:`quicmesh.netem.Link` as ``python -m quicmesh.netem.forwarder`` in its own
process (so the programs under test do not share a GIL with it), with the two TUN file
descriptors and one end of a control socket inherited. It is a thin loop around two
:class:`~quicmesh.netem.model.DirectionModel` instances: wait on epoll until a TUN is
readable or the next packet is due, read what arrived, write what is due.

Control protocol (one line each way, on the control socket): the forwarder writes
``ready`` once it runs; ``stats`` is answered with one JSON line of
:class:`~quicmesh.netem.model.DirectionStats` per direction. End of file on the
control socket (the parent closed it or died) makes the forwarder exit.

Timers have the 1 ms granularity of ``epoll_wait``: a packet is released at most
about 1 ms after its due time, but due times are computed exactly, so the rate and
the mean delay do not drift.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable

from quicmesh.netem.config import LinkConfig
from quicmesh.netem.model import DirectionModel

__all__ = ["Forwarder", "main"]

#: Packets read from one TUN before the loop looks at the other one and the timers.
READ_BATCH = 64


class Forwarder:
    """Forward packets between ``client_fd`` and ``server_fd`` through the link model.

    :param config: the link to emulate.
    :param client_fd: non-blocking TUN descriptor of the client namespace's interface.
    :param server_fd: the same for the server namespace.
    :param control: the control socket (see the module docstring).
    :param clock: monotonic clock in seconds.
    """

    def __init__(
        self,
        config: LinkConfig,
        client_fd: int,
        server_fd: int,
        control: socket.socket,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client_fd = client_fd
        self._server_fd = server_fd
        self._control = control
        self._clock = clock
        self._read_size = config.mtu + 64
        self.client_to_server = DirectionModel(
            config.client_to_server, f"{config.seed}:client_to_server"
        )
        self.server_to_client = DirectionModel(
            config.server_to_client, f"{config.seed}:server_to_client"
        )
        self._control_buffer = b""

    def stats_json(self) -> str:
        """The counters of both directions as one JSON line."""
        return json.dumps(
            {
                "client_to_server": dataclasses.asdict(self.client_to_server.stats),
                "server_to_client": dataclasses.asdict(self.server_to_client.stats),
            }
        )

    def run(self) -> None:
        """Forward until the control socket closes."""
        control_fd = self._control.fileno()
        poller = select.epoll()
        poller.register(self._client_fd, select.EPOLLIN)
        poller.register(self._server_fd, select.EPOLLIN)
        poller.register(control_fd, select.EPOLLIN)
        routes = {
            self._client_fd: self.client_to_server,
            self._server_fd: self.server_to_client,
        }
        outputs = (
            (self.client_to_server, self._server_fd),
            (self.server_to_client, self._client_fd),
        )
        clock = self._clock
        read = os.read
        read_size = self._read_size
        self._control.sendall(b"ready\n")
        while True:
            due = [t for t in (m.next_delivery_time() for m, _ in outputs) if t is not None]
            timeout = max(0.0, min(due) - clock()) if due else -1.0
            events = poller.poll(timeout)
            now = clock()
            for fd, _mask in events:
                if fd == control_fd:
                    if not self._on_control():
                        return
                    continue
                submit = routes[fd].submit
                for _ in range(READ_BATCH):
                    try:
                        packet = read(fd, read_size)
                    except BlockingIOError:
                        break
                    submit(packet, now)
            for model, out_fd in outputs:
                next_time = model.next_delivery_time()
                if next_time is None or next_time > now:
                    continue
                for packet in model.deliver(now):
                    try:
                        os.write(out_fd, packet)
                    except OSError:
                        model.stats.dropped_by_device += 1

    def _on_control(self) -> bool:
        """Handle control input; return ``False`` when the forwarder should stop."""
        try:
            data = self._control.recv(4096)
        except ConnectionError:
            return False
        if not data:
            return False
        self._control_buffer += data
        while b"\n" in self._control_buffer:
            line, self._control_buffer = self._control_buffer.split(b"\n", 1)
            if line.strip() == b"stats":
                self._control.sendall(self.stats_json().encode() + b"\n")
        return True


def main(argv: list[str] | None = None) -> int:
    """Entry point of the forwarder process (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m quicmesh.netem.forwarder")
    parser.add_argument("--client-fd", type=int, required=True)
    parser.add_argument("--server-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--config", required=True, help="LinkConfig as JSON")
    args = parser.parse_args(argv)
    # Ctrl-C belongs to the parent, which tears the link down and closes the control socket.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    config = LinkConfig.from_dict(json.loads(args.config))
    control = socket.socket(fileno=args.control_fd)
    try:
        Forwarder(config, args.client_fd, args.server_fd, control).run()
    except (BrokenPipeError, ConnectionError):
        pass
    finally:
        control.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
