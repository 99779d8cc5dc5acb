"""lower-decode-linears: the runtime graph's 16-bit linears become ``kiln.gemv``, a split-K GEMV at decode.

One step graph serves prefill and decode (DESIGN.md); at decode each linear has one row of x
per sequence and streams its weight once, where cuBLAS runs small shapes well below memory
bandwidth. ``kiln::gemv`` computes exactly ``aten.linear``; its CUDA kernel
(``kiln.backends.triton.gemv``) times, per shape, cuBLAS against a weight-streaming split-K
GEMV (after flash-decoding, Dao et al. 2023) and runs the faster; rows beyond a few go to cuBLAS.

Matches: ``aten.linear(x, W, b)`` where ``W`` is a 2-D ``get_attr`` constant of dtype float16 or
    bfloat16 on one of ``devices`` (default: CUDA, where the kernel exists), ``x`` has W's dtype,
    and ``b`` is absent or a constant of that dtype.
Rewrites to: ``kiln.gemv(x, W, b)``.
Requires: the runtime's step graph (after ``kv-cache``); linears in canonical form.
Establishes: no matched ``aten.linear`` remains; outputs equal the linear's up to fp32
    summation order (both accumulate in fp32 and round once).
Statistics: ``linears_lowered``, ``weight_bytes`` (bytes of the weights the GEMVs read).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node

from kiln.ir import PASS_KEY, constant_tensor, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta

aten = torch.ops.aten
LINEAR = aten.linear.default
GEMV = torch.ops.kiln.gemv.default
_DTYPES = (torch.float16, torch.bfloat16)


class LowerDecodeLinears(Pass):
    """Rewrite 16-bit constant-weight linears to ``kiln.gemv`` (the CUDA split-K GEMV or cuBLAS, per shape)."""

    name = "lower-decode-linears"

    def __init__(self, devices: Sequence[str] = ("cuda",)) -> None:
        self.devices = tuple(devices)

    def _matches(self, gm: GraphModule, lin: Node) -> bool:
        if lin.op != "call_function" or lin.target != LINEAR:
            return False
        w = constant_tensor(gm, lin.args[1])
        if w is None or w.dim() != 2 or w.dtype not in _DTYPES or w.device.type not in self.devices:
            return False
        x = lin.args[0].meta.get("val") if isinstance(lin.args[0], Node) else None
        bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
        b = constant_tensor(gm, bias)
        return x is not None and x.dtype == w.dtype and (bias is None or (b is not None and b.dtype == w.dtype))

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for lin in [n for n in gm.graph.nodes if self._matches(gm, n)]:
            bias = lin.args[2] if len(lin.args) > 2 else lin.kwargs.get("bias")
            with gm.graph.inserting_before(lin):
                new = gm.graph.call_function(GEMV, (lin.args[0], lin.args[1], bias))
            copy_meta(lin, new)
            new.meta[PASS_KEY] = self.name
            infer_meta(new)
            lin.replace_all_uses_with(new)
            gm.graph.erase_node(lin)
            w = constant_tensor(gm, new.args[1])
            stats["linears_lowered"] += 1
            stats["weight_bytes"] += w.numel() * w.element_size()  # type: ignore[union-attr]
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if self._matches(gm, n):
                raise RewriteError("a 16-bit constant-weight linear was left unlowered", n)


__all__ = ["LowerDecodeLinears"]
