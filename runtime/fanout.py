"""Several completions of one prompt (``SamplingParams(n=...)``): child requests, one merged output.

As vLLM v1 does for parallel sampling, a request with ``n > 1`` becomes ``n`` child requests
that the scheduler runs like any others; the engine reports them as one :class:`RequestOutput`
whose ``outputs`` hold completion ``i`` at index ``i``. Completion ``i`` of a seeded request
samples with seed ``seed + i``, so the completions differ and each is reproducible.

With prefix caching on, completions 1 .. n-1 are held back until completion 0's prompt has
been scheduled: they then find its full blocks in the prefix cache, so the prompt is computed
once rather than n times (the blocks' KV is written by a step queued before theirs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.runtime.request import CompletionOutput, RequestOutput, SamplingParams

#: ``add(request_id, token_ids, text, params, cache_salt)``: the engine queues one request
AddFn = Callable[[str, list[int], "str | None", SamplingParams, "str | None"], None]


@dataclass
class Held:
    """Completions of a parent not yet given to the scheduler (waiting for completion 0's prompt)."""

    first: str  # completion 0's request id
    children: list[tuple[str, SamplingParams]]  # (request id, params) of the others
    token_ids: list[int]
    text: str | None
    cache_salt: str | None


@dataclass
class _Parent:
    n: int
    latest: dict[int, CompletionOutput] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    first: RequestOutput | None = None  # completion 0's latest output (prompt, metrics)


class Fanout:
    """Which requests are completions of which parent, and their merged outputs."""

    def __init__(self) -> None:
        self.children: dict[str, tuple[str, int]] = {}  # child id -> (parent id, completion index)
        self.parents: dict[str, _Parent] = {}
        self.held: dict[str, Held] = {}  # parent id -> completions waiting for completion 0's prompt

    @staticmethod
    def child_id(parent: str, index: int) -> str:
        return f"{parent}#{index}"

    @staticmethod
    def child_params(params: SamplingParams, index: int) -> SamplingParams:
        seed = None if params.seed is None else (params.seed + index) % (1 << 64)
        return dataclasses.replace(params, n=1, seed=seed)

    def add(self, parent: str, n: int) -> list[str]:
        """Register ``parent``'s ``n`` children; their ids."""
        ids = [self.child_id(parent, i) for i in range(n)]
        self.parents[parent] = _Parent(n)
        self.children.update((c, (parent, i)) for i, c in enumerate(ids))
        return ids

    def submit(self, parent: str, params: SamplingParams, add: AddFn, abort: Callable[[str], object], *, hold: bool,
               token_ids: list[int], text: str | None, cache_salt: str | None) -> None:  # fmt: skip
        """Queue ``parent``'s ``params.n`` completions through ``add`` (all or none: ``abort`` undoes a partial
        add); with ``hold``, completion 0 alone until :meth:`release` queues the others."""
        children = self.add(parent, params.n)
        added: list[str] = []
        try:
            for i, child in enumerate(children[: 1 if hold else None]):
                add(child, token_ids, text, self.child_params(params, i), cache_salt)
                added.append(child)
        except Exception:
            for child in added:
                abort(child)
            self.forget(parent)
            raise
        if hold:
            later = [(c, self.child_params(params, i)) for i, c in enumerate(children) if i]
            self.held[parent] = Held(children[0], later, token_ids, text, cache_salt)

    def release(self, waiting: Callable[[str], bool], add: AddFn) -> None:
        """Queue the held completions of every parent whose completion 0 no longer ``waiting`` (its prompt is
        cached, or it is gone)."""
        for parent, held in list(self.held.items()):
            if waiting(held.first):
                continue
            del self.held[parent]
            for child, params in held.children:
                add(child, held.token_ids, held.text, params, held.cache_salt)

    def ids_of(self, request_id: str) -> list[str]:
        """The engine's request ids behind a user's id (its children, or itself)."""
        p = self.parents.get(request_id)
        return [self.child_id(request_id, i) for i in range(p.n)] if p is not None else [request_id]

    def forget(self, parent: str) -> None:
        self.held.pop(parent, None)
        p = self.parents.pop(parent, None)
        if p is not None:
            for i in range(p.n):
                self.children.pop(self.child_id(parent, i), None)

    def merge(self, out: RequestOutput, snapshots: bool) -> RequestOutput | None:
        """``out`` as its parent's output (None while others are unfinished and ``snapshots`` is off)."""
        hit = self.children.get(out.request_id)
        if hit is None:
            return out
        parent, index = hit
        p = self.parents[parent]
        completion = dataclasses.replace(out.outputs[0], index=index)
        p.latest[index] = completion
        if index == 0 or p.first is None:
            p.first = out
        if out.finished:
            p.done.add(index)
        finished = len(p.done) == p.n
        if not (snapshots or finished):
            return None
        first = p.first
        merged = RequestOutput(
            request_id=parent,
            prompt=first.prompt,
            prompt_token_ids=first.prompt_token_ids,
            outputs=[p.latest.get(i) or CompletionOutput(index=i, token_ids=[]) for i in range(p.n)],
            finished=finished,
            metrics=first.metrics,
        )
        if finished:
            self.forget(parent)
        return merged


__all__ = ["Fanout", "Held"]
