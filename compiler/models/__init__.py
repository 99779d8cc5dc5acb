"""kiln's own model definitions (Llama, GPT-2), Hugging Face-format loading/saving, and presets.

``load_model("llama-tiny")`` builds a preset with random weights; ``load_model("path/to/folder")``
loads a Hugging Face-format folder (``config.json`` + safetensors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from kiln.errors import ConfigError
from kiln.models.gpt2 import GPT2Config, GPT2LMHeadModel
from kiln.models.hub import load_pretrained, read_config, save_pretrained
from kiln.models.llama import Llama3RopeScaling, LlamaConfig, LlamaForCausalLM
from kiln.models.presets import PRESETS, from_config, from_preset


def load_model(name_or_path: str | os.PathLike[str], **kw: Any) -> nn.Module:
    """A preset name (``from_preset``) or a Hugging Face-format folder (``load_pretrained``).

    Keyword arguments go to the chosen loader (``dtype``, ``device``; ``seed`` for presets).
    """
    if Path(name_or_path).is_dir():
        return load_pretrained(name_or_path, **kw)
    if isinstance(name_or_path, str) and name_or_path in PRESETS:
        return from_preset(name_or_path, **kw)
    raise ConfigError(
        f"{str(name_or_path)!r} is neither a folder nor a preset; pass a Hugging Face-format folder "
        f"(config.json + model.safetensors) or one of the presets: {', '.join(PRESETS)}"
    )


__all__ = [
    "GPT2Config",
    "GPT2LMHeadModel",
    "PRESETS",
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "from_config",
    "from_preset",
    "load_model",
    "load_pretrained",
    "read_config",
    "save_pretrained",
]
