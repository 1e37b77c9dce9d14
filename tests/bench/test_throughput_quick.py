"""The throughput benchmark end to end at a tiny size: it runs and every byte checks out.

No timing assertions: this only proves the benchmark (and each transport under
bulk load) moves exactly the right bytes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    "argv", [["--size", "12parsecs"], ["--streams", "0"], ["--transports", "udp"]]
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
