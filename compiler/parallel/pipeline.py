"""Pipeline execution: one stage per rank, micro-batches moved with torch.distributed P2P.

Every rank of a pipeline group holds one :class:`kiln.parallel.stages.StageGraph` of a
:class:`~kiln.parallel.stages.PipelinePlan` (``split-pipeline-stages``) and runs the actions
its :mod:`schedule <kiln.parallel.schedule>` lists, in that order:

- ``F(i)``: receive micro-batch i's boundary values from the previous rank (``irecv``,
  posted one forward ahead so the transfer overlaps compute), run the stage graph, send
  its outputs to the next rank (``isend``; kept until released). The last rank keeps the
  model's outputs.
- ``B(i)``: release micro-batch i: wait for the next rank's release message (the last rank
  releases at once), finish and free the sends of i, tell the previous rank.

All ranks are given every micro-batch's user inputs (the step metadata), as vLLM broadcasts
them; only computed activations travel. Receivers size their buffers from the symbolic
shapes of the plan and the sizes of the inputs, so no shape message is sent. Gloo carries
CPU tensors (activations on a GPU are staged through host memory), NCCL GPU tensors.

Timing: each rank records (action, start, end) of its computations. With a
:class:`VirtualClock` (``kiln``'s design for measuring a schedule when ranks share one
device), a rank computes only while holding a file lock, so its compute time is its
uncontended time (on a CPU shared with other work, optionally its thread's CPU time), and it
keeps a virtual clock: a computation starts at
``max(clock, arrival of its inputs)``, an arrival is the sender's virtual send time plus
``bytes / link_bandwidth + latency``; send times travel with the messages. The timeline
is then the one p dedicated devices would show for the same durations and dependencies.

Example (``torchrun --nproc-per-node 2 script.py``; every rank compiles and splits alike)::

    rank, world = kiln.parallel.init_distributed()
    compiled = kiln.compile(model, {"input_ids": ids, "position_ids": pos})
    plan = kiln.parallel.split_pipeline_stages(compiled.graph_module, world).for_rank(rank)
    outputs, stats = PipelineExecutor(plan, device=f"cuda:{rank}").run(microbatches, "1f1b")
    # outputs: the model's outputs per micro-batch on the last rank, None on the others
"""

from __future__ import annotations

import fcntl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from kiln.errors import ConfigError
from kiln.parallel.schedule import Schedule, get_schedule
from kiln.parallel.stages import PipelinePlan

Inputs = Mapping[str, Any]


@dataclass
class VirtualClock:
    """Per-rank virtual time for ranks that share a device (see the module docstring)."""

    lock_path: str  # file locked while computing, shared by all ranks of the device
    link_bandwidth: float = 450e9  # bytes/s of the modelled link between neighbouring stages
    latency: float = 5e-6  # seconds per message on the modelled link
    cpu_time: bool = False  # time computations by this thread's CPU time (CPU ranks with one thread each)
    now: float = 0.0  # this rank's virtual time

    def arrival(self, sent_at: float, nbytes: int) -> float:
        return sent_at + nbytes / self.link_bandwidth + self.latency


@dataclass
class RunStats:
    """What one :meth:`PipelineExecutor.run` did on this rank."""

    events: list[tuple[str, float, float]] = field(default_factory=list)  # (action, start, end) computed
    peak_in_flight: int = 0  # most micro-batches computed here and not yet released
    busy: float = 0.0  # seconds computing


def _to_mapping(plan: PipelinePlan, inputs: Inputs | Sequence[Any]) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    if len(inputs) != len(plan.input_names):
        raise ConfigError(f"a micro-batch has {len(inputs)} inputs; the graph takes {list(plan.input_names)}")
    return dict(zip(plan.input_names, inputs, strict=True))


class PipelineExecutor:
    """Runs this rank's stage of ``plan`` under a schedule (see the module docstring).

    Args:
        plan: the partitioned graph (every rank builds the same plan).
        group: the pipeline process group (default: the world); group rank s runs stage s.
        device: where the stage computes (default: CPU).
        clock: measure with a virtual clock (ranks sharing one device), or None for wall time.
    """

    def __init__(
        self,
        plan: PipelinePlan,
        *,
        group: Any = None,
        device: torch.device | str | None = None,
        clock: VirtualClock | None = None,
    ) -> None:
        if not dist.is_initialized():
            raise ConfigError(
                "pipeline execution needs torch.distributed: launch with torchrun or kiln.parallel.launch.launch"
            )
        self.group = group or dist.group.WORLD
        size = dist.get_world_size(self.group)
        if size != plan.num_stages:
            raise ConfigError(f"the plan has {plan.num_stages} stages but the process group has {size} ranks")
        self.plan = plan
        self.index = dist.get_rank(self.group)
        self.stage = plan.stages[self.index]
        self.device = torch.device(device or "cpu")
        self.stage.gm.to(self.device)
        self.first, self.last = self.index == 0, self.index == plan.num_stages - 1
        self.prev = None if self.first else dist.get_global_rank(self.group, self.index - 1)
        self.next = None if self.last else dist.get_global_rank(self.group, self.index + 1)
        self.wire = torch.device("cpu") if dist.get_backend(self.group) == "gloo" else self.device
        self.clock = clock
        self._lock = open(clock.lock_path, "a+") if clock else None  # noqa: SIM115 - held for the executor's life

    # -- communication -----------------------------------------------------------------

    def _post_recv(self, inputs: Inputs) -> tuple[list[torch.Tensor], list[Any]]:
        bindings = self.plan.bindings(inputs)
        bufs = [
            torch.empty(v.concrete_shape(bindings), dtype=v.dtype, device=self.wire) for v in self.stage.recv
        ]
        if self.clock:
            stamp = torch.zeros(1, dtype=torch.float64, device=self.wire)  # the sender's virtual send time
            bufs.append(stamp)
        return bufs, [dist.irecv(b, src=self.prev, group=self.group) for b in bufs]

    def _send(
        self, values: Sequence[torch.Tensor], dst: int, stamp: float
    ) -> tuple[list[torch.Tensor], list[Any]]:
        wire = [v.detach().to(self.wire).contiguous() for v in values]
        if self.clock:
            wire.append(torch.tensor([stamp], dtype=torch.float64, device=self.wire))
        return wire, [dist.isend(t, dst=dst, group=self.group) for t in wire]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _compute(self, label: str, ready: float, fn: Callable[[], Any], stats: RunStats) -> Any:
        """Run ``fn`` and record it (virtual clock: exclusively, from ``max(clock, ready)``)."""
        if self.clock is None:
            start = time.perf_counter()
            out = fn()
            self._sync()
            end = time.perf_counter()
        else:
            fcntl.flock(self._lock, fcntl.LOCK_EX)
            try:
                self._sync()
                timer = time.thread_time if self.clock.cpu_time else time.perf_counter
                t0 = timer()
                out = fn()
                self._sync()
                took = timer() - t0
            finally:
                fcntl.flock(self._lock, fcntl.LOCK_UN)
            start = max(self.clock.now, ready)
            end = self.clock.now = start + took
        stats.events.append((label, start, end))
        stats.busy += end - start
        return out

    # -- prefill: GPipe / 1F1B -----------------------------------------------------------

    @torch.no_grad()
    def run(
        self, microbatches: Sequence[Inputs | Sequence[Any]], schedule: str | Schedule = "1f1b"
    ) -> tuple[list[Any] | None, RunStats]:
        """Run every micro-batch through the pipeline; the last rank gets their outputs (others: None)."""
        sched = get_schedule(schedule)
        mbs = [_to_mapping(self.plan, mb) for mb in microbatches]
        order = sched.order(self.index, self.plan.num_stages, len(mbs))
        forwards = [a.microbatch for a in order if a.kind == "F"]
        stats = RunStats()
        posted: dict[int, tuple[list[torch.Tensor], list[Any]]] = {}
        sending: dict[int, tuple[list[torch.Tensor], list[Any]]] = {}
        acks: list[Any] = []
        outputs: dict[int, Any] = {}
        live = 0
        if self.clock:
            self.clock.now = 0.0
        for a in order:
            if a.kind == "F":
                i = a.microbatch
                received: list[torch.Tensor] = []
                ready = 0.0
                if not self.first:
                    bufs, works = posted.pop(i) if i in posted else self._post_recv(mbs[i])
                    for w in works:
                        w.wait()
                    if self.clock:
                        nbytes = sum(b.numel() * b.element_size() for b in bufs[:-1])
                        ready = self.clock.arrival(float(bufs[-1].item()), nbytes)
                        bufs = bufs[:-1]
                    received = [b.to(self.device) for b in bufs]
                    k = forwards.index(i) + 1  # post the next forward's receive before computing
                    if k < len(forwards) and forwards[k] not in posted:
                        posted[forwards[k]] = self._post_recv(mbs[forwards[k]])
                sent, outs = self._compute(str(a), ready, lambda: self.stage(mbs[i], received), stats)  # noqa: B023
                stamp = self.clock.now if self.clock else 0.0
                if self.last:
                    outputs[i] = self.plan.outputs(outs)
                else:
                    sending[i] = self._send(sent, self.next, stamp)  # (buffers, works), freed at release
                live += 1
                stats.peak_in_flight = max(stats.peak_in_flight, live)
            else:  # B: release
                i = a.microbatch
                if not self.last:
                    ack = torch.zeros(1, dtype=torch.float64, device=self.wire)
                    dist.recv(ack, src=self.next, group=self.group)
                    if self.clock:
                        self.clock.now = max(self.clock.now, self.clock.arrival(float(ack.item()), 8))
                    for w in sending.pop(i)[1]:
                        w.wait()
                if not self.first:
                    stamp = torch.tensor(
                        [self.clock.now if self.clock else 0.0], dtype=torch.float64, device=self.wire
                    )
                    acks.append((stamp, dist.isend(stamp, dst=self.prev, group=self.group)))
                live -= 1
        for _, w in acks:
            w.wait()
        for _, works in sending.values():
            for w in works:
                w.wait()
        return ([outputs[i] for i in range(len(mbs))] if self.last else None), stats

    # -- decode: independent request groups interleaved --------------------------------

    @torch.no_grad()
    def interleave(
        self,
        group_sizes: Sequence[int],
        num_steps: int,
        step_inputs: Callable[[int, int, torch.Tensor | None], Inputs],
        sample: Callable[[int, int, Any], torch.Tensor],
    ) -> tuple[dict[tuple[int, int], torch.Tensor], RunStats]:
        """Decode independent request groups for ``num_steps`` steps, interleaved round robin.

        Group g samples ``group_sizes[g]`` tokens per step (one per sequence).
        ``step_inputs(g, k, tokens)`` builds step k's user inputs on every rank from the
        tokens group g sampled at step k - 1 (None at step 0); ``sample(g, k, outputs)``
        picks the next tokens on the last rank, which sends them to every other rank (the
        next step's metadata, as a driver broadcasts it). Returns, on every rank, the
        tokens sampled by (group, step) (steps that no later step needs: last rank only).
        """
        if self.clock is not None:
            raise ConfigError("the virtual clock times prefill schedules (run); decode runs in wall time")
        from kiln.parallel.schedule import InterleavedDecode

        order = InterleavedDecode(num_steps).order(self.index, self.plan.num_stages, len(group_sizes))
        stats = RunStats()
        tokens: dict[tuple[int, int], torch.Tensor] = {}
        pending: list[Any] = []
        src = dist.get_global_rank(self.group, self.plan.num_stages - 1)
        for a in order:
            g, k = a.microbatch, a.step
            prev: torch.Tensor | None = None
            if k > 0 and self.last:
                prev = tokens[(g, k - 1)]
            elif k > 0:  # the tokens group g sampled at step k - 1, from the last rank
                buf = torch.empty(group_sizes[g], dtype=torch.int64, device=self.wire)
                dist.recv(buf, src=src, group=self.group)
                prev = tokens[(g, k - 1)] = buf.to(self.device)
            inputs = step_inputs(g, k, prev)
            received: list[torch.Tensor] = []
            if not self.first:
                bufs, works = self._post_recv(inputs)
                for w in works:
                    w.wait()
                received = [b.to(self.device) for b in bufs]
            sent, outs = self._compute(str(a), 0.0, lambda: self.stage(inputs, received), stats)  # noqa: B023
            if not self.last:
                wire, works = self._send(sent, self.next, 0.0)
                pending += [*works, *wire]  # buffers stay alive until their sends complete
                continue
            new = sample(g, k, self.plan.outputs(outs)).to(torch.int64).reshape(-1)
            if new.numel() != group_sizes[g]:
                raise ConfigError(
                    f"sample returned {new.numel()} tokens for group {g} of {group_sizes[g]} sequences"
                )
            tokens[(g, k)] = new
            if k + 1 < num_steps:
                wire = new.to(self.wire).contiguous()
                for r in range(self.plan.num_stages - 1):
                    pending.append(
                        dist.isend(wire, dst=dist.get_global_rank(self.group, r), group=self.group)
                    )
                    pending.append(wire)  # keep the buffer alive until the send completes
        for w in pending:
            if not isinstance(w, torch.Tensor):
                w.wait()
        return tokens, stats


__all__ = ["PipelineExecutor", "RunStats", "VirtualClock"]
