"""``to_mlir``: the compiled graph as MLIR text, through torch-mlir's FX importer.

The rewritten graph (after kiln's pipeline) is re-exported with ``torch.export``; every
``kiln::`` op is replaced by its plain-torch reference (``kiln.ops.<name>_reference``),
added to torch-mlir's decomposition table, so MLIR sees standard ATen ops only;
``torch_mlir.fx.export_and_import`` decomposes, imports and lowers it to the requested dialect:
``torch`` (torch-mlir's value-semantic Torch dialect), ``linalg`` (linalg-on-tensors),
``stablehlo`` or ``tosa`` (https://github.com/llvm/torch-mlir). The token axis stays dynamic
except for TOSA, whose lowering needs static shapes (the captured example length is used).

torch-mlir is the optional ``mlir`` extra (``pip install 'kiln[mlir]'``); without it
``to_mlir`` raises :class:`kiln.ExportError` saying so.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from kiln import ops
from kiln.errors import ExportError
from kiln.ops import is_kiln_op

if TYPE_CHECKING:
    from kiln.compile import CompiledModel

#: kiln's dialect names -> torch-mlir output types.
DIALECTS = {"torch": "torch", "linalg": "linalg-on-tensors", "stablehlo": "stablehlo", "tosa": "tosa"}

#: Dialects whose lowering needs static shapes.
_STATIC_ONLY = {"tosa"}

INSTALL_HINT = "pip install 'kiln[mlir]'  (or: pip install torch-mlir)"


def reference_decompositions(gm: torch.fx.GraphModule) -> dict[Any, Any]:
    """kiln op overload -> its plain-torch reference, for every kiln op in ``gm``."""
    table: dict[Any, Any] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not is_kiln_op(node.target) or node.target in table:
            continue
        name = node.target._schema.name.split("::")[-1]
        reference = getattr(ops, f"{name}_reference", None)
        if reference is None:
            from kiln.ir import provenance

            raise ExportError(
                f"kiln::{name} (node %{node.name}  # {provenance(node)}) has no plain-torch reference "
                f"kiln.ops.{name}_reference to lower to MLIR"
            )
        table[node.target] = reference
    return table


def to_mlir(compiled: CompiledModel, dialect: str = "torch", *, elide_weights: bool = True) -> str:
    """The compiled graph as MLIR text in ``dialect`` (``torch``, ``linalg``, ``stablehlo``, ``tosa``).

    ``elide_weights`` prints weights as ``dense_resource<__elided__>`` instead of hex blobs.
    """
    if dialect not in DIALECTS:
        raise ExportError(f"unknown MLIR dialect {dialect!r}; choose one of {', '.join(DIALECTS)}")
    try:
        from torch_mlir import fx
    except ImportError as e:
        raise ExportError(f"to_mlir needs torch-mlir, which is not installed: {INSTALL_HINT}") from e
    from kiln.backends.onnx.prepare import flat_copy

    captured = compiled.capture
    gm = flat_copy(compiled.graph_module, captured.constants)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    args = tuple(captured.inputs[n] for n in names)
    shapes = None
    if dialect not in _STATIC_ONLY and captured.dynamic_shapes:
        shapes = tuple(dict(captured.dynamic_shapes[n]) if n in captured.dynamic_shapes else None for n in names)
    table = {**fx.get_decomposition_table(), **reference_decompositions(gm)}
    try:
        ep = torch.export.export(gm, args, dynamic_shapes=shapes, strict=False)
    except Exception as e:
        raise ExportError(f"re-exporting the compiled graph for MLIR failed: {e}") from e
    try:
        module = fx.export_and_import(ep, output_type=DIALECTS[dialect], func_name="main", decomposition_table=table)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"torch-mlir could not lower the graph to {dialect}: {first}") from e
    limit = 16 if elide_weights else None
    return module.operation.get_asm(large_elements_limit=limit, large_resource_limit=limit)


__all__ = ["DIALECTS", "INSTALL_HINT", "reference_decompositions", "to_mlir"]
