"""Load and save kiln models as Hugging Face-format folders (``config.json`` + safetensors).

Implements the on-disk layout of Hugging Face ``transformers``' ``save_pretrained`` /
``from_pretrained`` for the ``llama`` and ``gpt2`` model types: ``config.json``,
``model.safetensors`` or sharded ``model-0000i-of-0000n.safetensors`` with a
``model.safetensors.index.json`` weight map, and tied LM heads stored once. Weights are read
with ``safetensors`` only, never from pickles (``pytorch_model.bin``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from kiln.errors import ConfigError, UnsupportedModelError
from kiln.models.gpt2 import GPT2Config, GPT2LMHeadModel
from kiln.models.llama import LlamaConfig, LlamaForCausalLM

# model_type -> (config class, model class)
ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "gpt2": (GPT2Config, GPT2LMHeadModel),
}

# GPT-2 weights HF stores as Conv1D (in, out); kiln's nn.Linear wants (out, in).
_GPT2_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_from_hf(key: str, t: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    if not key.startswith(("transformer.", "lm_head.")):
        key = "transformer." + key  # original OpenAI-converted checkpoints have no prefix
    if key.endswith((".attn.bias", ".attn.masked_bias")):
        return None, t  # causal-mask buffers some checkpoints carry
    if key.endswith(_GPT2_CONV1D):
        t = t.t()
    return key, t


def _gpt2_to_hf(key: str, t: torch.Tensor) -> torch.Tensor:
    return t.t() if key.endswith(_GPT2_CONV1D) else t


def _llama_from_hf(key: str, t: torch.Tensor) -> tuple[str | None, torch.Tensor]:
    if key.endswith("rotary_emb.inv_freq"):
        return None, t  # old checkpoints saved the RoPE buffer; kiln recomputes it
    return key, t


_FROM_HF: dict[str, Callable[[str, torch.Tensor], tuple[str | None, torch.Tensor]]] = {
    "llama": _llama_from_hf,
    "gpt2": _gpt2_from_hf,
}
_TO_HF: dict[str, Callable[[str, torch.Tensor], torch.Tensor]] = {
    "llama": lambda key, t: t,
    "gpt2": _gpt2_to_hf,
}


def read_config(path: str | os.PathLike[str]) -> LlamaConfig | GPT2Config:
    """Parse ``path/config.json`` into kiln's config for its ``model_type``."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{folder} has no config.json; a Hugging Face model folder needs one")
    with open(config_file) as f:
        d = json.load(f)
    model_type = d.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{config_file} has model_type {model_type!r}; kiln's own definitions cover "
            f"{sorted(ARCHITECTURES)}. Load it with transformers "
            "(AutoModelForCausalLM.from_pretrained) and pass the module to kiln.compile."
        )
    config_cls, _ = ARCHITECTURES[model_type]
    return config_cls.from_dict(d)


def _weight_files(folder: Path) -> list[Path]:
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise ConfigError(f"{index} names shards that do not exist: {missing}")
        return files
    if (folder / "pytorch_model.bin").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise UnsupportedModelError(
            f"{folder} holds only pytorch_model.bin (a pickle); kiln loads safetensors only. Convert it once: "
            'python -c "from transformers import AutoModelForCausalLM; '
            f"AutoModelForCausalLM.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\""
        )
    raise ConfigError(f"{folder} has no model.safetensors or model.safetensors.index.json")


def _names(keys: set[str], limit: int = 8) -> str:
    names = sorted(keys)
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Load a Hugging Face-format Llama or GPT-2 folder into kiln's own model definition.

    ``dtype=None`` keeps the checkpoint's dtype; ``device=None`` means CPU. The model is built
    on the meta device and the checkpoint tensors are assigned to it, so nothing is allocated
    twice. Returns the model in eval mode.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; expected a Hugging Face model folder")
    config = read_config(folder)
    _, model_cls = ARCHITECTURES[config.model_type]
    from_hf = _FROM_HF[config.model_type]
    device = torch.device(device if device is not None else "cpu")

    with torch.device("meta"):
        model = model_cls(config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied_key = "lm_head.weight" if config.tie_word_embeddings else None

    state: dict[str, torch.Tensor] = {}
    unexpected: set[str] = set()
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for hf_key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                key, t = from_hf(hf_key, f.get_tensor(hf_key))
                if key is None or key == tied_key:
                    continue  # ignored buffers; a tied head is the embedding
                if key not in expected:
                    unexpected.add(hf_key)
                    continue
                if tuple(t.shape) != tuple(expected[key]):
                    raise ConfigError(
                        f"{file.name}: tensor {hf_key!r} has shape {tuple(t.shape)} but config.json implies "
                        f"{tuple(expected[key])}; the weights do not match the config"
                    )
                if dtype is not None and t.is_floating_point():
                    t = t.to(dtype)
                state[key] = t.to(device).contiguous()
    missing = set(expected) - set(state) - ({tied_key} if tied_key else set())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_names(unexpected)}")
        hint = ""
        if missing == {"lm_head.weight"}:
            hint = " (is tie_word_embeddings missing from config.json?)"
        raise ConfigError(
            f"the checkpoint in {folder} does not match its config.json ({config.model_type}): "
            + "; ".join(parts)
            + hint
        )
    if tied_key:
        state[tied_key] = state[_embedding_key(config)]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def _embedding_key(config: LlamaConfig | GPT2Config) -> str:
    return "transformer.wte.weight" if config.model_type == "gpt2" else "model.embed_tokens.weight"


def save_pretrained(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``config.json`` and ``model.safetensors`` so ``transformers`` can load the folder.

    A tied LM head is saved once (as the embedding), as Hugging Face does.
    """
    if not isinstance(model, LlamaForCausalLM | GPT2LMHeadModel):
        raise UnsupportedModelError(
            f"save_pretrained takes a kiln LlamaForCausalLM or GPT2LMHeadModel, got {type(model).__name__}; "
            "for a transformers model use its own model.save_pretrained(path)"
        )
    config = model.config
    to_hf = _TO_HF[config.model_type]
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if t.device.type == "meta":
            raise UnsupportedModelError(f"cannot save {key!r}: it is on the meta device (no data)")
        tensors[key] = to_hf(key, t.detach()).contiguous().cpu()

    cfg: dict[str, Any] = config.to_dict()
    cfg["dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    with open(folder / "config.json", "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


__all__ = ["ARCHITECTURES", "load_pretrained", "read_config", "save_pretrained"]
