"""The endpoints-file watcher and a reload that reads the file while it is rewritten."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

import quicmesh.xds.bootstrap as bootstrap
from quicmesh.sidecar.launch import free_port
from quicmesh.sidecar.runtime import Sidecar
from quicmesh.tls import DevCA


def test_a_file_rewritten_during_a_reload_is_read_by_the_watcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload read the file's old content; an agent finished rewriting it before the
    reload noted the file's version, which then hid the change from the watcher: the
    cluster kept the old endpoints until the file changed again."""
    DevCA().save(tmp_path / "ca")
    endpoints = tmp_path / "endpoints.yaml"
    endpoints.write_text("['127.0.0.1:9001', '127.0.0.1:9002']\n")
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "node": {"name": "a", "identity": "spiffe://mesh.local/a"},
                "tls": {"ca_dir": str(tmp_path / "ca")},
                "admin": {"address": f"127.0.0.1:{free_port()}"},
                "clusters": [
                    {
                        "name": "c",
                        "transport": "h2",
                        "target": "10.0.0.1:80",
                        "endpoints_file": str(endpoints),
                    }
                ],
                "listeners": {
                    "outbound": [
                        {"name": "o", "address": f"127.0.0.1:{free_port()}", "cluster": "c"}
                    ]
                },
            }
        )
    )
    load = bootstrap.load_any_config

    def load_then_rewrite(path: object, **options: object) -> object:
        loaded = load(path, **options)  # type: ignore[arg-type]
        endpoints.write_text("['127.0.0.1:9001', '127.0.0.1:9003']\n")  # the agent finishes
        return loaded

    async def main() -> None:
        sidecar = Sidecar(load(config), str(config))
        await sidecar.start()
        try:
            monkeypatch.setattr(bootstrap, "load_any_config", load_then_rewrite)
            assert await sidecar.reload()
            monkeypatch.setattr(bootstrap, "load_any_config", load)
            while set(sidecar.clusters["c"].endpoints) != {
                ("127.0.0.1", 9001),
                ("127.0.0.1", 9003),
            }:
                await asyncio.sleep(0.05)
        finally:
            await sidecar._close_everything()

    asyncio.run(asyncio.wait_for(main(), 10))
