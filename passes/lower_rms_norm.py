"""lower-rms-norm: the runtime graph's RMSNorms, spelled op by op, become one ``kiln.rms_norm`` each.

A captured Llama-family model writes RMSNorm (Zhang & Sennrich 2019) as ``weight * (x *
rsqrt(mean(x², -1) + eps))``, Hugging Face's ``LlamaRMSNorm`` with a cast to fp32 before and
back after: six to eight ops, each its own kernel. In a decode step those kernels are a few
microseconds each and there are two norms per layer (and one at the end), so they make up a
large part of the step's launches; ``kiln::rms_norm``'s CUDA kernel
(``kiln.backends.triton.rms_norm``) does a row in one program.

Matches: ``mul(W, h)`` or ``mul(h, W)`` where ``W`` is a 1-D float32 / 16-bit ``get_attr`` constant
    on one of ``devices`` (default: CUDA, where the kernel exists), and ``h`` is
    ``[to(·, x.dtype)](mul(a, rsqrt(add(mean(pow(a, 2), [-1], keepdim=True), eps))))`` with
    ``a = to(x, float32)`` and the cast back present (x 16-bit: ``upcast``), or ``a = x`` and no
    casts (x fp32). Every matched node but the last is used only inside the pattern.
Rewrites to: ``kiln.rms_norm(x, W, eps, upcast)``; the replaced nodes are erased.
Requires: the runtime's step graph (after ``kv-cache``); canonical forms (``aten.to.dtype`` casts).
Establishes: no matched pattern remains. The reference computes the same ops, so on the CPU the
    rewritten graph's outputs equal the original's exactly; the kernel sums squares in a
    different order (fp32) and may differ in the last bit.
Statistics: ``norms_lowered``, ``nodes_removed``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from kiln.ir import constant_tensor, is_call, meta_val
from kiln.pass_manager import Pass, PassResult, RewriteError, replace_with_call

aten = torch.ops.aten
RMS_NORM = torch.ops.kiln.rms_norm.default
_16BIT = (torch.float16, torch.bfloat16)
_WEIGHT_DTYPES = (torch.float32, *_16BIT)


def _cast_to(node: object) -> torch.dtype | None:
    """The dtype of an ``aten.to.dtype`` cast with no other effect, else None."""
    if not is_call(node, aten.to.dtype):
        return None
    assert isinstance(node, Node)
    if len(node.args) > 2 or node.kwargs.keys() - {"non_blocking", "copy"} or node.kwargs.get("copy"):
        return None
    dtype = node.args[1] if len(node.args) > 1 else node.kwargs.get("dtype")
    return dtype if isinstance(dtype, torch.dtype) else None


@dataclass
class _Match:
    out: Node  # the scaling mul
    x: Node
    weight: Node
    eps: float
    upcast: bool
    inner: list[Node]  # the pattern's other nodes, to erase


class LowerRMSNorm(Pass):
    """Rewrite op-by-op RMSNorms with a constant weight to ``kiln.rms_norm`` (one CUDA kernel)."""

    name = "lower-rms-norm"

    def __init__(self, devices: Sequence[str] = ("cuda",)) -> None:
        self.devices = tuple(devices)

    def _match(self, gm: GraphModule, out: Node) -> _Match | None:
        if not is_call(out, aten.mul.Tensor) or len(out.args) != 2:
            return None
        for w_arg, h in ((out.args[0], out.args[1]), (out.args[1], out.args[0])):
            w = constant_tensor(gm, w_arg)
            if w is None or w.dim() != 1 or w.dtype not in _WEIGHT_DTYPES or \
                    w.device.type not in self.devices or not isinstance(h, Node):  # fmt: skip
                continue
            m = self._match_norm(h)
            if m is None:
                continue
            x, eps, upcast, inner = m
            if set(inner[0].users) != {out}:  # the normalized value is used elsewhere too: keep it
                continue
            xv = meta_val(x)
            if xv is None or xv.shape[-1] != w.shape[0] or not w.dtype.is_floating_point:
                continue
            if upcast != (xv.dtype in _16BIT) or (not upcast and xv.dtype != torch.float32):
                continue
            return _Match(out, x, w_arg, eps, upcast, inner)  # type: ignore[arg-type]
        return None

    @staticmethod
    def _match_norm(h: Node) -> tuple[Node, float, bool, list[Node]] | None:
        """``h`` = [cast back](a * rsqrt(mean(a²) + eps)), a = [cast to fp32](x): (x, eps, upcast, nodes)."""
        inner: list[Node] = []
        down = _cast_to(h)
        if down is not None:
            inner.append(h)
            h = h.args[0]  # type: ignore[assignment]
        if not is_call(h, aten.mul.Tensor) or len(h.args) != 2:
            return None
        inner.append(h)
        for a, r in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
            if not is_call(r, aten.rsqrt.default) or not isinstance(a, Node):
                continue
            add = r.args[0]  # type: ignore[union-attr]
            # x + eps exactly: no alpha; the mean over the last dim with keepdim and no dtype
            if not (is_call(add, aten.add.Tensor) and not add.kwargs and len(add.args) == 2  # type: ignore[union-attr]
                    and isinstance(add.args[1], float)):  # type: ignore[union-attr]  # fmt: skip
                continue
            mean = add.args[0]  # type: ignore[union-attr]
            if not (is_call(mean, aten.mean.dim) and not mean.kwargs and len(mean.args) == 3  # type: ignore[union-attr]
                    and mean.args[2] is True):  # type: ignore[union-attr]  # fmt: skip
                continue
            a_val = meta_val(a)
            dims = mean.args[1]  # type: ignore[union-attr]
            if a_val is None or not isinstance(dims, list | tuple) or len(dims) != 1 or \
                    dims[0] not in (-1, a_val.dim() - 1):  # fmt: skip
                continue
            sq = mean.args[0]  # type: ignore[union-attr]
            if not (is_call(sq, aten.pow.Tensor_Scalar) and sq.args[0] is a and sq.args[1] == 2):  # type: ignore[union-attr]
                continue
            up = _cast_to(a)
            if up is not None:
                if up != torch.float32 or down is None:
                    continue
                x = a.args[0]
                if not isinstance(x, Node) or meta_val(x) is None or meta_val(x).dtype != down:  # type: ignore[union-attr]
                    continue
                nodes = [*inner, r, add, mean, sq, a]  # type: ignore[list-item]
                upcast = True
            else:
                if down is not None:
                    continue
                x, nodes, upcast = a, [*inner, r, add, mean, sq], False  # type: ignore[list-item]
            members = set(nodes)
            # every node but the normalized value feeds only the pattern (x may have other users)
            if any(u not in members for n in nodes[1:] for u in n.users):
                continue
            return x, float(add.args[1]), upcast, nodes  # type: ignore[union-attr]
        return None

    def call(self, gm: GraphModule) -> PassResult:
        stats: Counter[str] = Counter()
        for node in list(gm.graph.nodes):
            if getattr(node, "_erased", False):  # erased with an earlier match
                continue
            m = self._match(gm, node)
            if m is None:
                continue
            stats["nodes_removed"] += replace_with_call(m.out, RMS_NORM, (m.x, m.weight, m.eps, m.upcast), self.name,
                                                        m.inner)  # fmt: skip
            stats["norms_lowered"] += 1
        return PassResult(gm, bool(stats), dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if self._match(gm, n) is not None:
                raise RewriteError("an RMSNorm with a constant weight was left unlowered", n)


__all__ = ["LowerRMSNorm"]
