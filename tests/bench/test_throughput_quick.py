"""The throughput benchmark end to end at a tiny size: it runs and every byte checks out.

No timing assertions: this only proves the benchmark (and each transport under
bulk load) moves exactly the right bytes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect

from quicmesh.bench import throughput


def test_quick_run_moves_every_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "throughput.json"
    argv = ["--quick", "--size", "2MiB", "--transports", "quic,h2,tcp", "--streams", "1,4"]
    assert throughput.main([*argv, "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["failures"] == []
    cases = {(row["transport"], row["streams"]) for row in result["rows"]}
    assert cases == {(name, n) for name in ("aioquic", "quic", "h2", "tcp") for n in (1, 4)}
    assert all(row["size"] == 2 * 1024 * 1024 for row in result["rows"])
    assert "vs aioquic" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MiB", 256 << 20), ("16M", 16_000_000), ("1.5GB", 1_500_000_000), ("4096", 4096)],
)
def test_parse_size(text: str, size: int) -> None:
    assert throughput.parse_size(text) == size


@pytest.mark.parametrize(
    "argv",
    [
        ["--size", "12parsecs"],
        ["--size", "9" * 400],  # (an OverflowError's traceback, a review)
        ["--streams", "0"],
        ["--transports", "udp"],
    ],
)
def test_bad_options_exit_2(argv: list[str]) -> None:
    assert throughput.main(argv) == 2


def test_checker_catches_wrong_and_missing_bytes() -> None:
    block = throughput.pattern_block()
    good = throughput.PayloadChecker(block, 3 * len(block) + 5)
    good.feed(block * 3 + block[:5])
    good.finish()
    corrupt = throughput.PayloadChecker(block, len(block))
    corrupt.feed(block[:100] + bytes([block[100] ^ 1]) + block[101:])
    with pytest.raises(throughput.BenchmarkError, match="offset 100"):
        corrupt.finish()
    short = throughput.PayloadChecker(block, len(block))
    short.feed(block[:-1])
    with pytest.raises(throughput.BenchmarkError, match="expected"):
        short.finish()


def test_a_reference_handshake_given_up_leaves_no_unretrieved_error() -> None:
    """``bench throughput`` cancels a case on SIGTERM; cancelled in its handshake, the raw
    aioquic client left a "Future exception was never retrieved" (ConnectionError) in the log."""
    reported: list[str] = []

    async def give_up_a_handshake() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: reported.append(context["message"]))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            silent.setblocking(False)

            async def handshake() -> None:
                async with connect(
                    *silent.getsockname(),
                    configuration=throughput.reference_configuration(is_client=True),
                    create_protocol=throughput.ReferenceClientProtocol,
                ):
                    pass

            attempt = asyncio.ensure_future(handshake())
            await loop.sock_recv(silent, 2048)  # its Initial: the client waits for an answer
            attempt.cancel()
            with pytest.raises(asyncio.CancelledError):
                await attempt
            del attempt
            gc.collect()

    asyncio.run(give_up_a_handshake())
    assert reported == []
