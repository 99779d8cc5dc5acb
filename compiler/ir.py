"""kiln's IR: the ATen-level FX graph of ``torch.export`` plus ``kiln::`` operators.

This module gives the graph a stable, readable text form (one line per node: name, op,
operands, shape and dtype, provenance; weights summarized, never dumped), a verifier, a
``networkx`` view for analyses, and shape inference for nodes that passes create.

The graph is the *unlifted* module of an ``ExportedProgram`` (``ep.module()``): weights are
``get_attr`` nodes, user inputs are placeholders, and the module's pytree codegen keeps the
model's calling convention. Node ``meta["val"]`` holds a FakeTensor (or SymInt) for every
value; symbolic sizes print by the name of the dimension they came from (``T`` for tokens).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from kiln.errors import VerificationError
from kiln.ops import INVARIANTS, is_kiln_op

_DTYPE_NAMES = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
}

_TORCH_DIR = os.path.dirname(torch.__file__)

#: Meta key holding the name of the pass that created a node (provenance).
PASS_KEY = "kiln_pass"
#: GraphModule.meta key mapping symbol names (``s70``) to dimension names (``T``).
SYMBOLS_KEY = "kiln_symbols"


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name used in IR text: ``f32``, ``bf16``, ``i64`` ..."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# --------------------------------------------------------------------------------------
# Shape metadata
# --------------------------------------------------------------------------------------


def fake_mode(gm: GraphModule) -> Any:
    """The FakeTensorMode the graph's metadata was computed in (None for an empty graph)."""
    cached = gm.meta.get("_kiln_fake_mode")
    if cached is not None:
        return cached
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            mode = torch._guards.detect_fake_mode([val])
            if mode is not None:
                gm.meta["_kiln_fake_mode"] = mode
                return mode
    return None


def _fake_of(node: Node, mode: Any) -> Any:
    if "val" in node.meta:
        return node.meta["val"]
    if node.op == "get_attr":
        value = _get_attr(node.graph.owning_module, str(node.target))
        if isinstance(value, torch.Tensor):
            node.meta["val"] = mode.from_tensor(value, static_shapes=True)
            return node.meta["val"]
    raise VerificationError(f"node %{node.name} ({node.op} {node.target}) has no shape metadata")


def infer_meta(node: Node, mode: Any = None) -> Any:
    """Compute ``node.meta["val"]`` by running its target on the operands' fake values."""
    gm = node.graph.owning_module
    mode = mode or fake_mode(gm)
    if node.op == "get_attr":
        node.meta.pop("val", None)
        return _fake_of(node, mode)
    if node.op != "call_function":
        raise VerificationError(f"cannot infer metadata of {node.op} node %{node.name}")
    args = map_arg(node.args, lambda a: _fake_of(a, mode))
    kwargs = map_arg(node.kwargs, lambda a: _fake_of(a, mode))
    with mode:
        if node.target is torch.ops.aten.linear.default:
            # Built from the shapes: torch 2.11's linear decomposes into a matmul that calls
            # numel() on symbolic sizes and fails; the result's shape is all we need.
            x, w = args[0], args[1]
            node.meta["val"] = x.new_empty((*x.shape[:-1], w.shape[0]))
        else:
            node.meta["val"] = node.target(*args, **kwargs)  # type: ignore[operator]
    return node.meta["val"]


def _get_attr(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def meta_val(node: object) -> torch.Tensor | None:
    """The tensor metadata (``meta["val"]``) of a node; None for non-nodes and non-tensors."""
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def is_call(node: object, target: object) -> bool:
    """Whether ``node`` is a ``call_function`` node of ``target`` (anything else, non-nodes included: False)."""
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


#: The ``end`` of a slice to the end of its axis (``x[..., h:]`` traces to it).
SLICE_END = 2**63 - 1


def slice_args(node: Node) -> tuple:
    """``(dim, start, end, step)`` of an ``aten.slice.Tensor`` node, defaults filled in."""
    given = (*node.args[1:], *[None] * 4)[:4]
    dim, start, end, step = (node.kwargs.get(k, v) for k, v in zip(("dim", "start", "end", "step"), given, strict=True))
    return (0 if dim is None else dim, 0 if start is None else start, SLICE_END if end is None else end,
            1 if step is None else step)  # fmt: skip


def constant_tensor(gm: torch.nn.Module, arg: object) -> torch.Tensor | None:
    """The tensor a ``get_attr`` operand names (a weight or buffer of ``gm``); None for anything else."""
    if not (isinstance(arg, Node) and arg.op == "get_attr"):
        return None
    obj: Any = gm
    for part in str(arg.target).split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, torch.Tensor) else None


# --------------------------------------------------------------------------------------
# Printer
# --------------------------------------------------------------------------------------


class _SymbolNamer:
    def __init__(self, mapping: dict[str, str]) -> None:
        self.mapping = dict(mapping)
        self.pattern = re.compile(r"\b[su]\d+\b")

    def __call__(self, expr: object) -> str:
        text = str(expr)
        return self.pattern.sub(lambda m: self.mapping.get(m.group(0), m.group(0)), text)


def _format_val(val: Any, sym: _SymbolNamer) -> str:
    if isinstance(val, torch.Tensor):
        return f"{dtype_name(val.dtype)}[{', '.join(sym(s) for s in val.shape)}]"
    if isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return f"sym({sym(val)})"
    if isinstance(val, (list, tuple)):
        return "(" + ", ".join(_format_val(v, sym) for v in val) + ")"
    if val is None:
        return "none"
    return type(val).__name__


def _format_arg(arg: Any, sym: _SymbolNamer) -> str:
    if isinstance(arg, Node):
        return f"%{arg.name}"
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_format_arg(a, sym) for a in arg)
        return f"[{inner}]"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k}: {_format_arg(v, sym)}" for k, v in arg.items()) + "}"
    if isinstance(arg, torch.dtype):
        return dtype_name(arg)
    if isinstance(arg, float):
        return repr(arg)
    if isinstance(arg, torch.device):
        return f'"{arg.type}"'
    if isinstance(arg, torch.Tensor):
        return f"tensor<{_format_val(arg, sym)}>"
    return sym(repr(arg)) if isinstance(arg, (torch.SymInt, torch.SymFloat)) else repr(arg)


def op_name(node: Node) -> str:
    """Readable name of a node's operation: ``aten.linear``, ``kiln.attention``, ``getitem``."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        overload = target._overloadname
        base = target._schema.name.split("::")[-1]
        return f"{ns}.{base}" + ("" if overload == "default" else f".{overload}")
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}"
    if callable(target):
        mod = getattr(target, "__module__", "") or ""
        name = getattr(target, "__name__", repr(target))
        return name if mod in ("_operator", "operator", "builtins") else f"{mod.split('.')[-1]}.{name}"
    return str(target)


def provenance(node: Node) -> str:
    """Where a node came from: module path, user source line, and the pass that created it."""
    parts: list[str] = []
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path and not path.startswith("_"):
            parts.append(path)
    trace = node.meta.get("stack_trace")
    if trace:
        files = [f for f in re.findall(r'File "([^"]+)", line (\d+)', trace) if not f[0].startswith(_TORCH_DIR)]
        if files:
            file, line = files[-1]
            parts.append(f"{os.path.basename(file)}:{line}")
    made_by = node.meta.get(PASS_KEY)
    if made_by:
        parts.append(f"[{made_by}]")
    return " ".join(parts)


def print_ir(gm: GraphModule, *, show_provenance: bool = True, title: str = "graph") -> str:
    """The stable text form of a graph: one line per node, weights summarized.

    Example line::

        %linear = aten.linear(%mul_4, %q_proj_weight) : f32[1, T, 32]  # model.layers.0.q_proj linear.py:134
    """
    sym = _SymbolNamer(gm.meta.get(SYMBOLS_KEY, {}))
    lines: list[str] = []
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    weights = [n for n in gm.graph.nodes if n.op == "get_attr"]
    sig = ", ".join(f"%{n.name}: {_format_val(n.meta.get('val'), sym)}" for n in inputs)
    lines.append(f"{title}({sig}) {{")
    numel = 0
    by_dtype: dict[str, int] = {}
    for n in weights:
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            numel += val.numel()
            key = dtype_name(val.dtype)
            by_dtype[key] = by_dtype.get(key, 0) + val.numel() * val.element_size()
    dtypes = ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(by_dtype.items()))
    lines.append(f"  // weights: {len(weights)} tensors, {numel:,} elements ({dtypes or 'none'})")
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            lines.append(f"  return {_format_arg(n.args[0], sym)}")
            continue
        val = _format_val(n.meta.get("val"), sym)
        if n.op == "get_attr":
            body = f'%{n.name} = weight "{n.target}" : {val}'
        elif n.op == "call_module":
            args = ", ".join(_format_arg(a, sym) for a in n.args)
            body = f"%{n.name} = module {n.target}({args})"
        else:
            args = [_format_arg(a, sym) for a in n.args]
            args += [f"{k}={_format_arg(v, sym)}" for k, v in n.kwargs.items()]
            body = f"%{n.name} = {op_name(n)}({', '.join(args)}) : {val}"
        prov = provenance(n) if show_provenance else ""
        lines.append(f"  {body}" + (f"  # {prov}" if prov else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def node_counts(gm: GraphModule) -> dict[str, int]:
    """Count of call_function nodes by op name (``aten.linear: 7``), for summaries and tests."""
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_function":
            counts[op_name(n)] = counts.get(op_name(n), 0) + 1
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------------------
# Verifier
# --------------------------------------------------------------------------------------

_NO_VALUE_OK = {"output", "call_module"}


def _returns_nothing(node: Node) -> bool:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return len(target._schema.returns) == 0
    return False


def verify(gm: GraphModule) -> None:
    """Check the IR's invariants; raise :class:`kiln.VerificationError` naming the node.

    Checks: the FX graph is well formed (every operand is defined earlier in this graph,
    no dangling uses), every value-producing node has shape metadata, every ``get_attr``
    names an existing tensor, and every kiln op satisfies its declared invariants.
    """
    try:
        gm.graph.lint()
    except RuntimeError as e:
        raise VerificationError(f"malformed graph: {e}") from e
    seen: set[Node] = set()
    for n in gm.graph.nodes:
        for used in n.all_input_nodes:
            if used not in seen:
                raise VerificationError(f"%{n.name} uses %{used.name}, which is not defined before it")
            if n not in used.users:
                raise VerificationError(f"%{n.name} uses %{used.name} but is missing from its users")
        seen.add(n)
        if n.op == "get_attr":
            try:
                value = _get_attr(gm, str(n.target))
            except AttributeError as e:
                raise VerificationError(f"%{n.name} reads missing attribute {n.target!r}") from e
            if not isinstance(value, torch.Tensor):
                raise VerificationError(f"%{n.name} reads {n.target!r}, which is not a tensor")
        if n.op not in _NO_VALUE_OK and "val" not in n.meta and not _returns_nothing(n):
            raise VerificationError(f"%{n.name} ({op_name(n)}) has no shape metadata (meta['val'])")
        if n.op == "call_function" and is_kiln_op(n.target):
            check = INVARIANTS.get(n.target)
            reason = check(n) if check else None
            if reason:
                raise VerificationError(f"%{n.name} ({op_name(n)}): {reason}  # {provenance(n)}")


# --------------------------------------------------------------------------------------
# networkx view
# --------------------------------------------------------------------------------------


def to_networkx(gm: GraphModule) -> nx.DiGraph:
    """A ``networkx.DiGraph`` of the IR: one vertex per node (by name), edges operand -> user.

    Vertex attributes: ``op`` (FX opcode), ``target`` (op name), ``shape``, ``dtype``,
    ``numel`` and ``module`` (the nn.Module path it came from), for partitioning and cost models.
    """
    g = nx.DiGraph()
    for n in gm.graph.nodes:
        val = n.meta.get("val")
        is_t = isinstance(val, torch.Tensor)
        stack = n.meta.get("nn_module_stack")
        g.add_node(
            n.name,
            op=n.op,
            target=op_name(n) if n.op == "call_function" else str(n.target),
            shape=tuple(val.shape) if is_t else None,
            dtype=val.dtype if is_t else None,
            numel=val.numel() if is_t else 0,
            module=list(stack.values())[-1][0] if stack else "",
        )
        for used in n.all_input_nodes:
            g.add_edge(used.name, n.name)
    return g


def iter_ops(gm: GraphModule, targets: Iterable[object]) -> list[Node]:
    """The call_function nodes whose target is one of ``targets``, in graph order."""
    wanted = set(targets)
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in wanted]


__all__ = [
    "PASS_KEY",
    "SLICE_END",
    "SYMBOLS_KEY",
    "constant_tensor",
    "meta_val",
    "dtype_name",
    "fake_mode",
    "infer_meta",
    "is_call",
    "iter_ops",
    "node_counts",
    "op_name",
    "print_ir",
    "provenance",
    "slice_args",
    "to_networkx",
    "verify",
]
