"""The pipeline: kiln's table of contents.

Each compile configuration maps to an ordered list of passes, grouped in phases. Reading
this file tells what ``kiln.compile`` does to a model, in order. Later issues add their
passes in the phase where they belong (fusion, quantization, runtime, parallelism).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.pass_manager import Pass

if TYPE_CHECKING:
    from kiln.compile import CompileConfig


def build_pipeline(config: CompileConfig) -> list[Pass]:
    """The ordered passes for ``config`` (before ``config.disable`` is applied)."""
    from kiln.passes.canonicalize import Canonicalize
    from kiln.passes.eliminate_common_subexpressions import EliminateCommonSubexpressions
    from kiln.passes.eliminate_dead_code import EliminateDeadCode
    from kiln.passes.fold_constants import FoldConstants
    from kiln.passes.fuse_attention import FuseAttention

    passes: list[Pass] = [
        # -- Phase 1: cleanup and normal forms. Later fusions match the canonical forms only.
        Canonicalize(),
        EliminateDeadCode(),
        FoldConstants(),
        EliminateCommonSubexpressions(),
        EliminateDeadCode(),
        # -- Phase 2: fusion (attention -> kiln::attention, norms, rotary).
        FuseAttention(), EliminateDeadCode(),
        # -- Phase 3: quantization (Q/DQ insertion, calibration, qlinear lowering).
        # -- Phase 4: runtime (paged KV cache) and parallelism (sharding, pipeline stages).
    ]
    if config.quant is not None:  # Phase 3: Q/DQ insertion (with calibration and the PTQ method), qlinear lowering
        from kiln.passes.insert_qdq import InsertQDQ
        from kiln.passes.lower_qdq import LowerQDQ

        passes += [InsertQDQ(config.quant), LowerQDQ(), EliminateDeadCode()]
    if config.kv_cache:
        from kiln.passes.kv_cache import PageKVCache

        passes += [PageKVCache(), EliminateDeadCode()]
    return [*passes, *config.extra_passes]


def pass_names(config: CompileConfig) -> list[str]:
    """Names of the pipeline's passes, in order."""
    return [p.name for p in build_pipeline(config)]


__all__ = ["build_pipeline", "pass_names"]
