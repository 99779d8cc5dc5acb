"""The eager backend: run the rewritten graph with plain-torch reference implementations.

Every ``kiln::`` op's reference is registered for all devices, so the graph module itself
is the executable. This is the oracle the other backends are tested against.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from kiln.backends import register_backend


def lower(gm: GraphModule) -> Callable[..., object]:
    """The eager executable of ``gm``: the graph module itself."""
    return gm


register_backend("eager", lower)
