"""examples/README.md followed word by word, in a copy of examples/: CA, app, two sidecars,
curl, both access logs, what is (not) served, file modes, git-ignores, the h2 recipe.

The walkthrough's ports are fixed (9080, 15000, 15001, 15008, 15100), so this test
needs them free on loopback. Synchronised by polling ``/ready``, ``/stats`` and the
logs with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "examples" / "README.md").read_text()
SCRIPT = shutil.which("quicmesh")
T = TypeVar("T")

CA_COMMAND = """python -c 'import quicmesh; quicmesh.DevCA().save("ca")'"""
WWW_COMMAND = "mkdir -p www && head -c 20000000 /dev/urandom > www/some-large-file"
APP_COMMAND = "python -m http.server 9080 --bind 127.0.0.1 --directory www"
SIDECAR_B = "quicmesh sidecar -c sidecar-b.yaml"
SIDECAR_A = "quicmesh sidecar -c sidecar-a.yaml"


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 20.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.startswith("{")]


@pytest.fixture
def examples(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "examples"
    shutil.copytree(REPO / "examples", folder)
    yield folder


def test_the_walkthrough_word_by_word(examples: Path) -> None:
    for command in (CA_COMMAND, WWW_COMMAND, APP_COMMAND, SIDECAR_B, SIDECAR_A):
        assert command in README, f"examples/README.md no longer says {command!r}"
    assert SCRIPT is not None, "the quicmesh console script is not on PATH: pip install -e ."
    env = {**os.environ, "PATH": f"{Path(SCRIPT).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(CA_COMMAND, shell=True, cwd=examples, check=True, env=env, timeout=60)
    subprocess.run(WWW_COMMAND, shell=True, cwd=examples, check=True, env=env, timeout=60)
    processes: list[subprocess.Popen[bytes]] = []

    def start(command: str, name: str) -> subprocess.Popen[bytes]:
        with (
            open(examples / f"{name}.out", "wb") as out,
            open(examples / f"{name}.err", "wb") as err,
        ):
            process = subprocess.Popen(
                shlex.split(command), cwd=examples, env=env, stdout=out, stderr=err,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        processes.append(process)
        return process

    def err(name: str) -> str:
        return (examples / f"{name}.err").read_text(errors="replace")

    try:
        start(APP_COMMAND, "app")
        wait_until(lambda: get("http://127.0.0.1:9080/")[0] == 200, "the app")
        b = start(SIDECAR_B, "b")
        wait_until(lambda: get("http://127.0.0.1:15100/ready")[0] == 200, "sidecar B ready")
        a = start(SIDECAR_A, "a")
        wait_until(lambda: get("http://127.0.0.1:15000/ready")[0] == 200, "sidecar A ready")

        # 4. curl through A: the listing of www/, logged by both sidecars with one flow_id.
        status, body = get("http://127.0.0.1:15001/")
        assert status == 200 and b"some-large-file" in body
        line_a = wait_until(lambda: json_lines(examples / "a.out"), "A's access log")[0]
        line_b = wait_until(lambda: json_lines(examples / "b.out"), "B's access log")[0]
        assert line_a["flow_id"] == line_b["flow_id"] and len(line_a["flow_id"]) == 32
        assert (line_a["direction"], line_b["direction"]) == ("outbound", "inbound")
        assert line_a["transport"] == "quic" and line_b["downstream"].startswith("127.0.0.1:")

        # 7 (issue 17): the CA key is not served through the mesh, and secrets are 0600.
        status, body = get("http://127.0.0.1:15001/ca/ca-key.pem")
        assert status == 404 and b"PRIVATE KEY" not in body
        assert stat.S_IMODE((examples / "ca" / "ca-key.pem").stat().st_mode) == 0o600
        tickets = examples / "tickets.json"
        wait_until(tickets.exists, "A's ticket cache")
        assert stat.S_IMODE(tickets.stat().st_mode) == 0o600

        # 8. "set `transport: h2` and `kill -HUP` A": accepted, with a warning.
        config = examples / "sidecar-a.yaml"
        text = config.read_text()
        assert text.count("transport: quic ") == 1
        config.write_text(text.replace("transport: quic ", "transport: h2   "))
        a.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            _, stats = get("http://127.0.0.1:15000/stats")
            return bool(stats) and json.loads(stats)["reloads"]["ok"] == 1

        wait_until(reloaded, "A's reload")
        assert "clusters[0].congestion_control: applies to quic clusters only" in err("a")
        assert "reload rejected" not in err("a")
        assert get("http://127.0.0.1:15001/")[0] == 200
        # Third flow: the listing, the refused key, then this one.
        wait_until(lambda: json_lines(examples / "a.out")[2:], "a third flow on A")
        lines = json_lines(examples / "a.out")
        assert [line["transport"] for line in lines] == ["quic", "quic", "h2"]
        assert lines[-1]["outcome"] == "completed"

        for process in (a, b):
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(10)
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "Traceback" not in err("a") + err("b")


@pytest.mark.skipif(not (REPO / ".git").exists(), reason="not a git checkout")
def test_generated_files_are_git_ignored() -> None:
    paths = [
        "examples/ca/ca-key.pem",
        "examples/ca/ca.pem",
        "examples/tickets.json",
        "examples/www/some-large-file",
        "build/lib/quicmesh/cli.py",
        "dist/quicmesh-0.1.0-py3-none-any.whl",
    ]
    result = subprocess.run(
        ["git", "-C", str(REPO), "check-ignore", "--no-index", *paths],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.stdout.split() == paths, result.stderr
