"""Pipeline schedules: the order of actions each stage runs, and a simulator of them.

- **GPipe** (Huang et al. 2019, arXiv:1811.06965): every micro-batch forward, then every
  backward: ``F0 F1 .. F(m-1) B0 .. B(m-1)`` on every stage (as ``torch.distributed.
  pipelining.ScheduleGPipe``). A stage holds all m micro-batches at once.
- **1F1B** (PipeDream-Flush, Narayanan et al. 2021, arXiv:2104.04473; Megatron-LM's
  schedule): stage s runs ``w = min(p - s - 1, m)`` warm-up forwards, then alternates one
  forward and one backward, then drains the remaining backwards. A stage never holds more
  than ``p - s`` micro-batches.
- **interleaved decode**: independent request groups take turns; every stage runs
  ``F(g, k)`` for step k of group g in order ``(k, g)``. The first stage needs group g's
  token from step k - 1, sampled by the last stage, so with at least p groups the ring
  stays full and no stage waits in the steady state.

Inference has no backward pass. A ``B`` action here is the *release* of a micro-batch: the
stage waits until the next stage has released it (the last stage releases as soon as it
has computed it), frees what it kept for it (its sent activations) and tells the previous
stage. That is the dependency chain of a backward pass without its compute, so the
schedules keep their defining property, the bound on micro-batches in flight, and their
order is executed as written (``kiln.parallel.pipeline``). Forward-only, GPipe and 1F1B
have the same bubble, ``(p - 1) / (m + p - 1)`` of every stage's time; 1F1B holds at most
``p - s`` micro-batches where GPipe holds ``m``.

:func:`simulate` plays an order on p virtual stages with given durations, honouring the
dependencies (forward: the previous stage's forward of the same micro-batch; release: the
next stage's release; decode: the last stage's previous step of the group) and reports the
bubble and the peak number of micro-batches in flight; it detects an order that deadlocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kiln.errors import ConfigError


@dataclass(frozen=True, order=True)
class Action:
    """One step of a stage's schedule."""

    kind: str  # "F": compute a micro-batch; "B": release it (the backward slot of a training schedule)
    microbatch: int  # micro-batch (prefill) or request group (decode) index
    step: int = 0  # decode step (0 for prefill schedules)

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}" + (f".{self.step}" if self.step else "")


class Schedule:
    """Base class: ``order(stage, num_stages, num_microbatches)`` is a stage's list of actions."""

    name = "schedule"

    def order(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        raise NotImplementedError

    @staticmethod
    def _check(stage: int, num_stages: int, num_microbatches: int) -> None:
        if num_stages < 1 or not 0 <= stage < num_stages:
            raise ConfigError(f"stage {stage} is not in 0 .. {num_stages - 1}")
        if num_microbatches < 1:
            raise ConfigError(f"num_microbatches must be positive, got {num_microbatches}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class GPipe(Schedule):
    """All forwards, then all releases (GPipe's fill, then flush)."""

    name = "gpipe"

    def order(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        self._check(stage, num_stages, num_microbatches)
        m = num_microbatches
        return [Action("F", i) for i in range(m)] + [Action("B", i) for i in range(m)]


class OneFOneB(Schedule):
    """PipeDream-Flush: ``p - s - 1`` warm-up forwards, then one forward / one release, then the drain."""

    name = "1f1b"

    def order(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        self._check(stage, num_stages, num_microbatches)
        m = num_microbatches
        warmup = min(num_stages - stage - 1, m)
        out = [Action("F", i) for i in range(warmup)]
        for i in range(m - warmup):
            out += [Action("F", warmup + i), Action("B", i)]
        out += [Action("B", i) for i in range(m - warmup, m)]
        return out


class InterleavedDecode(Schedule):
    """Decode steps of independent request groups, round robin: ``F(g, k)`` in order ``(k, g)``."""

    name = "interleaved-decode"

    def __init__(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ConfigError(f"num_steps must be positive, got {num_steps}")
        self.num_steps = num_steps

    def order(self, stage: int, num_stages: int, num_microbatches: int) -> list[Action]:
        self._check(stage, num_stages, num_microbatches)
        return [Action("F", g, k) for k in range(self.num_steps) for g in range(num_microbatches)]

    def __repr__(self) -> str:
        return f"InterleavedDecode(num_steps={self.num_steps})"


SCHEDULES: dict[str, type[Schedule]] = {"gpipe": GPipe, "1f1b": OneFOneB}


def get_schedule(schedule: str | Schedule) -> Schedule:
    """A schedule from its name (``"gpipe"``, ``"1f1b"``) or itself."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown pipeline schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[schedule]()


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """The idle fraction of a filled-then-drained pipeline with equal stages: ``(p - 1) / (m + p - 1)``."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


@dataclass
class Timeline:
    """What :func:`simulate` found."""

    events: list[list[tuple[Action, float, float]]]  # per stage: (action, start, end)
    makespan: float  # time the last action ends
    busy: list[float]  # per stage: time spent computing
    peak_in_flight: list[int]  # per stage: most micro-batches forwarded and not yet released

    @property
    def bubble(self) -> float:
        """Idle fraction over all stages: ``1 - sum(busy) / (p * makespan)``."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.makespan) if self.makespan > 0 else 0.0


def simulate(
    schedule: Schedule,
    num_stages: int,
    num_microbatches: int,
    durations: Sequence[float] | None = None,
    release_duration: float = 0.0,
) -> Timeline:
    """Play ``schedule`` on virtual stages; ``durations[s]`` is stage s's forward time (default 1)."""
    p, m = num_stages, num_microbatches
    dur = list(durations) if durations is not None else [1.0] * p
    if len(dur) != p:
        raise ConfigError(f"durations has {len(dur)} entries for {p} stages")
    orders = [schedule.order(s, p, m) for s in range(p)]
    done: dict[tuple[int, Action], float] = {}
    pos, clock = [0] * p, [0.0] * p
    events: list[list[tuple[Action, float, float]]] = [[] for _ in range(p)]
    busy, live, peak = [0.0] * p, [0] * p, [0] * p
    decode = isinstance(schedule, InterleavedDecode)

    def ready(s: int, a: Action) -> float | None:
        deps: list[tuple[int, Action]] = []
        if a.kind == "F" and s > 0:
            deps.append((s - 1, a))
        if a.kind == "F" and s == 0 and decode and a.step > 0:
            deps.append((p - 1, Action("F", a.microbatch, a.step - 1)))
        if a.kind == "B":
            deps.append((s, Action("F", a.microbatch)))
            if s < p - 1:
                deps.append((s + 1, a))
        if any(d not in done for d in deps):
            return None
        return max([clock[s], *(done[d] for d in deps)])

    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for s in range(p):
            while pos[s] < len(orders[s]):
                a = orders[s][pos[s]]
                start = ready(s, a)
                if start is None:
                    break
                end = start + (dur[s] if a.kind == "F" else release_duration)
                if a.kind == "F":
                    busy[s] += dur[s]
                    live[s] += 0 if decode else 1
                    peak[s] = max(peak[s], live[s])
                else:
                    live[s] -= 1
                events[s].append((a, start, end))
                done[(s, a)] = clock[s] = end
                pos[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {s: str(orders[s][pos[s]]) for s in range(p) if pos[s] < len(orders[s])}
            raise ConfigError(f"schedule {schedule!r} deadlocks: stages wait on {stuck}")
    return Timeline(events, max(clock), busy, peak)


__all__ = [
    "SCHEDULES",
    "Action",
    "GPipe",
    "InterleavedDecode",
    "OneFOneB",
    "Schedule",
    "Timeline",
    "bubble_fraction",
    "get_schedule",
    "simulate",
]
