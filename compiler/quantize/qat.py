"""Quantization-aware training (QAT): fake quantization with a straight-through estimator on the Q/DQ graph.

Post-training methods (RTN, GPTQ, AWQ) choose quantized weights once, from the full-precision
ones. QAT keeps training the model *through* its quantization, so the weights adapt to the grid
they will be stored on. In kiln it is three steps on the same graph that ``kiln.compile`` builds::

    from kiln.quantize import QuantConfig, convert_qat, prepare_qat
    from kiln.train import TrainConfig, train

    config = QuantConfig.preset("w4a16-g128")                 # any QuantConfig; its method gives the start
    qat = prepare_qat(model, config, example_inputs)          # a QATModel: nn.Module, forward(input_ids) -> logits
    train(qat, train_tokens, TrainConfig(steps=300, lr=5e-5, weight_decay=0.0))   # any loss_fn
    compiled = convert_qat(qat)                               # a kiln.CompiledModel: kiln::qlinear_* + packed codes

1. :func:`prepare_qat` compiles ``model`` with ``CompileConfig(quant=config)`` but keeps the Q/DQ
   form (``lower-qdq`` disabled; attention stays unfused because ``kiln::attention`` has no
   backward), then runs the ``prepare-qat`` pass: every ``kiln.dequantize(kiln.quantize(x, s, zp,
   ...))`` pair -- on weights and on activations -- becomes one ``kiln.fake_quantize(x, s, zp, ...)``
   node (:mod:`kiln.quantize.fake_quant`) with the same arguments and the same forward arithmetic
   (bit for bit), plus a backward:

   - ``x``: the straight-through estimator (Bengio et al. 2013), as ``torch.fake_quantize_per_channel_affine``:
     ``grad * 1[qmin <= round(x / s) + zp <= qmax]`` (e4m3: ``|x / s| <= 448``): the identity inside
     the clipping range, zero outside.
   - ``s``, only with ``learn_scales=True``: LSQ (Esser et al., "Learned Step Size Quantization",
     ICLR 2020): ``d fq / d s = (c - zp) - x / s`` inside the range and ``c - zp`` outside (``c`` the
     clamped code), summed over the elements sharing the scale and multiplied by LSQ's gradient
     scale ``1 / sqrt(n · qmax)`` (``n`` elements per scale). A learned scale is a flat 1-D
     parameter (so AdamW's default groups exempt it from weight decay), reshaped and clamped
     positive in the graph.
   - zero points stay fixed integers; run-time (dynamic) activation scales are treated as constants
     (``kiln.dynamic_scale`` reads ``aten.detach(x)``).

   The weights the fake-quant nodes read become ``nn.Parameter`` s of the QATModel's own graph
   (its own copies: the caller's model is never written): the model's weights for RTN, the method's
   weights for GPTQ/AWQ/SmoothQuant (QAT then starts from that solution). Every other weight of
   the model (embeddings, norms, skipped layers) trains too; folded constants (RoPE tables),
   scales, zero points and smoothing factors do not.
2. Train with :func:`kiln.train.train` like any module: ``loss_fn`` plugs in distillation ("QAT with a
   teacher"). ``weight_decay=0`` is advisable for a short fine-tune.
3. :func:`convert_qat` copies the trained graph and runs ``convert-qat`` (each fake-quant node
   back to the Q/DQ pair on the trained values, now constants; parameters become buffers), then
   ``fuse-attention``, ``lower-qdq`` and ``eliminate-dead-code``: the deployed form, whose outputs
   equal the fake-quant model's (to fp32 rounding of the fused attention).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Node

from kiln.errors import ConfigError
from kiln.ir import PASS_KEY, infer_meta
from kiln.pass_manager import Pass, PassManager, PassResult, PipelineReport, RewriteError
from kiln.quantize import ops  # noqa: F401  (registers kiln::quantize / kiln::dequantize / kiln::dynamic_scale)
from kiln.quantize.config import QuantConfig
from kiln.quantize.fake_quant import fake_quantize, fake_quantize_reference

aten = torch.ops.aten
QUANT_META = "kiln_quant"
_MIN_SCALE = 1e-8

# --------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------

_QDQ_KW = ("axis", "group_size")


def _attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _set_attr(gm: nn.Module, target: str, value: Tensor, *, parameter: bool) -> None:
    *path, leaf = target.split(".")
    owner: Any = gm
    for part in path:
        owner = getattr(owner, part)
    if hasattr(owner, leaf):
        delattr(owner, leaf)
    if parameter:
        owner.register_parameter(leaf, nn.Parameter(value, requires_grad=True))
    else:
        owner.register_buffer(leaf, value)


def _weight_attr(x: object) -> Node | None:
    """The ``get_attr`` a quantized value reads when it is a constant weight (directly or transposed)."""
    if isinstance(x, Node) and x.op == "get_attr":
        return x
    if isinstance(x, Node) and x.target == aten.permute.default and isinstance(x.args[0], Node):
        return x.args[0] if x.args[0].op == "get_attr" else None
    return None


def _qdq_pairs(gm: GraphModule) -> list[tuple[Node, Node]]:
    """``(quantize, dequantize)`` pairs where the dequantize reads the quantize's codes with the same parameters."""
    pairs = []
    for dq in gm.graph.nodes:
        if dq.op != "call_function" or dq.target != torch.ops.kiln.dequantize.default:
            continue
        q = dq.args[0]
        if not (isinstance(q, Node) and q.target == torch.ops.kiln.quantize.default):
            continue
        same = list(q.args[1:3]) == list(dq.args[1:3]) and all(
            q.kwargs.get(k) == dq.kwargs.get(k) for k in _QDQ_KW
        )
        if not same:
            raise RewriteError(
                "a kiln.dequantize reads codes with parameters other than its kiln.quantize's", dq
            )
        pairs.append((q, dq))
    return pairs


class PrepareQAT(Pass):
    """Fuse each Q/DQ pair into a trainable ``kiln.fake_quantize``; make the weights it reads parameters."""

    name = "prepare-qat"

    def __init__(self, learn_scales: bool = False) -> None:
        self.learn_scales = learn_scales

    def _scale_param(
        self, gm: GraphModule, scale: Node, numel_x: int, qmax: int, before: Node
    ) -> tuple[Node, float]:
        """A learned scale: flat parameter -> reshape -> clamp_min, and LSQ's gradient factor."""
        value = _attr(gm, str(scale.target)).detach().float()
        base = "_qat_" + str(scale.target).removeprefix("_quant_").replace(".", "_")
        name, i = base, 1
        while hasattr(gm, name):
            name, i = f"{base}_{i}", i + 1
        gm.register_parameter(name, nn.Parameter(value.reshape(-1).clone()))
        meta = {k: v for k, v in before.meta.items() if k in ("nn_module_stack", "stack_trace")}
        with gm.graph.inserting_before(before):
            flat = gm.graph.get_attr(name)
            shaped = gm.graph.call_function(aten.reshape.default, (flat, list(value.shape)))
            pos = gm.graph.call_function(aten.clamp_min.default, (shaped, _MIN_SCALE))
        for n in (flat, shaped, pos):
            n.meta.update(meta)
            n.meta[PASS_KEY] = self.name
            infer_meta(n)
        per_scale = max(1, numel_x // max(1, value.numel()))
        return pos, 1.0 / math.sqrt(per_scale * qmax)

    def call(self, gm: GraphModule) -> PassResult:
        pairs = _qdq_pairs(gm)
        if not pairs:
            raise RewriteError("no kiln.quantize/kiln.dequantize pair to train through: run insert-qdq first")
        stats = {
            "fake_quantized": 0,
            "weights_trainable": 0,
            "scales_learned": 0,
            "dynamic_scales_detached": 0,
        }
        learned: dict[Node, tuple[Node, float]] = {}
        for q, dq in pairs:
            x, scale, zp = q.args[:3]
            qmin, qmax, dtype = q.args[3:6]
            kw = {k: q.kwargs[k] for k in _QDQ_KW if q.kwargs.get(k) is not None}
            grad_factor = 1.0
            if isinstance(scale, Node) and scale.target == torch.ops.kiln.dynamic_scale.default:
                with gm.graph.inserting_before(scale):
                    det = gm.graph.call_function(aten.detach.default, (scale.args[0],))
                det.meta.update(
                    {k: v for k, v in scale.meta.items() if k in ("nn_module_stack", "stack_trace")}
                )
                det.meta[PASS_KEY] = self.name
                infer_meta(det)
                scale.replace_input_with(scale.args[0], det)  # type: ignore[arg-type]
                stats["dynamic_scales_detached"] += 1
            elif self.learn_scales and isinstance(scale, Node) and scale.op == "get_attr":
                numel_x = x.meta["val"].numel() if _weight_attr(x) is not None else None  # type: ignore[union-attr]
                if numel_x is not None:  # static scales of constant weights (activations: not learned)
                    if scale not in learned:
                        learned[scale] = self._scale_param(gm, scale, numel_x, int(qmax), q)  # type: ignore[arg-type]
                        stats["scales_learned"] += 1
                    scale, grad_factor = learned[scale]
            with gm.graph.inserting_before(dq):
                fq = gm.graph.call_function(
                    torch.ops.kiln.fake_quantize.default,
                    (x, scale, zp, qmin, qmax, dtype),
                    {**kw, "grad_factor": grad_factor},
                )
            fq.meta.update({k: v for k, v in dq.meta.items() if k in ("nn_module_stack", "stack_trace")})
            fq.meta[PASS_KEY] = self.name
            infer_meta(fq)
            dq.replace_all_uses_with(fq)
            gm.graph.erase_node(dq)
            gm.graph.erase_node(q)
            stats["fake_quantized"] += 1
            if (attr := _weight_attr(x)) is not None:
                target = str(attr.target)
                value = _attr(gm, target)
                if not isinstance(value, nn.Parameter):
                    _set_attr(gm, target, value.detach().clone(), parameter=True)
                stats["weights_trainable"] += 1
        for node in list(gm.graph.nodes):  # scales read only by the fused pairs
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        gm.graph.lint()
        return PassResult(gm, modified=True, stats=stats)

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target in (torch.ops.kiln.quantize.default, torch.ops.kiln.dequantize.default):
                raise RewriteError("a Q/DQ node survived prepare-qat", node)


class ConvertQAT(Pass):
    """Turn each ``kiln.fake_quantize`` back into the Q/DQ pair on the trained values, as constants."""

    name = "convert-qat"

    def __init__(self, reference: GraphModule | None = None) -> None:
        self.reference = reference  # the full-precision capture: weight errors are measured against it

    def _const(self, gm: GraphModule, before: Node, name: str, value: Tensor, meta: dict) -> Node:
        base = "_qat_" + name.replace(".", "_")
        attr, i = base, 1
        while hasattr(gm, attr):
            attr, i = f"{base}_{i}", i + 1
        gm.register_buffer(attr, value.detach().clone().contiguous())
        with gm.graph.inserting_before(before):
            node = gm.graph.get_attr(attr)
        node.meta.update(meta)
        node.meta[PASS_KEY] = self.name
        infer_meta(node)
        return node

    def call(self, gm: GraphModule) -> PassResult:
        constants: dict[int, Tensor] = {}  # the trained values become constants (tied ones stay tied)
        for name, p in list(gm.named_parameters(remove_duplicate=False)):
            _set_attr(gm, name, constants.setdefault(id(p), p.detach().clone()), parameter=False)
        stats = {"fake_quantize_converted": 0, "scales_materialized": 0}
        fqs = [n for n in gm.graph.nodes if n.target == torch.ops.kiln.fake_quantize.default]
        if not fqs:
            raise RewriteError("no kiln.fake_quantize node: convert a graph made by prepare-qat")
        for fq in fqs:
            x, scale, zp, qmin, qmax, dtype = fq.args[:6]
            kw = {k: fq.kwargs[k] for k in _QDQ_KW if fq.kwargs.get(k) is not None}
            meta = {k: v for k, v in fq.meta.items() if k in ("nn_module_stack", "stack_trace")}
            if (
                isinstance(scale, Node)
                and scale.op != "get_attr"
                and scale.target != torch.ops.kiln.dynamic_scale.default
            ):
                value = _evaluate_constant(gm, scale)  # a learned scale: reshape(clamp_min(param))
                scale = self._const(gm, fq, f"{fq.name}.scale", value, meta)
                stats["scales_materialized"] += 1
            with gm.graph.inserting_before(fq):
                q = gm.graph.call_function(
                    torch.ops.kiln.quantize.default, (x, scale, zp, qmin, qmax, dtype), kw
                )
                dq = gm.graph.call_function(
                    torch.ops.kiln.dequantize.default,
                    (q, scale, zp),
                    {**kw, "out_dtype": fq.meta["val"].dtype},
                )
            for n in (q, dq):
                n.meta.update(meta)
                n.meta[PASS_KEY] = self.name
                infer_meta(n)
            fq.replace_all_uses_with(dq)
            gm.graph.erase_node(fq)
            stats["fake_quantize_converted"] += 1
        for node in list(gm.graph.nodes):  # learned-scale parameters, detaches of dynamic scales
            if node.target == aten.detach.default and node.meta.get(PASS_KEY) == PrepareQAT.name:
                node.replace_all_uses_with(node.args[0])  # type: ignore[arg-type]
        gm.graph.eliminate_dead_code()
        for name in [n for n, _ in gm.named_buffers() if n.startswith("_qat_") and "." not in n]:
            if not any(node.op == "get_attr" and node.target == name for node in gm.graph.nodes):
                delattr(gm, name)
        self._update_records(gm)
        gm.graph.lint()
        return PassResult(gm, modified=True, stats=stats)

    def _update_records(self, gm: GraphModule) -> None:
        """Weight errors of the trained, quantized weights against the full-precision model's."""
        records = gm.meta.get(QUANT_META)
        if not records or self.reference is None:
            return
        for node in gm.graph.nodes:
            if node.target != aten.linear.default or not isinstance(node.args[1], Node):
                continue
            dq = node.args[1]
            if dq.target != torch.ops.kiln.dequantize.default or dq.args[0].args[0].op != "get_attr":  # type: ignore[union-attr]
                continue
            stack = node.meta.get("nn_module_stack")
            path = list(stack.values())[-1][0] if stack else None
            if path not in records:
                continue
            try:
                w_fp = _attr(self.reference, f"{path}.weight").detach().float()
            except AttributeError:
                continue
            q = dq.args[0]
            args = [_attr(gm, str(a.target)) if isinstance(a, Node) else a for a in q.args]  # type: ignore[union-attr]
            codes = torch.ops.kiln.quantize.default(*args, **q.kwargs)  # type: ignore[union-attr]
            w_q = torch.ops.kiln.dequantize.default(
                codes, args[1], args[2], **{**dq.kwargs, "out_dtype": torch.float32}
            )
            if w_q.shape != w_fp.shape:
                continue
            records[path]["weight_error"] = ((w_q - w_fp).norm() / w_fp.norm().clamp(min=1e-12)).item()
            records[path]["method"] = "qat"

    def ensures(self, gm: GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.target == torch.ops.kiln.fake_quantize.default:
                raise RewriteError("a kiln.fake_quantize survived convert-qat", node)
        if any(True for _ in gm.parameters()):
            raise RewriteError("convert-qat left trainable parameters in the graph")


def _evaluate_constant(gm: GraphModule, node: Node) -> Tensor:
    """The value of a node computed from constants only (a learned scale's reshape/clamp chain)."""
    env: dict[Node, Any] = {}

    def value(n: Node) -> Any:
        if n in env:
            return env[n]
        if n.op == "get_attr":
            out = _attr(gm, str(n.target))
        elif n.op == "call_function":
            args = torch.fx.node.map_arg(n.args, value)
            kwargs = torch.fx.node.map_arg(n.kwargs, value)
            out = n.target(*args, **kwargs)  # type: ignore[operator]
        else:
            raise RewriteError("a fake-quant scale depends on a graph input: it is not a constant", n)
        env[n] = out
        return out

    with torch.no_grad():
        return value(node).detach()


# --------------------------------------------------------------------------------------
# The trainable module and the API
# --------------------------------------------------------------------------------------


class QATModel(nn.Module):
    """A model prepared for quantization-aware training: the fake-quant graph as a trainable module.

    Called like the original model (``qat(input_ids)`` returns what the model returns, e.g. logits
    ``(B, T, V)``). ``graph_module`` holds the graph and its parameters; ``capture`` the
    full-precision capture; ``quant_config`` the QuantConfig; ``report`` the compile report.
    """

    def __init__(self, compiled: Any, quant_config: QuantConfig) -> None:
        super().__init__()
        self.graph_module = compiled.graph_module
        self._compiled = [compiled]  # a list: not a submodule (its graph module is registered above)
        self.quant_config = quant_config

    @property
    def capture(self) -> Any:
        return self._compiled[0].capture

    @property
    def report(self) -> PipelineReport:
        return self._compiled[0].report

    @property
    def compile_config(self) -> Any:
        return self._compiled[0].config

    @property
    def ir(self) -> str:
        """The printed fake-quant IR."""
        from kiln.ir import print_ir

        return print_ir(self.graph_module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled[0](*args, **kwargs)

    def train(self, mode: bool = True) -> QATModel:
        """Set the training flag (the graph has no dropout or batch norm: both modes compute the same)."""
        self.training = mode  # torch.export's module refuses train()/eval(); nothing in it needs the mode
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> QATModel:
        """``.to(device)`` also moves the device constants the captured graph holds (``arange(device=...)``)."""
        super()._apply(fn, recurse)
        device = next((t.device for t in self.graph_module.parameters()), None)
        if device is not None:
            changed = False
            for node in self.graph_module.graph.nodes:
                dev = node.kwargs.get("device") if node.op == "call_function" else None
                if isinstance(dev, torch.device | str) and torch.device(dev) != device:
                    node.update_kwarg("device", device)
                    changed = True
            if changed:
                self.graph_module.recompile()
        return self


def prepare_qat(
    model: nn.Module,
    config: QuantConfig | str,
    example_inputs: Any = None,
    *,
    learn_scales: bool = False,
    trainable: str = "all",
    calibration_data: Any = None,
    dynamic: Mapping[str, Any] | None = None,
    progress: Any = None,
    **overrides: Any,
) -> QATModel:
    """Prepare ``model`` for quantization-aware training with ``config``; the model is not modified.

    Args:
        model: the full-precision model (kiln's models, Hugging Face causal LMs).
        config: a :class:`QuantConfig` or a preset name. Its ``method`` gives the starting point
            (RTN: the model's weights and their ranges; GPTQ/AWQ need calibration data).
        example_inputs: inputs to capture with; default ``input_ids`` of shape (2, 8). The batch
            and token axes are dynamic, so any training batch runs.
        learn_scales: also train the weights' static scales (LSQ); default: fixed scales.
        trainable: which parameters require grad: ``"all"`` (every weight of the model, and the
            learned scales), ``"quantized"`` (the quantized linears' weights and the learned scales;
            embeddings, norms and skipped layers frozen) or ``"scales"`` (the learned scales alone,
            EfficientQAT's end-to-end step-size training; needs ``learn_scales=True``).
        calibration_data: calibration inputs, when the method or static activations need them.
        dynamic: ``kiln.capture``'s dynamic-shape spec; default ``{"input_ids": {0: "B", 1: "T"}}``.
        progress: the ``kiln.compile`` progress callback.
        **overrides: QuantConfig fields, e.g. ``skip=()``.

    Returns:
        a :class:`QATModel` (an ``nn.Module``) to train with :func:`kiln.train`, then :func:`convert_qat`.
    """
    from kiln.compile import CompileConfig, compile

    if isinstance(config, str):
        config = QuantConfig.preset(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if not isinstance(config, QuantConfig):
        raise ConfigError(f"prepare_qat takes a kiln.QuantConfig or a preset name, got {config!r}")
    if trainable not in TRAINABLE:
        raise ConfigError(f"prepare_qat(trainable={trainable!r}): use one of {list(TRAINABLE)}")
    if trainable == "scales" and not learn_scales:
        raise ConfigError(
            "prepare_qat(trainable='scales') trains the learned scales alone: set learn_scales=True"
        )
    if calibration_data is not None:
        config = config.with_calibration(calibration_data)
    if example_inputs is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
        example_inputs = (torch.randint(0, vocab, (2, 8), generator=torch.Generator().manual_seed(0)),)
    cc = CompileConfig(
        quant=config,
        dynamic=dict(dynamic or {"input_ids": {0: "B", 1: "T"}}),
        disable=("lower-qdq", "fuse-attention"),
        extra_passes=(PrepareQAT(learn_scales),),
    )
    compiled = compile(model, example_inputs, config=cc, progress=progress)
    gm = compiled.graph_module
    _own_parameters(gm)
    quantized = {
        str(n.args[0].target)
        for n in gm.graph.nodes
        if n.target == torch.ops.kiln.fake_quantize.default
        and isinstance(n.args[0], Node)
        and n.args[0].op == "get_attr"
    }
    for name, p in gm.named_parameters():
        scale = name.startswith("_qat_")
        p.requires_grad_(scale or trainable == "all" or (trainable == "quantized" and name in quantized))
    return QATModel(compiled, config)


#: ``prepare_qat(trainable=...)`` choices.
TRAINABLE = ("all", "quantized", "scales")


def _own_parameters(gm: GraphModule) -> None:
    """Give ``gm`` its own copies of its parameters (the capture shares the model's), ties kept."""
    clones: dict[int, nn.Parameter] = {}
    for name, p in list(gm.named_parameters(remove_duplicate=False)):
        if id(p) not in clones:
            clones[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        *path, leaf = name.split(".")
        owner: Any = gm
        for part in path:
            owner = getattr(owner, part)
        delattr(owner, leaf)
        owner.register_parameter(leaf, clones[id(p)])


def _copy_graph_module(gm: GraphModule) -> GraphModule:
    """A deep copy of ``gm`` whose nodes share (shallow copies of) the originals' metadata.

    Node metadata holds fake tensors, which ``copy.deepcopy`` refuses; it is set aside meanwhile.
    """
    metas = [n.meta for n in gm.graph.nodes]
    gm_meta = gm.meta
    try:
        for n in gm.graph.nodes:
            n.meta = {}
        gm.meta = {}
        with warnings.catch_warnings():  # torch's pytree specs warn about a deprecated isinstance on copy
            warnings.simplefilter("ignore", FutureWarning)
            out = copy.deepcopy(gm)
    finally:
        for n, m in zip(gm.graph.nodes, metas, strict=True):
            n.meta = m
        gm.meta = gm_meta
    for n, m in zip(out.graph.nodes, metas, strict=True):
        n.meta = dict(m)
    out.meta = {k: copy.deepcopy(v) if k == QUANT_META else v for k, v in gm_meta.items()}
    return out


def convert_qat(prepared: QATModel, *, verify: bool | None = None) -> Any:
    """The deployed form of a trained :class:`QATModel`: a :class:`kiln.CompiledModel` with ``kiln::qlinear_*``.

    Copies the trained graph (``prepared`` stays trainable), turns each fake-quant node back into
    the Q/DQ pair on the trained weights and scales (now constants), then fuses attention, lowers
    Q/DQ + linear to ``kiln::qlinear_*`` with packed integer codes and removes dead code, as
    ``kiln.compile(model, config=CompileConfig(quant=...))`` does after post-training quantization.
    """
    from kiln.compile import CompileConfig, CompiledModel
    from kiln.passes.eliminate_dead_code import EliminateDeadCode
    from kiln.passes.fuse_attention import FuseAttention
    from kiln.passes.lower_qdq import LowerQDQ

    if not isinstance(prepared, QATModel):
        raise ConfigError(
            f"convert_qat takes the QATModel that prepare_qat returned, got {type(prepared).__name__}"
        )
    gm = _copy_graph_module(prepared.graph_module).cpu()
    base = prepared.compile_config
    config = CompileConfig(
        backend=base.backend,
        dynamic=base.dynamic,
        quant=prepared.quant_config,
        dump_dir=base.dump_dir,
        verify=base.verify if verify is None else verify,
    )
    manager = PassManager(
        [
            ConvertQAT(prepared.capture.gm),
            FuseAttention(),
            EliminateDeadCode(),
            LowerQDQ(),
            EliminateDeadCode(),
        ],
        verify_each=config.verify_each,
    )
    gm, converted = manager.run(gm)
    records = [*prepared.report.records, *converted.records]
    for i, r in enumerate(records, start=1):
        r.index = i
    report = PipelineReport(
        records=records,
        input_ir=prepared.report.input_ir,
        seconds=prepared.report.seconds + converted.seconds,
    )
    return CompiledModel(prepared.capture, gm, report, config)


__all__ = [
    "ConvertQAT",
    "PrepareQAT",
    "QATModel",
    "convert_qat",
    "fake_quantize",
    "fake_quantize_reference",
    "prepare_qat",
]
