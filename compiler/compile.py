"""``kiln.compile``: capture a model, run the pipeline, lower to a backend.

The result, a :class:`CompiledModel`, is called exactly like the model (same argument
names, same output structure, Hugging Face ``ModelOutput`` included), and exposes the
rewritten IR (``.ir``), per-pass statistics (``.stats``) and dumps (``.dump(dir)``).
The caller's model is never mutated: passes build new tensors, never write old ones.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule

from kiln.backends import get_backend
from kiln.capture import Capture, bind_inputs, capture
from kiln.errors import ConfigError
from kiln.ir import SYMBOLS_KEY, node_counts, print_ir
from kiln.parallel.config import ParallelConfig
from kiln.pass_manager import Pass, PassManager, PipelineReport
from kiln.pipeline import build_pipeline
from kiln.quantize.config import QuantConfig

#: ``KILN_DEBUG=1`` turns on verification after every pass (also on in the test suite).
DEBUG = os.environ.get("KILN_DEBUG", "0") not in ("", "0")
#: ``KILN_DUMP_DIR=path`` writes IR dumps of every compile there.
DUMP_DIR = os.environ.get("KILN_DUMP_DIR") or None


@dataclass(frozen=True, kw_only=True)
class CompileConfig:
    """How ``kiln.compile`` treats a model. Derive variants with ``dataclasses.replace``."""

    backend: str = "eager"  # where the graph runs: "eager" (reference); more as they land
    dynamic: bool | str | Mapping[str, Any] | None = "tokens"  # see kiln.capture
    verify: bool | None = None  # verify the IR after every pass (None: KILN_DEBUG)
    disable: tuple[str, ...] = ()  # pass names to skip
    print_ir_after: str | tuple[str, ...] | None = None  # "all", "change" or pass names
    dump_dir: str | None = None  # write IR dumps here (None: KILN_DUMP_DIR)
    kv_cache: bool = False  # rewrite attention to a paged KV cache (the runtime's step graph)
    quant: QuantConfig | None = None  # quantize (phase 3: insert-qdq, lower-qdq); see kiln.quantize
    extra_passes: tuple[Pass, ...] = field(default=(), compare=False)  # appended to the pipeline
    parallel: ParallelConfig | None = None  # spread over ranks (phase 4: sharding, ring attention, pipeline stages)
    rank: int | None = None  # which rank's shard to build under `parallel` (None: torch.distributed's rank)

    def __post_init__(self) -> None:
        if not isinstance(self.backend, str) or not self.backend:
            raise ConfigError(f"backend must be a backend name such as 'eager', got {self.backend!r}")
        if isinstance(self.disable, str):
            raise ConfigError(f"disable takes a tuple of pass names, e.g. ({self.disable!r},)")
        if isinstance(self.print_ir_after, list):
            object.__setattr__(self, "print_ir_after", tuple(self.print_ir_after))
        for p in self.extra_passes:
            if not isinstance(p, Pass):
                raise ConfigError(f"extra_passes takes kiln Pass instances, got {type(p).__name__}")
        if self.quant is not None and not isinstance(self.quant, QuantConfig):
            raise ConfigError(f"quant takes a kiln.QuantConfig (e.g. QuantConfig.preset('w8a16')), got {self.quant!r}")
        if self.parallel is not None:
            _check_parallel(self)

    @property
    def verify_each(self) -> bool:
        """Whether the pass manager verifies after every pass."""
        return DEBUG if self.verify is None else self.verify


class CompiledModel:
    """A compiled model: called like the original, with its IR and statistics attached."""

    def __init__(self, captured: Capture, gm: GraphModule, report: PipelineReport, config: CompileConfig) -> None:
        self.capture = captured
        self.graph_module = gm
        self.report = report
        self.config = config
        self.nodes_before = len(captured.gm.graph.nodes)
        self._run = get_backend(config.backend)(gm)
        self._names = list(captured.inputs)

    # -- calling ------------------------------------------------------------------------

    def _inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        given = bind_inputs(self.capture.signature, args, kwargs)
        params = self.capture.signature.parameters
        out: dict[str, Any] = {}
        for name, example in self.capture.inputs.items():
            if name in given:
                value = given.pop(name)
            elif not isinstance(example, torch.Tensor):
                value = example
            else:
                raise ConfigError(f"missing input {name!r}: the model was compiled with it")
            if not isinstance(example, torch.Tensor) and value != example:
                raise ConfigError(
                    f"input {name}={value!r} differs from the compiled constant {name}={example!r}; "
                    "recompile with that value in example_inputs"
                )
            out[name] = value
        for name, value in given.items():
            default = params[name].default if name in params else inspect.Parameter.empty
            if value is not default and not (value is None and default is None):
                raise ConfigError(
                    f"input {name!r} was not part of the compiled call ({self._names}); "
                    "recompile with it in example_inputs"
                )
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.config.kv_cache:  # the step graph takes flat inputs: see kiln.passes.kv_cache
            if kwargs:
                raise ConfigError("a kv_cache graph takes positional inputs in layout.input_names order")
            return self._run(*args)
        return self._run(**self._inputs(args, kwargs))

    # -- inspection ---------------------------------------------------------------------

    @property
    def ir(self) -> str:
        """The printed IR of the compiled graph."""
        return print_ir(self.graph_module)

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-pass statistics and timings, keyed by pass name (later runs of a name suffixed)."""
        out: dict[str, dict[str, float]] = {}
        for r in self.report.records:
            if r.skipped:
                continue
            key = r.name if r.name not in out else f"{r.name}#{r.index}"
            out[key] = {**r.stats, "seconds": r.seconds}
        return out

    def node_counts(self) -> dict[str, int]:
        """call_function node counts by op name in the compiled graph."""
        return node_counts(self.graph_module)

    def dump(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``000_input.txt``, one ``{i:03d}_{pass}.txt`` per pass and ``index.html``.

        Re-runs the pipeline on a fresh capture with IR recording on, so the dump shows
        exactly what each pass did. Returns the directory.
        """
        from kiln.dump import write_dump

        if any(r.ir is None for r in self.report.records if not r.skipped) or self.report.input_ir is None:
            _, report = _run_pipeline(self.capture.module(), self.capture, self.config, record_ir=True)
        else:
            report = self.report
        return write_dump(Path(directory), report)

    def export_onnx(
        self, path: str | os.PathLike[str], *, opset: int | None = None, external_data: str | bool = "auto",
        validate: bool = True, **kwargs: Any,
    ) -> Any:
        """Export this compiled graph to ONNX (see :func:`kiln.backends.onnx.export_onnx`); returns the report."""
        from kiln.backends.onnx import export_onnx

        return export_onnx(self, path, opset=opset, external_data=external_data, validate=validate, **kwargs)

    def to_mlir(self, dialect: str = "torch") -> str:
        """This compiled graph as MLIR text in ``dialect`` (torch, linalg, stablehlo, tosa) via torch-mlir."""
        from kiln.backends.mlir import to_mlir

        return to_mlir(self, dialect)

    def summary(self) -> str:
        """A plain-text table: pass, changed, statistics, time, node counts."""
        from kiln.dump import summary_table

        return summary_table(self.report)

    def __repr__(self) -> str:
        ran = [r.name for r in self.report.records if not r.skipped]
        return f"CompiledModel(backend={self.config.backend!r}, passes={ran}, nodes={len(self.graph_module.graph.nodes)})"


def _dump_dir(config: CompileConfig) -> str | None:
    dump_dir = config.dump_dir or DUMP_DIR
    if dump_dir and config.parallel is not None and config.parallel.world_size > 1:
        dump_dir = str(Path(dump_dir) / f"rank{config.rank}")  # one dump per rank's shard or stage
    return dump_dir


def _run_pipeline(
    gm: GraphModule,
    captured: Capture,
    config: CompileConfig,
    *,
    record_ir: bool = False,
    on_step: Any = None,
    progress: Any = None,
) -> tuple[GraphModule, PipelineReport]:
    gm.meta[SYMBOLS_KEY] = dict(captured.gm.meta.get(SYMBOLS_KEY, {}))
    dump_dir = _dump_dir(config)
    manager = PassManager(
        build_pipeline(config),
        verify_each=config.verify_each,
        disable=config.disable,
        print_ir_after=config.print_ir_after,
        dump_dir=dump_dir,
        on_step=on_step,
        progress=progress,
        record_ir=record_ir,
    )
    return manager.run(gm)


def compile(  # noqa: A001 - the public name, as torch.compile
    model: torch.nn.Module,
    example_inputs: Any = (),
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    config: CompileConfig | None = None,
    progress: Any = None,
    parallel: ParallelConfig | None = None,
) -> CompiledModel | Any:
    """Capture ``model``, run kiln's pipeline on it and lower it to ``config.backend``.

    Args:
        model: a ``torch.nn.Module`` (kiln's models, Hugging Face causal LMs, your own).
        example_inputs: a tensor, a tuple of positional inputs or a dict of named inputs.
            For language models the token axis is dynamic: any sequence length runs later.
        example_kwargs: further named inputs.
        config: a :class:`CompileConfig`; defaults to ``CompileConfig()``.
        progress: optional callback receiving each pass's name as it starts (the CLI's display).
        parallel: a :class:`kiln.ParallelConfig` (same as ``config.parallel``). In a process of a
            ``torch.distributed`` group (``torchrun``, :func:`kiln.parallel.launch`) the result is
            this rank's shard (``config.rank`` picks another for inspection); in a single process,
            a :class:`kiln.parallel.worker.ParallelCompiledModel` whose spawned ranks hold the shards.
            Under ``pipeline_parallel_size`` or ``context_parallel_size`` it is this rank's
            :class:`kiln.parallel.compiled.PipelineCompiledModel` (its stage; micro-batches of the
            example batch cut by ``num_microbatches``) or ``ContextParallelCompiledModel`` (ring
            attention over the token axis); called on every rank with the same inputs, each
            returns the model's whole output.
    """
    config = config or CompileConfig()
    if parallel is not None:
        config = replace(config, parallel=parallel)
    par = config.parallel
    if par is not None and par.world_size > 1 and config.rank is None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            from kiln.parallel.compiled import microbatch_example
            from kiln.parallel.worker import ParallelCompiledModel

            if par.pipeline_parallel_size > 1 and not config.kv_cache:  # fail here, not on every rank
                microbatch_example(example_inputs, example_kwargs, par.pipeline_parallel_size, par.num_microbatches)
            return ParallelCompiledModel(model, example_inputs, example_kwargs, config)
        if dist.get_world_size() != config.parallel.world_size:
            raise ConfigError(
                f"the process group has {dist.get_world_size()} ranks, {config.parallel} needs {config.parallel.world_size}"
            )
        config = replace(config, rank=dist.get_rank())
    get_backend(config.backend)  # fail early on an unknown backend
    if config.quant is not None:
        config.quant.check_model(model)  # group sizes, skip patterns, calibration data: fail before capture
    staged = par is not None and par.pipeline_parallel_size > 1
    if (staged or (par is not None and par.context_parallel_size > 1)) and not _in_process_group():
        raise ConfigError(
            f"rank {config.rank}'s {par} model runs with its peers: compile it in a torch.distributed process group "
            "(torchrun, kiln.parallel.launch), or leave config.rank unset to spawn the ranks"
        )
    if staged and not config.kv_cache:  # capture one micro-batch's rows (kiln.parallel.compiled)
        from kiln.parallel.compiled import microbatch_example

        example_inputs, example_kwargs, _ = microbatch_example(
            example_inputs, example_kwargs, par.pipeline_parallel_size, par.num_microbatches
        )
    if par is not None and par.world_size > 1:
        from kiln.parallel.groups import create_groups

        create_groups(par)  # collective: the tensor-parallel and pipeline groups, before the passes name them
    captured = capture(model, example_inputs, example_kwargs, dynamic=config.dynamic)
    gm = captured.module()
    gm, report = _run_pipeline(gm, captured, config, progress=progress)
    if staged or (par is not None and par.context_parallel_size > 1):
        return _parallel_model(captured, gm, report, config)
    return CompiledModel(captured, gm, report, config)


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _parallel_model(captured: Capture, gm: GraphModule, report: PipelineReport, config: CompileConfig) -> CompiledModel:
    """This rank's pipeline stage or context-parallel model (``kiln.parallel.compiled``)."""
    from kiln.parallel.compiled import ContextParallelCompiledModel, PipelineCompiledModel

    par = config.parallel
    assert par is not None
    if par.pipeline_parallel_size == 1:
        return ContextParallelCompiledModel(captured, gm, report, config)
    model = PipelineCompiledModel(captured, gm, report, config)
    dump_dir = _dump_dir(config)
    if dump_dir:
        model.write_stage(dump_dir)
    return model


def _check_parallel(config: CompileConfig) -> None:
    par = config.parallel
    if not isinstance(par, ParallelConfig):
        raise ConfigError(f"parallel takes a kiln.ParallelConfig, got {par!r}")
    if config.rank is not None and not 0 <= config.rank < par.world_size:
        raise ConfigError(f"rank must be in [0, {par.world_size}) for {par}, got {config.rank}")
    if par.context_parallel_size > 1:
        others = [n for n in ("tensor_parallel_size", "pipeline_parallel_size") if getattr(par, n) > 1]
        if others:
            raise ConfigError(f"context parallelism combined with {' or '.join(others)} > 1 is not implemented; "
                              "use context_parallel_size alone")  # fmt: skip
        if config.kv_cache:
            raise ConfigError("context parallelism splits a prefill's tokens; the paged step graph (kv_cache=True) "
                              "is not context-parallel: compile with kv_cache=False")  # fmt: skip
    if (par.context_parallel_size > 1 or par.pipeline_parallel_size > 1) and config.backend != "eager":
        raise ConfigError(f"pipeline and context parallelism run their graphs on the eager backend; "
                          f"backend={config.backend!r} is not implemented for them")  # fmt: skip
    if par.pipeline_parallel_size > 1 and par.sequence_parallel:
        raise ConfigError("sequence parallelism inside pipeline stages is not implemented; "
                          "use sequence_parallel with tensor parallelism alone")  # fmt: skip


def compile_pipeline_names(config: CompileConfig | None = None) -> Sequence[str]:
    """The names of the passes ``compile`` would run for ``config``."""
    return [p.name for p in build_pipeline(config or CompileConfig())]


__all__ = ["CompileConfig", "CompiledModel", "compile"]
