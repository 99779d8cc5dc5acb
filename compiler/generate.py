"""kiln's eager generation loop: the oracle every other generator is checked against.

No KV cache: each step runs the model on the whole sequence so far and takes the last
position's logits, so it depends on nothing but the model's forward. Greedy decoding takes
the argmax; sampling applies temperature, top-k and top-p (Holtzman et al. 2020, "The
Curious Case of Neural Text Degeneration", arXiv:1904.09751) in Hugging Face's order and
draws from one ``torch.Generator`` seeded by ``seed``, one ``multinomial`` per step for the
whole batch, so another generator with the same logits and seed draws the same tokens
(:class:`kiln.backends.onnx.OrtGenerator` uses :func:`sample_next` too).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

from kiln.errors import ConfigError


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0 (use do_sample=False for greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1] or None, got {top_p}")


def sample_next(
    logits: Tensor,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens (B,) int64 from last-position logits (B, V): argmax, or a filtered draw."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    _check_sampling(temperature, top_k, top_p)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p  # the low tail holding at most 1 - top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _logits_fn(model: Any) -> Any:
    """A function ``ids (B, T) -> logits (B, T, V)`` for a CompiledModel, a kiln model or an HF model."""
    from kiln.compile import CompiledModel

    if isinstance(model, CompiledModel):
        names = model.capture.inputs

        def run_compiled(ids: Tensor) -> Any:
            kwargs: dict[str, Tensor] = {}
            if "position_ids" in names:
                kwargs["position_ids"] = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
            if "attention_mask" in names:
                kwargs["attention_mask"] = torch.ones_like(ids)
            rows = [model(input_ids=ids[b : b + 1], **{k: v[b : b + 1] for k, v in kwargs.items()})
                    for b in range(ids.shape[0])]  # the capture's batch axis is static
            return torch.cat([_logits_of(r) for r in rows], 0)

        return run_compiled
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"generate takes a torch.nn.Module or a kiln CompiledModel, got {type(model).__name__}")
    params = inspect.signature(model.forward).parameters
    extra = {"use_cache": False} if "use_cache" in params else {}
    return lambda ids: _logits_of(model(input_ids=ids, **extra))


def _logits_of(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ConfigError(f"cannot find logits in the model output of type {type(out).__name__}")


@torch.no_grad()
def generate(
    model_or_compiled: Any,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> Tensor:
    """Prompt plus up to ``max_new_tokens`` generated tokens, (B, T + n) int64.

    Each step recomputes the whole sequence. Rows that emit ``eos_token_id`` are padded with
    it until every row has; generation stops early when all have.
    """
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if do_sample:
        _check_sampling(temperature, top_k, top_p)
    logits_of = _logits_fn(model_or_compiled)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    ids = input_ids.long()
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    for _ in range(max_new_tokens):
        last = logits_of(ids)[:, -1, :].cpu()  # (B, V)
        nxt = sample_next(last, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                          generator=generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        ids = torch.cat([ids, nxt.to(ids.device)[:, None]], dim=1)
        if eos_token_id is not None and bool(done.all()):
            break
    return ids


__all__ = ["generate", "sample_next"]
