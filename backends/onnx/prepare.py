"""Preparing the compiled graph for export: a flat copy, translations checked, a dynamic batch.

``torch.export`` captured the model with batch 1, so view-like ops carry the literal batch
size (``reshape(x, [1, T, H, D])``); :func:`generalize_batch` finds those by running the graph
on fake inputs of another batch size and rewrites them to follow the input, then
:func:`generalize_and_check` proves the result on real inputs (a batch equals its rows run one
at a time) before the export relies on it. :func:`prepare_graph` is the graph ``export_onnx``
exports and the eager side of ``benchmarks/onnx_cpu.py`` runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_aggregate
from torch.utils import _pytree as pytree

from kiln.backends.onnx import quant_translations as _quant_translations  # noqa: F401  (registers them)
from kiln.backends.onnx.kv_cache import CacheLayout, add_kv_cache
from kiln.backends.onnx.matmul_nbits import lower_int4_for_onnx
from kiln.backends.onnx.translations import TRANSLATIONS
from kiln.errors import ExportError
from kiln.ir import SYMBOLS_KEY, op_name, provenance

if TYPE_CHECKING:
    from kiln.compile import CompiledModel

#: Op namespaces the exporter translates itself.
_EXPORTER_NAMESPACES = {"aten", "prims", "onnx", "higher_order", "_operator", "builtins"}

#: What to do about kiln ops that deliberately have no ONNX translation.
_HINTS = {
    "kiln.paged_attention": "the paged cache is the GPU runtime's; the ONNX decoder has its own contiguous "
    "cache: compile without CompileConfig(kv_cache=True) and call export_onnx(..., kv_cache=True)",
}

_VIEW_LIKE = {
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.expand.default,
}


def flat_copy(gm: GraphModule, constants: dict[str, Any]) -> GraphModule:
    """A copy of ``gm`` (weights shared) with a flat calling convention and constants inlined.

    Placeholders keep their order; non-tensor inputs (``use_cache=False``) are replaced by
    their compiled value; the output becomes the tuple of the model output's tensor leaves.
    """
    graph = Graph()
    env: dict[Node, Node] = {}
    out: Any = None
    for node in gm.graph.nodes:
        if node.op == "output":
            out = map_aggregate(node.args[0], lambda a: env[a] if isinstance(a, Node) else a)
            continue
        env[node] = graph.node_copy(node, lambda a: env[a])
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, Node)]
    graph.output(tuple(leaves))
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        if node.name in constants or not isinstance(node.meta.get("val"), torch.Tensor):
            value = constants.get(node.name, node.meta.get("val"))
            for user in list(node.users):
                user.args = map_aggregate(user.args, lambda a, n=node, v=value: v if a is n else a)
                user.kwargs = map_aggregate(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
            graph.erase_node(node)
    new = GraphModule(gm, graph)
    new.meta.update({k: v for k, v in gm.meta.items() if k in (SYMBOLS_KEY, "_kiln_fake_mode")})
    return new


def output_names(gm: GraphModule, count: int) -> list[str]:
    """Names of the flat outputs from the compiled module's output structure (``logits`` ...)."""
    spec = getattr(gm, "_out_spec", None)
    names: list[str] = []
    if spec is not None:
        try:
            structure = pytree.tree_unflatten(list(range(spec.num_leaves)), spec)
            for path, _ in pytree.tree_flatten_with_path(structure)[0]:
                key = re.sub(r"[^0-9A-Za-z_.]+", ".", pytree.keystr(path)).strip(".")
                names.append(key or "logits")
        except Exception:
            names = []
    if len(names) != count:
        names = ["logits"] if count == 1 else [f"output_{i}" for i in range(count)]
    return names


def check_translations(gm: GraphModule) -> None:
    """ExportError naming the op and its source line for a custom op nothing translates."""
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace in _EXPORTER_NAMESPACES or target in TRANSLATIONS:
            continue
        hint = _HINTS.get(op_name(node), "add one with kiln.backends.onnx.translations.register_translation")
        raise ExportError(
            f"no ONNX translation for {op_name(node)} (node %{node.name}  # {provenance(node) or 'unknown source'}); "
            + hint
        )


def _fake(value: Any, mode: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return mode.from_tensor(value, static_shapes=True)
    return value


def _follow_batch(g: Graph, node: Node, env: dict[Node, Any], example_batch: int) -> int:
    """Rewrite one view-like node's leading batch literal so it follows the input; 1 if changed."""
    src = node.args[0]
    assert isinstance(src, Node)
    new = env[src]
    shape = list(node.args[1])  # type: ignore[arg-type]
    if not shape or not isinstance(shape[0], int) or shape[0] != example_batch:
        return 0
    sizes = [env[s] if isinstance(s, Node) else s for s in shape]
    if node.target is torch.ops.aten.expand.default:
        if new.dim() != len(shape) or new.shape[0] == example_batch:
            return 0
        node.args = (src, [-1, *shape[1:]], *node.args[2:])
        return 1
    known = [s for s in sizes if s != -1]
    if -1 not in sizes and int(np.prod(known)) == new.numel():
        return 0
    if -1 not in sizes:  # reshape(x, [b, ...]) -> reshape(x, [-1, ...])
        node.args = (src, [-1, *shape[1:]], *node.args[2:])
        return 1
    old = src.meta.get("val")
    if not (isinstance(old, torch.Tensor) and old.dim() and old.shape[0] == example_batch != new.shape[0]):
        return 0  # the batch is not on axis 0 here (or never reached it): the caller's check decides
    with g.inserting_before(node):
        size = g.call_function(torch.ops.aten.sym_size.int, (src, 0))
    size.meta["val"] = example_batch
    env[size] = new.shape[0]
    node.args = (src, [size, *shape[1:]], *node.args[2:])
    return 1


def generalize_batch(gm: GraphModule, feeds: dict[str, torch.Tensor], example_batch: int) -> int:
    """Make shape literals that carry the captured batch size follow the input's batch.

    The graph was captured with batch ``example_batch``; view-like ops whose shape operand
    starts with that literal while their input's axis 0 is the batch get ``sym_size(x, 0)``
    instead. Which axes carry the batch is found by running the graph on fake inputs whose
    batch differs from the captured one. Returns the number of literals replaced.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict[Node, Any] = {}
    replaced = 0
    g = gm.graph

    def load(a: Any) -> Any:
        return env[a] if isinstance(a, Node) else a

    with mode:
        for node in list(g.nodes):
            if node.op == "placeholder":
                env[node] = _fake(feeds[node.name], mode)
            elif node.op == "get_attr":
                obj: Any = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                env[node] = _fake(obj, mode)
            elif node.op == "call_function":
                if node.target in _VIEW_LIKE and isinstance(node.args[0], Node):
                    replaced += _follow_batch(g, node, env, example_batch)
                args = map_aggregate(node.args, load)
                kwargs = map_aggregate(node.kwargs, load)
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
    gm.recompile()
    return replaced


def prepare_graph(compiled: CompiledModel, kv_cache: bool) -> tuple[GraphModule, CacheLayout | None]:
    """The graph that gets exported: a flat copy of the compiled graph, with past/present K/V if asked.

    int4 linears (``kiln::qlinear_w4a16``) become ``kiln::matmul_nbits``, ONNX Runtime's
    ``MatMulNBits`` (:func:`~kiln.backends.onnx.matmul_nbits.lower_int4_for_onnx`). It runs in
    torch as it is (the eager side of ``benchmarks/onnx_cpu.py``); the batch stays the captured
    one until :func:`generalize_batch`.
    """
    gm = flat_copy(compiled.graph_module, compiled.capture.constants)
    lower_int4_for_onnx(gm)
    check_translations(gm)
    missing = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name not in compiled.capture.inputs]
    if missing:
        raise ExportError(f"graph inputs {missing} are not among the captured inputs {list(compiled.capture.inputs)}")
    return gm, (add_kv_cache(gm) if kv_cache else None)


def generalize_and_check(gm: GraphModule, feeds: dict[str, torch.Tensor], example_batch: int) -> str | None:
    """Generalize the batch (in place); None when batch ``b`` equals ``b`` runs of batch 1, else why not."""
    try:
        generalize_batch(gm, feeds, example_batch)
        names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        batch = next(iter(feeds.values())).shape[0]
        with torch.no_grad():
            whole = gm(*(feeds[n] for n in names))
            rows = [gm(*(feeds[n][b : b + 1] for n in names)) for b in range(batch)]
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for i, out in enumerate(whole):
        want = torch.cat([r[i] for r in rows], 0)
        if out.shape != want.shape or not torch.allclose(out.float(), want.float(), rtol=1e-4, atol=1e-5, equal_nan=True):
            return f"output {i} of a batch differs from its rows run one by one"
    return None


# --------------------------------------------------------------------------------------
# Example inputs
# --------------------------------------------------------------------------------------


def make_feed(
    captured: dict[str, Any], names: Sequence[str], batch: int, tokens: int, *, start: int = 0, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of ``batch`` x ``tokens`` in the captured inputs' image (token ids drawn from the example's).

    ``position_ids`` count from ``start``; an ``attention_mask`` pads the first tokens of odd rows.
    """
    gen = torch.Generator().manual_seed(seed)
    feed: dict[str, torch.Tensor] = {}
    for name in names:
        example = captured[name]
        if name == "position_ids":
            feed[name] = torch.arange(start, start + tokens, dtype=example.dtype).expand(batch, tokens).contiguous()
        elif name == "attention_mask":  # odd rows left-padded, so rows differ and masks matter
            feed[name] = torch.ones(batch, tokens, dtype=example.dtype)
            feed[name][1::2, : min(2, tokens - 1)] = 0
        elif example.dtype.is_floating_point:
            feed[name] = torch.randn(batch, tokens, *example.shape[2:], generator=gen).to(example.dtype)
        else:
            pool = example.flatten()
            index = torch.randint(0, pool.numel(), (batch, tokens), generator=gen)
            feed[name] = pool[index]
    return feed


def past_feed(layout: CacheLayout, batch: int, past: int, seed: int, *, onnx_names: bool) -> dict[str, torch.Tensor]:
    """Random past K/V (B, Hkv, past, D), keyed by graph placeholder names or ONNX input names."""
    gen = torch.Generator().manual_seed(seed)
    names = iter(layout.input_names())
    feed = {}
    for (k, v), h, d in zip(layout.past, layout.heads, layout.head_dims, strict=True):
        for name in (k, v):
            key = next(names) if onnx_names else name
            feed[key] = torch.randn(batch, h, past, d, generator=gen).to(layout.dtype)
    return feed


__all__ = [
    "check_translations",
    "flat_copy",
    "generalize_and_check",
    "generalize_batch",
    "make_feed",
    "output_names",
    "past_feed",
    "prepare_graph",
]
