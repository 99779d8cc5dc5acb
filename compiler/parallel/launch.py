"""Start ranks on ``torch.distributed``: under ``torchrun``, or as processes spawned here.

NCCL on GPUs, Gloo on CPUs. Under ``torchrun`` every process runs the same script
(SPMD) and calls :func:`init_distributed`; from one Python process, :func:`launch` runs a
function on ``world_size`` spawned ranks and returns what each returned.

Every rank must call the compiled shard with the same inputs (seed the random generators
alike): the collectives combine the ranks' slices of one computation.

Example (``torchrun --nproc-per-node 2 script.py``)::

    rank, world = kiln.parallel.init_distributed()
    torch.manual_seed(0)
    compiled = kiln.compile(model, ids, parallel=kiln.ParallelConfig(tensor_parallel_size=world))
    logits = compiled(ids)  # every rank computes the same logits, each with its shard of the weights
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import queue as queue_mod
import socket
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import ConfigError, KilnError


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a local rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_backend(device_type: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(backend: str | None = None, *, device_type: str | None = None) -> tuple[int, int]:
    """Join the process group ``torchrun`` (or :func:`launch`) set up; returns ``(rank, world_size)``.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; on CUDA,
    selects the local rank's GPU. A process group that exists already is reused.
    """
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ConfigError("no torch.distributed environment: launch with torchrun, or use kiln.parallel.launch")
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", os.environ["RANK"])))
        dist.init_process_group(backend or default_backend(device_type))
    return dist.get_rank(), dist.get_world_size()


@dataclass(frozen=True)
class _FnRef:
    """A function by name and file, so spawned ranks find it even in modules not on their path (tests)."""

    module: str
    qualname: str
    file: str | None

    @staticmethod
    def of(fn: Callable[..., Any]) -> _FnRef:
        mod = sys.modules.get(fn.__module__)
        return _FnRef(fn.__module__, fn.__qualname__, getattr(mod, "__file__", None))

    def resolve(self) -> Callable[..., Any]:
        try:
            mod = importlib.import_module(self.module)
        except ImportError:
            if self.file is None:
                raise
            spec = importlib.util.spec_from_file_location(self.module, self.file)
            mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.modules[self.module] = mod
            spec.loader.exec_module(mod)  # type: ignore[union-attr]
        obj: Any = mod
        for part in self.qualname.split("."):
            obj = getattr(obj, part)
        return obj  # type: ignore[no-any-return]


def setup_rank(rank: int, world: int, port: int, backend: str, device_type: str) -> None:
    """Set the rendezvous environment of a locally spawned rank and join the process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))  # fmt: skip
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)


def _entry(rank: int, world: int, port: int, backend: str, device_type: str, ref: _FnRef, args: tuple[Any, ...],
           results: Any) -> None:  # fmt: skip
    try:
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
        setup_rank(rank, world, port, backend, device_type)
        out = ref.resolve()(rank, *args)
        results.put((rank, True, out))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any], world_size: int, *args: Any, backend: str | None = None, device_type: str = "cpu",
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned ranks in one process group; return each rank's result.

    ``fn`` must be importable (a module-level function). A failure on any rank stops every
    rank and raises :class:`kiln.KilnError` with that rank's traceback.
    """
    if world_size < 1:
        raise ConfigError(f"world_size must be positive, got {world_size}")
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    backend = backend or default_backend(device_type)
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, backend, device_type, _FnRef.of(fn), args, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    waited = 0.0
    try:
        while len(out) < world_size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_mod.Empty:
                waited += 1.0
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in out]
                if dead or waited > timeout:
                    why = f"rank {dead[0]} exited with code {procs[dead[0]].exitcode}" if dead else f"timed out after {timeout:.0f} s"
                    raise KilnError(f"parallel launch failed: {why}") from None
                continue
            if not ok:
                raise KilnError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
    finally:
        for p in procs:
            p.join(timeout=10 if len(out) == world_size else 0.1)
            if p.is_alive():
                p.terminate()
    return [out[r] for r in range(world_size)]


__all__ = ["default_backend", "free_port", "init_distributed", "launch", "setup_rank"]
