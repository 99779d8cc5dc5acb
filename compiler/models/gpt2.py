"""GPT-2: a decoder-only transformer with learned positions, pre-LayerNorm blocks and a GELU MLP.

Implements Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"
(OpenAI GPT-2), in the style of nanoGPT. Numerics follow Hugging Face's
``transformers.GPT2LMHeadModel`` (``gelu_new`` is the tanh approximation of GELU), and
``state_dict()`` keys equal Hugging Face's. One difference in storage: HF's GPT-2 uses
``Conv1D`` whose weights are ``(in, out)``; kiln uses ``nn.Linear`` (``(out, in)``), and
``kiln.models.hub`` transposes those four weights per block on load and save.

The forward pass is ``torch.export``-friendly with a dynamic token axis (no Python branches on
sizes; positions are looked up by ``position_ids``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError

# Hugging Face's GPT2Config defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257,
    "n_positions": 1024,
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}

# activation_function -> F.gelu approximation. HF's "gelu_new" and "gelu_pytorch_tanh" are both
# the tanh approximation; "gelu" is the exact erf form.
_GELU_APPROXIMATION = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}

# HF keys that change the computation; kiln supports only their default value.
_UNSUPPORTED_HF_KEYS: dict[str, Any] = {
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    """Shapes and constants of a GPT-2 model, with Hugging Face's field names.

    ``n_inner`` defaults to ``4 * n_embd`` (resolved in ``__post_init__``). Read-only aliases
    with Llama's names (``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``,
    ``num_hidden_layers``, ``head_dim``, ``max_position_embeddings``) let model-agnostic code
    size KV caches.
    """

    model_type: ClassVar[str] = "gpt2"
    architecture: ClassVar[str] = "GPT2LMHeadModel"

    vocab_size: int
    n_positions: int  # learned position table size (maximum context)
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None  # MLP inner width
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    tie_word_embeddings: bool = True
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head}); change one of them, "
                f"e.g. n_head in {[k for k in range(1, min(self.n_embd, 128) + 1) if self.n_embd % k == 0]}"
            )
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        if self.n_inner <= 0:
            raise ConfigError(f"n_inner must be a positive int or None (= 4 * n_embd), got {self.n_inner}")
        if self.activation_function not in _GELU_APPROXIMATION:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported by kiln's GPT-2; "
                f"use one of {sorted(_GELU_APPROXIMATION)}"
            )
        if self.layer_norm_epsilon <= 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")

    # Llama-style aliases.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPT2Config:
        """Build from a Hugging Face ``config.json`` dict; keys kiln does not use are ignored."""
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"GPT2Config.from_dict got model_type {model_type!r}, expected 'gpt2'")
        for key, supported in _UNSUPPORTED_HF_KEYS.items():
            if key in d and d[key] != supported:
                raise ConfigError(
                    f"GPT-2 config sets {key}={d[key]!r}; kiln's GPT-2 supports only {key}={supported!r}. "
                    "Load the model with transformers and pass the module to kiln.compile."
                )
        kw = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for k, v in _HF_DEFAULTS.items():
            kw.setdefault(k, v)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict."""
        d: dict[str, Any] = {"model_type": self.model_type, "architectures": [self.architecture]}
        d.update(dataclasses.asdict(self))
        return d


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v stacked on the output axis
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=-1)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.approximate = _GELU_APPROXIMATION[config.activation_function]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Model(nn.Module):
    """The decoder stack without the LM head (HF's ``GPT2Model``, prefix ``transformer.``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class GPT2LMHeadModel(nn.Module):
    """GPT-2 with an LM head: ``forward(input_ids (B, T), position_ids (B, T) | None) -> logits (B, T, V)``."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the token embedding with the LM head when ``config.tie_word_embeddings``."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def init_buffers(self) -> None:
        """No non-persistent buffers in GPT-2; present so every kiln model has the same interface."""

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return n

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
        x = self.transformer(input_ids, position_ids)  # (B, T, C)
        return self.lm_head(x)  # (B, T, V)


__all__ = ["GPT2Config", "GPT2LMHeadModel", "GPT2Model"]
