"""ONNX translations of kiln's quantization operators (:mod:`kiln.quantize.ops`).

Both forms of a quantized graph export:

- the Q/DQ form (``CompileConfig(disable=("lower-qdq",))``): ``kiln::quantize`` ->
  ``QuantizeLinear`` and ``kiln::dequantize`` -> ``DequantizeLinear`` (opset 21:
  ``axis`` per channel, ``block_size`` per group along the last axis, and per token as one
  block of the whole last axis), ``kiln::dynamic_scale`` -> ``ReduceMax(Abs(x)) / qmax``;
- the lowered form: ``kiln::qlinear_w8a16`` -> ``DequantizeLinear`` of the int8 weight +
  ``MatMul``; ``kiln::qlinear_w8a8`` -> ``MatMulInteger`` (int8 x int8 -> int32) rescaled by
  the per-token and per-channel scales; ``kiln::qlinear_fp8`` -> ``DequantizeLinear`` of the
  e4m3 operands + ``MatMul``; ``kiln::qlinear_w4a16`` -> ``com.microsoft::MatMulNBits``
  (through ``kiln::matmul_nbits``, see :mod:`.matmul_nbits`).

``QuantizeLinear`` saturates to its output type's range, so a narrower code range (int4
codes held in int8, [-8, 7] or [0, 15]) adds a ``Clip`` on the codes. Scale layouts ONNX
cannot state (a scale broadcasting in other ways) take an exact decomposition instead
(``Round(x / s) + zp``, clipped and cast; ``Round`` is half-to-even like ``torch.round``).
Operator specifications: https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html,
https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html,
https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from onnx.defs import OpSchema
from onnxscript import opset21 as op
from onnxscript._internal.values import Op, Opset

from kiln.backends.onnx import matmul_nbits as _nbits  # noqa: F401  (registers kiln::matmul_nbits)
from kiln.backends.onnx.translations import _same_dim, register_translation
from kiln.errors import ExportError
from kiln.quantize import ops as _quant_ops  # noqa: F401  (registers kiln::quantize ...)

#: The first opset with QuantizeLinear/DequantizeLinear ``block_size`` and ``output_dtype``.
QDQ_OPSET = 21

_FLOAT, _UINT8, _INT8, _INT32, _FLOAT8E4M3FN = 1, 2, 3, 6, 17  # onnx.TensorProto values
_RANGES = {_INT8: (-128, 127), _UINT8: (0, 255), _FLOAT8E4M3FN: (-448, 448)}


def _dtype(value: Any) -> int | None:
    return None if value is None or value.dtype is None else int(value.dtype)


def _shape(value: Any) -> list[Any] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else list(shape)


def _check_opset(opset: int, what: str) -> None:
    if opset < QDQ_OPSET:
        raise ExportError(
            f"{what} needs opset >= {QDQ_OPSET} (QuantizeLinear/DequantizeLinear with block_size); "
            f"export with opset={QDQ_OPSET} or later (the default is 23)"
        )


def _layout(x: Any, scale: Any, axis: int | None, group_size: int | None) -> dict[str, int] | None:
    """``QuantizeLinear`` / ``DequantizeLinear`` attributes for kiln's scale layout; None: not expressible.

    Per tensor: a scalar scale. ``axis``: a 1-D scale. ``group_size``: blocks along the last axis.
    A scale shaped like ``x`` but 1 on the last axis (per token): one block of the whole last axis.
    """
    xs, ss = _shape(x), _shape(scale)
    if xs is None or ss is None:
        return None
    rank = len(xs)
    if axis is not None:
        return {"axis": axis % rank} if len(ss) == 1 else None
    if group_size is not None:
        return {"axis": rank - 1, "block_size": int(group_size)} if len(ss) == rank else None
    if len(ss) == 0:
        return {}
    last = xs[-1]
    if (
        len(ss) == rank
        and isinstance(last, int)
        and ss[-1] == 1
        and all(_same_dim(a, b) for a, b in zip(xs[:-1], ss[:-1], strict=True))
    ):
        return {"axis": rank - 1, "block_size": last} if last > 1 else {}
    return None


def _broadcast(value: Any, x: Any, axis: int | None, group_size: int | None) -> Any:
    """A scale or zero point reshaped so it broadcasts against ``x`` (for the decompositions)."""
    rank = len(_shape(x) or [])
    if axis is not None:
        shape = [1] * rank
        shape[axis % rank] = -1
        return op.Reshape(value, op.Constant(value_ints=shape))
    if group_size is not None:  # (..., K / g) -> (..., K / g, 1), against x as (..., K / g, g)
        return op.Unsqueeze(value, op.Constant(value_ints=[-1]))
    return value


def _grouped(x: Any, group_size: int | None) -> Any:
    if group_size is None:
        return x
    return op.Reshape(
        x, op.Concat(op.Shape(x, start=0, end=-1), op.Constant(value_ints=[-1, int(group_size)]), axis=0)
    )


def _ungrouped(y: Any, like: Any, group_size: int | None) -> Any:
    return y if group_size is None else op.Reshape(y, op.Shape(like))


# --------------------------------------------------------------------------------------
# kiln::quantize / kiln::dequantize / kiln::dynamic_scale
# --------------------------------------------------------------------------------------


def _quantize(
    x: Any,
    scale: Any,
    zero_point: Any = None,
    qmin: int = -128,
    qmax: int = 127,
    dtype: int = _INT8,
    axis: int | None = None,
    group_size: int | None = None,
    *,
    opset: int,
) -> Any:
    _check_opset(opset, "kiln::quantize")
    code = int(dtype)
    if code not in _RANGES or code == _UINT8:
        raise ExportError(f"kiln::quantize to ONNX data type {code}: only int8 and float8 e4m3 codes export")
    if code == _FLOAT8E4M3FN:
        if (qmin, qmax) != _RANGES[code]:
            raise ExportError(f"fp8 codes clamped to [{qmin}, {qmax}] do not export; e4m3 saturates at +-448")
    xf = op.Cast(x, to=_FLOAT) if _dtype(x) != _FLOAT else x
    sf = op.Cast(scale, to=_FLOAT) if _dtype(scale) != _FLOAT else scale
    attrs = _layout(x, scale, axis, group_size)
    if attrs is not None:
        q = op.QuantizeLinear(xf, sf, zero_point, output_dtype=code, **attrs)
    elif code == _FLOAT8E4M3FN:  # exact decomposition: saturate(x / s) -> e4m3
        q = op.Cast(
            op.Clip(
                op.Div(xf, _broadcast(sf, x, axis, group_size)),
                op.Constant(value_float=-448.0),
                op.Constant(value_float=448.0),
            ),
            to=code,
        )
    else:
        y = op.Round(op.Div(_grouped(xf, group_size), _broadcast(sf, x, axis, group_size)))
        if zero_point is not None:
            y = op.Add(y, op.Cast(_broadcast(zero_point, x, axis, group_size), to=_FLOAT))
        lo, hi = op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax))
        return _ungrouped(op.Cast(op.Clip(y, lo, hi), to=code), x, group_size)
    if code != _FLOAT8E4M3FN and (qmin, qmax) != _RANGES[code]:  # int4 codes in int8: clip to their range
        lo = op.Cast(op.Constant(value_int=int(qmin)), to=code)
        hi = op.Cast(op.Constant(value_int=int(qmax)), to=code)
        q = op.Clip(q, lo, hi)
    return q


def _dequantize(
    q: Any,
    scale: Any,
    zero_point: Any = None,
    axis: int | None = None,
    group_size: int | None = None,
    out_dtype: int = _FLOAT,
    *,
    opset: int,
) -> Any:
    _check_opset(opset, "kiln::dequantize")
    code = _dtype(q)
    sf = op.Cast(scale, to=_FLOAT) if _dtype(scale) != _FLOAT else scale
    attrs = _layout(q, scale, axis, group_size)
    if attrs is not None and code in _RANGES and (zero_point is None or _dtype(zero_point) == code):
        y = op.DequantizeLinear(q, sf, zero_point, **attrs)
    else:  # exact decomposition: (q - zp) * s
        y = op.Cast(_grouped(q, group_size), to=_FLOAT)
        if zero_point is not None:
            y = op.Sub(y, op.Cast(_broadcast(zero_point, q, axis, group_size), to=_FLOAT))
        y = _ungrouped(op.Mul(y, _broadcast(sf, q, axis, group_size)), q, group_size)
    return y if int(out_dtype) == _FLOAT else op.Cast(y, to=int(out_dtype))


def _dynamic_scale(x: Any, qmax: float, per_token: bool = True) -> Any:
    """``max|x| / qmax`` per token (..., 1) or per tensor (), never below 1e-8 / qmax."""
    a = op.Abs(op.Cast(x, to=_FLOAT) if _dtype(x) != _FLOAT else x)
    amax = (
        op.ReduceMax(a, op.Constant(value_ints=[-1]), keepdims=1)
        if per_token
        else op.ReduceMax(a, keepdims=0)
    )
    return op.Div(op.Max(amax, op.Constant(value_float=1e-8)), op.Constant(value_float=float(qmax)))


@register_translation(torch.ops.kiln.quantize.default)
def quantize_translation(opset: int) -> Callable[..., Any]:
    """``kiln::quantize`` -> ``QuantizeLinear`` (``axis`` / ``block_size``), clipped to narrower code ranges."""
    return functools.partial(_quantize, opset=opset)


@register_translation(torch.ops.kiln.dequantize.default)
def dequantize_translation(opset: int) -> Callable[..., Any]:
    """``kiln::dequantize`` -> ``DequantizeLinear`` (``axis`` / ``block_size``)."""
    return functools.partial(_dequantize, opset=opset)


@register_translation(torch.ops.kiln.dynamic_scale.default)
def dynamic_scale_translation(opset: int) -> Callable[..., Any]:
    """``kiln::dynamic_scale`` -> ``Max(ReduceMax(Abs(x)), 1e-8) / qmax``."""
    return _dynamic_scale


# --------------------------------------------------------------------------------------
# kiln::qlinear_*
# --------------------------------------------------------------------------------------


def _linear(x: Any, w_t: Any, bias: Any) -> Any:
    """``x @ w_t (+ bias)`` in float32, cast back to x's type."""
    xf = op.Cast(x, to=_FLOAT) if _dtype(x) != _FLOAT else x
    y = op.MatMul(xf, w_t)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT) if _dtype(bias) != _FLOAT else bias)
    return y


def _weight_t(w: Any, w_scale: Any, w_zero_point: Any, group_size: int | None, opset: int) -> Any:
    """The dequantized weight (N, K), transposed to (K, N) for MatMul."""
    per_channel = group_size is None and len(_shape(w_scale) or []) == 1
    wd = _dequantize(w, w_scale, w_zero_point, 0 if per_channel else None, group_size, _FLOAT, opset=opset)
    return op.Transpose(wd, perm=[1, 0])


def _qlinear_w8a16(
    x: Any, w: Any, w_scale: Any, w_zero_point: Any, group_size: int | None, bias: Any, *, opset: int
) -> Any:
    y = _linear(x, _weight_t(w, w_scale, w_zero_point, group_size, opset), bias)
    return y if _dtype(x) == _FLOAT else op.CastLike(y, x)


def _qlinear_w8a8(
    x: Any, x_scale: Any, x_zero_point: Any, w: Any, w_scale: Any, bias: Any, out_dtype: int, *, opset: int
) -> Any:
    """int8 GEMM: ``MatMulInteger(x, w^T, x_zp)`` (int32) times ``x_scale * w_scale`` (+ bias)."""
    _check_opset(opset, "kiln::qlinear_w8a8")
    if x_zero_point is not None and len(_shape(x_zero_point) or [1]) != 0:
        xd = _dequantize(x, x_scale, x_zero_point, None, None, _FLOAT, opset=opset)  # a per-token zero point
        y = _linear(xd, _weight_t(w, w_scale, None, None, opset), bias)
    else:
        acc = op.MatMulInteger(x, op.Transpose(w, perm=[1, 0]), x_zero_point)  # (..., N) int32
        y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), op.Cast(x_scale, to=_FLOAT)), op.Cast(w_scale, to=_FLOAT))
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return y if int(out_dtype) == _FLOAT else op.Cast(y, to=int(out_dtype))


def _qlinear_fp8(x: Any, x_scale: Any, w: Any, w_scale: Any, bias: Any, out_dtype: int, *, opset: int) -> Any:
    _check_opset(opset, "kiln::qlinear_fp8")
    xd = x if x_scale is None else _dequantize(x, x_scale, None, None, None, _FLOAT, opset=opset)
    y = _linear(xd, _weight_t(w, w_scale, None, None, opset), bias)
    return y if int(out_dtype) == _FLOAT else op.Cast(y, to=int(out_dtype))


@register_translation(torch.ops.kiln.qlinear_w8a16.default)
def qlinear_w8a16_translation(opset: int) -> Callable[..., Any]:
    """``kiln::qlinear_w8a16`` -> ``DequantizeLinear(w)`` (``axis=0`` / ``block_size``) + ``MatMul``."""
    return functools.partial(_qlinear_w8a16, opset=opset)


@register_translation(torch.ops.kiln.qlinear_w8a8.default)
def qlinear_w8a8_translation(opset: int) -> Callable[..., Any]:
    """``kiln::qlinear_w8a8`` -> ``MatMulInteger`` + the scales."""
    return functools.partial(_qlinear_w8a8, opset=opset)


@register_translation(torch.ops.kiln.qlinear_fp8.default)
def qlinear_fp8_translation(opset: int) -> Callable[..., Any]:
    """``kiln::qlinear_fp8`` -> ``DequantizeLinear`` of e4m3 codes + ``MatMul``."""
    return functools.partial(_qlinear_fp8, opset=opset)


# --------------------------------------------------------------------------------------
# kiln::matmul_nbits -> com.microsoft::MatMulNBits
# --------------------------------------------------------------------------------------


@functools.cache
def _matmul_nbits_op() -> Op:
    """``com.microsoft::MatMulNBits`` for onnxscript (ONNX has no schema for contrib ops: one is built)."""
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    schema = OpSchema(
        "MatMulNBits",
        "com.microsoft",
        1,
        inputs=[
            param("A", "T1"),
            param("B", "T2"),
            param("scales", "T1"),
            param("zero_points", "T3", param_option=optional),
        ],
        outputs=[param("Y", "T1")],
        type_constraints=[
            ("T1", ["tensor(float)", "tensor(float16)"], ""),
            ("T2", ["tensor(uint8)"], ""),
            ("T3", ["tensor(uint8)"], ""),
        ],
        attributes=[
            OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")
        ],
    )
    return Op(Opset("com.microsoft", 1), "MatMulNBits", schema)


def _matmul_nbits(a: Any, b: Any, scales: Any, zero_points: Any, k: int, n: int, block_size: int) -> Any:
    return _matmul_nbits_op()(
        a, b, scales, zero_points, K=int(k), N=int(n), bits=4, block_size=int(block_size)
    )


@register_translation(torch.ops.kiln.matmul_nbits.default)
def matmul_nbits_translation(opset: int) -> Callable[..., Any]:
    """``kiln::matmul_nbits`` -> ``com.microsoft::MatMulNBits`` (bits = 4)."""
    return _matmul_nbits


# --------------------------------------------------------------------------------------
# What onnxruntime runs, and how closely a quantized artifact can follow kiln
# --------------------------------------------------------------------------------------


@functools.cache
def ort_runs_fp8() -> bool:
    """Whether the installed onnxruntime quantizes and dequantizes float8 e4m3 on the CPU."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper

        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s"], ["q"], output_dtype=TensorProto.FLOAT8E4M3FN),
            helper.make_node("DequantizeLinear", ["q", "s"], ["y"]),
        ]
        graph = helper.make_graph(
            nodes,
            "probe",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
                helper.make_tensor_value_info("s", TensorProto.FLOAT, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", QDQ_OPSET)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.array([1.0, -3.0, 1000.0, 0.1], np.float32)
        (y,) = session.run(None, {"x": x, "s": np.array(0.5, np.float32)})
        want = (torch.from_numpy(x) / 0.5).clamp(-448, 448).to(torch.float8_e4m3fn).float() * 0.5
        return bool(np.array_equal(y, want.numpy()))
    except Exception:
        return False


#: kiln ops only a quantized graph holds.
QUANT_OPS = (
    torch.ops.kiln.quantize.default,
    torch.ops.kiln.dequantize.default,
    torch.ops.kiln.dynamic_scale.default,
    torch.ops.kiln.qlinear_w8a16.default,
    torch.ops.kiln.qlinear_w4a16.default,
    torch.ops.kiln.qlinear_w8a8.default,
    torch.ops.kiln.qlinear_fp8.default,
    torch.ops.kiln.matmul_nbits.default,
)


def check_quantized(gm: torch.fx.GraphModule, opset: int, validate: bool) -> None:
    """ExportError before conversion when a quantized graph cannot export (or be checked) as asked.

    Quantized ops need opset >= 21; float8 e4m3 needs an onnxruntime that runs it to be validated.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in QUANT_OPS]
    if not nodes:
        return
    _check_opset(opset, f"the quantized graph ({len(nodes)} quantization ops, first %{nodes[0].name})")
    fp8 = any(
        isinstance(v := n.meta.get("val"), torch.Tensor) and v.dtype == torch.float8_e4m3fn
        for n in gm.graph.nodes
    )
    if fp8 and validate and not ort_runs_fp8():
        raise ExportError(
            "the graph holds float8 e4m3 codes, but the installed onnxruntime does not run float8 "
            "QuantizeLinear/DequantizeLinear on the CPU, so the artifact cannot be checked; quantize with an "
            "integer preset (w8a16, w4a16-g128, w8a8), or export with validate=False for a runtime that has float8"
        )


#: Relative error (max |ort - kiln| / max |kiln|) allowed when activations are quantized at run time:
#: a value within rounding error of a code boundary may land on the neighbouring code (one step
#: of the format) when the two sides' float arithmetic differs in the last bit, and that step
#: travels through the remaining layers. kiln's own reference moves as much: on kiln-teacher,
#: perturbing its norm weights by 1e-7 (relative) moves its logits by 1.3e-2 (w8a8) and 3e-2
#: (fp8), and ONNX Runtime differs from it by 1.2e-2 and 4.3e-2 (benchmarks/RESULTS.md).
ACTIVATION_TOLERANCE = {torch.int8: 5e-2, torch.float8_e4m3fn: 1.5e-1}


def quant_tolerance(gm: torch.fx.GraphModule) -> float | None:
    """The validation tolerance of a graph that quantizes activations at run time; None for any other."""
    tol = None
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.kiln.quantize.default:
            continue
        x = node.args[0]
        if isinstance(x, torch.fx.Node) and x.op == "get_attr":
            continue  # a constant weight: both sides compute the same codes
        t = ACTIVATION_TOLERANCE.get(node.args[5], 1e-1)  # type: ignore[call-overload]
        tol = t if tol is None else max(tol, t)
    return tol


def cli_quant_config(
    model_name: str, model: torch.nn.Module, preset: str, samples: int = 16, seq_len: int = 256
) -> Any:
    """``kiln export-onnx MODEL --quant PRESET``'s QuantConfig, calibrated on the train split of :mod:`kiln.data`
    when MODEL is a folder with ``tokenizer.json`` (random tokens otherwise) when the preset needs it."""
    from pathlib import Path

    from kiln.quantize.config import QuantConfig

    config = QuantConfig.preset(preset)
    if not config.needs_calibration:
        return config
    n = samples * seq_len
    if (Path(model_name) / "tokenizer.json").is_file():
        from kiln.quantize.calibrate import calibration_tokens

        data = calibration_tokens(Path(model_name), n, split="train")
    else:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
        data = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(1))
    return config.with_calibration(data, num_samples=samples, seq_len=seq_len)


__all__ = [
    "ACTIVATION_TOLERANCE",
    "QDQ_OPSET",
    "QUANT_OPS",
    "check_quantized",
    "cli_quant_config",
    "dequantize_translation",
    "dynamic_scale_translation",
    "matmul_nbits_translation",
    "ort_runs_fp8",
    "qlinear_fp8_translation",
    "qlinear_w8a8_translation",
    "qlinear_w8a16_translation",
    "quant_tolerance",
    "quantize_translation",
]
