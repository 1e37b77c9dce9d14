"""The sidecar talks to transports only through ``transport/base.py`` and ``transport/stream.py``.

Every ``quicmesh/sidecar/*.py`` is parsed with :mod:`ast` (imports under
``TYPE_CHECKING`` and inside functions included); an import of any other
``quicmesh.transport`` module, of aioquic's seam (``quicmesh._aioquic``), or of a
name the ``quicmesh`` package re-exports from one of them (``QuicTransport``,
``TRANSPORTS``...) fails the test, naming the file, line and module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import quicmesh

SIDECAR = Path(quicmesh.__file__).parent / "sidecar"
ALLOWED = {"quicmesh.transport.base", "quicmesh.transport.stream"}


def forbidden(module: str) -> bool:
    """Whether the sidecar may not import ``module``."""
    if module in ALLOWED:
        return False
    if module == "quicmesh._aioquic" or module.startswith("quicmesh._aioquic."):
        return True
    return module == "quicmesh.transport" or module.startswith("quicmesh.transport.")


def offending_imports(source: str, package: str, filename: str) -> list[str]:
    """``file:line: imports module`` for each forbidden import in ``source``, a
    module of ``package`` (for resolving relative imports)."""
    problems: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source, filename)):
        imported: list[str] = []
        if isinstance(node, ast.Import):
            imported = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            origin = ".".join([*parts, node.module] if node.module else parts)
            if not node.level:
                origin = node.module or ""
            for alias in node.names:
                if origin == "quicmesh.transport":
                    imported.append(f"{origin}.{alias.name}")  # a module, by its name
                elif origin == "quicmesh":
                    # ``from .. import QuicTransport``: a name the package re-exports.
                    value = getattr(quicmesh, alias.name, None)
                    home = getattr(value, "__module__", None)
                    if alias.name == "TRANSPORTS" or (isinstance(home, str) and forbidden(home)):
                        imported.append(f"{home or origin} (via quicmesh.{alias.name})")
                    else:
                        imported.append(f"{origin}.{alias.name}")
                else:
                    imported.append(origin)
        for module in imported:
            if " (via " in module or forbidden(module):
                problems.append((node.lineno, f"{filename}:{node.lineno}: imports {module}"))
    return [problem for _, problem in sorted(problems)]


def test_sidecar_imports_only_the_transport_interface() -> None:
    files = sorted(SIDECAR.glob("*.py"))
    assert len(files) > 10  # the glob found the package
    problems = []
    for path in files:
        problems += offending_imports(path.read_text(), "quicmesh.sidecar", str(path))
    rule = "the sidecar must use only transport/base.py and transport/stream.py"
    assert not problems, rule + ":\n" + "\n".join(problems)


def test_the_check_catches_each_way_of_importing_a_transport() -> None:
    source = "\n".join(
        [
            "from ..transport.base import Transport",
            "from ..transport.stream import MeshStream",
            "from ..transport.quic import QuicPeerConnection",
            "from ..transport import tickets",
            "import quicmesh.transport.auto",
            "from .. import _aioquic",
            "from .. import QuicTransport",
            "from .. import TRANSPORTS",
            "from .. import errors",
            "def f():",
            "    from quicmesh.transport._admission import AdmissionConfig",
        ]
    )
    problems = offending_imports(source, "quicmesh.sidecar", "x.py")
    assert problems == [
        "x.py:3: imports quicmesh.transport.quic",
        "x.py:4: imports quicmesh.transport.tickets",
        "x.py:5: imports quicmesh.transport.auto",
        "x.py:6: imports quicmesh._aioquic",
        "x.py:7: imports quicmesh.transport.quic.transport (via quicmesh.QuicTransport)",
        "x.py:8: imports quicmesh (via quicmesh.TRANSPORTS)",
        "x.py:11: imports quicmesh.transport._admission",
    ]
