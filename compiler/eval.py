"""Quality measures of causal language models on a token stream.

- :func:`perplexity`: ``exp`` of the mean next-token negative log-likelihood over
  non-overlapping windows of ``seq_len`` tokens (each window starts a fresh context), the
  usual definition (Jelinek et al., "Perplexity - a measure of the difficulty of speech
  recognition tasks", 1977; windowing as in Hugging Face's "Perplexity of fixed-length models").
- :func:`agreement`: the fraction of positions where a draft model's greedy (top-1) next
  token equals a target model's, on the same windows: the quantity that bounds greedy
  speculative decoding's acceptance rate (Leviathan et al., "Fast Inference from
  Transformers via Speculative Decoding", ICML 2023).

Both accept a model (any ``nn.Module`` whose ``forward(input_ids)`` returns logits
``(B, T, V)`` or an object with ``.logits``) and either a 1-D token tensor or a split name
of :mod:`kiln.data` (``"eval"``, ``"train"``) plus a tokenizer.

``python -m kiln.eval MODEL_DIR [--draft DRAFT_DIR]`` prints both for saved models.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kiln.errors import ConfigError

TokensOrSplit = torch.Tensor | np.ndarray | str


def logits_of(output: Any) -> torch.Tensor:
    """Logits ``(B, T, V)`` from a model's output: a tensor, or an object with ``.logits``."""
    logits = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise ConfigError(
            f"model output of type {type(output).__name__} is neither a logits tensor nor has .logits; "
            "wrap the model so forward(input_ids) returns (B, T, V) logits"
        )
    return logits


def _tokenizer_of(tokenizer: Any, model: nn.Module | None) -> Any:
    """A ``tokenizers.Tokenizer`` from a Tokenizer, an HF tokenizer, a path, or the model's folder."""
    from kiln.data.tokenizer import load_tokenizer

    if tokenizer is None and model is not None:
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or getattr(model, "name_or_path", "")
        if name and (Path(name) / "tokenizer.json").is_file():
            tokenizer = Path(name)
    if tokenizer is None:
        raise ConfigError("a split name needs a tokenizer: pass tokenizer=(folder, tokenizers.Tokenizer or HF tokenizer)")
    if isinstance(tokenizer, str | Path):
        return load_tokenizer(tokenizer)
    return getattr(tokenizer, "backend_tokenizer", tokenizer)


def resolve_tokens(data: TokensOrSplit, tokenizer: Any = None, model: nn.Module | None = None) -> torch.Tensor:
    """A 1-D int64 token stream from tokens or a :mod:`kiln.data` split name."""
    if isinstance(data, str):
        from kiln.data.corpus import load_split
        from kiln.data.tokenizer import encode_documents

        if data not in ("train", "eval"):
            raise ConfigError(f"unknown split {data!r}; use 'eval' or 'train', or pass a 1-D token tensor")
        return encode_documents(_tokenizer_of(tokenizer, model), load_split(data), progress=False)  # type: ignore[arg-type]
    tokens = torch.as_tensor(np.asarray(data, dtype=np.int64)) if isinstance(data, np.ndarray) else data
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 1:
        raise ConfigError(f"tokens must be a 1-D tensor, got {type(data).__name__} "
                          f"of shape {tuple(getattr(data, 'shape', ()))}")
    if tokens.numel() < 2:
        raise ConfigError(f"need at least 2 tokens to score next-token predictions, got {tokens.numel()}")
    return tokens.long()


def iter_windows(
    tokens: torch.Tensor, *, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping ``(inputs, targets)`` batches, each (B, T), covering every next-token
    prediction of ``tokens`` once; the last, shorter window comes alone (unless capped)."""
    if seq_len < 1 or batch_size < 1:
        raise ConfigError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    n_pred = tokens.numel() - 1
    n_full = n_pred // seq_len
    starts = torch.arange(n_full) * seq_len
    offsets = torch.arange(seq_len + 1)
    n_batches = 0
    for b in range(0, n_full, batch_size):
        if max_batches is not None and n_batches >= max_batches:
            return
        window = tokens[starts[b : b + batch_size, None] + offsets]  # (B, T + 1)
        yield window[:, :-1], window[:, 1:]
        n_batches += 1
    rest = n_pred - n_full * seq_len
    if rest and (max_batches is None or n_batches < max_batches):
        window = tokens[n_full * seq_len :][None]  # (1, rest + 1)
        yield window[:, :-1], window[:, 1:]


def _n_batches(n_tokens: int, seq_len: int, batch_size: int, max_batches: int | None) -> int:
    n_pred = n_tokens - 1
    total = math.ceil((n_pred // seq_len) / batch_size) + (1 if n_pred % seq_len else 0)
    return total if max_batches is None else min(total, max_batches)


def _device_of(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        model.to(device)
        return torch.device(device)
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@torch.no_grad()
def mean_nll(
    model: nn.Module, tokens: torch.Tensor, *, seq_len: int, batch_size: int,
    device: torch.device | str | None = None, max_batches: int | None = None, progress: bool = True,
) -> float:
    """Mean next-token negative log-likelihood (nats) of ``tokens`` (1-D) under ``model``."""
    dev = _device_of(model, device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    count = 0
    batches = iter_windows(tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches)
    try:
        for inputs, targets in tqdm(batches, total=_n_batches(tokens.numel(), seq_len, batch_size, max_batches),
                                    desc="perplexity", unit="batch", disable=not progress, leave=False):
            logits = logits_of(model(inputs.to(dev)))  # (B, T, V)
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.to(dev).flatten(), reduction="sum")
            total += nll.double()
            count += targets.numel()
    finally:
        model.train(was_training)
    return (total / count).item()


def perplexity(
    model: nn.Module, data: TokensOrSplit, *, seq_len: int = 512, batch_size: int = 8,
    device: torch.device | str | None = None, tokenizer: Any = None, max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``data``: a 1-D token tensor, or a split name with a tokenizer.

    ``device`` moves the model there (default: where its parameters are). ``max_tokens``
    scores only the stream's first tokens.
    """
    tokens = resolve_tokens(data, tokenizer, model)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    return math.exp(mean_nll(model, tokens, seq_len=seq_len, batch_size=batch_size, device=device,
                             progress=progress))


@torch.no_grad()
def agreement(
    draft: nn.Module, target: nn.Module, data: TokensOrSplit, *, seq_len: int = 512, batch_size: int = 8,
    device: torch.device | str | None = None, tokenizer: Any = None, max_tokens: int | None = None,
    progress: bool = True,
) -> float:
    """Fraction of positions where ``draft``'s top-1 next token equals ``target``'s."""
    tokens = resolve_tokens(data, tokenizer, target if tokenizer is None else None)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    dev = _device_of(target, device)
    draft.to(dev)
    modes = (draft.training, target.training)
    draft.eval()
    target.eval()
    same = torch.zeros((), dtype=torch.long, device=dev)
    count = 0
    try:
        batches = iter_windows(tokens, seq_len=seq_len, batch_size=batch_size)
        for inputs, _ in tqdm(batches, total=_n_batches(tokens.numel(), seq_len, batch_size, None),
                              desc="agreement", unit="batch", disable=not progress, leave=False):
            inputs = inputs.to(dev)
            d, t = logits_of(draft(inputs)), logits_of(target(inputs))  # (B, T, V) each
            if d.shape[-1] != t.shape[-1]:
                raise ConfigError(f"draft vocabulary {d.shape[-1]} != target vocabulary {t.shape[-1]}; "
                                  "agreement needs models sharing one tokenizer")
            same += (d.argmax(-1) == t.argmax(-1)).sum()
            count += inputs.numel()
    finally:
        draft.train(modes[0])
        target.train(modes[1])
    return same.item() / count


def load_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A saved Hugging Face-format causal LM (``config.json`` + ``model.safetensors``)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.eval MODEL [--draft DRAFT]``: perplexity on a split, and agreement."""
    parser = argparse.ArgumentParser(prog="python -m kiln.eval", description=main.__doc__)
    parser.add_argument("model", help="model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--draft", help="draft model folder: also report its perplexity and top-1 agreement")
    parser.add_argument("--split", default="eval", choices=["eval", "train"])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    target = load_model(args.model)
    tokens = resolve_tokens(args.split, args.model)
    if args.max_tokens is not None:
        tokens = tokens[: args.max_tokens]
    kw = {"seq_len": args.seq_len, "batch_size": args.batch_size, "device": args.device}
    print(f"{args.model}: {args.split} perplexity {perplexity(target, tokens, **kw):.3f} ({tokens.numel()} tokens)")
    if args.draft:
        draft = load_model(args.draft)
        print(f"{args.draft}: {args.split} perplexity {perplexity(draft, tokens, **kw):.3f}")
        print(f"top-1 agreement of draft with target: {agreement(draft, target, tokens, **kw):.4f}")
    return 0


__all__ = ["agreement", "iter_windows", "load_model", "logits_of", "mean_nll", "perplexity", "resolve_tokens"]

if __name__ == "__main__":
    raise SystemExit(main())
