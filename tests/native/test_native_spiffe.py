"""The native verifier's SPIFFE-ID rules are quicmesh's: same verdict, same reason.

:func:`quicmesh._native.spiffe_id_problem` (Rust, used by the native engine's rustls
verifiers during the handshake) against :func:`quicmesh.tls.validate_spiffe_id`.
"""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from quicmesh.tls import validate_spiffe_id

PIECES = st.sampled_from(
    ["spiffe://", "SPIFFE://", "mesh.local", "Mesh", "/", "//", ".", "..", ":443", "@", "?",
     "#", "%20", "a", "Z", "0", "-", "_", "é", "x" * 700]
)  # fmt: skip


def _python_problem(value: str) -> str | None:
    try:
        validate_spiffe_id(value)
    except ValueError as exc:
        return str(exc).split(": ", 1)[1]
    return None


@settings(deadline=None)  # a loaded CI machine must not turn a slow example into a failure
@given(st.lists(PIECES, max_size=12).map("".join) | st.text(max_size=40))
@example("spiffe://mesh.local/ns/default/sa/x")
@example("spiffe://mesh.local")
@example("spiffe://")
@example("")
def test_native_and_python_agree_on_spiffe_ids(value: str) -> None:
    from quicmesh import _native  # type: ignore[attr-defined]

    assert _native.spiffe_id_problem(value) == _python_problem(value)
