import math

import pytest
import torch

from kiln.runtime import SamplingParams, make_generator, sample
from kiln.runtime.sampler import (
    _argmax_chunk,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k_top_p,
    greedy_argmax,
)

V = 64


def logits(n: int, v: int = V, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, v) * scale


def test_greedy_is_argmax_and_leaves_the_logits_alone() -> None:
    x = logits(7)
    before = x.clone()
    out = sample(x, [SamplingParams(temperature=0)] * 7)
    assert torch.equal(out.token_ids, x.argmax(-1)) and out.logprobs is None
    assert torch.equal(x, before)
    half = x.to(torch.bfloat16)
    assert torch.equal(sample(half, [SamplingParams(temperature=0)] * 7).token_ids, half.float().argmax(-1))


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(top_k=1, temperature=1.5),
        SamplingParams(top_p=1e-6),
        SamplingParams(min_p=1.0, temperature=2.0),
    ],
)
def test_degenerate_filters_are_greedy(params: SamplingParams) -> None:
    x = logits(16)
    gens = [make_generator(i) for i in range(16)]
    assert torch.equal(sample(x, [params] * 16, gens).token_ids, x.argmax(-1))


def test_mixed_batch_applies_each_rows_params() -> None:
    x = logits(4)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(top_k=3),
        SamplingParams(top_p=0.5, seed=1),
        SamplingParams(temperature=0.5),
    ]
    for _ in range(20):
        t = sample(x, params).token_ids
        assert t[0] == x[0].argmax()
        assert t[1] in x[1].topk(3).indices
        probs = x[2].softmax(-1)
        nucleus = probs.sort(descending=True)
        keep = int((nucleus.values.cumsum(0) < 0.5).sum()) + 1  # smallest set reaching 0.5
        assert t[2] in nucleus.indices[:keep]


def test_top_k_top_p_and_min_p_masks() -> None:
    x = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0]])
    assert apply_top_k_top_p(x, torch.tensor([2]), None).isfinite().tolist() == [
        [True, False, False, False, True]
    ]
    p = x.softmax(-1)[0]  # [0.23, 0.086, 0.032, 0.012, 0.64]
    kept = apply_top_k_top_p(x, None, torch.tensor([0.8])).isfinite()[0].tolist()
    assert kept == [True, False, False, False, True]  # 0.64 < 0.8 <= 0.64 + 0.23
    assert apply_top_k_top_p(x, None, torch.tensor([1.0])).isfinite().all()
    kept = apply_min_p(x, torch.tensor([0.1])).isfinite()[0].tolist()
    assert kept == [bool(q >= 0.1 * p.max()) for q in p]


def test_min_p_filters_unlikely_tokens_when_sampling() -> None:
    x = logits(1, scale=0.7).expand(4000, V).clone()
    probs = x[0].softmax(-1)
    allowed = set((probs >= 0.2 * probs.max()).nonzero().flatten().tolist())
    assert 1 < len(allowed) < V // 2
    tokens = set(sample(x, [SamplingParams(min_p=0.2)] * 4000).token_ids.tolist())
    assert tokens <= allowed and len(tokens) > 1
    assert len(set(sample(x, [SamplingParams()] * 4000).token_ids.tolist())) > len(allowed)


def test_repetition_penalty_changes_the_argmax_hf_style() -> None:
    x = torch.randn(2, V)
    x[1] -= 10  # row 1: every logit negative
    x[0, 3], x[0, 5] = 4.0, 3.9  # token 3 leads, but was seen: 4.0 / 1.2 < 3.9
    x[1, 7], x[1, 9] = -0.5, -0.55  # negative logits are multiplied: -0.5 * 1.2 = -0.6 < -0.55
    params = [SamplingParams(temperature=0, repetition_penalty=1.2)] * 2
    assert sample(x, [SamplingParams(temperature=0)] * 2).token_ids.tolist() == [3, 7]
    out = sample(x, params, output_token_ids=[[3], []], prompt_token_ids=[[1, 2], [7, 7]])
    assert out.token_ids.tolist() == [5, 9]
    pen = apply_repetition_penalty(x, torch.tensor([1.2, 1.0]), [[3, 3], [7]])
    assert pen[0, 3] == pytest.approx(4.0 / 1.2) and torch.equal(pen[1], x[1])  # once per token; row 1 off
    with pytest.raises(ValueError, match="needs prompt_token_ids"):
        sample(x, params)


def test_same_seed_same_tokens_whatever_the_batch() -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    steps = [logits(1, scale=1.0) for _ in range(6)]

    def run(position: int, batch: int) -> list[int]:
        gen = make_generator(seeded.seed)
        out = []
        for step in steps:
            x = logits(batch, scale=1.0)
            x[position] = step[0]
            params = [SamplingParams(temperature=0.8, top_k=5)] * batch
            params[position] = seeded
            gens = [make_generator(99 + i) if i % 2 else None for i in range(batch)]
            gens[position] = gen
            out.append(int(sample(x, params, gens).token_ids[position]))
        return out

    alone = run(0, 1)
    assert run(2, 5) == alone and run(6, 7) == alone
    other = SamplingParams(temperature=1.0, top_p=0.9, seed=4321)
    gen = make_generator(other.seed)
    assert [int(sample(s, [other], [gen]).token_ids[0]) for s in steps] != alone


def test_temperature_sampling_matches_softmax() -> None:
    v, n, temp = 6, 20000, 0.7
    x = logits(1, v, scale=1.0)
    want = (x[0] / temp).softmax(-1)
    tokens = sample(x.expand(n, v).clone(), [SamplingParams(temperature=temp)] * n).token_ids
    counts = torch.bincount(tokens, minlength=v).double()
    chi2 = float(((counts - n * want) ** 2 / (n * want)).sum())
    assert chi2 < 25.0  # 5 degrees of freedom: p < 1e-4 above this
    wrong = (x[0] / 1.5).softmax(-1)  # the check has power: another temperature fails it
    assert float(((counts - n * wrong) ** 2 / (n * wrong)).sum()) > 100.0


def test_logprobs_of_the_sampled_token_and_top_n_come_from_the_raw_logits() -> None:
    x = logits(3)
    params = [
        SamplingParams(temperature=0, logprobs=2),
        SamplingParams(logprobs=0, top_k=4, seed=3),
        SamplingParams(temperature=0),
    ]
    out = sample(x, params, [None, make_generator(3), None])
    lp = x.log_softmax(-1)
    assert out.logprobs is not None and out.logprobs.token_ids.shape == (3, 3)
    dicts = out.logprobs.to_dicts([p.logprobs for p in params])
    assert dicts[2] is None
    t0 = int(out.token_ids[0])
    top2 = lp[0].topk(2).indices.tolist()
    assert set(dicts[0]) == {t0, *top2} and dicts[0][t0].rank == 1
    assert dicts[0][t0].logprob == pytest.approx(float(lp[0, t0]))
    assert dicts[0][top2[1]].rank == 2
    t1 = int(out.token_ids[1])
    assert list(dicts[1]) == [t1] and dicts[1][t1].logprob == pytest.approx(float(lp[1, t1]))
    assert dicts[1][t1].rank == 1 + int((lp[1] > lp[1, t1]).sum())
    assert math.isclose(
        sum(math.exp(d.logprob) for d in dicts[0].values()), float(lp[0, top2].exp().sum()), rel_tol=1e-5
    )


@pytest.mark.parametrize(
    "vocab", [1000, 16411, 32000, 128256]
)  # below the threshold, no divisor (prime), chunked
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_argmax_equals_argmax_ties_included(vocab: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, vocab, generator=g).to(dtype)
    top = logits.max(dim=-1, keepdim=True).values
    logits[1, vocab // 3] = top[1, 0]  # a tie with the row's maximum: the first one wins
    logits[1, vocab - 1] = top[1, 0]
    logits[2, :] = logits[2, 0]  # a constant row: index 0
    assert torch.equal(greedy_argmax(logits), logits.argmax(dim=-1))
    assert greedy_argmax(logits)[2] == 0
    assert (_argmax_chunk(vocab) > 0) == (vocab in (32000, 128256))  # the two-stage path ran where meant


def test_keyed_noise_is_exponential_and_depends_on_seed_and_position_only() -> None:
    from kiln.runtime.sampler import keyed_exponential

    seeds, positions = torch.tensor([7, 7, 8, 0x632BE5AB + 5, 0x632BE5AB + 10]), torch.tensor([3, 4, 3, 10, 5])
    noise = keyed_exponential(seeds, positions, 200_000)
    assert torch.allclose(noise.mean(1), torch.ones(5), atol=0.01) and torch.allclose(noise.std(1), torch.ones(5), atol=0.01)
    u = torch.exp(-noise[0])  # uniform in (0, 1): ten equal bins
    assert torch.histc(u, 10, 0, 1).sub(20_000).abs().max() < 600
    assert torch.equal(noise[:1], keyed_exponential(seeds[:1], positions[:1], 200_000))  # a function of the key
    for i in range(5):
        for j in range(i):
            assert abs(float(torch.corrcoef(noise[[i, j]])[0, 1])) < 0.01, (i, j)  # other keys: independent
    big = keyed_exponential(torch.tensor([-1, 2**62]), torch.tensor([0, 0]), 8)  # any 64-bit seed
    assert torch.isfinite(big).all() and (big > 0).all()
