"""kiln.models.llama against transformers.LlamaForCausalLM, torch.export capture, config validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import transformers

import kiln
from kiln.errors import ConfigError
from kiln.models import LlamaConfig, LlamaForCausalLM, from_preset, load_pretrained
from kiln.models.llama import Llama3RopeScaling

VOCAB = 96


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere: norm scales around 1, biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * noise)
        else:
            p.copy_(0.05 * noise)


def _hf_llama(tmp_path: Path, seed: int = 0, **overrides) -> tuple[transformers.LlamaForCausalLM, Path]:
    kw = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="eager",
    )  # fmt: skip
    kw.update(overrides)
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).eval()
    _randomize(hf, seed)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    return hf, folder


def _ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


CASES = {
    "mha-untied": dict(num_key_value_heads=4),
    "gqa-untied": dict(num_key_value_heads=2),
    "mqa-tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "bias-headdim": dict(attention_bias=True, mlp_bias=True, head_dim=32),
    "llama3-rope": dict(
        rope_theta=500000.0,
        max_position_embeddings=4096,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path: Path, case: str) -> None:
    hf, folder = _hf_llama(tmp_path, **CASES[case])
    model = load_pretrained(folder)
    assert isinstance(model, LlamaForCausalLM)
    assert set(model.state_dict()) == set(hf.state_dict())
    ids = _ids(2, 11)
    with torch.no_grad():
        expected = hf(ids).logits
        got = model(ids)
    assert got.shape == (2, 11, VOCAB)
    assert expected.abs().max() > 0.1  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_offset_position_ids_match_transformers(tmp_path: Path) -> None:
    hf, folder = _hf_llama(tmp_path, rope_theta=100.0)
    model = load_pretrained(folder)
    ids = _ids(2, 7)
    offset = (torch.arange(7) + torch.tensor([[13], [40]])).long()  # (B, T), different offset per row
    gaps = torch.randint(1, 4, (2, 7), generator=torch.Generator().manual_seed(2))
    gapped = gaps.cumsum(-1) + torch.tensor([[5], [0]])  # increasing positions with holes
    with torch.no_grad():
        for pos in (offset, gapped):
            torch.testing.assert_close(
                model(ids, position_ids=pos), hf(ids, position_ids=pos).logits, atol=1e-5, rtol=1e-5
            )
        # RoPE is relative: a constant offset changes nothing, holes between positions do.
        torch.testing.assert_close(model(ids, position_ids=offset), model(ids), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(model(ids, position_ids=gapped), model(ids), atol=1e-3)


def test_tied_embeddings_share_one_parameter(tmp_path: Path) -> None:
    _, folder = _hf_llama(tmp_path, tie_word_embeddings=True)
    model = load_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    untied = LlamaForCausalLM(dataclasses.replace(model.config, tie_word_embeddings=False))
    assert untied.num_parameters() == model.num_parameters() + VOCAB * 64


def test_export_dynamic_tokens_matches_eager() -> None:
    model = from_preset("llama-tiny", seed=3)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(0))
    tokens = torch.export.Dim("tokens", max=512)
    ep = torch.export.export(model, (ids,), dynamic_shapes=({1: tokens},), strict=False)
    exported = ep.module()
    with torch.no_grad():
        for T in (1, 5, 33):
            x = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(T))
            torch.testing.assert_close(exported(x), model(x), atol=1e-5, rtol=1e-5)


def test_export_with_position_ids_matches_eager() -> None:
    model = from_preset("llama-tiny", seed=4)
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(6).unsqueeze(0)
    tokens = torch.export.Dim("tokens", max=512)
    ep = torch.export.export(model, (ids, pos), dynamic_shapes=({1: tokens}, {1: tokens}), strict=False)
    with torch.no_grad():
        for T, start in ((1, 40), (4, 7), (17, 0)):
            x = torch.randint(0, 512, (1, T), generator=torch.Generator().manual_seed(T))
            p = torch.arange(start, start + T).unsqueeze(0)
            torch.testing.assert_close(ep.module()(x, p), model(x, p), atol=1e-5, rtol=1e-5)


def test_exported_graph_uses_sdpa_without_repeating_kv() -> None:
    model = from_preset("llama-tiny", device="meta")
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    cap = kiln.capture(model, (ids,))  # dynamic token axis (torch 2.11 needs capture's retry with hints)
    targets = [str(n.target) for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert sum("scaled_dot_product" in t for t in targets) == 2  # one per layer
    assert not any("repeat_interleave" in t for t in targets)


# ----------------------------------------------------------------------------- config


def test_config_defaults_resolved() -> None:
    c = LlamaConfig(
        vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=8
    )
    assert c.head_dim == 8 and c.num_key_value_heads == 8


def test_config_rejects_heads_not_dividing_hidden() -> None:
    with pytest.raises(
        ConfigError, match=r"hidden_size \(64\) is not divisible by num_attention_heads \(6\)"
    ):
        LlamaConfig(
            vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=6
        )


def test_config_rejects_kv_heads_not_dividing_heads() -> None:
    with pytest.raises(
        ConfigError, match=r"num_key_value_heads \(3\) must divide num_attention_heads \(8\).*\[1, 2, 4, 8\]"
    ):
        LlamaConfig(
            vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1,
            num_attention_heads=8, num_key_value_heads=3,
        )  # fmt: skip


def test_config_rejects_unsupported_rope_scaling() -> None:
    d = LlamaConfig(
        vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=4
    ).to_dict()
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="'yarn' is not supported.*'llama3'"):
        LlamaConfig.from_dict(d)
    d["rope_scaling"] = {"factor": 4.0}  # no rope_type: refuse to guess
    with pytest.raises(ConfigError, match="rope_scaling type None is not supported"):
        LlamaConfig.from_dict(d)
    d["rope_scaling"] = {"rope_type": "llama3", "factor": 4.0}
    assert LlamaConfig.from_dict(d).rope_scaling == Llama3RopeScaling(factor=4.0)
    d["rope_scaling"] = None
    d["hidden_act"] = "gelu"
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        LlamaConfig.from_dict(d)


def test_config_dict_round_trips_through_transformers() -> None:
    c = LlamaConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=Llama3RopeScaling(factor=8.0, original_max_position_embeddings=512),
        max_position_embeddings=4096, eos_token_id=(5, 6), tie_word_embeddings=True,
    )  # fmt: skip
    d = c.to_dict()
    assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
    assert LlamaConfig.from_dict({**d, "some_future_hf_key": 1, "use_cache": True}) == c
    hf = transformers.LlamaConfig.from_dict(d)
    assert hf.num_key_value_heads == 2 and hf.head_dim == 16 and hf.tie_word_embeddings
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["rope_theta"] == 500000.0
    # transformers 5 writes rope_parameters; kiln reads that form too.
    assert LlamaConfig.from_dict(hf.to_dict()) == c


def test_preset_determinism_and_meta() -> None:
    a = from_preset("llama-tiny", seed=0)
    b = from_preset("llama-tiny", seed=0)
    c = from_preset("llama-tiny", seed=1)
    w = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a.state_dict()[w], b.state_dict()[w])
    assert not torch.equal(a.state_dict()[w], c.state_dict()[w])
    assert abs(a.state_dict()[w].std().item() - 0.02) < 0.002
    bf16 = from_preset("llama-tiny", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.rotary_emb.inv_freq.dtype == torch.float32


def test_meta_llama_8b_has_llama_3_1_8b_parameter_count() -> None:
    model = from_preset("llama-8b", device="meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.num_parameters() == 8_030_261_248
    small = from_preset("llama-small", device="meta").num_parameters()
    assert 95e6 < small < 105e6
    assert from_preset("llama-1b", device="meta").num_parameters() == 1_235_814_400
