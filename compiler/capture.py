"""Capture: a model becomes kiln IR through ``torch.export`` (non-strict).

For language models the token axis is dynamic by default (one symbol ``T`` shared by
``input_ids``, ``position_ids``, ``attention_mask`` ...), so one capture serves every
sequence length, decode's single token included. A model that cannot be exported raises
:class:`kiln.UnsupportedModelError` naming the construct, the user's source line and what
to try. The caller's model is left as it was (training flags are restored).
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import os
import re
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.export import Dim, ExportedProgram
from torch.fx import GraphModule

from kiln.errors import ConfigError, UnsupportedModelError
from kiln.ir import SYMBOLS_KEY

#: Inputs whose axis 1 is the token axis when ``dynamic="tokens"`` (the default).
TOKEN_INPUTS = ("input_ids", "position_ids", "attention_mask", "token_type_ids", "labels", "inputs_embeds")

#: The name the dynamic token dimension gets (in shapes printed by ``kiln.ir``).
TOKEN_DIM = "T"


@dataclass
class Capture:
    """A captured model: the graph passes rewrite plus what is needed to call it like the model."""

    gm: GraphModule  # the unlifted exported graph; weights are get_attr nodes
    exported: ExportedProgram  # what torch.export returned (kept for re-export and saving)
    signature: inspect.Signature  # the model's forward signature, to bind user calls
    inputs: dict[str, Any]  # captured input name -> example value (tensors and constants)
    dynamic_shapes: dict[str, Any] = field(default_factory=dict)  # name -> {axis: Dim}

    @property
    def constants(self) -> dict[str, Any]:
        """Non-tensor inputs baked into the graph (e.g. ``use_cache=False``)."""
        return {k: v for k, v in self.inputs.items() if not isinstance(v, torch.Tensor)}

    def module(self) -> GraphModule:
        """A fresh copy of the captured graph (``exported.module()``, context regions inlined) for a pipeline run."""
        gm = self.exported.module()
        _inline_context_wrappers(gm)
        return gm


def _forward_signature(model: torch.nn.Module) -> inspect.Signature:
    return inspect.signature(model.forward)


def bind_inputs(
    signature: inspect.Signature, args: tuple[Any, ...], kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """Bind a call's positional and keyword arguments to parameter names (no defaults filled)."""
    try:
        bound = signature.bind_partial(*args, **kwargs)
    except TypeError as e:
        raise ConfigError(f"inputs do not match the model's forward{signature}: {e}") from e
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif param.kind is inspect.Parameter.VAR_POSITIONAL:
            raise ConfigError(f"kiln cannot capture *{name} arguments; pass inputs by name")
        else:
            out[name] = value
    return out


def _is_hf_model(model: torch.nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _max_positions(model: torch.nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 2:
            return value
    return None


def _dynamic_shapes(
    model: torch.nn.Module, inputs: dict[str, Any], dynamic: bool | str | Mapping[str, Any] | None
) -> dict[str, Any]:
    if dynamic is None or dynamic is False:
        return {}
    if isinstance(dynamic, Mapping):
        spec: dict[str, Any] = {}
        dims: dict[str, Dim] = {}
        for name, axes in dynamic.items():
            if name not in inputs:
                raise ConfigError(f"dynamic names input {name!r}, which is not among the inputs {list(inputs)}")
            spec[name] = {int(ax): dims.setdefault(dn, Dim(dn)) for ax, dn in axes.items()}
        return spec
    if dynamic not in (True, "tokens"):
        raise ConfigError(f"dynamic must be 'tokens', True, False or a mapping, got {dynamic!r}")
    # At least one token: with T = 0 allowed, shape logic that holds for every real step (e.g. the stride
    # checks of SDPA's math backend, which fp32 grouped-query attention takes on CUDA) cannot be proven.
    tokens = Dim(TOKEN_DIM, min=1, max=_max_positions(model))
    spec = {}
    for name, value in inputs.items():
        if name in TOKEN_INPUTS and isinstance(value, torch.Tensor) and value.dim() >= 2:
            if value.shape[1] < 2:
                raise ConfigError(
                    f"example input {name!r} has {value.shape[1]} token(s); capture with at least 2 tokens "
                    "so the token axis can be dynamic (the captured graph still runs with 1 token)"
                )
            spec[name] = {1: tokens}
    return spec


def _export_dynamic_shapes(
    signature: inspect.Signature, inputs: dict[str, Any], spec: dict[str, Any]
) -> dict[str, Any] | None:
    """torch.export's form of ``spec``: inputs bound to ``**kwargs`` nest under that parameter's name."""
    if not spec:
        return None
    var_kw = next((p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD), None)
    out: dict[str, Any] = {}
    for name in inputs:
        if name in signature.parameters or var_kw is None:
            out[name] = spec.get(name)
        else:
            out.setdefault(var_kw, {})[name] = spec.get(name)
    return out


def _user_frame(exc: BaseException) -> str | None:
    """The deepest frame in the user's code (not torch, kiln or the stdlib) that led to ``exc``.

    Looks at the tracebacks of the exception chain, then at the frames torch quotes in its
    message (``File: path:line in fn, code: ...``), since non-strict export re-raises.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kiln_dirs = tuple(os.path.join(root, d) + os.sep for d in ("compiler", "passes", "backends", "runtime", "kiln"))
    skip = (os.path.dirname(torch.__file__), os.path.dirname(os.__file__), *kiln_dirs)

    def is_user(filename: str) -> bool:
        return not filename.startswith(skip) and "<" not in filename

    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in chain:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if is_user(f.filename)]
        if frames:
            f = frames[-1]
            return f'{f.filename}:{f.lineno}, in {f.name}: "{(f.line or "").strip()}"'
    for e in chain:
        quoted = re.findall(r"File: (\S+?):(\d+) in (\w+), code: ([^\n]*)", str(e))
        quoted += [(f, ln, fn, code) for f, ln, fn, code in re.findall(r'File "([^"]+)", line (\d+), in (\w+)\n\s*([^\n]*)', str(e))]
        user = [q for q in quoted if is_user(q[0])]
        if user:
            f, ln, fn, code = user[-1]
            return f'{f}:{ln}, in {fn}: "{code.strip()}"'
    return None


def _is_constraint_violation(exc: BaseException) -> bool:
    return "ConstraintViolation" in type(exc).__name__ or "Constraints violated" in str(exc)


def _explain(exc: BaseException) -> tuple[str, str]:
    """(construct, what to try) for a torch.export failure."""
    name = type(exc).__name__
    text = str(exc)
    if "GuardOnDataDependentSymNode" in name or "data-dependent" in text or "data dependent" in text:
        return (
            "data-dependent control flow (a Python branch, int() or .item() on a tensor value)",
            "replace the branch with torch.where / torch.cond, or move it out of forward()",
        )
    if _is_constraint_violation(exc) or "specialized" in text:
        return (
            "a shape that must stay dynamic was specialized to a constant (the code fixes the token count)",
            "remove size-dependent Python logic, or capture with dynamic=False for one fixed shape",
        )
    if "DynamicOutputShape" in name or "UnsupportedOperator" in name:
        return (
            f"an operator without a shape function or with a data-dependent output shape ({text.splitlines()[0]})",
            "avoid ops like nonzero/unique/masked_select in forward(), or register a fake implementation",
        )
    return (f"{name}: {text.splitlines()[0] if text else ''}", "simplify the model's forward() around that line")


def _trace_attention_backend(model: torch.nn.Module, inputs: Mapping[str, Any]) -> contextlib.AbstractContextManager:
    """The SDPA backends fake tensors may pick while tracing: only the math one for fp32 on CUDA.

    There ``scaled_dot_product_attention``'s fake kernel chooses the memory-efficient backend, whose
    alignment checks on the sequence length become guards that specialize the dynamic token axis
    (pytorch/pytorch#124502, #128385); the math backend has none. The traced op is the same
    ``aten.scaled_dot_product_attention`` either way, and kiln replaces it (``fuse-attention``).
    """
    tensors = [*model.parameters(), *(v for v in inputs.values() if isinstance(v, torch.Tensor))]
    if any(t.is_cuda for t in tensors) and any(t.dtype == torch.float32 for t in tensors if t.is_floating_point()):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def _export(
    model: torch.nn.Module, signature: inspect.Signature, inputs: dict[str, Any], spec: dict[str, Any]
) -> ExportedProgram:
    """``torch.export.export`` (non-strict) of ``model`` with the dynamic axes ``spec`` (named ``Dim`` s).

    A constraint violation is retried with the same ranges given as ``Dim.DYNAMIC`` hints, which let
    export record guards instead of proving them; the capture stands only if every axis kept its
    range (from at most 2 up to its maximum). Older torch (2.11) cannot prove some guards that hold
    for every size: transformers' ``repeat_kv`` reshape of an expanded (1, Hkv, groups, T, D) tensor
    makes ``Min(8*T, 16*T) == 8*T``, true for all T >= 0, and a named ``Dim`` then fails although
    nothing is specialized. The retry stands only if the guards export recorded hold for every size
    in the range (:func:`_guards_hold`) and axes that shared a ``Dim`` still share one symbol; a real
    specialization (the code fixing, narrowing or constraining the size) fails with the first error.
    """

    def run(dims: dict[str, Any]) -> ExportedProgram:
        return torch.export.export(
            model, (), inputs, dynamic_shapes=_export_dynamic_shapes(signature, inputs, dims), strict=False
        )

    try:
        return run(spec)
    except Exception as e:
        if not (spec and _is_constraint_violation(e)):
            raise
        first = e
    hints = {
        name: {ax: Dim.DYNAMIC(min=d.min, max=d.max) for ax, d in axes.items()} for name, axes in spec.items()
    }
    try:
        exported = run(hints)
    except Exception:
        raise first from None
    ranges = exported.range_constraints
    symbols: dict[str, set[str]] = {}  # Dim name -> the symbols its axes got
    for name, axes in spec.items():
        node = next((n for n in exported.graph.nodes if n.op == "placeholder" and n.name == name), None)
        val = node.meta.get("val") if node is not None else None
        for ax, d in axes.items():
            size = val.shape[ax] if isinstance(val, torch.Tensor) else None
            vr = ranges.get(size.node.expr) if isinstance(size, torch.SymInt) else None
            if vr is None or bool(vr.upper < d.max) or bool(vr.lower > 2):  # 2: export's 0/1 specialization
                raise first
            symbols.setdefault(d.__name__, set()).add(str(size.node.expr))  # type: ignore[union-attr]
    if any(len(group) > 1 for group in symbols.values()):  # axes one Dim tied together are no longer equal
        raise first
    if not _guards_hold(getattr(exported, "_guards_code", None) or [], spec, inputs):
        raise first
    return exported


class _Sized:
    """What a shape guard reads of an input: ``size()``, ``size(i)`` and ``shape``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def size(self, i: int | None = None) -> Any:
        return self.shape if i is None else self.shape[i]


_GUARD_CHECK_LIMIT = 1 << 17  # sizes checked one by one; a larger maximum is checked at itself too


def _guards_hold(codes: list[str], spec: dict[str, Any], inputs: dict[str, Any]) -> bool:
    """Whether every guard export recorded (``L['input_ids'].size()[1] % 2 == 0``, ...) holds for every size of
    each dynamic axis in its declared range, the other axes at their example sizes.

    A guard that reads anything but sizes, or that fails to evaluate, counts as failing. Sizes run
    from the Dim's minimum (at least 1) to its maximum, one by one up to 2^17.
    """
    if not codes:
        return True
    try:
        checks = [compile(c, "<guard>", "eval") for c in codes]
    except SyntaxError:
        return False
    shapes = {n: tuple(v.shape) for n, v in inputs.items() if isinstance(v, torch.Tensor)}
    dims: dict[str, Any] = {}
    for axes in spec.values():
        for d in axes.values():
            dims.setdefault(d.__name__, d)
    env = {"__builtins__": {}, "min": min, "max": max, "abs": abs}
    for dim_name, d in dims.items():
        lo = max(1, int(d.min) if d.min is not None else 1)
        hi = int(d.max) if d.max is not None and bool(d.max < 2**62) else None
        sizes = list(range(lo, min(hi if hi is not None else _GUARD_CHECK_LIMIT, _GUARD_CHECK_LIMIT) + 1))
        if hi is not None and hi > _GUARD_CHECK_LIMIT:
            sizes.append(hi)
        for size in sizes:
            local = {}
            for name, shape in shapes.items():
                axes = {ax: size for ax, dd in spec.get(name, {}).items() if dd.__name__ == dim_name}
                local[name] = _Sized(tuple(axes.get(i, n) for i, n in enumerate(shape)))
            try:
                if not all(eval(c, env, {"L": local}) for c in checks):  # noqa: S307 (export's own guard text)
                    return False
            except Exception:
                return False
    return True


def _inline_context_wrappers(gm: GraphModule) -> int:
    """Inline the no-grad and disabled-autocast regions that export keeps as higher-order ops.

    Export writes a ``torch.no_grad()`` block as ``wrap_with_set_grad_enabled(False, submod,
    *operands)`` and ``torch.autocast(enabled=False)`` as ``wrap_with_autocast``, each region a
    submodule that kiln's passes would not look into (transformers 5.17's rotary embedding is one,
    under torch 2.11). Inlined, the passes see plain ops: a no-grad region's outputs are detached
    (no gradient flows back through them, as in the model), a disabled autocast region runs as
    written. Regions that enable grad or autocast are left as they are. Returns how many were inlined.
    """
    hop = torch.ops.higher_order
    grad = getattr(hop, "wrap_with_set_grad_enabled", None)
    autocast = getattr(hop, "wrap_with_autocast", None)
    inlined = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is None or node.target not in (grad, autocast):
            continue
        if node.target is grad:
            enabled, sub_node, operands = node.args[0], node.args[1], node.args[2:]
        else:  # (device_type, dtype, enabled, cache_enabled, submod, *operands)
            enabled, sub_node, operands = node.args[2], node.args[4], node.args[5:]
        if enabled:
            continue
        if not all(u.op == "call_function" and u.target is operator.getitem for u in node.users):
            continue  # used whole (not through getitem): leave the region's call in place
        sub = getattr(gm, str(sub_node.target))  # type: ignore[union-attr]
        _inline_context_wrappers(sub)  # regions nested in this one first (no_grad around autocast(False))
        if any(n.op == "get_attr" for n in sub.graph.nodes):
            continue  # constants of its own, or a region left as it is: keep this one too
        env = dict(zip([n for n in sub.graph.nodes if n.op == "placeholder"], operands, strict=True))
        with gm.graph.inserting_before(node):
            out = gm.graph.graph_copy(sub.graph, env)  # type: ignore[arg-type]
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        for user in list(node.users):
            value = outs[user.args[1]]  # type: ignore[index]
            if node.target is grad and isinstance(value, torch.fx.Node):
                with gm.graph.inserting_before(user):
                    value = gm.graph.call_function(torch.ops.aten.detach.default, (value,))
                value.meta.update(user.meta)
            user.replace_all_uses_with(value)  # type: ignore[arg-type]
            gm.graph.erase_node(user)
        gm.graph.erase_node(node)
        if not sub_node.users:  # type: ignore[union-attr]
            gm.graph.erase_node(sub_node)  # type: ignore[arg-type]
            target = str(sub_node.target)  # type: ignore[union-attr]
            if not any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
                delattr(gm, target)
        inlined += 1
    if inlined:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return inlined


def capture(
    model: torch.nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    dynamic: bool | str | Mapping[str, Any] | None = "tokens",
) -> Capture:
    """Capture ``model`` with ``torch.export`` (non-strict) into kiln IR.

    Args:
        model: any ``torch.nn.Module``; kiln's models and Hugging Face causal LMs included.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of named inputs.
        example_kwargs: further named inputs.
        dynamic: ``"tokens"`` (default) makes axis 1 of token inputs dynamic; ``False`` keeps
            every shape static; a mapping ``{"input_ids": {1: "T"}}`` names dynamic axes.

    Hugging Face models get ``use_cache=False`` unless the caller passes it: kiln manages
    the KV cache itself.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"kiln.capture takes a torch.nn.Module, got {type(model).__name__}")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    kwargs = dict(example_kwargs or {})
    if isinstance(example_inputs, Mapping):
        kwargs = {**example_inputs, **kwargs}
        example_inputs = ()
    signature = _forward_signature(model)
    inputs = bind_inputs(signature, tuple(example_inputs), kwargs)
    if _is_hf_model(model) and "use_cache" in signature.parameters and "use_cache" not in inputs:
        inputs["use_cache"] = False
    dynamic_shapes = _dynamic_shapes(model, inputs, dynamic)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with _trace_attention_backend(model, inputs):
            exported = _export(model, signature, inputs, dynamic_shapes)
    except Exception as e:
        construct, hint = _explain(e)
        where = _user_frame(e)
        raise UnsupportedModelError(
            f"torch.export could not capture {type(model).__name__}: {construct}\n"
            f"  at {where or 'an unknown location (no frame in your code)'}\n"
            f"  try: {hint}"
        ) from e
    finally:
        for m, training in modes.items():
            m.training = training

    gm = exported.module()
    _inline_context_wrappers(gm)
    symbols: dict[str, str] = {}
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for name, axes in dynamic_shapes.items():
        node = placeholders.get(name)
        val = node.meta.get("val") if node is not None else None
        if isinstance(val, torch.Tensor):
            for axis, dim in axes.items():
                size = val.shape[axis]
                if isinstance(size, torch.SymInt):
                    symbols[str(size.node.expr)] = dim.__name__
    gm.meta[SYMBOLS_KEY] = symbols
    return Capture(gm=gm, exported=exported, signature=signature, inputs=inputs, dynamic_shapes=dynamic_shapes)


__all__ = ["TOKEN_DIM", "TOKEN_INPUTS", "Capture", "bind_inputs", "capture"]
