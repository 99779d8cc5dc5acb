"""Select the sampled rows before a vocabulary-parallel LM head, not after its all-gather.

The kv-cache pass gathers the rows the sampler needs (``logits_indices``) right before the LM
head, so a step computes logits for one token per sequence, not for every prompt token. Under
tensor parallelism the graph's logits come out of the LM head's all-gather along the
vocabulary (``shard-tensor-parallel``), so the kv-cache pass selects after it; this moves the
selection in front of the LM head linear. Every node between the linear and the selection was
made by ``shard-tensor-parallel`` for the gather (tagged ``lm_head_gather``) and acts per row.
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node

from kiln.ir import fake_mode
from kiln.parallel.tp_collectives import ROLE_KEY
from kiln.quantize.ops import operand

aten = torch.ops.aten


def select_rows_before_gather(gm: GraphModule) -> int:
    """Rewrite ``index_select(gather(linear(x)), d, idx)`` to ``gather(linear(index_select(x, d, idx)))``; returns how many."""
    moved = 0
    mode = fake_mode(gm)
    for sel in [n for n in gm.graph.nodes if n.target == aten.index_select.default]:
        x, dim, idx = sel.args
        chain: list[Node] = []
        n = x
        while isinstance(n, Node) and n.meta.get(ROLE_KEY) == "lm_head_gather" and len(n.users) == 1:
            chain.append(n)
            n = n.args[0]
        if not chain or not isinstance(n, Node) or n.meta.get(ROLE_KEY) != "lm_head" or len(n.users) != 1:
            continue
        head, hidden = n, n.args[0]
        tokens = str(hidden.meta["val"].shape[dim])  # type: ignore[union-attr]
        # the activation, and a quantized head's per-token activation scale / zero point with it
        per_token = [hidden, *(a for a in (operand(head, "x_scale"), operand(head, "x_zero_point"))
                               if isinstance(a, Node) and a.meta["val"].dim() > dim
                               and str(a.meta["val"].shape[dim]) == tokens)]  # fmt: skip
        rows = idx.meta["val"].shape[0]  # type: ignore[union-attr]
        for value in per_token:
            with gm.graph.inserting_before(head):
                picked = gm.graph.call_function(aten.index_select.default, (value, dim, idx))
            picked.meta.update({k: v for k, v in sel.meta.items() if k != "val"})
            with mode:
                picked.meta["val"] = aten.index_select.default(value.meta["val"], dim, idx.meta["val"])  # type: ignore[union-attr]
            head.replace_input_with(value, picked)  # type: ignore[arg-type]
        with mode:
            for node in [head, *reversed(chain)]:  # built, not re-run: fake kernels guard on the unbacked row count
                old = node.meta["val"]
                node.meta["val"] = old.new_empty([rows if str(s) == tokens else s for s in old.shape])
        sel.replace_all_uses_with(x)
        gm.graph.erase_node(sel)
        moved += 1
    return moved


__all__ = ["select_rows_before_gather"]
