"""Text in and out of the engine: the tokenizer, prompts as token ids, incremental detokenization."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kiln.errors import ConfigError
from kiln.runtime.request import Request
from kiln.runtime.stop import StopMatch, find_stop_string

Prompt = str | Sequence[int]


class TextState(Protocol):
    """What :func:`detokenize` keeps per request (the engine's ``_Sequence``)."""

    request: Request
    text: str  # detokenized output so far
    prefix_offset: int  # tokens before this are settled text ...
    read_offset: int  # ... and text up to this token has been emitted


def load_tokenizer(tokenizer: Any, source: object) -> Any:
    """``tokenizer`` itself, or the ``transformers`` tokenizer of its path (default: ``source``'s
    ``tokenizer.json``); None when there is none and none was asked for."""
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    path = tokenizer or source
    if path is None or not (Path(str(path)) / "tokenizer.json").exists():
        if tokenizer is not None:
            raise ConfigError(f"no tokenizer.json in {path}")
        return None
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(path))


def tokenize_prompt(prompt: Prompt, tokenizer: Any, vocab: int | None) -> tuple[list[int], str | None]:
    """A prompt's token ids (checked against the vocabulary) and its text, when given as text."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ConfigError(
                "this LLM has no tokenizer: pass prompts as lists of token ids, or give tokenizer="
            )
        return list(tokenizer.encode(prompt)), prompt
    arr = prompt.flatten().cpu().numpy() if isinstance(prompt, torch.Tensor) else np.asarray(prompt)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise ConfigError(
            f"a prompt is a string or a flat sequence of int token ids, got {type(prompt).__name__} "
            f"of {arr.dtype} with shape {arr.shape}"
        )
    if arr.size and (int(arr.min()) < 0 or (vocab is not None and int(arr.max()) >= vocab)):
        raise ConfigError(
            f"prompt token ids must be in [0, {vocab}) (the vocabulary)"
            if vocab is not None
            else "prompt token ids must not be negative"
        )
    return arr.astype(np.int64).tolist(), None


def detokenize(seq: TextState, tokenizer: Any) -> StopMatch | None:
    """Extend ``seq.text`` with the new tokens' text; the stop string it now holds, if any (text cut there).

    Incremental (as HF's streamers and vLLM do): only a window of recent tokens is decoded
    each step, and text is held back while it ends in an incomplete UTF-8 character, so the
    cost per token stays constant.
    """
    if tokenizer is None:
        return None
    request, ids = seq.request, seq.request.output_token_ids
    before = len(seq.text)
    decode = tokenizer.decode
    prefix = decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
    full = decode(ids[seq.prefix_offset :], skip_special_tokens=True)
    if len(full) > len(prefix) and not full.endswith("\ufffd"):
        seq.text += full[len(prefix) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
    stops = request.sampling_params.stop
    if not stops:
        return None
    match = find_stop_string(seq.text, stops, new_text_len=len(seq.text) - before)
    if match is not None:
        seq.text = seq.text[: match.index]
    return match


__all__ = ["Prompt", "detokenize", "load_tokenizer", "tokenize_prompt"]
