"""Persistent rank processes driven from one Python process (vLLM's executor split, kept small).

A :class:`WorkerGroup` spawns one process per rank; they join one ``torch.distributed`` group
(NCCL on GPUs, Gloo on CPUs) and wait for commands on a pipe. The driver sends every rank the
same command, the ranks run their shards in lockstep (their collectives meet), and rank 0's
answer comes back. Two users:

- :class:`ParallelCompiledModel`, what ``kiln.compile(..., parallel=...)`` returns outside
  ``torchrun``: each rank compiles its shard of the graph and runs it on every call;
- :class:`ParallelModelRunner`, ``kiln.LLM(..., tensor_parallel_size=n, pipeline_parallel_size=p)``'s
  model runner: each rank compiles the sharded step graph (under pipeline parallelism: one
  stage of it) and keeps the paged KV cache of its own heads (and layers); the scheduler,
  the sampler and detokenization stay in the driver.
"""

from __future__ import annotations

import traceback
from multiprocessing.connection import wait
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._pytree import tree_map

from kiln.errors import ConfigError, KilnError
from kiln.parallel.config import ParallelConfig
from kiln.parallel.launch import default_backend, free_port, setup_rank


def _to(x: Any, device: torch.device | str) -> Any:
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, x)


class _Rank:
    """What one worker process holds: its compiled shard or its model runner."""

    def __init__(self, rank: int, world: int, device_type: str) -> None:
        self.rank, self.world = rank, world
        self.device = torch.device(f"cuda:{rank}") if device_type == "cuda" else torch.device("cpu")
        self.compiled: Any = None
        self.runner: Any = None

    def compile(self, model: torch.nn.Module, args: Any, kwargs: Any, config: Any) -> None:
        import kiln

        model = model.to(self.device)
        self.compiled = kiln.compile(model, _to(args, self.device), _to(kwargs, self.device), config=config)

    def call(self, args: Any, kwargs: Any) -> Any:
        with torch.no_grad():
            out = self.compiled(*_to(args, self.device), **_to(kwargs, self.device))
        return _to(out, "cpu") if self.rank == 0 else None

    def ir(self) -> str:
        return str(self.compiled.ir)

    def stats(self) -> dict[str, dict[str, float]]:
        return dict(self.compiled.stats)

    def runner_init(self, model: torch.nn.Module, block_size: int, num_blocks: int | None,
                    kv_cache_memory: int | None, config: Any, kv_cache_dtype: Any) -> tuple[int, Any]:  # fmt: skip
        from kiln.runtime.model_runner import ModelRunner

        runner_cls: Any = ModelRunner
        if config.parallel.pipeline_parallel_size > 1:  # this rank's stage and its layers' caches
            from kiln.runtime.pipeline_runner import PipelineStageRunner

            runner_cls = PipelineStageRunner
        quant = {} if kv_cache_dtype in (None, "auto") else {"kv_cache_dtype": kv_cache_dtype}
        self.runner = runner_cls(model.to(self.device), block_size=block_size, num_blocks=num_blocks,
                                 kv_cache_memory=kv_cache_memory, device=self.device, compile_config=config,
                                 **quant)  # fmt: skip
        return self.runner.num_blocks, self.runner.layout

    def execute(self, steps: Any, output_rank: int = 0) -> torch.Tensor | None:
        logits = self.runner.execute(steps)
        return logits.cpu() if self.rank == output_rank else None


def _serve(rank: int, world: int, port: int, backend: str, device_type: str, conn: Any) -> None:
    """A worker's loop: run each (method, args) the driver sends, answer ("ok", value) or ("error", traceback)."""
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        setup_rank(rank, world, port, backend, device_type)
        state = _Rank(rank, world, device_type)
        conn.send(("ok", None))
        while True:
            msg = conn.recv()
            if msg is None:
                break
            method, args = msg
            try:
                conn.send(("ok", getattr(state, method)(*args)))
            except Exception as e:  # noqa: BLE001 - the driver re-raises it
                conn.send(("error", (type(e).__name__, str(e), traceback.format_exc())))
    except (EOFError, KeyboardInterrupt):
        pass
    except Exception:  # noqa: BLE001
        conn.send(("error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _rank_error(rank: int, world: int, what: str, value: Any) -> Exception:
    """A rank's failure for the driver: kiln's own errors (a bad config, a pass that cannot apply) keep their
    type and message; anything else is a KilnError carrying the rank's traceback."""
    from kiln import errors

    if isinstance(value, tuple):
        name, message, trace = value
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, errors.KilnError):
            return cls(f"(rank {rank} of {world}, {what}) {message}")
        value = trace
    return KilnError(f"rank {rank} of {world} failed in {what!r}:\n{value}")


class WorkerGroup:
    """``world_size`` rank processes in one process group, commanded in lockstep."""

    def __init__(self, world_size: int, device_type: str = "cpu", backend: str | None = None) -> None:
        if device_type == "cuda" and torch.cuda.device_count() < world_size:
            raise ConfigError(f"{world_size} ranks need {world_size} GPUs, this machine has {torch.cuda.device_count()}")
        ctx = torch.multiprocessing.get_context("spawn")
        port, backend = free_port(), backend or default_backend(device_type)
        self.world_size = world_size
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        for r in range(world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(r, world_size, port, backend, device_type, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self._gather("start")

    def call(self, method: str, *args: Any) -> list[Any]:
        """Run ``method(*args)`` on every rank; return the ranks' results in rank order."""
        if not self.conns:
            raise KilnError("this worker group is closed")
        for c in self.conns:
            c.send((method, args))
        return self._gather(method)

    def _gather(self, what: str) -> list[Any]:
        out: dict[int, Any] = {}
        pending = dict(enumerate(self.conns))
        while pending:
            ready = wait(list(pending.values()), timeout=5.0)
            if not ready:
                dead = [r for r in pending if not self.procs[r].is_alive()]
                if dead:
                    self.close()
                    raise KilnError(f"rank {dead[0]} died during {what!r} (exit code {self.procs[dead[0]].exitcode})")
                continue
            for c in ready:
                r = self.conns.index(c)
                try:
                    status, value = c.recv()
                except EOFError:
                    self.close()
                    raise KilnError(f"rank {r} died during {what!r}") from None
                if status != "ok":
                    self.close()  # the other ranks may wait in a collective forever: stop them all
                    raise _rank_error(r, self.world_size, what, value)
                out[r] = value
                del pending[r]
        return [out[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop every rank."""
        for c in self.conns:
            try:
                c.send(None)
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
        self.conns, self.procs = [], []

    def __del__(self) -> None:
        if getattr(self, "procs", None):
            self.close()


def _device_type(model: torch.nn.Module) -> str:
    param = next(model.parameters(), None)
    return param.device.type if param is not None else "cpu"


class ParallelCompiledModel:
    """A model compiled for ``ParallelConfig`` and run by one worker process per rank.

    Called like the model; inputs go to every rank, the output comes from rank 0 on the
    inputs' device. ``ir(rank)`` and ``stats(rank)`` show a rank's shard. ``close()`` (or
    leaving a ``with`` block) stops the workers.
    """

    def __init__(self, model: torch.nn.Module, example_inputs: Any, example_kwargs: Any, config: Any) -> None:
        parallel: ParallelConfig = config.parallel
        self.config = config
        self.group = WorkerGroup(parallel.world_size, _device_type(model))
        cpu = {k: _to(v, "cpu") for k, v in (example_kwargs or {}).items()}
        self.group.call("compile", model, _to(example_inputs, "cpu"), cpu, config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        device = next((t.device for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)),
                      torch.device("cpu"))  # fmt: skip
        out = self.group.call("call", _to(args, "cpu"), _to(kwargs, "cpu"))[0]
        return _to(out, device)

    def ir(self, rank: int = 0) -> str:
        """The printed IR of ``rank``'s shard."""
        return self.group.call("ir")[rank]  # type: ignore[no-any-return]

    def stats(self, rank: int = 0) -> dict[str, dict[str, float]]:
        """Per-pass statistics of ``rank``'s compile."""
        return self.group.call("stats")[rank]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.group.close()

    def __enter__(self) -> ParallelCompiledModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ParallelModelRunner:
    """:class:`kiln.runtime.model_runner.ModelRunner`'s interface over tensor- and pipeline-parallel ranks.

    Each rank compiles the paged step graph of its shard (the kv-cache pass runs after
    sharding, so a rank's cache holds its own kv heads) and allocates its cache; under
    pipeline parallelism each rank keeps one stage of it and the caches of that stage's
    layers (:class:`kiln.runtime.pipeline_runner.PipelineStageRunner`). ``execute`` sends the
    step to every rank and returns the logits of the first shard of the last stage (the LM
    head's all-gather gives every shard the full vocabulary).
    """

    def __init__(self, model: torch.nn.Module, *, tensor_parallel_size: int, block_size: int, num_blocks: int | None = None,
                 kv_cache_memory: int | None = None, device: torch.device | str | None = None,
                 kv_cache_dtype: Any = None, pipeline_parallel_size: int = 1, compile_config: Any = None) -> None:  # fmt: skip
        import dataclasses

        import kiln

        device = torch.device(device) if device is not None else next(model.parameters()).device
        parallel = ParallelConfig(tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size)
        # every rank compiles the same step graph (e.g. with compile_config's weight quantization), then its shard
        if compile_config is not None and not compile_config.kv_cache:
            raise ConfigError("the model runner's compile_config needs kv_cache=True")
        base = compile_config if compile_config is not None else kiln.CompileConfig(kv_cache=True)
        config = dataclasses.replace(base, parallel=parallel)
        self.output_rank = parallel.world_size - tensor_parallel_size  # shard 0 of the last stage
        self.group = WorkerGroup(parallel.world_size, device.type)
        infos = self.group.call("runner_init", model, block_size, num_blocks, kv_cache_memory, config, kv_cache_dtype)
        if len({blocks for blocks, _ in infos}) != 1:  # the scheduler's block ids must mean the same on every rank
            self.close()
            raise KilnError(f"the ranks' caches hold different block counts: {[b for b, _ in infos]}")
        self.num_blocks, self.layout = infos[0]
        self.block_size = block_size
        self.device = torch.device("cpu")  # where logits arrive: the driver samples on the CPU
        self.tensor_parallel_size = tensor_parallel_size
        self.pipeline_parallel_size = pipeline_parallel_size

    def execute(self, steps: list[Any]) -> torch.Tensor:
        """Run one step on every rank; the logits of each sequence's last ``num_logits`` tokens."""
        if not steps:
            raise ConfigError("execute needs at least one sequence")
        return self.group.call("execute", steps, self.output_rank)[self.output_rank]  # type: ignore[no-any-return]

    def close(self) -> None:
        self.group.close()


__all__ = ["ParallelCompiledModel", "ParallelModelRunner", "WorkerGroup"]
