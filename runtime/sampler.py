"""Token sampling: pure functions on a batch of logits, one row per request, each with its own params.

The order of filters is Hugging Face's (``generate``'s logits processors and warpers):
repetition penalty (Keskar et al. 2019, CTRL, as HF applies it), temperature, top-k,
top-p (Holtzman et al. 2020, nucleus sampling), min-p (Nguyen et al. 2024). Temperature 0
is greedy: the argmax of the penalized logits.

Random rows draw with the exponential race (the Gumbel-max trick in exponential form, as
vLLM does): ``argmax(p / q)`` with ``q ~ Exp(1)`` per vocabulary entry picks token ``i``
with probability ``p_i``. A request with a seed takes its ``q`` from a counter-based hash of
(seed, position of the token, vocabulary index) (:func:`keyed_exponential`), so its token at
each position depends on its seed and its logits there only: never on which other requests
share the batch, where its row is, how its prompt was chunked, or whether prompt-lookup
speculation verified it (a draft is kept exactly when it equals that draw).

Logprobs are the model's: ``log_softmax`` of the raw logits, before penalties and filters
(vLLM v1's default), reported for the sampled token plus the top ``k``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.runtime.request import Logprob, SamplingParams, TokenLogprobs

_GREEDY_EPS = 1e-5  # temperatures below this sample greedily (vLLM's threshold)


@dataclass(frozen=True, kw_only=True)
class LogprobsTensors:
    """Logprobs of a batch: the sampled token first, then the top ``k`` (k = the most any row asked)."""

    token_ids: Tensor  # (N, 1 + k) int64: sampled token, then the top-k token ids
    logprobs: Tensor  # (N, 1 + k) float32: their log-probabilities
    sampled_ranks: Tensor  # (N,) int64: rank of the sampled token, 1 = most likely

    def to_dicts(self, num_logprobs: Sequence[int | None]) -> list[TokenLogprobs | None]:
        """Per row, ``{token id: Logprob}`` of the sampled token and that row's top ``num_logprobs[i]``."""
        ids, lps, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.sampled_ranks.tolist()
        out: list[TokenLogprobs | None] = []
        for i, k in enumerate(num_logprobs):
            if k is None:
                out.append(None)
                continue
            d = {ids[i][0]: Logprob(lps[i][0], ranks[i])}
            for j in range(1, min(k, len(ids[i]) - 1) + 1):
                d.setdefault(ids[i][j], Logprob(lps[i][j], j))
            out.append(d)
        return out


@dataclass(frozen=True, kw_only=True)
class SamplerOutput:
    """One sampled token per row, and logprobs when any row asked for them."""

    token_ids: Tensor  # (N,) int64 sampled token per request
    logprobs: LogprobsTensors | None  # None when no row set SamplingParams.logprobs


def to_device(
    values: Sequence[object], device: torch.device | str, dtype: torch.dtype | None = None
) -> Tensor:
    """``torch.tensor(values)`` on ``device`` through pinned memory: no wait for the device's queued work.

    (A copy from pageable memory makes the host wait until the stream is idle, which would
    undo asynchronous scheduling.)
    """
    t = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The per-request generator for ``SamplingParams.seed``; keep it for the request's whole life."""
    return torch.Generator(device=device).manual_seed(seed % (1 << 64))


def apply_repetition_penalty(logits: Tensor, penalties: Tensor, seen: Sequence[Sequence[int]]) -> Tensor:
    """HF's repetition penalty: for tokens in ``seen[i]``, divide positive logits by it, multiply negative ones.

    ``logits`` (N, V) float, ``penalties`` (N,) float; rows with penalty 1 are unchanged.
    """
    n, v = logits.shape
    width = max((len(s) for s in seen), default=0)
    if width == 0:
        return logits
    ids = torch.full((n, width), v, dtype=torch.long)  # pad with an extra column, sliced off
    for i, s in enumerate(seen):
        if len(s):
            ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    mask = torch.zeros((n, v + 1), dtype=torch.bool, device=logits.device)
    mask.scatter_(1, ids.to(logits.device), True)
    mask = mask[:, :v]  # (N, V): token seen in prompt or output
    p = penalties.to(logits.device, logits.dtype)[:, None]
    penalized = torch.where(logits > 0, logits / p, logits * p)
    return torch.where(mask, penalized, logits)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Mask (to -inf) tokens outside each row's top ``top_k[i]`` and outside its nucleus ``top_p[i]``.

    ``top_k`` (N,) int64 with V meaning off; ``top_p`` (N,) float with 1 meaning off. The
    most likely token always survives.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=False)  # (N, V) ascending
    v = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (v - top_k.clamp(1, v)).unsqueeze(1))  # (N, 1) k-th largest
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        cum = probs.cumsum(dim=-1)  # ascending: mass of this token and every less likely one
        drop = cum <= (1 - top_p.to(cum.dtype)).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Mask tokens whose probability is below ``min_p[i]`` times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.to(probs.dtype).unsqueeze(1)
    return logits.masked_fill(probs < threshold, float("-inf"))


_M32 = 0xFFFFFFFF
_KEYED_ELEMENTS = 1 << 22  # keyed noise for at most this many (row, token) pairs at once: ~32 MB per temporary


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (the xor-shift-multiply mixer), on int64 tensors holding values < 2^32.

    The multiplier is below 2^27, so no product leaves int64.
    """
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    x = x ^ (x >> 16)
    x = (x * 0x45D9F3B) & _M32
    return x ^ (x >> 16)


def as_int64(seed: int) -> int:
    """``seed`` modulo 2^64 as a signed 64-bit int (any Python int is a valid seed)."""
    s = seed % (1 << 64)
    return s - (1 << 64) if s >= 1 << 63 else s


def keyed_exponential(seeds: Tensor, positions: Tensor, v: int) -> Tensor:
    """Exp(1) noise (R, V) fp32 that depends only on each row's (seed, position) and the vocabulary index.

    ``seeds``, ``positions``: (R,) int64 on the device of the result. A counter-based generator
    (a hash of the key, as Philox is a cipher of its counter): the same request and position give
    the same draw on any device, in any batch, in any step that computes it.
    """
    s, pos = seeds.long(), positions.long() & _M32
    lo, hi = _mix32(s & _M32), _mix32(((s >> 32) & _M32) ^ 0x5BD1E995)
    # two 32-bit keys per row, each mixing seed and position asymmetrically (a product, then a xor)
    k1 = _mix32(((lo * 0x2C1B3C6D) & _M32) ^ pos).unsqueeze(1)  # (R, 1); multipliers < 2^31: no int64 overflow
    k2 = _mix32(((hi * 0x297A2D39) & _M32) ^ _mix32(pos ^ 0x632BE5AB)).unsqueeze(1)
    idx = (torch.arange(v, device=seeds.device, dtype=torch.int64) * 0x9E3779B1) & _M32  # (V,) spread apart
    h = _mix32(_mix32(k1 ^ idx) ^ k2)  # (R, V) uniform 32-bit
    u = (h.double() + 0.5) * (1.0 / 4294967296.0)  # in (0, 1)
    return (-torch.log(u)).float()


def random_sample(
    probs: Tensor,
    generators: Sequence[torch.Generator | None] | None = None,
    *,
    seeds: Sequence[int | None] | None = None,
    positions: Tensor | Sequence[int] | None = None,
) -> Tensor:
    """One token per row with probability ``probs[i]``.

    Row ``i`` with ``seeds[i]`` set draws from :func:`keyed_exponential` at ``positions[i]`` (the
    index of the token it samples); else from ``generators[i]`` when given; else from the
    global generator.
    """
    q = torch.empty_like(probs)
    q.exponential_()  # unseeded rows share the global generator
    for i, g in enumerate(generators or ()):
        if g is not None and (seeds is None or seeds[i] is None):
            q[i].exponential_(generator=g)
    keyed = [i for i, sd in enumerate(seeds or ()) if sd is not None]
    if keyed:
        if positions is None:
            raise ValueError("seeded rows need the positions of the tokens they sample")
        dev = probs.device  # (host values reach the device through pinned memory: nothing waits)
        rows = to_device(keyed, dev, torch.int64)
        if isinstance(positions, Tensor):
            pos = positions.to(dev).index_select(0, rows)
        else:
            pos = to_device([positions[i] for i in keyed], dev, torch.int64)
        folded = to_device([as_int64(seeds[i]) for i in keyed], dev, torch.int64)  # type: ignore[index, arg-type]
        step = max(1, _KEYED_ELEMENTS // probs.shape[-1])  # rows at a time: bounded int64 temporaries
        for a in range(0, len(keyed), step):
            noise = keyed_exponential(folded[a : a + step], pos[a : a + step], probs.shape[-1])
            q.index_copy_(0, rows[a : a + step], noise.to(q.dtype))
    return probs.div(q.clamp_min_(torch.finfo(q.dtype).tiny)).argmax(dim=-1)


def sample(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    output_token_ids: Sequence[Sequence[int]] | None = None,
    prompt_token_ids: Sequence[Sequence[int]] | None = None,
    positions: Tensor | Sequence[int] | None = None,
) -> SamplerOutput:
    """Sample one token per row of ``logits`` (N, V) under each row's ``params``.

    ``positions[i]``: the index (in its request) of the token row i samples; with it, a row
    whose params carry a seed draws keyed noise (:func:`keyed_exponential`). Without it, a
    seeded row uses ``generators[i]`` (from :func:`make_generator`), consumed only when it
    samples randomly; None uses the global generator. ``output_token_ids`` /
    ``prompt_token_ids`` are needed only by rows with a repetition penalty. ``logits`` is
    not modified.
    """
    n, v = logits.shape
    if len(params) != n:
        raise ValueError(f"{n} rows of logits but {len(params)} SamplingParams")
    device = logits.device
    penalty = [p.repetition_penalty for p in params]
    greedy = [p.temperature < _GREEDY_EPS for p in params]
    if all(greedy) and all(r == 1.0 for r in penalty):  # the decode fast path: no float copy of the logits
        tokens = greedy_argmax(logits)
        return SamplerOutput(token_ids=tokens, logprobs=compute_logprobs(logits, tokens, params))
    x = logits.float()  # (N, V); a copy when logits were not float32
    raw = x

    if any(r != 1.0 for r in penalty):
        if output_token_ids is None or prompt_token_ids is None:
            raise ValueError("repetition_penalty needs prompt_token_ids and output_token_ids")
        seen = [
            list(prompt_token_ids[i]) + list(output_token_ids[i]) if penalty[i] != 1.0 else []
            for i in range(n)
        ]
        x = apply_repetition_penalty(x, torch.tensor(penalty), seen)

    if all(greedy):
        tokens = x.argmax(dim=-1)
    else:
        temps = to_device([1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device)
        y = x / temps.unsqueeze(1)
        top_k = [p.top_k if p.top_k > 0 else v for p in params]
        top_p = [p.top_p for p in params]
        if any(k < v for k in top_k) or any(q < 1.0 for q in top_p):
            y = apply_top_k_top_p(
                y,
                to_device(top_k, device) if any(k < v for k in top_k) else None,
                to_device(top_p, device) if any(q < 1.0 for q in top_p) else None,
            )
        if any(p.min_p > 0 for p in params):
            y = apply_min_p(y, to_device([p.min_p for p in params], device))
        gens = [
            None if g else (generators[i] if generators is not None else None) for i, g in enumerate(greedy)
        ]
        seeds = [p.seed if positions is not None and not g else None for p, g in zip(params, greedy, strict=True)]
        sampled = random_sample(y.softmax(dim=-1), gens, seeds=seeds, positions=positions)
        tokens = torch.where(to_device(greedy, device), x.argmax(dim=-1), sampled)

    return SamplerOutput(token_ids=tokens, logprobs=compute_logprobs(raw, tokens, params))


@functools.lru_cache(maxsize=64)
def _argmax_chunk(v: int) -> int:
    """The chunk width of :func:`greedy_argmax` for a vocabulary of ``v`` (0: one plain argmax)."""
    if v < 16384:
        return 0
    for c in (*range(1024, 255, -1), *range(1025, 4097)):  # a divisor of v, so no padded copy; ~1k:
        if v % c == 0:  # enough chunks to fill the device, each long enough to be one warp's work
            return c
    return 0


def greedy_argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(dim=-1)`` of (N, V) logits, in two stages when rows are few and long.

    One row of a 128k vocabulary is a single reduction that a GPU spreads poorly (about 26 us on an
    H100, as much as two decode-layer GEMVs); the maximum of each chunk of ``c`` entries first,
    then the argmax over the chunks, uses the whole device. Both stages pick the first of tied
    maxima, so the result is exactly ``argmax``'s. Comparing in the logits' own dtype is exact:
    the float conversion is monotonic.
    """
    n, v = logits.shape
    c = _argmax_chunk(v)
    if c == 0 or n > 8 or not logits.is_contiguous():
        return logits.argmax(dim=-1)
    best, where = logits.view(n, v // c, c).max(dim=-1)  # (N, V / c) maxima and their offsets
    chunk = best.argmax(dim=-1, keepdim=True)  # (N, 1): the first chunk holding the row's maximum
    return (chunk * c + where.gather(1, chunk)).squeeze(1)


def compute_logprobs(
    logits: Tensor, tokens: Tensor, params: Sequence[SamplingParams]
) -> LogprobsTensors | None:
    """Logprobs of the sampled ``tokens`` (N,) and the top-k under the raw ``logits`` (N, V)."""
    ks = [p.logprobs for p in params if p.logprobs is not None]
    if not ks:
        return None
    lp = logits.float().log_softmax(dim=-1)  # (N, V)
    sampled_lp = lp.gather(1, tokens.unsqueeze(1))  # (N, 1)
    ranks = (lp > sampled_lp).sum(dim=-1) + 1  # (N,)
    top_lp, top_ids = lp.topk(min(max(ks), lp.shape[-1]), dim=-1)  # (N, k)
    return LogprobsTensors(
        token_ids=torch.cat([tokens.unsqueeze(1), top_ids], dim=1),
        logprobs=torch.cat([sampled_lp, top_lp], dim=1),
        sampled_ranks=ranks,
    )


def processed_probs(
    logits: Tensor, params: Sequence[SamplingParams], seen: Sequence[Sequence[int]] | None = None
) -> Tensor:
    """The distribution :func:`kiln.runtime.sampler.sample` draws row i from, (N, V) fp32.

    Repetition penalty (over ``seen[i]``: prompt + output + drafts before this position),
    temperature, top-k, top-p, min-p; a greedy row (temperature 0) is the one-hot argmax of
    its penalized logits, as the sampler picks it.
    """
    n, v = logits.shape
    if len(params) != n:
        raise ValueError(f"{n} rows of logits but {len(params)} SamplingParams")
    device = logits.device
    x = logits.float()
    penalty = [p.repetition_penalty for p in params]
    if any(r != 1.0 for r in penalty):
        if seen is None:
            raise ValueError("repetition_penalty needs the seen token ids of every row")
        x = apply_repetition_penalty(
            x, torch.tensor(penalty), [seen[i] if penalty[i] != 1.0 else [] for i in range(n)]
        )
    greedy = [p.temperature < _GREEDY_EPS for p in params]
    onehot = F.one_hot(x.argmax(dim=-1), v).float()  # (N, V)
    if all(greedy):
        return onehot
    temps = torch.tensor(
        [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)], device=device
    )
    y = x / temps.unsqueeze(1)
    top_k = [p.top_k if p.top_k > 0 else v for p in params]
    top_p = [p.top_p for p in params]
    if any(k < v for k in top_k) or any(q < 1.0 for q in top_p):
        y = apply_top_k_top_p(
            y,
            torch.tensor(top_k, device=device) if any(k < v for k in top_k) else None,
            torch.tensor(top_p, device=device) if any(q < 1.0 for q in top_p) else None,
        )
    if any(p.min_p > 0 for p in params):
        y = apply_min_p(y, torch.tensor([p.min_p for p in params], device=device))
    return torch.where(torch.tensor(greedy, device=device).unsqueeze(1), onehot, y.softmax(dim=-1))


__all__ = [
    "LogprobsTensors",
    "SamplerOutput",
    "apply_min_p",
    "apply_repetition_penalty",
    "apply_top_k_top_p",
    "compute_logprobs",
    "greedy_argmax",
    "keyed_exponential",
    "make_generator",
    "processed_probs",
    "random_sample",
    "sample",
    "to_device",
]
