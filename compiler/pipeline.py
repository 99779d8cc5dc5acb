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


#: Step-graph passes to leave out when inductor compiles the graph (``kiln.LLM(torch_compile=True)``): it fuses
#: these ops with their neighbours itself, and an opaque kiln kernel would stop it.
INDUCTOR_FUSES = (
    "lower-rms-norm", "fuse-add-rms-norm", "lower-rotary", "fuse-rotary-pairs", "fuse-rotary-table", "fuse-silu-mul",
)


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
    quant = config.quant
    if quant is not None and (quant.weights is not None or quant.activations is not None):
        # Phase 3: Q/DQ insertion (with calibration and the PTQ method), qlinear lowering
        from kiln.passes.insert_qdq import InsertQDQ
        from kiln.passes.lower_qdq import LowerQDQ

        passes += [InsertQDQ(quant), LowerQDQ(), EliminateDeadCode()]
    par = config.parallel
    if par is not None and par.tensor_parallel_size > 1:  # Phase 4: shard for this rank, before the KV cache
        from kiln.parallel.groups import tp_group_name
        from kiln.passes.shard_tensor_parallel import ShardTensorParallel

        if par.context_parallel_size > 1:
            from kiln.errors import ConfigError

            raise ConfigError("tensor parallelism combined with context parallelism is not implemented yet")
        tp, rank = par.tensor_parallel_size, par.tp_rank_of(config.rank or 0)  # its stage's group under PP
        passes += [ShardTensorParallel(tp, rank, tp_group_name(par, config.rank or 0)), EliminateDeadCode()]
        if par.sequence_parallel:
            from kiln.passes.sequence_parallel import SequenceParallel

            passes += [SequenceParallel(tp, rank), EliminateDeadCode()]
    if config.kv_cache:
        # Phase 4: one linear per input (Q/K/V, gate/up) in the runtime's step graph: after quantization
        # (plain linears only) and sharding (each rank merges its shards), so decode runs one bigger GEMV
        # instead of three / two. Not in other graphs: the merged weights are new tensors, so a graph
        # that trains (QAT, distillation) would no longer reach the model's parameters.
        from kiln.passes.merge_parallel_linears import MergeParallelLinears

        passes += [MergeParallelLinears()]
    kv_quant = quant.kv_cache if quant is not None else None
    if config.kv_cache:  # Phase 4: the paged KV cache, quantized by QuantConfig.kv_cache (int8 / fp8)
        from kiln.passes.kv_cache import PageKVCache

        calibration = quant.calibration if quant is not None else None
        passes += [PageKVCache(kv_quant=kv_quant, calibration=calibration), EliminateDeadCode()]
        if par is not None and par.tensor_parallel_size > 1:
            from kiln.passes.shard_tensor_parallel import SelectLogitsBeforeGather

            passes += [SelectLogitsBeforeGather(), EliminateDeadCode()]
        # 16-bit linears on CUDA -> kiln.gemv: a split-K GEMV where it beats cuBLAS at decode (timed per shape)
        from kiln.passes.lower_decode_linears import LowerDecodeLinears

        passes += [LowerDecodeLinears()]
        # op-by-op RMSNorms on CUDA -> kiln.rms_norm: one kernel per norm instead of six to eight
        from kiln.passes.lower_rms_norm import LowerRMSNorm

        passes += [LowerRMSNorm()]
        # each residual add that a lowered norm reads joins the norm's kernel (kiln.add_rms_norm)
        from kiln.passes.fuse_add_rms_norm import FuseAddRMSNorm

        passes += [FuseAddRMSNorm()]
        # op-by-op rotary embeddings on CUDA -> kiln.rotary: one kernel per tensor instead of five
        from kiln.passes.lower_rotary import LowerRotary

        passes += [LowerRotary()]
        # a layer's query and key rotations on one table -> kiln.rotary_pair: one launch instead of two
        from kiln.passes.fuse_rotary_pairs import FuseRotaryPairs

        passes += [FuseRotaryPairs()]
        # the rotary cos / sin tables from the position ids on CUDA -> kiln.rotary_table: one kernel instead of seven
        from kiln.passes.fuse_rotary_table import FuseRotaryTable

        passes += [FuseRotaryTable()]
        # the gated MLP's silu(gate) * up on CUDA -> kiln.silu_mul: one kernel instead of two
        from kiln.passes.fuse_silu_mul import FuseSiluMul

        passes += [FuseSiluMul()]
    elif kv_quant is not None:
        from kiln.errors import ConfigError

        raise ConfigError(
            "QuantConfig.kv_cache quantizes the paged KV cache: compile with CompileConfig(kv_cache=True, ...) "
            "(kiln.LLM does), or leave kv_cache=None"
        )
    if par is not None and par.context_parallel_size > 1:  # Phase 4: ring attention over the token axis
        from kiln.parallel.ring_attention_pass import ContextParallelAttention

        passes += [ContextParallelAttention()]
    passes += config.extra_passes
    if par is not None and par.pipeline_parallel_size > 1:  # Phase 4, last: cut the final graph into stages
        from kiln.parallel.stages_cost import decode_cost_model
        from kiln.passes.split_pipeline_stages import SplitPipelineStages

        cost = decode_cost_model() if config.kv_cache else None  # the step graph: balanced for decode
        passes += [SplitPipelineStages(par.pipeline_parallel_size, cost_model=cost)]
    return passes


def pass_names(config: CompileConfig) -> list[str]:
    """Names of the pipeline's passes, in order."""
    return [p.name for p in build_pipeline(config)]


__all__ = ["INDUCTOR_FUSES", "build_pipeline", "pass_names"]
