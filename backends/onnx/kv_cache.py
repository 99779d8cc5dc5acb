"""The contiguous-cache rewrite: the compiled graph becomes a decoder with past/present K/V.

The layout is the one ONNX Runtime's generation tools (onnxruntime-genai, Optimum) expect:
inputs ``past_key_values.{i}.key`` / ``.value`` of shape (B, Hkv, P, D), outputs
``present.{i}.key`` / ``.value`` of shape (B, Hkv, P + T, D), for the ``i``-th attention of
the graph. It is the contiguous variant of the paged ``kv_cache`` pass (DESIGN.md, "One
captured graph serves every step").

Matches: every ``kiln::attention`` node of the graph (the fuse-attention pass made them).
Rewrites to: ``k' = cat([past_k, k], 2)``, ``v' = cat([past_v, v], 2)``,
    ``kiln::attention(q, k', v', mask', causal, scale)`` with ``k'`` and ``v'`` appended to
    the outputs; ``kiln::attention``'s causal mask is aligned to the end of the keys, so the
    new queries see the whole past. A mask operand over the new tokens gets the past keys
    prepended as visible. Token-index ``arange(T)`` nodes (positions, and the causal masks
    built from them) are shifted to ``arange(P, P + T)``, so a graph that computes its own
    positions stays right after the past.
Requires: no unfused attention left (``aten.scaled_dot_product_attention``), at least one
    ``kiln::attention``, a token input (``input_ids``) whose axis 1 is the token axis, and no
    ``attention_mask`` input (a mask built over the new tokens cannot index the past).
Establishes: the graph takes ``2 * layers`` more inputs and returns ``2 * layers`` more outputs.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from kiln.errors import ExportError
from kiln.ir import PASS_KEY, fake_mode, iter_ops, provenance

_UNFUSED_ATTENTION = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
)
_ARANGES = (torch.ops.aten.arange.default, torch.ops.aten.arange.start, torch.ops.aten.arange.start_step)
_NAME = "kv-cache-contiguous"


@dataclass
class CacheLayout:
    """What the rewrite added to the graph, in order."""

    past: list[tuple[str, str]]  # placeholder names (key, value) per attention, graph order
    heads: list[int]  # kv heads of each attention's cache
    head_dims: list[int]  # head dim of each attention's cache
    dtype: torch.dtype  # cache dtype
    positions_shifted: int  # token-index aranges shifted by the past length

    @property
    def layers(self) -> int:
        return len(self.past)

    def input_names(self) -> list[str]:
        """The ONNX names of the past inputs: ``past_key_values.{i}.key`` / ``.value``."""
        return [f"past_key_values.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]

    def output_names(self) -> list[str]:
        """The ONNX names of the present outputs: ``present.{i}.key`` / ``.value``."""
        return [f"present.{i}.{kind}" for i in range(self.layers) for kind in ("key", "value")]


def _sym_expr(value: object) -> str | None:
    return str(value.node.expr) if isinstance(value, torch.SymInt) else None


def _token_symbol(gm: GraphModule) -> str:
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name == "input_ids":
            val = n.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() == 2 and _sym_expr(val.shape[1]):
                return _sym_expr(val.shape[1])  # type: ignore[return-value]
    raise ExportError(
        "the generation artifact needs an input_ids input with a dynamic token axis; "
        "compile the model with kiln.compile(model, (input_ids,)) (the token axis is dynamic by default)"
    )


def _mark(node: Node, like: Node | None = None) -> Node:
    node.meta[PASS_KEY] = _NAME
    if like is not None:
        for key in ("nn_module_stack", "stack_trace"):
            if key in like.meta:
                node.meta[key] = like.meta[key]
    return node


def _pad_mask(gm: GraphModule, mask: Node, past_len: Node, attention: Node) -> Node:
    """``cat([visible(..., Tq, P), mask], -1)``: the past keys are visible to every new query."""
    val = mask.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() < 2:
        raise ExportError(
            f"attention %{attention.name} has a mask without shape metadata; cannot extend it over the "
            f"cache  # {provenance(attention)}"
        )
    g = gm.graph
    with g.inserting_before(attention):
        sizes: list[object] = []
        for axis, size in enumerate(val.shape[:-1]):
            sizes.append(size if isinstance(size, int) else _mark(g.call_function(torch.ops.aten.sym_size.int, (mask, axis))))
        sizes.append(past_len)
        fill = torch.ops.aten.new_ones.default if val.dtype == torch.bool else torch.ops.aten.new_zeros.default
        pad = _mark(g.call_function(fill, (mask, sizes)), attention)
        return _mark(g.call_function(torch.ops.aten.cat.default, ([pad, mask], -1)), attention)


def add_kv_cache(gm: GraphModule) -> CacheLayout:
    """Rewrite ``gm`` in place into a decoder with contiguous past/present K/V (see module doc).

    ``gm`` must use plain (flat) calling convention: placeholders in order, a tuple output.
    """
    unfused = iter_ops(gm, _UNFUSED_ATTENTION)
    if unfused:
        n = unfused[0]
        raise ExportError(
            f"the graph still has unfused attention ({len(unfused)} node(s), first %{n.name} "
            f"{n.target}  # {provenance(n)}); the generation artifact rewrites kiln::attention nodes. "
            "Compile with the fuse-attention pass in the pipeline (it turns SDPA into kiln::attention)."
        )
    attentions = iter_ops(gm, [torch.ops.kiln.attention.default])
    if not attentions:
        raise ExportError("the graph has no kiln::attention node: nothing to cache (is this a transformer LM?)")
    tokens = _token_symbol(gm)
    g = gm.graph
    masked = [n for n in g.nodes if n.op == "placeholder" and n.name == "attention_mask" and n.users]
    if masked:
        raise ExportError(
            "the generation artifact cannot take attention_mask: the compiled graph builds its masks over the "
            "new tokens only, while a cache needs them over past + new. Compile with input_ids (and "
            "position_ids) only for kv_cache=True; the causal mask is kiln::attention's own"
        )
    mode = fake_mode(gm)
    placeholders = [n for n in g.nodes if n.op == "placeholder"]
    past: list[tuple[str, str]] = []
    heads: list[int] = []
    dims: list[int] = []
    dtype = torch.float32
    cache_inputs: list[tuple[Node, Node]] = []
    with g.inserting_after(placeholders[-1]):
        # inserting_after puts each new node right after the anchor: create in reverse order
        for i in reversed(range(len(attentions))):
            for kind in ("value", "key"):
                g.placeholder(f"past_key_values_{i}_{kind}")
    new_ph = [n for n in g.nodes if n.op == "placeholder"][len(placeholders) :]
    for i, attn in enumerate(attentions):
        pk, pv = new_ph[2 * i], new_ph[2 * i + 1]
        k, v = attn.args[1], attn.args[2]
        kval, vval = k.meta["val"], v.meta["val"]  # type: ignore[union-attr]
        b, hkv, _, d = kval.shape
        dtype = kval.dtype
        for ph, val in ((pk, kval), (pv, vval)):
            ph.meta[PASS_KEY] = _NAME
            if mode is not None:
                with mode:
                    ph.meta["val"] = torch.empty((b, hkv, 0, val.shape[-1]), dtype=val.dtype)
        cache_inputs.append((pk, pv))
        past.append((pk.name, pv.name))
        heads.append(int(hkv))
        dims.append(int(d))

    first_past = cache_inputs[0][0]
    with g.inserting_after(new_ph[-1]):
        past_len = _mark(g.call_function(torch.ops.aten.sym_size.int, (first_past, 2)))

    shifted = 0
    for n in list(g.nodes):
        if n.op != "call_function" or n.target not in _ARANGES:
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() != 1 or _sym_expr(val.shape[0]) != tokens:
            continue
        args = list(n.args)
        start, end = (0, args[0]) if n.target is torch.ops.aten.arange.default else (args[0], args[1])
        step = args[2] if n.target is torch.ops.aten.arange.start_step else 1
        if start != 0 or step != 1:
            continue
        with g.inserting_before(n):
            new_end = _mark(g.call_function(operator.add, (past_len, end)), n)
            new = _mark(g.call_function(torch.ops.aten.arange.start, (past_len, new_end), dict(n.kwargs)), n)
        new.meta["val"] = val
        n.replace_all_uses_with(new)
        g.erase_node(n)
        shifted += 1

    presents: list[Node] = []
    for attn, (pk, pv) in zip(attentions, cache_inputs, strict=True):
        q, k, v, *rest = attn.args
        mask = rest[0] if rest else attn.kwargs.get("mask")
        with g.inserting_before(attn):
            k_all = _mark(g.call_function(torch.ops.aten.cat.default, ([pk, k], 2)), attn)
            v_all = _mark(g.call_function(torch.ops.aten.cat.default, ([pv, v], 2)), attn)
        if isinstance(mask, Node):
            mask = _pad_mask(gm, mask, past_len, attn)
        kwargs = dict(attn.kwargs)
        if rest:
            attn.args = (q, k_all, v_all, mask, *rest[1:])
        else:
            attn.args = (q, k_all, v_all)
            if "mask" in kwargs:
                kwargs["mask"] = mask
        attn.kwargs = kwargs
        attn.meta[PASS_KEY] = _NAME
        presents += [k_all, v_all]

    output = next(n for n in g.nodes if n.op == "output")
    outs = output.args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    output.args = (tuple(outs + presents),)
    gm.recompile()
    return CacheLayout(past=past, heads=heads, head_dims=dims, dtype=dtype, positions_shifted=shifted)


__all__ = ["CacheLayout", "add_kv_cache"]
