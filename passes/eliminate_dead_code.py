"""eliminate-dead-code: remove values nothing uses, and weights nothing reads.

Matches: call_function and get_attr nodes without users whose op has no side effect
    (placeholders and the output are never removed; impure ops such as in-place copies
    into buffers or collectives are kept).
Rewrites to: nothing: the nodes are erased; attributes of the GraphModule that no
    remaining get_attr reads are deleted, so dropped weights free their memory.
Requires: a well-formed graph.
Establishes: every non-placeholder node except impure ones has at least one user.
"""

from __future__ import annotations

from torch.fx import GraphModule, Node

from kiln.pass_manager import Pass, PassResult, RewriteError


def _is_impure(node: Node) -> bool:
    return node.op in ("placeholder", "output") or node.is_impure()


def _delete_attr(gm: GraphModule, target: str) -> bool:
    *path, leaf = target.split(".")
    owner = gm
    for part in path:
        owner = getattr(owner, part, None)
        if owner is None:
            return False
    if hasattr(owner, leaf):
        delattr(owner, leaf)
        return True
    return False


class EliminateDeadCode(Pass):
    """Erase unused pure nodes and the weights only they read."""

    name = "eliminate-dead-code"

    def call(self, gm: GraphModule) -> PassResult:
        removed = 0
        for node in reversed(list(gm.graph.nodes)):
            if not node.users and not _is_impure(node):
                gm.graph.erase_node(node)
                removed += 1
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        candidates = {name for name, _ in gm.named_parameters()} | {name for name, _ in gm.named_buffers()}
        attrs = sum(_delete_attr(gm, name) for name in sorted(candidates - read))
        return PassResult(gm, modified=bool(removed or attrs), stats={"nodes_removed": removed, "weights_removed": attrs})

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if not node.users and not _is_impure(node):
                raise RewriteError("node left without users", node)
