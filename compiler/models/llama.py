"""Llama: a decoder-only transformer with RMSNorm, rotary positions, SwiGLU and grouped-query attention.

Implements the architecture of Touvron et al. 2023, "LLaMA: Open and Efficient Foundation
Language Models" (arXiv:2302.13971) and "Llama 2" (arXiv:2307.09288), with grouped-query
attention (Ainslie et al. 2023, arXiv:2305.13245), rotary position embeddings (Su et al. 2021,
arXiv:2104.09864) and Llama 3.1's "llama3" RoPE frequency scaling.

Numerics follow Hugging Face's ``transformers.LlamaForCausalLM`` exactly (RMSNorm in fp32 then
cast back, the ``rotate_half`` convention, cos/sin in fp32 then cast), and ``state_dict()`` keys
equal Hugging Face's, so checkpoints load without renaming.

The forward pass is written to be captured by ``torch.export`` with a dynamic token axis: no
Python branches on sizes, and RoPE cos/sin are computed from ``position_ids`` and the
``inv_freq`` buffer instead of slicing a precomputed max-length table.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError

# Hugging Face's LlamaConfig defaults, used for keys a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Llama3RopeScaling:
    """Llama 3.1 RoPE frequency scaling (``rope_scaling = {"rope_type": "llama3", ...}`` in HF configs)."""

    factor: float  # low frequencies are divided by this (8 for Llama-3.1, 32 for Llama-3.2)
    low_freq_factor: float = 1.0  # wavelengths above original_max / low_freq_factor are fully scaled
    high_freq_factor: float = 4.0  # wavelengths below original_max / high_freq_factor are left alone
    original_max_position_embeddings: int = 8192  # context length the model was pre-trained with

    def __post_init__(self) -> None:
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"rope_scaling.high_freq_factor ({self.high_freq_factor}) must be greater than "
                f"low_freq_factor ({self.low_freq_factor})"
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Llama3RopeScaling:
        rope_type = d.get("rope_type", d.get("type"))
        if rope_type != "llama3":
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not supported by kiln's Llama; supported: 'llama3' "
                "(or no rope_scaling). Load the model with transformers and pass the module to kiln.compile."
            )
        if d.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("partial_rotary_factor != 1.0 is not supported by kiln's Llama")
        try:
            return cls(
                factor=float(d["factor"]),
                low_freq_factor=float(d.get("low_freq_factor", 1.0)),
                high_freq_factor=float(d.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(d.get("original_max_position_embeddings", 8192)),
            )
        except KeyError as e:
            raise ConfigError(f"rope_scaling of type 'llama3' needs the key {e.args[0]!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"rope_type": "llama3", **dataclasses.asdict(self)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Shapes and constants of a Llama model, with Hugging Face's field names.

    ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads``
    to ``num_attention_heads``; both are resolved in ``__post_init__``.
    """

    model_type: ClassVar[str] = "llama"
    architecture: ClassVar[str] = "LlamaForCausalLM"

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # < num_attention_heads means grouped-query attention
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Llama3RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"LlamaConfig.{name} must be a positive int, got {value!r}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); change one of them or set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(
                f"head_dim must be a positive even number (RoPE rotates pairs), got {self.head_dim}"
            )
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads}); choose a divisor such as "
                f"{_divisors(self.num_attention_heads)}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported by kiln's Llama; use 'silu'")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.max_position_embeddings <= 0:
            raise ConfigError(f"max_position_embeddings must be > 0, got {self.max_position_embeddings}")
        if isinstance(self.rope_scaling, Mapping):  # an HF-style dict
            object.__setattr__(self, "rope_scaling", Llama3RopeScaling.from_dict(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Build from a Hugging Face ``config.json`` dict; keys kiln does not use are ignored.

        Reads RoPE settings from either the legacy ``rope_theta`` + ``rope_scaling`` keys or
        transformers 5's ``rope_parameters``.
        """
        model_type = d.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ConfigError(f"LlamaConfig.from_dict got model_type {model_type!r}, expected 'llama'")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in d and f.name not in ("rope_scaling", "rope_theta"):
                kw[f.name] = d[f.name]
        for k, v in _HF_DEFAULTS.items():
            kw.setdefault(k, v)
        rope = d.get("rope_parameters")
        scaling = d.get("rope_scaling")
        if rope is not None:  # transformers >= 5
            kw["rope_theta"] = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                scaling = rope
            elif rope.get("partial_rotary_factor", 1.0) != 1.0:
                raise ConfigError("partial_rotary_factor != 1.0 is not supported by kiln's Llama")
        elif "rope_theta" in d:
            kw["rope_theta"] = float(d["rope_theta"])
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "default":
            kw["rope_scaling"] = Llama3RopeScaling.from_dict(scaling)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (legacy RoPE keys, read by transformers 4.x and 5.x)."""
        d: dict[str, Any] = {"model_type": self.model_type, "architectures": [self.architecture]}
        for f in dataclasses.fields(self):
            d[f.name] = getattr(self, f.name)
        d["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_dict()
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        return d


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def compute_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """RoPE inverse frequencies, shape ``(head_dim // 2,)`` fp32; applies llama3 scaling if configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
    )
    s = config.rope_scaling
    if s is None:
        return inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), computed in fp32 and cast back, as in HF."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for the given positions: ``position_ids (B, T) -> cos, sin (B, T, D)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", compute_inv_freq(config), persistent=False)

    def reset_inv_freq(self, device: torch.device | str) -> None:
        """Recompute ``inv_freq`` (fp32) on ``device``, e.g. after building on the meta device."""
        self.inv_freq = compute_inv_freq(self.config, device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (HF's convention: halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x (B, H, T, D)`` by ``cos, sin (B, T, D)``."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.n_heads, self.n_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads < self.n_heads
        )  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder stack without the LM head (HF's ``LlamaModel``, prefix ``model.``)."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, T, D)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama with an LM head: ``forward(input_ids (B, T), position_ids (B, T) | None) -> logits (B, T, V)``."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when ``config.tie_word_embeddings`` (call after reloading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self) -> None:
        """Recompute non-persistent buffers (RoPE ``inv_freq``) on the parameters' device."""
        self.model.rotary_emb.reset_inv_freq(self.model.embed_tokens.weight.device)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Number of distinct parameters (a tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.model.embed_tokens.weight.numel() if exclude_embeddings else n

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)  # (1, T)
        x = self.model(input_ids, position_ids)  # (B, T, C)
        return self.lm_head(x)  # (B, T, V)


__all__ = [
    "Llama3RopeScaling",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "RotaryEmbedding",
    "apply_rotary",
    "compute_inv_freq",
    "rotate_half",
]
