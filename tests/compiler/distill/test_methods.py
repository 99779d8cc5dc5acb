"""kiln.distill end to end on tiny models: every method lowers its loss, resume is exact, caches and filters work."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import kiln
from kiln.distill import (
    DataDistillation,
    DistillConfig,
    DistillLossFn,
    KnowledgeDistillation,
    LossConfig,
    OnPolicyDistillation,
    OnPolicySource,
    TopKCache,
    distill,
)
from kiln.distill.generate import GeneratedData, distinct_ngram_ratio, generate_data
from kiln.errors import ConfigError
from kiln.eval import logits_of
from kiln.train import TokenWindows, TrainConfig, latest_checkpoint

VOCAB = 64  # the fixtures' vocabulary (conftest.py)
TC = TrainConfig(
    steps=8,
    batch_size=4,
    seq_len=24,
    lr=3e-3,
    min_lr=3e-4,
    warmup_steps=2,
    eval_every=4,
    eval_batches=2,
    ckpt_every=4,
    log_every=2,
    seed=3,
    device="cpu",
    progress=False,
)
CFG = DistillConfig(train=TC)
FKL = LossConfig(divergence="forward_kl")


def losses(result: kiln.distill.DistillResult) -> list[float]:
    return [r["loss"] for r in result.train.history if r["event"] == "train"]


@pytest.mark.parametrize("method", ["hard", "kd", "kd-reverse", "kd-jsd-mixed"])
def test_window_methods_lower_their_loss(
    make_student: Callable[..., nn.Module],
    method: str,
    teacher: nn.Module,
    tokens: torch.Tensor,
    eval_tokens: torch.Tensor,
    tmp_path: Path,
) -> None:
    spec = {
        "hard": "hard",
        "kd": "kd",
        "kd-reverse": KnowledgeDistillation(loss=LossConfig(divergence="reverse_kl", temperature=2.0)),
        "kd-jsd-mixed": KnowledgeDistillation(
            loss=LossConfig(divergence="jsd", beta=0.3, hard_label_weight=0.5)
        ),
    }
    result = distill(
        make_student(),
        teacher,
        tokens,
        method=spec[method],
        config=CFG,
        eval_data=eval_tokens,
        out_dir=tmp_path,
    )
    curve = losses(result)
    assert len(curve) == 4 and curve[-1] < curve[0] * 0.97, curve
    assert result.method == ("hard" if method == "hard" else "kd")
    assert result.eval_perplexity is not None and 1 < result.eval_perplexity < VOCAB * 2
    assert result.agreement is not None and 0 <= result.agreement <= 1
    evals = [r for r in result.train.history if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and all("agreement" in r for r in evals)
    # the student as a Hugging Face-format folder, in the checkpoints and at the end
    for folder in (result.model_dir, tmp_path / "ckpt-00000008"):
        assert (
            folder is not None
            and (folder / "config.json").is_file()
            and (folder / "model.safetensors").is_file()
        )
    reloaded = kiln.models.load_model(result.model_dir)
    x = tokens[:20][None]
    torch.testing.assert_close(reloaded(x), result.student(x))
    summary = json.loads((tmp_path / "distill_summary.json").read_text())
    assert summary["steps"] == 8 and summary["method"] == result.method


def test_kd_learns_the_teacher_faster_than_hard_labels(
    make_student: Callable[..., nn.Module],
    teacher: nn.Module,
    tokens: torch.Tensor,
    eval_tokens: torch.Tensor,
) -> None:
    cfg = DistillConfig(train=dataclasses.replace(TC, steps=16, ckpt_every=0, eval_every=0))
    hard = distill(make_student(), teacher, tokens, method="hard", config=cfg, eval_data=eval_tokens)
    kd = distill(make_student(), teacher, tokens, method="kd", config=cfg, eval_data=eval_tokens)
    assert kd.agreement > hard.agreement  # type: ignore[operator]


def test_top_k_cache_matches_dense_and_is_reused(
    make_student: Callable[..., nn.Module], teacher: nn.Module, tokens: torch.Tensor, tmp_path: Path
) -> None:
    windows = TokenWindows(tokens, seq_len=24, batch_size=4, seed=3)
    key = {"data": "stream", "seed": 3}
    cache = TopKCache(
        tmp_path / "c",
        teacher=teacher,
        batch_fn=windows.batch,
        k=VOCAB,
        temperature=1.0,
        key=key,
        shard_size=4,
        progress=False,
    )
    inputs, labels = windows.batch(5)
    top = cache.get(5)
    assert top.logprobs.shape == (4, 24, VOCAB) and cache.computed_batches == 4  # shard 1 = batches 4..7
    s = make_student()
    from kiln.distill import DistillBatch

    dense = DistillLossFn(teacher, FKL)(s, DistillBatch(inputs, labels, None))
    cached = DistillLossFn(None, FKL)(s, DistillBatch(inputs, labels, None, top))
    torch.testing.assert_close(cached, dense, rtol=1e-5, atol=1e-6)  # k = V: exactly the dense loss
    again = TopKCache(
        tmp_path / "c",
        teacher=teacher,
        batch_fn=windows.batch,
        k=VOCAB,
        temperature=1.0,
        key=key,
        shard_size=4,
        progress=False,
    )
    torch.testing.assert_close(again.get(6).logprobs, cache.get(6).logprobs)
    assert again.computed_batches == 0  # read from disk
    with pytest.raises(ConfigError, match="seed"):
        TopKCache(
            tmp_path / "c",
            teacher=teacher,
            batch_fn=windows.batch,
            k=VOCAB,
            temperature=1.0,
            key={**key, "seed": 4},
            shard_size=4,
            progress=False,
        )
    # through distill: a top-8 cache in OUT/teacher_topk lowers the loss too
    result = distill(
        make_student(),
        teacher,
        tokens,
        method=KnowledgeDistillation(top_k=8),
        config=CFG,
        out_dir=tmp_path / "run",
    )
    assert losses(result)[-1] < losses(result)[0] and result.stats["cache_batches_computed"] >= 8
    assert (tmp_path / "run" / "teacher_topk" / "cache.json").is_file()


def test_data_distillation_generates_filters_and_trains(
    make_student: Callable[..., nn.Module], teacher: nn.Module, tokens: torch.Tensor, tmp_path: Path
) -> None:
    spec = DataDistillation(
        num_prompts=6, samples_per_prompt=2, prompt_tokens=20, temperature=1.0, top_p=1.0, max_num_seqs=4
    )
    prompts = tokens[:120].view(6, 20)
    data = generate_data(teacher, prompts, length=29, config=spec, seed=0, progress=False)
    assert data.sequences.shape[1] == 29 and data.stats["generated"] == 12
    assert data.stats["kept"] + sum(v for k, v in data.stats.items() if k.startswith("dropped_")) == 12
    assert (
        data.stats["prompt_tokens_from_prefix_cache"] == 6 * 16
    )  # each chunk's round 2 reused its prompts' full block (16 of 20)
    for row, seq in enumerate(data.sequences):
        assert any(torch.equal(seq[:20], p) for p in prompts)
        assert data.trained[row, 20:].all() and not data.trained[row, :20].any()
    # the teacher's log-probabilities of its continuations: recompute one
    with torch.no_grad():
        lp = torch.log_softmax(logits_of(teacher(data.sequences[:1, :-1])), -1)[0, 19:]
    own = lp.gather(-1, data.sequences[0, 20:, None]).mean()
    torch.testing.assert_close(data.mean_logprob[0], own, rtol=1e-4, atol=1e-4)
    # filters: keep only the most likely half
    half = generate_data(
        teacher,
        prompts,
        length=29,
        config=dataclasses.replace(spec, keep_fraction=0.5, max_num_seqs=8),
        seed=0,
        progress=False,
    )
    assert half.stats["kept"] == (data.stats["kept"] + 1) // 2
    best = data.mean_logprob.argsort(descending=True)[: half.stats["kept"]].sort().values
    assert torch.equal(half.sequences, data.sequences[best])  # seeded samples: the same whatever the chunking
    assert distinct_ngram_ratio([5, 6, 7, 8] * 6) < 0.25 < distinct_ngram_ratio(list(range(20)))
    path = data.save(tmp_path / "d.safetensors")
    loaded = GeneratedData.load(path)
    assert torch.equal(loaded.sequences, data.sequences) and loaded.stats == data.stats

    result = distill(
        make_student(),
        teacher,
        tokens,
        method=dataclasses.replace(spec, prompt_tokens=8),
        config=CFG,
        out_dir=tmp_path / "run",
    )
    assert losses(result)[-1] < losses(result)[0]
    assert (tmp_path / "run" / "distill_data.safetensors").is_file() and result.stats["data"]["kept"] > 0


def test_on_policy_samples_with_live_weights_and_lowers_its_loss(
    make_student: Callable[..., nn.Module], teacher: nn.Module, tokens: torch.Tensor
) -> None:
    s = make_student()
    windows = TokenWindows(tokens, seq_len=24, batch_size=4, seed=3)
    source = OnPolicySource(s, windows, prompt_tokens=8, lmbda=1.0, temperature=0.0, top_p=1.0, seed=3)
    batch = source.batch(0)
    assert batch.kind == "on_policy" and batch.labels is None and batch.inputs.shape == (4, 24)
    assert batch.mask is not None and not batch.mask[:, :7].any() and batch.mask[:, 7:].all()
    # greedy samples are the student's own argmax continuations, computed by kiln.LLM on the live weights
    with torch.no_grad():
        seq = batch.inputs[:1, :8]
        for _ in range(16):
            seq = torch.cat([seq, s(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq[0, :24], batch.inputs[0])
    with torch.no_grad():
        for p in s.parameters():
            p.mul_(1.7)  # the weights change in place (as an optimizer step does) ...
    changed = source.batch(0)
    with torch.no_grad():
        seq = changed.inputs[:1, :8]
        for _ in range(16):
            seq = torch.cat([seq, s(seq)[:, -1:].argmax(-1)], 1)
    assert torch.equal(seq[0, :24], changed.inputs[0])  # ... and the engine samples from the new ones

    s = make_student()
    fixed_source = OnPolicySource(s, windows, prompt_tokens=8, lmbda=1.0, temperature=1.0, top_p=1.0, seed=3)
    fixed = [fixed_source.batch(i) for i in range(3)]  # the student's samples before training
    loss = DistillLossFn(teacher, OnPolicyDistillation().loss)
    with torch.no_grad():
        before = sum(float(loss(s, b)) for b in fixed)
    result = distill(s, teacher, tokens, method=OnPolicyDistillation(prompt_tokens=8, lmbda=0.5), config=CFG)
    with torch.no_grad():
        after = sum(float(loss(s, b)) for b in fixed)
    assert after < before * 0.97
    assert 0 < result.stats["on_policy_batches"] < 8 and result.stats["sampled_tokens"] > 0


@pytest.mark.parametrize("method", ["kd-topk", "on_policy"])
def test_resume_continues_identically(
    make_student: Callable[..., nn.Module],
    method: str,
    teacher: nn.Module,
    tokens: torch.Tensor,
    tmp_path: Path,
) -> None:
    spec = {
        "kd-topk": KnowledgeDistillation(top_k=8),
        "on_policy": OnPolicyDistillation(prompt_tokens=8, lmbda=0.5),
    }
    cfg = DistillConfig(train=dataclasses.replace(TC, eval_every=0))
    straight = make_student()
    distill(straight, teacher, tokens, method=spec[method], config=cfg, out_dir=tmp_path / "a")

    stopped = distill(
        make_student(),
        teacher,
        tokens,
        method=spec[method],
        config=cfg,
        out_dir=tmp_path / "b",
        callbacks=(lambda info: info.step == 4,),
    )
    assert stopped.train.step == 4 and stopped.train.stopped_early
    resumed = make_student(seed=99)  # everything must come from the checkpoint
    second = distill(resumed, teacher, tokens, method=spec[method], config=cfg, out_dir=tmp_path / "b")
    assert second.train.resumed_from == 4 and second.train.step == 8
    if method == "on_policy":  # the resumed run sampled on-policy batches after the checkpoint
        assert second.stats["on_policy_batches"] > 0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert latest_checkpoint(tmp_path / "b").stem == "ckpt-00000008"  # type: ignore[union-attr]


def test_config_errors(
    make_student: Callable[..., nn.Module], teacher: nn.Module, tokens: torch.Tensor
) -> None:
    with pytest.raises(ConfigError, match="same module"):
        distill(teacher, teacher, tokens, method="kd", config=CFG)
    with pytest.raises(ConfigError, match="unknown distillation method"):
        distill(make_student(), teacher, tokens, method="magic")
    with pytest.raises(ConfigError, match="hard_label_weight"):
        OnPolicyDistillation(loss=LossConfig(hard_label_weight=1.0))
    with pytest.raises(ConfigError, match="lmbda"):
        OnPolicyDistillation(lmbda=1.5)
    with pytest.raises(ConfigError, match="top_k"):
        KnowledgeDistillation(top_k=0)
    with pytest.raises(ConfigError, match="keep_fraction"):
        DataDistillation(keep_fraction=0.0)
    with pytest.raises(ConfigError, match="cache_dir or out_dir"):
        distill(make_student(), teacher, tokens, method=KnowledgeDistillation(top_k=4), config=CFG)
    with pytest.raises(ConfigError, match="tokenizer"):
        distill(make_student(), teacher, "train", config=CFG)
    with pytest.raises(ConfigError, match="prompt_tokens"):
        distill(make_student(), teacher, tokens, method=OnPolicyDistillation(prompt_tokens=40), config=CFG)
