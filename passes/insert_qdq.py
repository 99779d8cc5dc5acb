"""insert-qdq: quantize linear weights and activations as visible ``kiln::quantize`` / ``kiln::dequantize`` pairs.

Configured by a :class:`kiln.quantize.QuantConfig`; the PTQ method (RTN, GPTQ, AWQ,
SmoothQuant, see :mod:`kiln.quantize.methods`) runs inside the pass, on statistics gathered by
running the graph with observers over the calibration data (:mod:`kiln.quantize.calibrate`).

Matches: ``aten.linear(x, W[, b])`` with ``W`` a constant 2-D weight (a ``get_attr``, or
    ``aten.permute(get_attr, [1, 0])`` for GPT-2's Conv1D) whose module path
    (``node.meta["nn_module_stack"]``) no ``QuantConfig.skip`` pattern matches.
Rewrites to (once per input ``x`` shared by a group of linears, then per linear)::

    %x_s  = aten.mul.Tensor(%x, %inv_s)                        # AWQ / SmoothQuant smoothing
    %x_sc = kiln.dynamic_scale(%x_s, qmax, per_token)          # dynamic activations (else a constant)
    %x_q  = kiln.quantize(%x_s, %x_sc, %x_zp, qmin, qmax, i8)
    %x_dq = kiln.dequantize(%x_q, %x_sc, %x_zp, out_dtype=f32)
    %w_q  = kiln.quantize(%W', %w_scale, %w_zp, qmin, qmax, i8, axis=0 | group_size=g)
    %w_dq = kiln.dequantize(%w_q, %w_scale, %w_zp, axis=0 | group_size=g, out_dtype=f32)
    %y    = aten.linear(%x_dq, %w_dq[, %b])

    ``W'`` is the model's ``W`` (RTN) or a new tensor from the method; scales, zero points and
    smoothing factors are new buffers. The caller's parameters are never written.
Requires: canonical linears (``canonicalize``); calibration data when the method or static
    activation scales need it; group sizes dividing every quantized layer's input dimension.
Establishes: every matched linear reads its weight through ``kiln.dequantize(kiln.quantize(...))``
    (and its input through one when activations are quantized); no observer is left;
    ``gm.meta["kiln_quant"]`` records each quantized layer (shape, formats, weight error).
"""

from __future__ import annotations

import torch
from torch.fx import GraphModule, Node
from tqdm.auto import tqdm

from kiln.ir import PASS_KEY, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError
from kiln.quantize.calibrate import OBSERVER_PREFIX, calibrate
from kiln.quantize.config import AWQ, PerToken, QuantConfig
from kiln.quantize.methods import Group, GroupPlan, QuantizedWeight, Site, effective_weight, handler_for
from kiln.quantize.observers import StatsObserver, make_observer, qdq_args

aten = torch.ops.aten
kiln_ops = torch.ops.kiln

#: GraphModule.meta key of the per-layer record.
QUANT_META = "kiln_quant"


def _attr(gm: torch.nn.Module, target: str) -> object:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def module_path(node: Node) -> str | None:
    """The path of the module a node came from (``model.layers.0.mlp.down_proj``), if recorded."""
    stack = node.meta.get("nn_module_stack")
    return list(stack.values())[-1][0] if stack else None


def find_sites(gm: GraphModule) -> list[Site]:
    """Every ``aten.linear`` by a constant 2-D float weight, in graph order."""
    sites = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        w = node.args[1]
        if not isinstance(w, Node):
            continue
        if w.op == "get_attr":
            weight, target = _attr(gm, str(w.target)), str(w.target)
        elif w.target == aten.permute.default and list(w.args[1]) == [1, 0] and w.args[0].op == "get_attr":  # type: ignore[union-attr]
            target = str(w.args[0].target)  # type: ignore[union-attr]
            weight = _attr(gm, target).t()  # type: ignore[union-attr]  (a view: read only)
        else:
            continue
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            continue
        path = module_path(node) or target.removesuffix(".weight")
        sites.append(Site(node, path, weight, w))
    return sites


def _groups(sites: list[Site]) -> list[Group]:
    by_input: dict[Node, Group] = {}
    for s in sites:
        x = s.node.args[0]
        if not isinstance(x, Node):
            raise RewriteError("linear input is not a graph value", s.node)
        by_input.setdefault(x, Group(x, [])).sites.append(s)
    return list(by_input.values())


def _stages(groups: list[Group]) -> list[list[Group]]:
    """Groups by block (the module path up to its first index: ``model.layers.3``), in graph order."""
    stages: dict[str, list[Group]] = {}
    for g in groups:
        parts = g.sites[0].path.split(".")
        cut = next((i + 1 for i, p in enumerate(parts) if p.isdigit()), len(parts))
        stages.setdefault(".".join(parts[:cut]), []).append(g)
    return list(stages.values())


def _common_meta(nodes: list[Node]) -> dict:
    """Provenance shared by ``nodes``: the common prefix of their module stacks."""
    stacks = [list(n.meta.get("nn_module_stack", {}).items()) for n in nodes]
    common = []
    for items in zip(*stacks, strict=False):
        if any(i != items[0] for i in items):
            break
        common.append(items[0])
    meta = {"nn_module_stack": dict(common)} if common else {}
    if "stack_trace" in nodes[0].meta:
        meta["stack_trace"] = nodes[0].meta["stack_trace"]
    return meta


def _group_name(g: Group) -> str:
    if len(g.sites) == 1:
        return g.sites[0].path
    stack = _common_meta([s.node for s in g.sites]).get("nn_module_stack")
    prefix = list(stack.values())[-1][0] if stack else ""
    names = "_".join(s.path.rsplit(".", 1)[-1] for s in g.sites)
    return f"{prefix}.{names}" if prefix else names


class InsertQDQ(Pass):
    """Insert Q/DQ pairs on the weights and inputs of linears, per a QuantConfig."""

    name = "insert-qdq"

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    # -- building blocks -----------------------------------------------------------------

    def _node(self, gm: GraphModule, before: Node, target: object, args: tuple, kwargs: dict | None, meta: dict) -> Node:
        with gm.graph.inserting_before(before):
            node = gm.graph.call_function(target, args, kwargs or {})  # type: ignore[arg-type]
        node.meta.update(meta)
        node.meta[PASS_KEY] = self.name
        infer_meta(node)
        return node

    def _const(self, gm: GraphModule, before: Node, name: str, value: torch.Tensor, meta: dict) -> Node:
        base = "_quant_" + name.replace(".", "_")
        attr, i = base, 1
        while hasattr(gm, attr):
            attr, i = f"{base}_{i}", i + 1
        gm.register_buffer(attr, value.detach().contiguous())
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(attr)
        node.meta.update(meta)
        node.meta[PASS_KEY] = self.name
        infer_meta(node)
        return node

    def _first_user(self, g: Group) -> Node:
        order = {n: i for i, n in enumerate(g.input.graph.nodes)}
        return min((s.node for s in g.sites), key=order.__getitem__)

    def _smooth(self, gm: GraphModule, g: Group, x: Node, s: torch.Tensor) -> Node:
        meta = _common_meta([s_.node for s_ in g.sites])
        at = self._first_user(g)
        inv = self._const(gm, at, f"{_group_name(g)}.inv_smooth", (1.0 / s).to(x.meta["val"].dtype), meta)
        mul = self._node(gm, at, aten.mul.Tensor, (x, inv), None, meta)
        for site in g.sites:
            site.node.replace_input_with(x, mul)
        return mul

    def _quantize_input(self, gm: GraphModule, g: Group, x: Node, params: tuple | None) -> Node:
        spec = self.config.activations
        assert spec is not None
        meta = _common_meta([s.node for s in g.sites])
        at = self._first_user(g)
        name = _group_name(g)
        if spec.dynamic:
            per_token = isinstance(spec.granularity, PerToken)
            scale = self._node(gm, at, kiln_ops.dynamic_scale.default, (x, float(spec.qmax), per_token), None, meta)
            zp = None
        else:
            assert params is not None
            scale = self._const(gm, at, f"{name}.x_scale", params[0], meta)
            zp = self._const(gm, at, f"{name}.x_zero_point", params[1], meta) if params[1] is not None else None
        q = self._node(gm, at, kiln_ops.quantize.default, (x, scale, zp, spec.qmin, spec.qmax, spec.storage), None, meta)
        dq = self._node(gm, at, kiln_ops.dequantize.default, (q, scale, zp), {"out_dtype": x.meta["val"].dtype}, meta)
        for site in g.sites:
            site.node.replace_input_with(x, dq)
        return dq

    def _quantize_weight(self, gm: GraphModule, site: Site, qw: QuantizedWeight) -> None:
        spec = self.config.weights
        assert spec is not None
        meta = {k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")}
        at = site.node
        if qw.weight is site.weight and site.weight_node.op == "get_attr":
            w = site.weight_node  # RTN on the model's own tensor: read it, never write it
        else:
            w = self._const(gm, at, f"{site.path}.weight", qw.weight, meta)
        scale = self._const(gm, at, f"{site.path}.w_scale", qw.scale, meta)
        zp = self._const(gm, at, f"{site.path}.w_zero_point", qw.zero_point, meta) if qw.zero_point is not None else None
        kw = qdq_args(spec, tuple(qw.weight.shape))
        q = self._node(gm, at, kiln_ops.quantize.default, (w, scale, zp, spec.qmin, spec.qmax, spec.storage), kw, meta)
        out_dtype = site.node.meta["val"].dtype
        dq = self._node(gm, at, kiln_ops.dequantize.default, (q, scale, zp), {**kw, "out_dtype": out_dtype}, meta)
        site.node.replace_input_with(site.weight_node, dq)

    # -- the pass ------------------------------------------------------------------------

    def call(self, gm: GraphModule) -> PassResult:
        cfg = self.config
        all_sites = find_sites(gm)
        if not all_sites:
            return PassResult(gm, modified=False, stats={})
        cfg.check_layers({s.path: tuple(s.weight.shape) for s in all_sites})  # type: ignore[misc]
        groups = _groups([s for s in all_sites if not cfg.skips(s.path)])
        stats = {"layers_skipped": len(all_sites) - sum(len(g.sites) for g in groups), "calibration_samples": 0,
                 "weights_quantized": 0, "inputs_smoothed": 0}
        handler, needs = handler_for(cfg)
        stages = _stages(groups) if needs and getattr(cfg.method, "sequential", False) else [groups]
        dynamic = cfg.activations is not None and cfg.activations.dynamic
        inputs: dict[int, Node] = {}
        bar = tqdm(total=len(groups), desc=cfg.method.name, unit="group",  # type: ignore[union-attr]
                   disable=not (cfg.calibration.progress and needs), leave=False)
        for stage in stages:  # sequential: a stage's statistics see every earlier stage quantized
            if needs:
                tokens = cfg.method.tokens if isinstance(cfg.method, AWQ) else 1024
                observers = {g.input: StatsObserver(needs, max_tokens=tokens) for g in stage}
                users = {g.input: [s.node for s in g.sites] for g in stage}
                stats["calibration_samples"] += calibrate(gm, observers, cfg.calibration, users)
                for g in stage:
                    g.stats = observers[g.input]
            for g in stage:
                plan = handler(g, cfg)
                g.stats = None  # free the statistics
                x = g.input if plan.input_scale is None else self._smooth(gm, g, g.input, plan.input_scale)
                inputs[id(g)] = x
                stats["inputs_smoothed"] += plan.input_scale is not None
                self._quantize_weights(gm, g, plan, stats)
                if dynamic:
                    self._quantize_input(gm, g, x, None)
                bar.update(1)
        bar.close()
        if cfg.activations is not None and not dynamic:
            observers = {inputs[id(g)]: make_observer(cfg.activations) for g in groups}
            users = {inputs[id(g)]: [s.node for s in g.sites] for g in groups}
            stats["calibration_samples"] += calibrate(gm, observers, cfg.calibration, users, desc="activation ranges")
            for g in groups:
                self._quantize_input(gm, g, inputs[id(g)], observers[inputs[id(g)]].qparams(cfg.activations))
        if cfg.activations is not None:
            stats["activations_quantized"] = len(groups)
        gm.graph.lint()
        return PassResult(gm, modified=True, stats=stats)

    def _quantize_weights(self, gm: GraphModule, g: Group, plan: GroupPlan, stats: dict[str, int]) -> None:
        cfg = self.config
        layers = gm.meta.setdefault(QUANT_META, {})
        for site, qw in zip(g.sites, plan.weights, strict=True):
            record = {"shape": tuple(site.weight.shape), "method": cfg.method.name, "config": cfg.describe()}  # type: ignore[union-attr]
            if qw is not None and cfg.weights is not None:
                self._quantize_weight(gm, site, qw)
                w = site.weight.detach().float()
                err = (effective_weight(qw, cfg.weights, plan.input_scale) - w).norm() / w.norm().clamp(min=1e-12)
                record.update(weights=cfg.weights.describe(), weight_error=err.item())
                stats["weights_quantized"] += 1
            record.update(activations=cfg.activations.describe() if cfg.activations else "-",
                          smoothed=plan.input_scale is not None, **plan.info)
            layers[site.path] = record

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_module" and str(node.target).startswith(OBSERVER_PREFIX):
                raise RewriteError("an observer was left in the graph", node)
            if node.target == kiln_ops.quantize.default and "val" not in node.meta:
                raise RewriteError("kiln.quantize without shape metadata", node)


__all__ = ["QUANT_META", "InsertQDQ", "find_sites", "module_path"]
