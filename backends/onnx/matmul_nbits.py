"""int4 weights for ONNX Runtime: ``kiln::qlinear_w4a16`` becomes ``com.microsoft::MatMulNBits``.

``kiln::matmul_nbits`` is ONNX Runtime's contrib operator ``MatMulNBits`` (bits = 4) as a kiln
op, with its plain-torch reference (the operator's specification,
https://github.com/microsoft/onnxruntime/blob/main/docs/ContribOperators.md#com.microsoft.MatMulNBits):

- ``B`` (N, ceil(K / block_size), block_size / 2) uint8: each row's unsigned 4-bit codes,
  block by block, two per byte, the even element in the low nibble;
- ``scales`` (N, ceil(K / block_size)) in A's float type;
- ``zero_points`` (N, ceil(ceil(K / block_size) / 2)) uint8, two per byte, low nibble first,
  or None (8);
- ``Y = A @ ((B - zero_point) * scale)^T``.

:func:`lower_int4_for_onnx` rewrites the prepared graph before export: each
``kiln::qlinear_w4a16`` becomes ``kiln::matmul_nbits`` (plus an ``aten.add`` for the bias),
its weights repacked from kiln's codes *as* :func:`kiln.quantize.ops.unpack_int4` *reads
them*, so the layout kiln packs in does not matter here. ``MatMulNBits`` takes a block size
that is a power of two >= 16; a kiln group size that is not one is split into such blocks
(scales and zero points repeated), and when none divides it the linear falls back to
``kiln::dequantize`` of the unpacked uint8 codes (ONNX ``DequantizeLinear`` with
``block_size``) + ``aten.linear``. Each rewritten layer is checked against
``qlinear_w4a16``'s reference on random inputs before the export goes on.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.fx import GraphModule, Node

from kiln.errors import ExportError
from kiln.ir import PASS_KEY, infer_meta, provenance
from kiln.quantize import ops as quant_ops

_NAME = "lower-int4-onnx"


# --------------------------------------------------------------------------------------
# kiln::matmul_nbits — MatMulNBits (bits = 4) and its reference
# --------------------------------------------------------------------------------------


def _unpack_nibbles(p: Tensor) -> Tensor:
    """Bytes (..., n) -> 4-bit values (..., 2n), the low nibble of each byte first."""
    return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)


def _pack_nibbles(u: Tensor) -> Tensor:
    """4-bit values (..., n) -> bytes (..., ceil(n / 2)), the even element in the low nibble."""
    u = u.to(torch.uint8)
    if u.shape[-1] % 2:
        u = F.pad(u, (0, 1))
    return (u[..., 0::2] & 0xF) | ((u[..., 1::2] & 0xF) << 4)


def matmul_nbits_reference(
    a: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, n: int, block_size: int
) -> Tensor:
    """``a @ dequantize(b)^T`` with ``b`` in MatMulNBits' 4-bit layout (see the module docstring)."""
    blocks = scales.shape[-1]
    u = _unpack_nibbles(b.reshape(n, blocks, block_size // 2)).float()  # (N, blocks, bs)
    if zero_points is None:
        zp = torch.full((n, blocks, 1), 8.0)
    else:
        zp = _unpack_nibbles(zero_points.reshape(n, -1))[:, :blocks].float().unsqueeze(-1)  # (N, blocks, 1)
    deq = ((u - zp) * scales.float().reshape(n, blocks, 1)).reshape(n, -1)[:, :k]  # (N, K)
    return F.linear(a.float(), deq).to(a.dtype)


@torch.library.custom_op("kiln::matmul_nbits", mutates_args=())
def matmul_nbits(
    a: Tensor, b: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, n: int, block_size: int
) -> Tensor:
    """ONNX Runtime's ``MatMulNBits`` with 4-bit weights: ``a (..., K)`` float, ``b (N, K/bs, bs/2)`` uint8."""
    return matmul_nbits_reference(a, b, scales, zero_points, k, n, block_size)


@matmul_nbits.register_fake
def _matmul_nbits_fake(a, b, scales, zero_points, k, n, block_size):
    return a.new_empty((*a.shape[:-1], n))


# --------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------


def block_size_for(group_size: int) -> int | None:
    """The largest power of two >= 16 dividing ``group_size`` (MatMulNBits' block), or None."""
    b = group_size & -group_size  # the largest power of two dividing it
    return b if b >= 16 else None


def _attr(gm: torch.nn.Module, node: object) -> Tensor | None:
    if node is None:
        return None
    if not (isinstance(node, Node) and node.op == "get_attr"):
        raise ExportError(f"kiln::qlinear_w4a16 needs constant weights, scales and zero points, got {node}")
    obj: object = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _buffer(gm: GraphModule, before: Node, name: str, value: Tensor) -> Node:
    attr, i = f"_onnx_{name}", 1
    while hasattr(gm, attr):
        attr, i = f"_onnx_{name}_{i}", i + 1
    gm.register_buffer(attr, value.contiguous())
    with gm.graph.inserting_before(before):
        node = gm.graph.get_attr(attr)
    node.meta[PASS_KEY] = _NAME
    infer_meta(node)
    return node


def _call(gm: GraphModule, before: Node, target: object, args: tuple, kwargs: dict | None = None) -> Node:
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs or {})  # type: ignore[arg-type]
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in before.meta:
            node.meta[key] = before.meta[key]
    node.meta[PASS_KEY] = _NAME
    infer_meta(node)
    return node


def _codes(w: Tensor, n: int, k: int, node: Node) -> Tensor:
    """kiln's packed weight -> unsigned codes (N, K) through ``unpack_int4`` (whatever its layout)."""
    u = quant_ops.unpack_int4(w)  # looked up at call time: whatever layout kiln packs in now
    if tuple(u.shape) == (k, n) and n != k:
        u = u.t()
    if tuple(u.shape) != (n, k):
        raise ExportError(
            f"unpack_int4 turned the weight {tuple(w.shape)} of %{node.name} into {tuple(u.shape)}, not (N, K) = "
            f"({n}, {k}); the int4 export cannot read this layout  # {provenance(node)}"
        )
    return u.to(torch.uint8)


def lower_int4_for_onnx(gm: GraphModule, *, use_matmul_nbits: bool | None = None) -> dict[str, int]:
    """Rewrite every ``kiln::qlinear_w4a16`` of ``gm`` in place for ONNX (see the module docstring).

    ``use_matmul_nbits``: None asks whether the installed onnxruntime runs ``MatMulNBits``
    (:func:`ort_runs_matmul_nbits`); False always takes the ``DequantizeLinear`` form.
    Returns counts: ``matmul_nbits`` and ``dequantize_linear`` rewrites.
    """
    stats = {"matmul_nbits": 0, "dequantize_linear": 0}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.kiln.qlinear_w4a16.default:
            continue
        if use_matmul_nbits is None:  # asked once, and only of a graph with int4 linears
            use_matmul_nbits = ort_runs_matmul_nbits()
        x, w_node, s_node, z_node, group, bias = node.args
        w, scale, zp = _attr(gm, w_node), _attr(gm, s_node), _attr(gm, z_node)
        assert w is not None and scale is not None
        x_val = x.meta["val"]  # type: ignore[union-attr]
        k, n = int(x_val.shape[-1]), int(scale.shape[0])
        u = _codes(w, n, k, node)
        g = int(group)  # type: ignore[arg-type]
        zp_full = zp if zp is not None else torch.full(scale.shape, 8, dtype=torch.uint8)
        bs = block_size_for(g) if use_matmul_nbits else None
        if bs is not None:
            rep = g // bs
            s_b = scale.float().repeat_interleave(rep, dim=1)  # (N, K / bs)
            blocks = s_b.shape[1]
            packed = _pack_nibbles(u.reshape(n, blocks, bs))  # (N, K / bs, bs / 2)
            z_b = (
                None if zp is None else _pack_nibbles(zp.repeat_interleave(rep, dim=1))
            )  # (N, ceil(blocks / 2))
            compute = x_val.dtype if x_val.dtype in (torch.float32, torch.float16) else torch.float32
            args = (
                _buffer(gm, node, "nbits_b", packed),
                _buffer(gm, node, "nbits_scales", s_b.to(compute)),
                None if z_b is None else _buffer(gm, node, "nbits_zero_points", z_b),
            )
            x_in = (
                x
                if compute == x_val.dtype
                else _call(gm, node, torch.ops.aten._to_copy.default, (x,), {"dtype": compute})
            )
            y = _call(gm, node, torch.ops.kiln.matmul_nbits.default, (x_in, *args, k, n, bs))
            if x_in is not x:
                y = _call(gm, node, torch.ops.aten._to_copy.default, (y,), {"dtype": x_val.dtype})
            if bias is not None:
                y = _call(gm, node, torch.ops.aten.add.Tensor, (y, bias))
            stats["matmul_nbits"] += 1
        else:
            codes = _buffer(gm, node, "int4_codes", u)
            s_n, z_n = (
                _buffer(gm, node, "int4_scale", scale.float()),
                _buffer(gm, node, "int4_zero_point", zp_full),
            )
            wd = _call(
                gm,
                node,
                torch.ops.kiln.dequantize.default,
                (codes, s_n, z_n),
                {"group_size": g, "out_dtype": x_val.dtype},
            )
            y = _call(gm, node, torch.ops.aten.linear.default, (x, wd, bias) if bias is not None else (x, wd))
            stats["dequantize_linear"] += 1
        _check(gm, node, y, x_val, w, scale, zp, g, bias)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
    if any(stats.values()):
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return stats


def _value(gm: GraphModule, node: object, env: dict[Node, Tensor]) -> object:
    if not isinstance(node, Node):
        return node
    if node in env:
        return env[node]
    if node.op == "get_attr":
        return _attr(gm, node)
    raise KeyError(node)


def _check(
    gm: GraphModule,
    old: Node,
    new: Node,
    x_val: Tensor,
    w: Tensor,
    scale: Tensor,
    zp: Tensor | None,
    group: int,
    bias: object,
) -> None:
    """The rewritten nodes equal ``qlinear_w4a16``'s reference on a random input (else ExportError)."""
    x = torch.randn(3, x_val.shape[-1], generator=torch.Generator().manual_seed(0)).to(x_val.dtype)
    b = _attr(gm, bias) if isinstance(bias, Node) and bias.op == "get_attr" else None
    if bias is not None and b is None:  # a computed bias: compare without it
        return
    env: dict[Node, Tensor] = {old.args[0]: x}  # type: ignore[dict-item]
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    chain = sorted({n for n in _ancestors(new, old) if n.op == "call_function"}, key=order.__getitem__)
    with torch.no_grad():
        for n in chain:
            args = tuple(_value(gm, a, env) for a in n.args)
            kwargs = {key: _value(gm, a, env) for key, a in n.kwargs.items()}
            env[n] = n.target(*args, **kwargs)  # type: ignore[operator]
        want = quant_ops.qlinear_w4a16_reference(x, w, scale, zp, group, b)
    got = env[new]
    tol = 1e-4 if x_val.dtype == torch.float32 else 2e-2
    err = (got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12)
    if not err <= tol:
        raise ExportError(
            f"the ONNX form of %{old.name} (kiln::qlinear_w4a16) disagrees with its reference (relative error "
            f"{float(err):.3g}); the int4 repacking misread kiln's layout  # {provenance(old)}"
        )


def _ancestors(node: Node, stop: Node) -> set[Node]:
    """``node`` and what it computes from, back to ``stop``'s inputs (the rewrite's own nodes)."""
    seen: set[Node] = set()
    work = [node]
    boundary = set(stop.all_input_nodes)
    while work:
        n = work.pop()
        if n in seen or n in boundary:
            continue
        seen.add(n)
        work += n.all_input_nodes
    return seen


@functools.cache
def ort_runs_matmul_nbits() -> bool:
    """Whether the installed onnxruntime runs ``com.microsoft::MatMulNBits`` (4 bits) on the CPU, correctly."""
    try:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        k, n, bs = 32, 4, 16
        gen = torch.Generator().manual_seed(0)
        u = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        b = _pack_nibbles(u.reshape(n, k // bs, bs))
        s = torch.rand(n, k // bs, generator=gen) + 0.5
        a = torch.randn(2, k, generator=gen)
        node = helper.make_node(
            "MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=bs
        )
        graph = helper.make_graph(
            [node],
            "probe",
            [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])],
            initializer=[numpy_helper.from_array(b.numpy(), "B"), numpy_helper.from_array(s.numpy(), "S")],
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
        )
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"A": a.numpy()})
        want = matmul_nbits_reference(a, b, s, None, k, n, bs).numpy()
        return bool(np.allclose(y, want, rtol=1e-4, atol=1e-4))
    except Exception:
        return False


__all__ = [
    "block_size_for",
    "lower_int4_for_onnx",
    "matmul_nbits",
    "matmul_nbits_reference",
    "ort_runs_matmul_nbits",
]
