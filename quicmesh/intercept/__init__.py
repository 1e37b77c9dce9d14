"""Transparent interception: nftables rules that send an application's TCP through its sidecar.

:mod:`.rules` renders the ruleset (a pure function, tested without root),
:mod:`.nft` runs ``nft`` (the thin adaptor), :mod:`.cli` is
``quicmesh intercept install|remove``. The sidecar's side, the capture listeners
that recover the original destination, lives in :mod:`quicmesh.sidecar.capture`.
See docs/interception.md.
"""

from __future__ import annotations

from .nft import InterceptError
from .rules import InterceptRules, render_install, render_remove

__all__ = ["InterceptError", "InterceptRules", "render_install", "render_remove"]
