"""Issue 13, fuzzing: the atheris targets of ``quicmesh fuzz``.

Every input kept in ``tests/fuzz_regressions/<target>/`` (crashes found by a
long run, and seeds) is replayed through its target; a short coverage-guided
run of every target (1 s each) runs through the console script, as a user
runs it (``quicmesh fuzz --seconds N --target NAME``), in two runs at once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from quicmesh.fuzz import INSTRUMENTED, REGRESSIONS, TARGETS, replay

KEPT = sorted(
    (target.name, case)
    for target in REGRESSIONS.iterdir()
    if target.is_dir()
    for case in target.iterdir()
    if case.is_file()
)


def test_every_target_has_kept_cases() -> None:
    assert {target for target, _ in KEPT} == set(TARGETS)


def test_every_target_names_what_coverage_follows() -> None:
    assert set(INSTRUMENTED) == set(TARGETS)


@pytest.mark.parametrize(("target", "case"), KEPT, ids=[f"{t}/{c.name}" for t, c in KEPT])
def test_kept_inputs_replay_without_escaping(target: str, case: Path) -> None:
    replay(target, case.read_bytes())


def test_help_names_the_options() -> None:
    result = subprocess.run(
        ["quicmesh", "fuzz", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    for option in ("--seconds", "--target", "--crashes", "--corpus"):
        assert option in result.stdout


def test_an_unknown_target_is_refused_in_one_line() -> None:
    result = subprocess.run(
        ["quicmesh", "fuzz", "--target", "nope"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr


def test_a_short_run_of_every_target_finds_no_crash(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris (the test extra) builds for Python <= 3.11")
    # Two runs at once, half the targets each (--target repeated): the machine's two
    # cores, and half the wall time of one run of them all.
    names = sorted(TARGETS)
    halves = [names[::2], names[1::2]]
    runs = [
        subprocess.Popen(
            [
                "quicmesh",
                "fuzz",
                "--seconds",
                "1",
                "--crashes",
                str(tmp_path),
                *(option for name in half for option in ("--target", name)),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half in halves
    ]
    try:
        for run, half in zip(runs, halves, strict=True):
            stdout, stderr = run.communicate(timeout=600)
            assert run.returncode == 0, stdout + stderr[-3000:]
            for target in half:
                assert f"{target}: ok (Done " in stdout, stdout
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert not any(path.is_file() for path in tmp_path.rglob("*"))


def test_the_h3_targets_requests_reach_the_server_session() -> None:
    # Found by a review: the pair's clock stood still, aioquic's pacer sent nothing
    # after the handshake, and the target's requests never reached the server.
    import pylsqpack

    from quicmesh.fuzz import _H3Pair
    from quicmesh.tunnel import events

    pair = _H3Pair()
    for index in range(3):
        _, block = pylsqpack.Encoder().encode(
            0, [(b":method", b"CONNECT"), (b":authority", f"a{index}.svc:80".encode())]
        )
        frame = b"\x01" + bytes([len(block)]) + block
        pair.client.send_stream_data(pair.client.get_next_available_stream_id(), frame)
        produced = pair.exchange()
        assert [type(event) for event in produced] == [events.StreamRequested]
