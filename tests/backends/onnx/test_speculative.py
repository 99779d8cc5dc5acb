"""Speculative decoding on ONNX Runtime: greedy identity with prompt lookup and a draft-model artifact,
the target's distribution under sampling (chi-square), cache rollback, metrics and errors."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from kiln_testing import chi_square_p, tiny_vocab_llama

import kiln
from kiln.backends.onnx import OrtDraftModelDrafter, OrtGenerator, export_onnx
from kiln.backends.onnx.speculative import truncate
from kiln.runtime.drafters import DraftRequest
from kiln.runtime.request import Request
from kiln.runtime.sampler import processed_probs
from kiln.runtime.speculative import SpeculativeConfig

V = 12  # a small vocabulary: the chi-square test sees every token


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The target and a related draft (the target's weights, perturbed), each exported as a KV-cache decoder."""
    target = tiny_vocab_llama(11)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn_like(w) * 0.1)
    out = tmp_path_factory.mktemp("spec")
    paths = {}
    for name, model in (("target", target), ("draft", draft)):
        compiled = kiln.compile(model, {"input_ids": torch.randint(0, V, (1, 6))})
        paths[name] = export_onnx(compiled, out / f"{name}.onnx", kv_cache=True, lengths=(3,)).path
    return {"target": target, "paths": paths, "ort": OrtGenerator(paths["target"])}


PROMPTS = torch.tensor(
    [[3, 7, 1, 5, 3, 7, 1, 5, 3], [0, 2, 4, 6, 8, 10, 1, 3, 5], [9, 9, 9, 9, 4, 9, 9, 9, 9]]
)


@pytest.mark.parametrize("method", ["ngram", "draft_model", "draft_model_fixed_k"])
def test_greedy_speculative_output_equals_plain_output(models: dict, method: str) -> None:
    ort_gen: OrtGenerator = models["ort"]
    want = ort_gen.generate(PROMPTS, 24)
    if method == "ngram":
        config = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    else:
        config = SpeculativeConfig(
            method="draft_model",
            draft_model=str(models["paths"]["draft"]),
            num_speculative_tokens=3,
            adaptive=method == "draft_model",
            draft_cost=0.1,
        )  # the artifacts are the same size: c = 1 would never draft
    got = ort_gen.generate(PROMPTS, 24, speculative=config)
    assert torch.equal(got, want)
    s = ort_gen.stats
    assert s["generated_tokens"] == 3 * 24 and s["spec_steps"] > 0 and s["draft_tokens"] > 0
    assert s["target_calls"] < 3 * 24  # speculation saved target calls
    assert 0 < s["accepted_tokens"] < s["draft_tokens"]  # drafts both kept and rejected
    assert s["acceptance_rate"] == pytest.approx(s["accepted_tokens"] / s["draft_tokens"])
    assert s["accepted_tokens_per_step"] == pytest.approx(
        (s["accepted_tokens"] + s["spec_steps"]) / s["spec_steps"]
    )
    assert [m.num_draft_tokens for m in ort_gen.last_metrics] and sum(
        m.num_accepted_tokens for m in ort_gen.last_metrics
    ) == s["accepted_tokens"]
    if method != "ngram":
        assert (
            s["draft_calls"] >= s["draft_tokens"] - s["spec_steps"]
        )  # k - 1 single-token calls per step at least
    eos = int(want[0, PROMPTS.shape[1] + 5])  # a token row 0 generates: every row stops at its first one
    plain, spec = (
        ort_gen.generate(PROMPTS, 24, eos_token_id=eos),
        ort_gen.generate(PROMPTS, 24, eos_token_id=eos, speculative=config),
    )
    assert torch.equal(spec, plain) and plain.shape[1] < PROMPTS.shape[1] + 24


def test_the_target_as_its_own_drafter_is_always_accepted(models: dict) -> None:
    ort_gen: OrtGenerator = models["ort"]
    config = SpeculativeConfig(
        method="draft_model", draft_model=ort_gen, num_speculative_tokens=4, adaptive=False
    )
    got = ort_gen.generate(PROMPTS[:1], 21, speculative=config)
    assert torch.equal(got, ort_gen.generate(PROMPTS[:1], 21))
    s = ort_gen.stats
    assert s["acceptance_rate"] == 1.0 and s["accepted_tokens_per_step"] == 5.0 and s["target_calls"] == 5


def test_rejected_drafts_are_rolled_back_by_truncating_the_cache(models: dict) -> None:
    ort_gen: OrtGenerator = models["ort"]
    ids = PROMPTS[:1].numpy()
    _, past = ort_gen.step(ids, ort_gen.empty_cache(1))
    logits, longer = ort_gen.step(np.array([[1, 2, 3, 4]]), past)  # the last token and three drafts
    kept = truncate(longer, ids.shape[1] + 1)  # one draft accepted
    assert kept[0].shape[2] == ids.shape[1] + 1 and all(k.flags["C_CONTIGUOUS"] for k in kept)
    after, _ = ort_gen.step(np.array([[7]]), kept)
    _, fresh = ort_gen.step(np.concatenate([ids, [[1]]], axis=1), ort_gen.empty_cache(1))
    recomputed, _ = ort_gen.step(np.array([[7]]), fresh)
    np.testing.assert_allclose(after, recomputed, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(logits[:, :2], ort_gen.step(np.array([[1, 2]]), past)[0], rtol=1e-4, atol=1e-5)


def test_draft_model_drafter_keeps_its_cache_in_sync(models: dict) -> None:
    drafter = OrtDraftModelDrafter(models["paths"]["draft"], vocab_size=V)
    greedy = kiln.SamplingParams(temperature=0)
    req = Request(request_id="r", prompt_token_ids=[3, 7, 1, 5], sampling_params=greedy)
    first = drafter.propose([DraftRequest(request=req, num_tokens=3)])["r"]
    req.output_token_ids += [
        first.token_ids[0],
        (first.token_ids[1] + 1) % V,
    ]  # one accepted, then the target's own
    second = drafter.propose([DraftRequest(request=req, num_tokens=3)])["r"]
    fresh = OrtDraftModelDrafter(drafter.model)  # no cache: the same drafts from scratch
    assert second.token_ids == fresh.propose([DraftRequest(request=req, num_tokens=3)])["r"].token_ids
    assert first.probs is None and second.probs is None  # greedy drafts are point masses
    assert drafter.calls == 3 + 3  # each call: catch up (one call), then k - 1 single tokens


def test_sampled_speculation_keeps_the_target_distribution(models: dict) -> None:
    ort_gen: OrtGenerator = models["ort"]
    target = models["target"]
    prompt, n = [3, 7, 1, 5], 600
    kw = {"do_sample": True, "temperature": 0.9, "top_p": 0.9}
    config = SpeculativeConfig(
        method="draft_model",
        draft_model=str(models["paths"]["draft"]),
        num_speculative_tokens=2,
        adaptive=False,
    )
    out = ort_gen.generate(torch.tensor([prompt] * n), 4, speculative=config, seed=0, **kw)[:, len(prompt) :]
    assert 0.2 < ort_gen.stats["acceptance_rate"] < 0.95  # drafts both kept and rejected
    params = kiln.SamplingParams(temperature=0.9, top_p=0.9)
    with torch.no_grad():  # the exact distributions of tokens 2 and 3 under the target
        p1 = processed_probs(target(input_ids=torch.tensor([prompt])).logits[:, -1], [params])[0]
        p2 = processed_probs(
            target(input_ids=torch.tensor([prompt + [a] for a in range(V)])).logits[:, -1], [params] * V
        )
        ctx = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = processed_probs(target(input_ids=ctx).logits[:, -1], [params] * V * V).view(V, V, V)
    second, third = p1 @ p2, torch.einsum("a,ab,abc->c", p1, p2, p3)
    assert int((second > 0.05).sum()) >= 3  # a spread distribution, not a near-certain token
    assert chi_square_p(torch.bincount(out[:, 0], minlength=V), p1) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 1], minlength=V), second) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 2], minlength=V), third) > 1e-3
    # prompt lookup with other filters: a point-mass drafter (here token 0, p = 0.34), accepted with probability p(x)
    grounded = [3, 7, 7, 0, 1, 3, 3, 7, 7]
    lookup = ort_gen.generate(
        torch.tensor([grounded] * n),
        2,
        speculative=SpeculativeConfig(method="ngram"),
        seed=1,
        do_sample=True,
        temperature=1.3,
        top_k=5,
    )[:, len(grounded) :]
    assert ort_gen.stats["draft_tokens"] == n and 0.2 < ort_gen.stats["acceptance_rate"] < 0.5
    params = kiln.SamplingParams(temperature=1.3, top_k=5)
    with torch.no_grad():
        q1 = processed_probs(target(input_ids=torch.tensor([grounded])).logits[:, -1], [params])[0]
        q2 = processed_probs(
            target(input_ids=torch.tensor([grounded + [a] for a in range(V)])).logits[:, -1], [params] * V
        )
    assert chi_square_p(torch.bincount(lookup[:, 0], minlength=V), q1) > 1e-3
    assert chi_square_p(torch.bincount(lookup[:, 1], minlength=V), q1 @ q2) > 1e-3


def test_configuration_errors(models: dict, tmp_path: Path) -> None:
    ort_gen: OrtGenerator = models["ort"]
    with pytest.raises(kiln.ConfigError, match="exported decoder"):
        ort_gen.generate(
            PROMPTS, 4, speculative=SpeculativeConfig(method="draft_model", draft_model=models["target"])
        )
    with pytest.raises(kiln.ConfigError, match="SpeculativeConfig"):
        ort_gen.generate(PROMPTS, 4, speculative="ngram")  # type: ignore[arg-type]
    small = OrtDraftModelDrafter(models["paths"]["draft"], vocab_size=V - 1)
    req = Request(request_id="r", prompt_token_ids=[1, 2], sampling_params=kiln.SamplingParams(temperature=0))
    with pytest.raises(kiln.ConfigError, match="vocabulary"):
        small.propose([DraftRequest(request=req, num_tokens=2)])
