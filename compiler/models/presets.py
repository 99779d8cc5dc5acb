"""Named model shapes with random weights, for tests and speed figures.

The large presets copy the published shapes of Meta's Llama-3.2-1B and Llama-3.1-8B
(Grattafiori et al. 2024, "The Llama 3 Herd of Models", arXiv:2407.21783) and OpenAI's
124M GPT-2 (Radford et al. 2019). Weights are drawn from N(0, 0.02) as in GPT-2 and nanoGPT
(norm scales 1, biases 0), deterministically from ``seed``. ``device="meta"`` builds the module
without allocating memory, so an 8B model can be inspected or captured anywhere.
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from kiln.errors import ConfigError
from kiln.models.gpt2 import GPT2Config, GPT2LMHeadModel
from kiln.models.llama import Llama3RopeScaling, LlamaConfig, LlamaForCausalLM

_LLAMA3_ROPE_1B = Llama3RopeScaling(
    factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)
_LLAMA3_ROPE_8B = Llama3RopeScaling(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192
)

PRESETS: dict[str, LlamaConfig | GPT2Config] = {
    # 2 layers, 4 heads sharing 2 KV heads: exercises GQA in milliseconds.
    "llama-tiny": LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=2048,
    ),
    # 99.5M parameters: 8 layers of 768, GQA 12/4, untied 32k embeddings.
    "llama-small": LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
        num_attention_heads=12, num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=4096,
    ),
    # meta-llama/Llama-3.2-1B shapes (1.24B parameters, tied embeddings).
    "llama-1b": LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_1B, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
    ),
    # meta-llama/Llama-3.1-8B shapes (8.03B parameters, untied embeddings).
    "llama-8b": LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE_8B, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    ),
    "gpt2-tiny": GPT2Config(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4),
    # openai-community/gpt2 shapes (124M parameters).
    "gpt2": GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
        bos_token_id=50256, eos_token_id=50256,
    ),
}  # fmt: skip


def get_preset(name: str) -> LlamaConfig | GPT2Config:
    """The config of a preset; unknown names raise ConfigError listing the valid ones."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}.{hint}")
    return PRESETS[name]


def build_model(config: LlamaConfig | GPT2Config) -> nn.Module:
    """An uninitialized kiln model for ``config`` on the meta device (no memory allocated)."""
    cls = LlamaForCausalLM if isinstance(config, LlamaConfig) else GPT2LMHeadModel
    with torch.device("meta"):
        return cls(config)


@torch.no_grad()
def init_weights(model: nn.Module, *, seed: int = 0, std: float = 0.02) -> None:
    """Linear and embedding weights ~ N(0, std), biases 0, norm scales 1; deterministic by seed.

    The generator lives on the parameters' device, so the draw is reproducible per device type.
    """
    seen: set[int] = set()
    generator: torch.Generator | None = None
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.device.type == "meta":
                continue
            seen.add(id(p))
            if generator is None:
                generator = torch.Generator(device=p.device).manual_seed(seed)
            if name == "bias":
                p.zero_()
            elif isinstance(module, nn.Linear | nn.Embedding):
                p.normal_(0.0, std, generator=generator)
            else:  # RMSNorm / LayerNorm scale
                p.fill_(1.0)


def from_config(
    config: LlamaConfig | GPT2Config,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> nn.Module:
    """A kiln model for ``config`` with random weights (see :func:`init_weights`), in eval mode.

    ``device=None`` means CPU; ``device="meta"`` allocates nothing (for shape inspection or capture).
    """
    model = build_model(config).to(dtype)
    device = torch.device(device if device is not None else "cpu")
    if device.type != "meta":
        model = model.to_empty(device=device)
        model.tie_weights()
        init_weights(model, seed=seed)
    model.tie_weights()
    model.init_buffers()
    return model.eval()


def from_preset(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> nn.Module:
    """A kiln model with the shapes of preset ``name`` (a key of :data:`PRESETS`) and random weights."""
    return from_config(get_preset(name), dtype=dtype, device=device, seed=seed)


__all__ = ["PRESETS", "build_model", "from_config", "from_preset", "get_preset", "init_weights"]
