"""A reload checks what the start checks, and says when it is ignored (review 27).

A SIGHUP reload skipped :func:`~quicmesh.sidecar.config.check_files`: a new inbound
listener whose ``stateless_reset_key`` was the configuration file itself (refused by
``--check`` and at start) was applied, the file's text taken as the key. A SIGHUP
during a drain was ignored without a word.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from quicmesh.sidecar.launch import free_port
from quicmesh.sidecar.runtime import Sidecar
from quicmesh.tls import DevCA
from quicmesh.xds.bootstrap import load_any_config


def _document(tmp_path: Path) -> dict[str, Any]:
    return {
        "node": {"name": "a", "identity": "spiffe://mesh.local/a"},
        "tls": {"ca_dir": str(tmp_path / "ca")},
        "admin": {"address": f"127.0.0.1:{free_port()}"},
        "clusters": [
            {"name": "c", "transport": "h2", "target": "10.0.0.1:80", "endpoints": ["127.0.0.1:9"]}
        ],
        "listeners": {
            "outbound": [{"name": "o", "address": f"127.0.0.1:{free_port()}", "cluster": "c"}]
        },
    }


def test_a_reload_naming_the_configuration_as_a_reset_key_is_rejected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    DevCA().save(tmp_path / "ca")
    config = tmp_path / "sidecar.yaml"
    document = _document(tmp_path)
    config.write_text(yaml.safe_dump(document))

    async def main() -> None:
        sidecar = Sidecar(load_any_config(config), str(config))
        await sidecar.start()
        try:
            document["listeners"]["inbound"] = [
                {
                    "name": "in3",
                    "address": f"127.0.0.1:{free_port()}",
                    "transports": ["quic"],
                    "engine": "aioquic",
                    "destinations": ["127.0.0.1:1"],
                    "stateless_reset_key": str(config),
                }
            ]
            config.write_text(yaml.safe_dump(document))
            with caplog.at_level(logging.ERROR, logger="quicmesh.sidecar"):
                assert await sidecar.reload() is False
            assert sidecar.reloads == {"ok": 0, "rejected": 1}
            assert "in3" not in sidecar.inbound and not sidecar.config.inbound
        finally:
            await sidecar._close_everything()

    asyncio.run(asyncio.wait_for(main(), 20))
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert said == [
        "reload rejected, keeping the running configuration: "
        f"{config}: listeners.inbound[0].stateless_reset_key: {config} is also "
        "the configuration itself"
    ]


def test_a_reload_during_a_drain_says_it_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    DevCA().save(tmp_path / "ca")
    config = tmp_path / "sidecar.yaml"
    config.write_text(yaml.safe_dump(_document(tmp_path)))

    async def main() -> None:
        sidecar = Sidecar(load_any_config(config), str(config))
        await sidecar.start()
        assert sidecar.begin_drain()
        while not sidecar.draining:  # the drain task's first step (no timer involved)
            await asyncio.sleep(0)
        with caplog.at_level(logging.INFO, logger="quicmesh.sidecar"):
            assert await sidecar.reload() is False
        assert sidecar.reloads == {"ok": 0, "rejected": 0}
        await sidecar.wait_drained()

    asyncio.run(asyncio.wait_for(main(), 20))
    said = [r for r in caplog.records if "reload" in r.getMessage()]
    assert [(r.levelno, r.getMessage()) for r in said] == [
        (logging.WARNING, f"{config}: reload ignored: the sidecar is draining")
    ]
