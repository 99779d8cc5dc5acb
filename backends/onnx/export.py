"""``export_onnx``: the compiled graph, after kiln's pipeline, as an ONNX artifact.

The graph that kiln's passes produced (``CompiledModel.graph_module``) is re-exported with
``torch.export`` (batch and token axes dynamic) and converted by ``torch.onnx.export(...,
dynamo=True)``, each ``kiln::`` op through its entry in
:data:`kiln.backends.onnx.translations.TRANSLATIONS`. What a user inspected with ``kiln ir``
is what ships. The artifact is written beside the destination and renamed into place only
after ``onnx.checker`` and an ONNX Runtime run against eager agree (:mod:`.validate`), so a
failed export never leaves a half-written file. With ``kv_cache=True`` the graph first goes
through the contiguous-cache rewrite (:mod:`.kv_cache`), giving the decoder that
:class:`kiln.backends.onnx.OrtGenerator` drives. A quantized graph (``CompileConfig(quant=...)``,
Q/DQ or lowered form) exports through :mod:`.quant_translations`: ``QuantizeLinear`` /
``DequantizeLinear`` with ``axis`` / ``block_size`` (opset >= 21), ``MatMulInteger`` for W8A8 and
``com.microsoft::MatMulNBits`` for int4 weights, validated against kiln's own quantized reference.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.export import Dim
from torch.fx import GraphModule, Node

from kiln.backends.onnx.kv_cache import CacheLayout
from kiln.backends.onnx.prepare import (
    generalize_and_check,
    make_feed,
    output_names,
    past_feed,
    prepare_graph,
)
from kiln.backends.onnx.quant_translations import check_quantized, quant_tolerance
from kiln.backends.onnx.translations import DEFAULT_OPSET, translation_table
from kiln.backends.onnx.validate import Validation, max_tokens, validate_artifact
from kiln.errors import ExportError
from kiln.ir import op_name, provenance

if TYPE_CHECKING:
    from kiln.compile import CompiledModel

#: Weights above this many bytes go to an external data file under ``external_data="auto"``
#: (protobuf caps a serialized model at 2 GiB; 128 MiB is left for the graph itself).
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27


@dataclass(frozen=True)
class OnnxExportReport:
    """What ``export_onnx`` wrote and how it checked it."""

    path: Path  # the .onnx file
    opset: int  # default-domain opset of the artifact
    model_bytes: int  # size of the .onnx file
    data_bytes: int  # size of the external data file (0 when the weights are inside the .onnx)
    external_data: bool  # whether the weights live in ``<path>.data``
    inputs: tuple[str, ...]  # ONNX input names, in order
    outputs: tuple[str, ...]  # ONNX output names, in order
    dynamic_axes: dict[str, dict[int, str]]  # input name -> {axis: dimension name}
    kv_cache: bool  # whether this is the generation artifact (past/present K/V)
    layers: int  # attention layers in the graph
    max_rel_error: float | None  # max |ort - eager| / max |eager| over the checks (None: not validated)
    max_abs_error: float | None  # max |ort - eager| over the checks
    checks: tuple[str, ...]  # what was compared, e.g. "batch 2 x 9 tokens"
    ort_fused_ops: dict[str, int] = field(default_factory=dict)  # op -> count ORT fused in (ORT_ENABLE_ALL)
    ort_op_counts: dict[str, int] = field(default_factory=dict)  # every op of the ORT-optimized graph
    seconds: float = 0.0  # wall time of the whole export

    @property
    def ort_fused_ops_per_layer(self) -> dict[str, float]:
        """Fused operator counts divided by the number of attention layers."""
        return {k: v / max(self.layers, 1) for k, v in self.ort_fused_ops.items()}

    def summary(self) -> str:
        """A few lines for a terminal."""
        size = self.model_bytes + self.data_bytes
        err = "not validated" if self.max_rel_error is None else f"max rel error {self.max_rel_error:.2e}"
        fused = ", ".join(f"{k} {v:g}" for k, v in self.ort_fused_ops_per_layer.items()) or "none"
        return (
            f"{self.path}  opset {self.opset}, {size / 2**20:.1f} MiB"
            f"{' (external data)' if self.external_data else ''}, {self.layers} layers, "
            f"{'KV-cache decoder, ' if self.kv_cache else ''}{err}\n"
            f"  inputs {', '.join(self.inputs)}\n  outputs {', '.join(self.outputs)}\n"
            f"  ORT fused ops per layer: {fused}"
        )


def use_external_data(weight_bytes: int, external_data: bool | str) -> bool:
    """Whether weights go to ``<path>.data``: ``"auto"`` past :data:`EXTERNAL_DATA_THRESHOLD` bytes."""
    return weight_bytes > EXTERNAL_DATA_THRESHOLD if external_data == "auto" else bool(external_data)


def _metadata(compiled: CompiledModel, opset: int, kv: CacheLayout | None, dynamic_batch: bool) -> dict[str, str]:
    import kiln

    config = {}
    for f in dataclasses.fields(compiled.config):
        value = getattr(compiled.config, f.name)
        config[f.name] = [p.name for p in value] if f.name == "extra_passes" else value
    meta = {
        "kiln.version": kiln.__version__,
        "kiln.passes": json.dumps([r.name for r in compiled.report.records if not r.skipped]),
        "kiln.pass_stats": json.dumps(compiled.stats, default=str),
        "kiln.compile_config": json.dumps(config, default=str),
        "kiln.inputs": json.dumps({k: (list(v.shape), str(v.dtype)) if isinstance(v, torch.Tensor) else repr(v)
                                   for k, v in compiled.capture.inputs.items()}),
        "kiln.opset": str(opset),
        "kiln.dynamic_batch": str(dynamic_batch).lower(),
        "kiln.torch_version": torch.__version__,
    }
    if kv is not None:
        meta["kiln.kv_cache"] = json.dumps(
            {"layers": kv.layers, "kv_heads": kv.heads, "head_dims": kv.head_dims, "dtype": str(kv.dtype),
             "layout": "past_key_values.{i}.key/value (B, Hkv, P, D) -> present.{i}.key/value (B, Hkv, P+T, D)"}
        )
    return meta


def _axis_names(model: Any, token_inputs: Sequence[str], layout: CacheLayout | None) -> dict[str, str]:
    """Symbol -> readable name: ``batch_size``, ``sequence_length``, ``past_sequence_length``."""
    names: dict[str, str] = {}
    wanted = {0: "batch_size", 1: "sequence_length"}
    past = set(layout.input_names()) if layout else set()
    for value in model.graph.inputs:
        for axis, dim in enumerate(value.shape or []):
            if isinstance(dim, int) or dim.value is None:
                continue
            if value.name in token_inputs and axis in wanted:
                names.setdefault(dim.value, wanted[axis])
            elif value.name in past and axis in (0, 2):
                names.setdefault(dim.value, "batch_size" if axis == 0 else "past_sequence_length")
    return names


def _node_from_error(gm: GraphModule, exc: BaseException) -> Node | None:
    text = ""
    cur: BaseException | None = exc
    while cur is not None:
        text += str(cur) + "\n"
        cur = cur.__cause__ or cur.__context__
    names = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    for m in re.finditer(r"(?:%|node |')([A-Za-z_][A-Za-z0-9_]*)", text):
        if m.group(1) in names:
            return names[m.group(1)]
    return None


def _torch_export(gm: GraphModule, feeds: dict[str, torch.Tensor], spec: dict[str, Any] | None) -> Any:
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    args = tuple(feeds[n] for n in names)
    shapes = None if spec is None else tuple(spec.get(n) for n in names)
    return torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)


@functools.lru_cache(maxsize=4)
def _torchlib_registry(opset: int) -> Any:
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=opset)


def _convert(ep: Any, opset: int) -> Any:
    """``torch.onnx.export(ep, dynamo=True)`` with kiln's translations; the torchlib registry is
    built once per opset (about a second each time otherwise), falling back to the public API."""
    table = translation_table(opset)
    try:
        from torch.onnx._internal.exporter import _core

        base = _torchlib_registry(max(opset, 18))
        registry = type(base)()
        registry._opset_version = base._opset_version
        registry.functions = {k: list(v) for k, v in base.functions.items()}
        for op, fn in table.items():
            registry.register_op(op, fn)
    except Exception:  # the private API moved: take the public road
        return torch.onnx.export(
            ep, (), dynamo=True, opset_version=opset, custom_translation_table=table, optimize=False, verbose=False
        )
    return _core.export(ep, registry=registry, optimize=False, verbose=False, opset_version=opset)


def _to_onnx(ep: Any, gm: GraphModule, opset: int) -> Any:
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)  # "torchvision is not installed" notes
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _convert(ep, opset)
    except Exception as e:
        node = _node_from_error(gm, e)
        where = f" at node %{node.name} ({op_name(node)})  # {provenance(node)}" if node is not None else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch.onnx.export failed{where}: {first}") from e
    finally:
        registry_log.setLevel(level)


def optimize(model: Any) -> dict[str, int]:
    """The exporter's ONNX optimization minus rotary fusion; returns fusion counts.

    ``onnxscript.optimizer.optimize_ir`` (constant folding, CSE, dead code) then the opset-23
    ``RMSNormalization`` fusion. The exporter's default also fuses ``RotaryEmbedding``, which
    onnxscript builds with batch-1 cos/sin caches that ONNX Runtime rejects for batch > 1.
    """
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model)
    counts: dict[str, int] = {}
    if model.opset_imports.get("", 0) >= 23:
        try:
            from onnxscript.rewriter.rules.fusion import _rms_normalization

            counts["RMSNormalization"] = _rms_normalization.fuse_rms_normalization(model)
        except Exception:  # a private onnxscript module: a missing fusion only costs speed
            pass
    import onnx_ir.passes.common as common_passes

    common_passes.RemoveUnusedNodesPass()(model)  # initializers the fusions left behind
    return counts


def export_onnx(
    compiled: CompiledModel,
    path: str | os.PathLike[str],
    *,
    opset: int | None = None,
    external_data: bool | str = "auto",
    validate: bool = True,
    kv_cache: bool = False,
    dynamic_batch: bool = True,
    lengths: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> OnnxExportReport:
    """Write the compiled graph to ``path`` as ONNX; check it in onnxruntime first.

    Args:
        compiled: what ``kiln.compile`` returned.
        path: the ``.onnx`` file to write (external weights go to ``<path>.data``).
        opset: default-domain opset (default 23, which brings the ``Attention`` operator).
        external_data: ``"auto"`` (external when the weights exceed ~2 GB), True or False.
        validate: run ``onnx.checker`` and compare onnxruntime (ORT_ENABLE_ALL) with eager at
            several batch sizes and lengths (fp32 relative error <= 1e-4) before writing.
        kv_cache: write the generation decoder (past/present K/V, see ``kv_cache.py``).
        dynamic_batch: make the batch axis dynamic (the capture has batch 1).
        lengths: token counts validation checks (default: 1, the captured length, 2x + 3).
        progress: called with a short description of each step.

    Returns an :class:`OnnxExportReport`. Raises :class:`kiln.ExportError` when an op has no
    translation (naming it and its source line), when export fails, or when validation fails;
    in every failure case nothing is written at ``path``.
    """
    start_time = time.perf_counter()
    step = progress or (lambda _msg: None)
    opset = DEFAULT_OPSET if opset is None else int(opset)
    if external_data not in ("auto", True, False):
        raise ExportError(f"external_data must be 'auto', True or False, got {external_data!r}")
    dest = Path(path)
    if dest.is_dir():
        raise ExportError(f"{dest} is a directory; pass the path of the .onnx file to write")
    if not dest.parent.exists():
        raise ExportError(f"the folder {dest.parent} does not exist")

    step("preparing the graph")
    gm, layout, token_inputs, dynamic_batch = _graph_for_export(compiled, kv_cache, dynamic_batch, step)
    check_quantized(gm, opset, validate)
    layers = sum(n.op == "call_function" and n.target is torch.ops.kiln.attention.default for n in gm.graph.nodes)
    step("re-exporting the compiled graph (torch.export)")
    ep, dynamic_batch = _reexport(compiled, gm, layout, token_inputs, dynamic_batch)
    step("converting to ONNX (torch.onnx.export, dynamo=True)")
    program = _to_onnx(ep, gm, opset)
    model = program.model
    optimize(model)
    in_names = list(token_inputs) + (layout.input_names() if layout else [])
    n_out = len(model.graph.outputs) - (2 * layout.layers if layout else 0)
    out_names = output_names(compiled.graph_module, n_out) + (layout.output_names() if layout else [])
    if len(model.graph.inputs) != len(in_names):
        raise ExportError(f"exported graph has {len(model.graph.inputs)} inputs, expected {in_names}")
    for value, name in zip([*model.graph.inputs, *model.graph.outputs], [*in_names, *out_names], strict=True):
        value.name = name
    program.rename_axes(_axis_names(model, token_inputs, layout))
    dynamic_axes = {
        v.name: {i: str(d) for i, d in enumerate(v.shape or []) if not isinstance(d, int)} for v in model.graph.inputs
    }
    model.metadata_props.update(_metadata(compiled, opset, layout, dynamic_batch))

    weight_bytes = sum(int(t.nbytes) for t in [*ep.state_dict.values(), *ep.constants.values()] if hasattr(t, "nbytes"))
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        step("writing the artifact")
        tmp = tmpdir / dest.name
        program.save(tmp, external_data=use_external_data(weight_bytes, external_data))
        data_files = [p for p in tmpdir.iterdir() if p != tmp]
        checked: Validation | None = None
        if validate:
            step("checking (onnx.checker, onnxruntime vs eager)")
            tokens = int(compiled.capture.inputs[token_inputs[0]].shape[1])
            if any(compiled.capture.dynamic_shapes.get(n) for n in token_inputs):
                top = max_tokens(compiled) - (3 if layout else 0)
                lens = sorted({max(1, min(t, top)) for t in (lengths or (1, tokens, 2 * tokens + 3))})
            else:  # a static token axis: the captured length only
                lens = [tokens]
            batches = (1, 2) if dynamic_batch else (int(compiled.capture.inputs[token_inputs[0]].shape[0]),)
            checked = validate_artifact(compiled, tmp, in_names, token_inputs, layout, batches, lens,
                                        tolerance=quant_tolerance(gm))
        for p in data_files:  # weights first, the model last: the .onnx never points at missing data
            os.replace(p, dest.parent / p.name)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return OnnxExportReport(
        path=dest,
        opset=opset,
        model_bytes=dest.stat().st_size,
        data_bytes=sum((dest.parent / p.name).stat().st_size for p in data_files),
        external_data=bool(data_files),
        inputs=tuple(in_names),
        outputs=tuple(out_names),
        dynamic_axes={k: v for k, v in dynamic_axes.items() if v},
        kv_cache=layout is not None,
        layers=layers,
        max_rel_error=checked.max_rel_error if checked else None,
        max_abs_error=checked.max_abs_error if checked else None,
        checks=tuple(checked.checks) if checked else (),
        ort_fused_ops=checked.fused_ops if checked else {},
        ort_op_counts=checked.op_counts if checked else {},
        seconds=time.perf_counter() - start_time,
    )


def _graph_for_export(
    compiled: CompiledModel, kv_cache: bool, dynamic_batch: bool, step: Callable[[str], None]
) -> tuple[GraphModule, CacheLayout | None, list[str], bool]:
    """The prepared graph, its token inputs, and whether its batch axis could be generalized."""
    captured = compiled.capture
    gm, layout = prepare_graph(compiled, kv_cache)
    token_inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name in captured.inputs]
    if not token_inputs:
        raise ExportError("the compiled graph has no tensor input to export")
    if dynamic_batch:
        step("generalizing the batch axis")
        example_batch = int(captured.inputs[token_inputs[0]].shape[0])
        reason = generalize_and_check(gm, _example_feeds(compiled, token_inputs, layout, example_batch + 1), example_batch)
        if reason:
            warnings.warn(f"kiln: the ONNX artifact keeps batch {example_batch} static: {reason}", stacklevel=3)
            gm, layout = prepare_graph(compiled, kv_cache)
            dynamic_batch = False
    return gm, layout, token_inputs, dynamic_batch


def _example_feeds(
    compiled: CompiledModel, token_inputs: list[str], layout: CacheLayout | None, batch: int
) -> dict[str, torch.Tensor]:
    tokens = max(int(compiled.capture.inputs[token_inputs[0]].shape[1]), 2)
    feeds = make_feed(compiled.capture.inputs, token_inputs, batch, tokens, start=3 if layout else 0)
    if layout is not None:
        feeds.update(past_feed(layout, batch, 3, seed=0, onnx_names=False))
    return feeds


def _reexport(
    compiled: CompiledModel, gm: GraphModule, layout: CacheLayout | None, token_inputs: list[str], dynamic_batch: bool
) -> tuple[Any, bool]:
    """``torch.export`` of the prepared graph with dynamic token (and batch, past) axes."""
    captured = compiled.capture
    example_batch = int(captured.inputs[token_inputs[0]].shape[0])

    def spec(with_batch: bool) -> dict[str, Any]:
        b, past = Dim("batch", min=1, max=4096), Dim("past", min=0)
        out: dict[str, Any] = {}
        for n in token_inputs:
            axes = dict(captured.dynamic_shapes.get(n, {}))
            if with_batch:
                axes[0] = b
            out[n] = axes or None
        for k, v in layout.past if layout else ():
            out[k] = out[v] = {0: b, 2: past} if with_batch else {2: past}
        return out

    if dynamic_batch:
        try:
            return _torch_export(gm, _example_feeds(compiled, token_inputs, layout, example_batch + 1), spec(True)), True
        except Exception as e:
            warnings.warn(f"kiln: the ONNX artifact keeps batch {example_batch} static (torch.export: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__})", stacklevel=3)
    try:
        return _torch_export(gm, _example_feeds(compiled, token_inputs, layout, example_batch), spec(False)), False
    except Exception as e:
        raise ExportError(f"torch.export could not re-export the compiled graph: {e}") from e


__all__ = ["EXTERNAL_DATA_THRESHOLD", "OnnxExportReport", "export_onnx", "optimize", "use_external_data"]
