"""kiln.models.hub: Hugging Face-format folders in and out, and the typed errors on bad folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kiln.errors import ConfigError, UnsupportedModelError
from kiln.models import (
    PRESETS,
    LlamaForCausalLM,
    from_config,
    from_preset,
    load_model,
    load_pretrained,
    save_pretrained,
)


def _ids(vocab: int, B: int = 2, T: int = 10) -> torch.Tensor:
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(7))


def _kiln_model(kind: str) -> torch.nn.Module:
    if kind == "llama-tied-rope3":
        config = dataclasses.replace(
            PRESETS["llama-tiny"], tie_word_embeddings=True, rope_theta=500000.0,
            rope_scaling=PRESETS["llama-1b"].rope_scaling,
        )  # fmt: skip
        return from_config(config, seed=11)
    return from_preset(kind, seed=11)


def _file_keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("kind", ["llama-tiny", "llama-tied-rope3", "gpt2-tiny"])
def test_saved_folder_loads_in_transformers_with_equal_logits(tmp_path: Path, kind: str) -> None:
    model = _kiln_model(kind)
    save_pretrained(model, tmp_path)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(hf).__name__ == model.config.architecture
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert ("lm_head.weight" in _file_keys(tmp_path)) == (not model.config.tie_word_embeddings)


@pytest.mark.parametrize("kind", ["llama-tied-rope3", "gpt2-tiny"])
def test_save_load_round_trip(tmp_path: Path, kind: str) -> None:
    model = _kiln_model(kind)
    save_pretrained(model, tmp_path)
    back = load_pretrained(tmp_path)
    assert back.config == model.config
    assert (
        back.lm_head.weight
        is back.get_submodule("model.embed_tokens" if kind.startswith("llama") else "transformer.wte").weight
    )
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_load_sharded_checkpoint(tmp_path: Path) -> None:
    hf = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            attn_implementation="eager",
        )  # fmt: skip
    ).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    model = load_pretrained(tmp_path)
    ids = _ids(64)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_load_with_dtype_keeps_rope_in_fp32(tmp_path: Path) -> None:
    save_pretrained(from_preset("llama-tiny"), tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not model.model.rotary_emb.inv_freq.is_meta
    assert model(_ids(512)).dtype == torch.bfloat16


def test_gpt2_legacy_layout_loads(tmp_path: Path) -> None:
    """openai-community/gpt2 stores keys without 'transformer.' and carries attn.bias mask buffers."""
    model = from_preset("gpt2-tiny", seed=2)
    save_pretrained(model, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    legacy = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 256, 256))
    save_file(legacy, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = load_pretrained(tmp_path)
    ids = _ids(512)
    with torch.no_grad():
        torch.testing.assert_close(back(ids), model(ids))


# ----------------------------------------------------------------------------- errors


def test_pytorch_bin_only_is_refused_with_conversion_hint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["llama-tiny"].to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(UnsupportedModelError, match="safetensors only.*save_pretrained"):
        load_pretrained(tmp_path)


def test_unknown_model_type_is_unsupported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral", "hidden_size": 64}))
    with pytest.raises(UnsupportedModelError, match="'mistral'.*transformers.*kiln.compile"):
        load_pretrained(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    save_pretrained(from_preset("llama-tiny"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.9.mlp.up_proj.weight"] = torch.randn(2, 2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"missing keys: model\.layers\.1\.mlp\.up_proj\.weight.*"
                       r"unexpected keys: model\.layers\.9\.mlp\.up_proj\.weight"):  # fmt: skip
        load_pretrained(tmp_path)


def test_shape_mismatch_and_untied_head_missing(tmp_path: Path) -> None:
    save_pretrained(from_preset("llama-tiny"), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ConfigError, match=r"mlp\.\w+_proj\.weight' has shape .* config\.json implies"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match="missing keys: lm_head.weight.*tie_word_embeddings"):
        load_pretrained(tmp_path)


def test_not_a_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        load_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="not a folder"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["gpt2-tiny"].to_dict()))
    with pytest.raises(ConfigError, match="no model.safetensors"):
        load_pretrained(tmp_path)


def test_save_refuses_foreign_and_meta_models(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="model.save_pretrained"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(UnsupportedModelError, match="meta device"):
        save_pretrained(from_preset("llama-tiny", device="meta"), tmp_path)


def test_load_model_dispatches_on_folder_or_preset(tmp_path: Path) -> None:
    saved = from_preset("gpt2-tiny", seed=4)
    save_pretrained(saved, tmp_path)
    assert torch.equal(load_model(tmp_path).lm_head.weight, saved.lm_head.weight)
    assert torch.equal(load_model(str(tmp_path)).lm_head.weight, saved.lm_head.weight)
    assert isinstance(load_model("llama-tiny", seed=1), LlamaForCausalLM)
    with pytest.raises(ConfigError, match="neither a folder nor a preset.*llama-tiny"):
        load_model(tmp_path / "missing")


def test_unknown_preset_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match=r"unknown model preset 'llama-8B'.*llama-tiny, .*gpt2.*'llama-8b'"):
        from_preset("llama-8B")
