"""kiln.models.gpt2 against transformers.GPT2LMHeadModel, torch.export capture, config validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from kiln.errors import ConfigError
from kiln.models import GPT2Config, GPT2LMHeadModel, from_preset, load_pretrained

VOCAB = 80


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere: LayerNorm scales around 1, biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if ".ln_" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def _hf_gpt2(tmp_path: Path, seed: int = 0, **overrides) -> tuple[transformers.GPT2LMHeadModel, Path]:
    kw = dict(
        vocab_size=VOCAB, n_positions=64, n_embd=48, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager",
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    _randomize(hf, seed)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_word_embeddings": False, "n_inner": 40}, {"activation_function": "gelu"}],
    ids=["tied", "untied-n_inner", "exact-gelu"],
)
def test_logits_match_transformers(tmp_path: Path, overrides: dict) -> None:
    hf, folder = _hf_gpt2(tmp_path, **overrides)
    model = load_pretrained(folder)
    assert isinstance(model, GPT2LMHeadModel)
    assert set(model.state_dict()) == set(hf.state_dict())
    tied = overrides.get("tie_word_embeddings", True)
    assert (model.lm_head.weight is model.transformer.wte.weight) == tied
    ids = _ids(3, 13)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == (3, 13, VOCAB)
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_position_ids_match_transformers(tmp_path: Path) -> None:
    hf, folder = _hf_gpt2(tmp_path)
    model = load_pretrained(folder)
    ids = _ids(2, 9)
    pos = torch.arange(9) + torch.tensor([[20], [3]])  # (B, T)
    with torch.no_grad():
        got = model(ids, position_ids=pos)
        torch.testing.assert_close(got, hf(ids, position_ids=pos).logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got, model(ids), atol=1e-3)  # learned positions are absolute


def test_export_dynamic_tokens_matches_eager() -> None:
    model = from_preset("gpt2-tiny", seed=5)
    ids = torch.randint(0, 512, (1, 10), generator=torch.Generator().manual_seed(0))
    ep = torch.export.export(
        model, (ids,), dynamic_shapes=({1: torch.export.Dim("tokens", max=256)},), strict=False
    )
    with torch.no_grad():
        for T in (1, 6, 64):
            x = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(T))
            torch.testing.assert_close(ep.module()(x), model(x), atol=1e-5, rtol=1e-5)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match=r"n_embd \(64\) is not divisible by n_head \(5\)"):
        GPT2Config(vocab_size=10, n_positions=8, n_embd=64, n_layer=1, n_head=5)
    with pytest.raises(ConfigError, match="activation_function 'relu'.*gelu_new"):
        GPT2Config(vocab_size=10, n_positions=8, n_embd=64, n_layer=1, n_head=4, activation_function="relu")
    c = GPT2Config(vocab_size=10, n_positions=8, n_embd=64, n_layer=1, n_head=4)
    assert c.n_inner == 256 and c.head_dim == 16 and c.num_key_value_heads == 4 and c.hidden_size == 64


def test_config_dict_round_trips_through_transformers() -> None:
    c = GPT2Config(
        vocab_size=100, n_positions=32, n_embd=64, n_layer=3, n_head=4, bos_token_id=1, eos_token_id=2
    )
    d = c.to_dict()
    assert d["model_type"] == "gpt2" and d["architectures"] == ["GPT2LMHeadModel"]
    hf = transformers.GPT2Config.from_dict(d)
    assert (hf.n_embd, hf.n_layer, hf.n_head, hf.n_positions, hf.n_inner) == (64, 3, 4, 32, 256)
    assert GPT2Config.from_dict(hf.to_dict()) == c  # unknown HF keys (dropouts, summary_*) ignored


def test_config_rejects_hf_options_that_change_numerics() -> None:
    d = GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=1, n_head=4).to_dict()
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx=True.*kiln.compile"):
        GPT2Config.from_dict({**d, "scale_attn_by_inverse_layer_idx": True})


def test_gpt2_preset_parameter_count() -> None:
    assert from_preset("gpt2", device="meta").num_parameters() == 124_439_808
