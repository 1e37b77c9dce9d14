"""Config validation, unit parsers, and the command line's argument handling (no root needed)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quicmesh.errors import ConfigError
from quicmesh.netem import (
    DirectionConfig,
    GilbertElliottConfig,
    LinkConfig,
    cli,
    parse_duration,
    parse_percent,
    parse_queue,
    parse_rate,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20ms", 0.020), ("1.5s", 1.5), ("500us", 0.0005), ("0.25", 0.25), (" 2 ms ", 0.002)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "fraction"), [("2%", 0.02), ("0.5%", 0.005), ("0.1", 0.1)])
def test_parse_percent(text: str, fraction: float) -> None:
    assert parse_percent(text) == pytest.approx(fraction)


@pytest.mark.parametrize(
    ("text", "bps"),
    [("20mbit", 20e6), ("500kbit", 5e5), ("1gbit", 1e9), ("1e6", 1e6), ("10Mbps", 10e6)],
)
def test_parse_rate(text: str, bps: float) -> None:
    assert parse_rate(text) == pytest.approx(bps)


def test_parse_queue() -> None:
    assert parse_queue("25pkt") == {"queue_packets": 25}
    assert parse_queue("64kb") == {"queue_bytes": 64_000}
    assert parse_queue("60ms") == {"queue_delay": pytest.approx(0.06)}


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (parse_duration, "20 parsecs"),
        (parse_duration, "-3ms"),
        (parse_percent, "150%"),
        (parse_percent, "2 percent"),
        (parse_rate, "fast"),
        (parse_rate, "0mbit"),
        (parse_queue, "2.5pkt"),
        (parse_queue, "lots"),
        # (An OverflowError, and an infinite rate taken.)
        (parse_queue, "1e999pkt"),
        (parse_queue, "1e999b"),
        (parse_rate, "1e999mbit"),
        (parse_percent, "1e999"),
    ],
)
def test_parsers_reject_nonsense(parse: object, text: str) -> None:
    with pytest.raises(ConfigError):
        parse(text)  # type: ignore[operator]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay": -0.001},
        {"loss": 1.5},
        {"loss": float("nan")},
        {"rate_bps": 0},
        {"queue_packets": 10},  # a queue without a rate
        {"rate_bps": 1e6, "queue_packets": 10, "queue_bytes": 10_000},
        {"rate_bps": 1e6, "queue_packets": 0},
        {"rate_bps": 1e6, "queue_bytes": 100},
        {"loss": 0.1, "burst": GilbertElliottConfig(0.1, 0.5)},
    ],
)
def test_direction_config_rejects(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        DirectionConfig(**kwargs)  # type: ignore[arg-type]


def test_gilbert_elliott_from_loss_and_burst() -> None:
    burst = GilbertElliottConfig.from_loss_and_burst(0.02, 3.0)
    assert burst.mean_loss == pytest.approx(0.02)
    assert burst.p_bad_to_good == pytest.approx(1 / 3)
    with pytest.raises(ConfigError):
        GilbertElliottConfig.from_loss_and_burst(0.02, 0.5)
    with pytest.raises(ConfigError):
        GilbertElliottConfig.from_loss_and_burst(0.9, 1.0)


def test_link_config_round_trips_through_json_form() -> None:
    config = LinkConfig(
        client_to_server=DirectionConfig(
            delay=0.01, burst=GilbertElliottConfig.from_loss_and_burst(0.02, 2, max_burst=3)
        ),
        server_to_client=DirectionConfig(delay=0.02, rate_bps=1e7, queue_packets=25),
        seed=9,
        mtu=1400,
    )
    assert LinkConfig.from_dict(config.to_dict()) == config


def test_symmetric() -> None:
    config = LinkConfig.symmetric(delay=0.02, loss=0.01, seed=3)
    assert config.client_to_server == config.server_to_client == DirectionConfig(0.02, loss=0.01)
    with pytest.raises(ConfigError, match="unknown link option"):
        LinkConfig.symmetric(latency=0.02)


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--delay", "20 parsecs", "--", "true"], "--delay"),
        (["--loss", "200%", "--", "true"], "--loss"),
        (["--rate", "fast", "--", "true"], "--rate"),
        (["--queue", "25pkt", "--", "true"], "--queue"),  # no --rate
        (["--burst", "3", "--", "true"], "--burst"),  # no --loss
        (["--seed", "x", "--", "true"], "--seed"),
        (["--frobnicate", "--", "true"], "--frobnicate"),
        (["--server-command", "'unclosed", "--", "true"], "--server-command"),
    ],
)
def test_cli_bad_arguments_are_one_line_naming_the_option(
    argv: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("quicmesh netem: ")
    assert named in err


def test_cli_without_root_says_so_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert cli.main(["--delay", "20ms", "--", "true"]) == 2
    assert capsys.readouterr().err == (
        "quicmesh netem: needs root (network namespaces and TUN devices)\n"
    )


@given(st.text(max_size=20))
def test_each_parser_reads_a_value_or_says_why(text: str) -> None:
    for parse in (parse_duration, parse_percent, parse_rate, parse_queue):
        try:
            parse(text)  # type: ignore[operator]
        except ConfigError as exc:
            assert "\n" not in str(exc)
