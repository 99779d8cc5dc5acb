"""Speculative decoding on the CPU: exactness (greedy identity, chi-square on distributions), integration, leaks."""

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln_testing import chi_square_p, hf_llama, tiny_vocab_llama

import kiln
from kiln.runtime.drafters import DraftRequest, NgramDrafter
from kiln.runtime.model_runner import SequenceStep
from kiln.runtime.request import Request
from kiln.runtime.sampler import processed_probs, sample
from kiln.runtime.speculative import SpeculationPolicy, SpeculativeConfig, rejection_sample, verify

GREEDY = kiln.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
SETTINGS = [  # (temperature, top_p, top_k, min_p)
    dict(temperature=1.0),
    dict(temperature=0.7, top_p=0.8),
    dict(temperature=1.3, top_k=5),
    dict(temperature=0.9, top_p=0.9, min_p=0.05),
]


# -- the rejection sampler, many rows at once ---------------------------------------------------------


def _speculate_chain(p_chain: torch.Tensor, q_chain: torch.Tensor, n: int, k: int, length: int,
                     greedy: bool = False) -> torch.Tensor:
    """Generate ``length`` tokens for ``n`` rows of a bigram target ``p_chain[prev]`` by speculating
    with a bigram drafter ``q_chain``, a random number of drafts (0..k) per row and step."""
    out = torch.full((n, length + k + 1), -1)
    count = torch.zeros(n, dtype=torch.long)
    prev = torch.zeros(n, dtype=torch.long)  # every row starts after token 0
    rows = torch.arange(n)
    while bool((count < length).any()):
        drafts = torch.empty(n, k, dtype=torch.long)
        x = prev
        for j in range(k):
            x = torch.multinomial(q_chain[x], 1).squeeze(1)
            drafts[:, j] = x
        ctx = torch.cat([prev[:, None], drafts], dim=1)  # (N, K+1): the token before each position
        num = torch.randint(0, k + 1, (n,))
        tokens, accepted = rejection_sample(
            p_chain[ctx], drafts, num, q_chain[ctx[:, :k]], torch.full((n,), greedy)
        )
        assert bool((accepted <= num).all())
        going = count < length
        for j in range(k + 1):
            live = going & (j <= accepted)
            out[rows[live], count[live] + j] = tokens[live, j]
        count += torch.where(going, accepted + 1, 0)
        prev = tokens[rows, accepted]
    return out[:, :length]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_rejection_sampler_reproduces_the_target_chain_distribution(setting) -> None:
    v, n = 8, 20000
    g = torch.Generator().manual_seed(7)
    target_logits = torch.randn(v, v, generator=g) * 1.5
    draft_logits = target_logits + torch.randn(v, v, generator=g)  # a correlated, imperfect drafter
    params = [kiln.SamplingParams(**setting)] * v
    p, q = processed_probs(target_logits, params), processed_probs(draft_logits, params)
    out = _speculate_chain(p, q, n, k=3, length=2)
    joint = torch.zeros(v * v)
    joint.index_add_(0, out[:, 0] * v + out[:, 1], torch.ones(n))
    exact = p[0][:, None] * p  # P(a, b) = p(a | 0) p(b | a)
    assert chi_square_p(joint, exact) > 1e-3


def test_rejection_sampler_is_greedy_for_greedy_rows() -> None:
    v, n = 8, 2000
    target_logits, draft_logits = torch.randn(v, v), torch.randn(v, v)
    p = processed_probs(target_logits, [kiln.SamplingParams(temperature=0)] * v)
    q = processed_probs(draft_logits, [kiln.SamplingParams(temperature=1.0)] * v)
    out = _speculate_chain(p, q, n, k=3, length=5, greedy=True)
    chain = [0]
    for _ in range(5):
        chain.append(int(target_logits[chain[-1]].argmax()))
    assert (out == torch.tensor(chain[1:])).all()


def test_verify_keeps_the_leading_drafts_that_are_the_argmax() -> None:
    v = 10
    logits = torch.randn(10, v)  # rows: request 0: 0; 1: 1-2; 2: 3-5; 3: 6-9
    best = logits.argmax(dim=-1).tolist()

    def wrong(t: int) -> int:
        return (t + 1) % v

    drafts = [[], [wrong(best[1])], [best[3], wrong(best[4])], [best[6], best[7], best[8]]]
    want = [[best[0]], [best[1]], [best[3], best[4]], [best[6], best[7], best[8], best[9]]]  # the last: a bonus
    greedy = kiln.SamplingParams(temperature=0)
    assert verify(logits, drafts, [None] * 4, [greedy] * 4) == want  # the argmax fast path
    general = verify(torch.cat([logits, torch.randn(1, v)]), [*drafts, []], [None] * 5,
                     [greedy] * 4 + [kiln.SamplingParams(temperature=1.0)])  # through the rejection sampler
    assert general[:4] == want


def test_processed_probs_is_the_distribution_the_sampler_draws_from() -> None:
    v, n = 12, 20000
    logits = torch.randn(v) * 2
    seen = [3, 3, 7]
    for setting in [*SETTINGS, dict(temperature=0.8, repetition_penalty=1.5)]:
        params = kiln.SamplingParams(**setting)
        want = processed_probs(logits[None], [params], [seen])[0]
        got = sample(logits.expand(n, v), [params] * n, None, [seen] * n, [[]] * n).token_ids
        assert chi_square_p(torch.bincount(got, minlength=v), want) > 1e-3, setting
    greedy = processed_probs(logits[None], [kiln.SamplingParams(temperature=0)])[0]
    assert greedy.sum() == 1 and greedy.argmax() == logits.argmax()


# -- drafters and the policy --------------------------------------------------------------------------


def test_ngram_lookup_prefers_long_recent_matches_with_a_full_continuation() -> None:
    d = NgramDrafter(min_n=1, max_n=3)
    assert d.lookup([1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 6, 1, 2, 3], 3) == [4, 5, 6]  # latest 3-gram match
    assert d.lookup([7, 1, 2, 8, 8, 8, 5, 2], 2) == [8, 8]  # only a 1-gram matches
    assert d.lookup([1, 2, 3, 4, 5], 2) == []
    assert d.lookup([5, 1, 2, 5, 1, 2], 4) == [5, 1, 2]  # the latest match has a short continuation only
    req = Request(request_id="r", prompt_token_ids=[4, 5, 6, 4, 5])
    assert d.propose([DraftRequest(request=req, num_tokens=2)])["r"].token_ids == [6, 4]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.lists(st.integers(1, 7), min_size=1, max_size=12),
       st.integers(1, 2), st.integers(2, 4), st.integers(1, 5))
def test_incremental_ngram_index_proposes_what_a_fresh_lookup_finds(prompt, growth, min_n, max_n, k) -> None:
    d = NgramDrafter(min_n=min(min_n, max_n), max_n=max_n)
    req = Request(request_id="r", prompt_token_ids=list(prompt))
    rng = iter(range(10**6))
    for grow in growth:  # tokens arrive a few per step, as verified drafts do
        got = d.propose([DraftRequest(request=req, num_tokens=k)])
        want = d.lookup(req.all_token_ids, k)
        assert (got["r"].token_ids if "r" in got else []) == want
        req.output_token_ids.extend((next(rng) * 7 + t) % 5 for t in range(grow))
    d.on_finished("r")
    assert not d._index


def test_policy_lowers_k_stops_and_probes_again() -> None:
    policy = SpeculationPolicy(max_tokens=5, cost=0.2)
    assert 1 <= policy.num_drafts("a", 0) <= 5  # the prior speculates
    for step in range(20):
        policy.observe("a", 5, 5, step)
    assert policy.num_drafts("a", 20) == 5
    for step in range(20, 120):
        policy.observe("a", 3, 0, step)
    assert policy.num_drafts("a", 120) == 0  # nothing is accepted any more: off
    assert policy.num_drafts("a", 120 + 60) == 1  # the evidence faded: probe again
    policy.forget("a")
    for step in range(10):
        policy.observe("a", 5, 4, step)
    assert 2 <= policy.num_drafts("a", 10) < 5  # high but imperfect acceptance: a middle k
    assert SpeculationPolicy(max_tokens=3, cost=0.9, adaptive=False).num_drafts("a", 0) == 3


def test_config_and_params_are_validated() -> None:
    with pytest.raises(kiln.ConfigError, match="method"):
        SpeculativeConfig(method="medusa")  # type: ignore[arg-type]
    with pytest.raises(kiln.ConfigError, match="draft_model"):
        SpeculativeConfig(method="draft_model")
    with pytest.raises(kiln.ConfigError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=0)
    with pytest.raises(kiln.ConfigError, match="prompt_lookup_max"):
        SpeculativeConfig(method="ngram", prompt_lookup_min=3, prompt_lookup_max=2)
    with pytest.raises(kiln.ConfigError, match="speculative"):
        kiln.SamplingParams(speculative="yes")  # type: ignore[arg-type]


# -- the engine ----------------------------------------------------------------------------------------

_CACHE: dict[str, object] = {}


def _shared(name: str, build):
    if name not in _CACHE:
        _CACHE[name] = build()
    return _CACHE[name]


def _seeded(build, seed: int):
    def make():
        torch.manual_seed(seed)  # the same weights whichever test builds it first
        return build()
    return make


def _model() -> torch.nn.Module:
    return _shared("model", _seeded(hf_llama, 1234))  # type: ignore[return-value]


def _reference() -> kiln.LLM:  # no prefix caching: its runner's blocks are all free between tests
    return _shared("ref", lambda: kiln.LLM(_model(), num_blocks=64, block_size=4, enable_prefix_caching=False))


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _repetitive(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 128, (5,), generator=g).tolist()
    return (motif * 8)[:n]


def test_runner_returns_the_logits_of_the_last_tokens_of_each_sequence() -> None:
    runner, model = _reference().runner, _model()
    a, b = torch.randint(0, 128, (9,)).tolist(), torch.randint(0, 128, (5,)).tolist()
    out = runner.execute([SequenceStep(a, 0, [0, 1, 2], num_logits=3), SequenceStep(b, 0, [3, 4]),
                          SequenceStep(b, 0, [5, 6], num_logits=5)])
    with torch.no_grad():
        la, lb = model(input_ids=torch.tensor([a])).logits[0], model(input_ids=torch.tensor([b])).logits[0]
    torch.testing.assert_close(out, torch.cat([la[-3:], lb[-1:], lb]), rtol=1e-4, atol=1e-5)
    with pytest.raises(kiln.ConfigError, match="num_logits"):
        runner.execute([SequenceStep(b, 0, [3, 4], num_logits=6)])


def test_ngram_greedy_is_token_identical_and_reports_metrics() -> None:
    # the random model does not copy its prompt, but it falls into loops of its own that prompt lookup finds
    prompts = [_repetitive(23, 1), _repetitive(17, 2), torch.randint(0, 128, (9,)).tolist(), _repetitive(30, 3)]
    params = [kiln.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)] * 3 + [
        kiln.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, speculative=False)
    ]
    want = _reference().generate(prompts, params, use_tqdm=False)
    llm = kiln.LLM(_model(), num_blocks=64, block_size=4,
                   speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want, strict=True):  # logprobs come from the row that chose each token
        lg = [lp[t].logprob for t, lp in zip(g.outputs[0].token_ids, g.outputs[0].logprobs, strict=True)]
        lw = [lp[t].logprob for t, lp in zip(w.outputs[0].token_ids, w.outputs[0].logprobs, strict=True)]
        assert lg == pytest.approx(lw, abs=1e-4)
    assert got[3].metrics.num_draft_tokens == 0  # opted out, in the same batch
    for m in (o.metrics for o in got[:3]):
        assert m.num_draft_tokens > 0 and m.num_spec_steps > 0
        assert m.acceptance_rate == pytest.approx(m.num_accepted_tokens / m.num_draft_tokens)
        assert m.accepted_tokens_per_step == pytest.approx(1 + m.num_accepted_tokens / m.num_spec_steps)
    s = llm.stats
    assert s["draft_tokens"] == sum(o.metrics.num_draft_tokens for o in got)
    assert s["accepted_tokens"] == sum(o.metrics.num_accepted_tokens for o in got) > 0
    assert s["generated_tokens"] == 4 * 24 and s["accepted_tokens_per_step"] > 1.5
    llm.speculative = dataclasses.replace(llm.speculative, disable_by_batch_size=1)  # a "large" batch: no drafts
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    assert llm.stats["draft_tokens"] == s["draft_tokens"]


def _copy_drafter_llm() -> kiln.LLM:
    return _shared("copy", lambda: kiln.LLM(
        _model(), num_blocks=48, block_size=4, max_num_batched_tokens=8,  # chunked prefill, truncated drafts
        speculative=SpeculativeConfig(method="draft_model", draft_model=copy.deepcopy(_model()),
                                      num_speculative_tokens=3, adaptive=False),
    ))


def test_draft_model_equal_to_the_target_is_always_accepted() -> None:
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (5, 11)]
    llm = _copy_drafter_llm()
    before = dict(llm.stats)
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(got) == _tokens(_reference().generate(prompts, GREEDY, use_tqdm=False))
    drafted = llm.stats["draft_tokens"] - before["draft_tokens"]
    assert drafted > 0 and llm.stats["accepted_tokens"] - before["accepted_tokens"] == drafted


def test_speculation_with_prefix_caching_and_chunked_prefill() -> None:
    shared = torch.randint(0, 128, (29,)).tolist()
    prompts = [shared + [3, 4], shared + [9], shared + _repetitive(6, 4)]
    want = _tokens(_reference().generate(prompts, GREEDY, use_tqdm=False))
    llm = _copy_drafter_llm()  # a budget of 8 tokens: prompts arrive in chunks, drafts get cut
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    assert _tokens(first + rest) == want
    assert all(o.num_cached_tokens >= 28 for o in rest)  # seven shared blocks of 4
    assert all(o.metrics.num_draft_tokens > 0 for o in first + rest)
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks and llm.drafter.num_free_blocks == llm.drafter.num_blocks


def _tight_llm() -> kiln.LLM:  # a poor drafter that always drafts, and too few blocks: preemptions
    return _shared("tight", lambda: kiln.LLM(
        _model(), num_blocks=14, block_size=4, max_num_batched_tokens=24,
        speculative=SpeculativeConfig(method="draft_model", draft_model=hf_llama(layers=1),
                                      num_speculative_tokens=3, draft_cost=0.0, draft_num_blocks=24),
    ))


def test_small_draft_model_greedy_is_token_identical_under_preemption() -> None:
    prompts = [torch.randint(0, 128, (n,)).tolist() for n in (9, 14, 12, 10)]
    llm = _tight_llm()
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(got) == _tokens(_reference().generate(prompts, GREEDY, use_tqdm=False))
    assert sum(o.metrics.num_preemptions for o in got) > 0
    assert sum(o.metrics.num_draft_tokens for o in got) > sum(o.metrics.num_accepted_tokens for o in got)


def _counting_fill(graphs) -> list:
    used: list = []
    fill = graphs.fill
    graphs.fill = lambda steps, sources=None, key=None: used.append(fill(steps, sources, key)) or used[-1]
    return used


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_verification_and_draft_steps_run_in_step_graphs(method: str) -> None:
    prompts = [_repetitive(13, 5), torch.randint(0, 128, (9,)).tolist(), _repetitive(11, 6)]
    want = _tokens(_reference().generate(prompts, GREEDY, use_tqdm=False))
    spec = SpeculativeConfig(method=method, num_speculative_tokens=3, adaptive=False,
                             draft_model=hf_llama(layers=1) if method == "draft_model" else None)
    llm = kiln.LLM(_model(), num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16,
                   enable_prefix_caching=False, speculative=spec)
    runners = [llm.runner] + ([llm.drafter.runner] if method == "draft_model" else [])
    used, eager = [], []
    for runner, rows in zip(runners, [4 * 4, None][: len(runners)], strict=True):  # static padded buffers: the CUDA-graph path, uncaptured
        graphs = runner.enable_cuda_graphs(max_num_seqs=4, max_model_len=llm.max_model_len, max_num_tokens=16,
                                           max_num_logits=rows, capture=False)
        used.append(_counting_fill(graphs))
        step_gm = runner.step_gm
        runner.step_gm = lambda *a, _f=step_gm: eager.append(1) or _f(*a)  # the op-by-op path
    got = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert _tokens(got) == want and not eager  # every step of the target (and the drafter) in a bucket
    verify_keys = [k for k in used[0] if k[1][2] > k[1][1]]  # buckets with several logits rows per sequence
    assert verify_keys and llm.stats["spec_steps"] > 0
    if method == "draft_model":
        assert any(decode for decode, _ in used[1])  # draft tokens 2..k: decode buckets fed on the device
        assert llm.drafter.num_free_blocks == llm.drafter.num_blocks  # every finished request gave its blocks back


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 8), st.booleans(), st.sampled_from([0.0, 0.8]),
                          st.booleans(), st.sampled_from([1.0, 1.3])), min_size=2, max_size=6))
def test_random_workloads_with_speculation_leak_no_blocks(spec) -> None:
    llm = _tight_llm()
    ids = []
    for n, max_tokens, abort, temperature, speculative, penalty in spec:
        params = kiln.SamplingParams(temperature=temperature, top_p=0.9, max_tokens=max_tokens,
                                     speculative=speculative, repetition_penalty=penalty)
        ids.append((llm.add_request(torch.randint(0, 128, (n,)).tolist(), params), abort))
    llm.step()
    llm.step()
    for rid, abort in ids:
        if abort:
            llm.abort_request(rid)
    while llm.has_unfinished_requests():
        llm.step()
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert llm.drafter.num_free_blocks == llm.drafter.num_blocks and not llm.drafter._states


def test_engine_sampling_with_a_draft_model_keeps_the_target_distribution() -> None:
    target = tiny_vocab_llama(11, layers=2, max_positions=64)
    draft = copy.deepcopy(target)  # a related but different drafter: the target's weights, perturbed
    with torch.no_grad():
        for w in draft.parameters():
            w.add_(torch.randn_like(w) * 0.1)
    params = kiln.SamplingParams(temperature=0.9, top_p=0.9, max_tokens=4, ignore_eos=True)
    llm = kiln.LLM(target, num_blocks=4000, block_size=4, max_num_seqs=1000, max_num_batched_tokens=4096,
                   speculative=SpeculativeConfig(method="draft_model", draft_model=draft, num_speculative_tokens=2,
                                                 adaptive=False, disable_by_batch_size=None))
    prompt, n, v = [3, 7, 1, 5], 800, 12
    torch.manual_seed(0)
    out = torch.tensor(_tokens(llm.generate([prompt] * n, params, use_tqdm=False)))  # (n, 4)
    assert 0.2 < llm.stats["acceptance_rate"] < 0.95  # drafts both kept and rejected
    with torch.no_grad():  # the exact distributions of tokens 2 and 3 under the target
        p1 = processed_probs(target(input_ids=torch.tensor([prompt])).logits[:, -1], [params])[0]
        ctx = torch.tensor([prompt + [a] for a in range(v)])
        p2 = processed_probs(target(input_ids=ctx).logits[:, -1], [params] * v)  # (a, b)
        ctx = torch.tensor([prompt + [a, b] for a in range(v) for b in range(v)])
        p3 = processed_probs(target(input_ids=ctx).logits[:, -1], [params] * v * v).view(v, v, v)
    second = p1 @ p2
    assert int((second > 0.05).sum()) >= 4  # a spread distribution, not a near-certain token
    third = torch.einsum("a,ab,abc->c", p1, p2, p3)
    assert chi_square_p(torch.bincount(out[:, 1], minlength=v), second) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 2], minlength=v), third) > 1e-3



def test_stop_strings_end_speculative_requests_while_the_next_step_runs() -> None:
    # Speculative steps launch the next step before detokenizing this one: a stop string found then must
    # still end the request exactly there, and the step already launched for it must change nothing.
    from pathlib import Path

    teacher = Path(__file__).resolve().parents[2] / "models" / "kiln-teacher"
    prompts = ["def read_config(path):\n", "class Parser:\n    def __init__(self):\n"]
    params = kiln.SamplingParams(temperature=0, max_tokens=40, stop=["\n\n", "return"])
    plain = kiln.LLM(str(teacher), num_blocks=64, block_size=16)
    want = plain.generate(prompts, params, use_tqdm=False)
    spec = kiln.LLM(str(teacher), num_blocks=64, block_size=16,
                    speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False))
    got = spec.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert any(o.outputs[0].finish_reason == "stop" for o in got)
    again = spec.generate(prompts[:1], params, use_tqdm=False)  # collects whatever was still in flight first
    assert again[0].outputs[0].text == want[0].outputs[0].text
    manager = spec.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_an_aborted_id_is_refused_while_its_step_is_in_flight() -> None:
    llm = kiln.LLM(_model(), num_blocks=64, block_size=4,
                   speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=3, adaptive=False))
    llm.add_request(_repetitive(12, 7), GREEDY, request_id="a")
    llm.add_request(_repetitive(12, 8), GREEDY, request_id="b")
    for _ in range(3):
        llm.step()  # speculative steps: the next one is launched before step() returns
    assert llm._in_flight("a")
    llm.abort_request("a")
    with pytest.raises(kiln.ConfigError, match="still running"):
        llm.add_request(_repetitive(5, 9), GREEDY, request_id="a")
    llm.step()  # applies the step in flight (its tokens for "a" are dropped)
    llm.add_request(_repetitive(5, 9), GREEDY, request_id="a")  # now a new request may take the id
    while llm.has_unfinished_requests():
        llm.step()
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
