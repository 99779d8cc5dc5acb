"""kiln.train: config validation, schedule, data windows, loss goes down, exact resume."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from kiln.errors import ConfigError
from kiln.eval import mean_nll
from kiln.train import (
    StepInfo,
    TokenWindows,
    TrainConfig,
    latest_checkpoint,
    list_checkpoints,
    next_token_loss,
    train,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

VOCAB = 32


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config)


class Bigram(nn.Module):
    """A model that returns raw logits (no .logits attribute)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.emb(input_ids)  # (B, T, V)


def stream(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """A learnable stream: mostly the next token of a fixed cycle, with some noise."""
    cycle = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    base = cycle[torch.arange(n) % VOCAB]
    noise = torch.randint(0, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.1, noise, base)


CFG = TrainConfig(steps=30, batch_size=4, seq_len=32, lr=1e-2, min_lr=1e-3, warmup_steps=3, eval_every=10,
                  eval_batches=4, ckpt_every=10, log_every=5, seed=7, device="cpu", progress=False)


@pytest.mark.parametrize("change", [
    {"steps": 0}, {"lr": -1.0}, {"lr": float("nan")}, {"min_lr": 1.0}, {"batch_size": 0},
    {"warmup_steps": -1}, {"grad_clip": 0.0}, {"precision": "fp8"}, {"device": "nonsense"},
    {"betas": (0.9, 1.5)}, {"eval_batches": 0}, {"seq_len": 1.5},
])
def test_config_validation(change: dict) -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(CFG, **change)


def test_lr_schedule() -> None:
    cfg = dataclasses.replace(CFG, steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [cfg.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert cfg.lr_at(100) == pytest.approx(0.1)
    assert cfg.autocast_dtype(torch.device("cpu")) is None
    assert cfg.autocast_dtype(torch.device("cuda")) is torch.bfloat16


def test_token_windows_are_seeded_and_shifted() -> None:
    tokens = torch.arange(1000)
    a = TokenWindows(tokens, seq_len=16, batch_size=3, seed=1)
    b = TokenWindows(tokens.numpy(), seq_len=16, batch_size=3, seed=1)
    x, y = a.batch(5)
    assert x.shape == y.shape == (3, 16)
    assert torch.equal(y, x + 1)  # targets are the next tokens
    assert torch.equal(x, b.batch(5)[0])
    assert not torch.equal(x, a.batch(6)[0])
    assert not torch.equal(x, TokenWindows(tokens, seq_len=16, batch_size=3, seed=2).batch(5)[0])
    with pytest.raises(ConfigError):
        TokenWindows(torch.arange(10), seq_len=16, batch_size=1, seed=0)


def test_training_lowers_loss(tmp_path: Path) -> None:
    model, tokens = tiny_llama(), stream()
    held_out = stream(600, seed=1)
    before = mean_nll(model, held_out, seq_len=32, batch_size=8, progress=False)
    result = train(model, tokens, CFG, eval_tokens=held_out, out_dir=tmp_path)
    assert result.step == 30 and not result.stopped_early
    assert result.eval_loss is not None and result.eval_loss < before - 0.5
    assert result.eval_perplexity == pytest.approx(torch.tensor(result.eval_loss).exp().item())
    assert result.tokens_seen == 30 * 4 * 32
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log][0] == "start" and log[-1]["event"] == "end"
    assert [r["step"] for r in log if r["event"] == "eval"] == [10, 20, 30]
    assert [r["step"] for r in log if r["event"] == "train"] == [5, 10, 15, 20, 25, 30]


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    tokens = stream()
    straight = tiny_llama()
    train(straight, tokens, CFG, out_dir=tmp_path / "a")

    interrupted = tiny_llama()
    first = train(interrupted, tokens, CFG, out_dir=tmp_path / "b", callbacks=[lambda i: i.step == 15])
    assert first.step == 15 and first.stopped_early
    resumed_model = tiny_llama(seed=99)  # different init: everything must come from the checkpoint
    second = train(resumed_model, tokens, CFG, out_dir=tmp_path / "b")
    assert second.resumed_from == 15 and second.step == 30
    for (name, a), b in zip(straight.state_dict().items(), resumed_model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    # checkpoints: a safetensors/json pair, older ones pruned, no pickles
    kept = list_checkpoints(tmp_path / "b")
    assert [p.stem for p in kept] == ["ckpt-00000020", "ckpt-00000030"]
    assert latest_checkpoint(tmp_path / "b") == kept[-1]
    meta = json.loads(kept[-1].read_text())
    assert meta["step"] == 30 and meta["config"]["seed"] == 7
    with safe_open(str(kept[-1].with_suffix(".safetensors")), "pt") as f:
        keys = set(f.keys())
    assert "model/model.embed_tokens.weight" in keys and "rng/cpu" in keys
    assert any(k.startswith("optim/") and k.endswith("exp_avg") for k in keys)
    assert not list((tmp_path / "b").glob("*.pt")) and not list((tmp_path / "b").glob("*.bin"))

    # resuming a finished run trains no further
    again = train(tiny_llama(), tokens, CFG, out_dir=tmp_path / "b")
    assert again.step == 30 and again.resumed_from == 30


def test_custom_loss_and_plain_logits_model() -> None:
    calls: list[int] = []
    seen: list[StepInfo] = []

    def loss_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(inputs.shape[0])
        return next_token_loss(model, inputs, targets)

    model = Bigram()
    cfg = dataclasses.replace(CFG, steps=12, grad_accum=2, grad_clip=None, ckpt_every=0)
    result = train(model, stream(), cfg, loss_fn=loss_fn, callbacks=[seen.append])
    assert len(calls) == 24 and calls[0] == 4
    assert [i.step for i in seen] == list(range(1, 13))
    assert seen[-1].loss < seen[0].loss
    assert result.checkpoint is None and result.eval_loss is None


def test_reference_script_smoke(tmp_path: Path) -> None:
    """examples/train_reference_models.py --smoke: corpus, tokenizer, 20 CPU steps, HF folders."""
    import importlib.util

    script = Path(__file__).parents[2] / "examples" / "train_reference_models.py"
    spec = importlib.util.spec_from_file_location("train_reference_models", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "models"
    assert module.main(["--smoke", "--out", str(out), "--data", str(tmp_path / "data"),
                        "--work", str(tmp_path / "work"), "--no-progress"]) == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for kind in ("teacher", "drafter"):
        folder = out / f"kiln-{kind}"
        for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "special_tokens_map.json", "train_log.jsonl", "README.md"):
            assert (folder / name).is_file(), name
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.dtype == torch.bfloat16 and model.config.tie_word_embeddings
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("import os\n", return_tensors="pt").input_ids
        assert model(ids).logits.shape == (1, ids.shape[1], tokenizer.vocab_size)
        assert "eval-split perplexity" in (folder / "README.md").read_text()
        log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
        assert log[-1]["event"] == "summary" and log[-1]["steps"] == 20
