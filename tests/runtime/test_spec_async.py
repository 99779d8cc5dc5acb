"""Asynchronous prompt-lookup speculation: drafts made and verified on the device, steps launched ahead.

On the CPU the device work runs at once, but the bookkeeping is the GPU's: the host counts
every draft as accepted, the next step is scheduled before the verified tokens are seen, the
runner feeds the next inputs and rolls positions back on the device. Greedy outputs must be
exactly those of plain decoding.
"""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln_testing import chi_square_p, hf_llama, tiny_vocab_llama

import kiln
from kiln.runtime.request import Request
from kiln.runtime.sampler import processed_probs
from kiln.runtime.scheduler import PLACEHOLDER, Scheduler, SchedulerConfig
from kiln.runtime.scheduler_output import ModelRunnerOutput
from kiln.runtime.speculative import SpeculativeConfig
from kiln.runtime.step_inputs import DeviceFeed

NGRAM = SpeculativeConfig(
    method="ngram", num_speculative_tokens=3, adaptive=False, disable_by_batch_size=None
)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(7)
    return hf_llama(layers=1)


def _repetitive(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, 128, (5,), generator=g).tolist()
    return (motif * 8)[:n]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [
        _repetitive(23, 1),
        _repetitive(17, 2),
        torch.randint(0, 128, (9,), generator=g).tolist(),
        _repetitive(30, 3),
        torch.randint(0, 128, (4,), generator=g).tolist(),
    ]


def _tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def _no_leaks(llm: kiln.LLM) -> None:
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm.scheduler.num_pending or llm._inflight is not None


def _spy_feeds(llm: kiln.LLM) -> list[int]:
    """The most tokens one sequence took from the device, per step."""
    seen: list[int] = []
    execute = llm.runner.execute

    def spy(steps, feed=None):  # noqa: ANN001, ANN202
        if isinstance(feed, DeviceFeed):
            seen.append(max(c for c, s in zip(feed.counts, feed.sources, strict=True) if s >= 0))
        return execute(steps, feed)

    llm.runner.execute = spy
    return seen


@pytest.mark.parametrize("graphs", [False, True], ids=["op-by-op", "static-buffers"])
def test_async_ngram_greedy_equals_plain_decoding(model, graphs: bool) -> None:
    prompts = _prompts()
    params = [
        kiln.SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, speculative=s)
        for m, s in zip([24, 9, 17, 24, 1], [True, True, True, False, True], strict=True)
    ]
    plain = kiln.LLM(model, num_blocks=96, block_size=4, enable_prefix_caching=False, async_scheduling=False)
    want = _tokens(plain.generate(prompts, params, use_tqdm=False))
    llm = kiln.LLM(
        model,
        num_blocks=96,
        block_size=4,
        max_num_seqs=4,
        max_num_batched_tokens=16,
        speculative=NGRAM,
        async_scheduling=True,
    )  # chunked prefill: prompts arrive in pieces
    assert llm._spec_async is not None
    if graphs:
        llm.runner.enable_cuda_graphs(
            max_num_seqs=4,
            max_model_len=llm.max_model_len,
            max_num_tokens=16,
            max_num_logits=16,
            capture=False,
        )
    fed = _spy_feeds(llm)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _tokens(got) == want
    assert max(fed) == 4  # the new last token and 3 drafts, all made on the device
    s = llm.stats
    assert s["spec_steps"] > 0 and 0 < s["accepted_tokens"] <= s["draft_tokens"]
    assert s["generated_tokens"] == sum(len(w) for w in want) and s["accepted_tokens_per_step"] > 1.5
    assert got[3].metrics.num_draft_tokens == 0  # opted out, in the same batches
    assert s["steps"] < sum(len(w) for w in want[:4])  # fewer steps than tokens of the longest ones
    _no_leaks(llm)
    assert not llm._spec_async.history.slots  # every finished request gave its history back


def test_async_ngram_under_prefix_caching_preemption_stops_and_abort(model) -> None:
    prompts = _prompts()
    plain = kiln.LLM(model, num_blocks=96, block_size=4, enable_prefix_caching=False, async_scheduling=False)
    free = _tokens(plain.generate(prompts, kiln.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True),
                                  use_tqdm=False))  # fmt: skip
    tight = kiln.LLM(
        model,
        num_blocks=22,
        block_size=4,
        max_num_batched_tokens=32,
        speculative=NGRAM,
        async_scheduling=True,
    )  # 88 slots for 5 requests of up to 50 tokens: preemption
    got = tight.generate(
        prompts, kiln.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False
    )
    assert _tokens(got) == free
    assert sum(o.metrics.num_preemptions for o in got) > 0
    _no_leaks(tight)
    roomy = kiln.LLM(model, num_blocks=96, block_size=4, speculative=NGRAM, async_scheduling=True)
    greedy = kiln.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    shared = [prompts[3], prompts[3][:21] + prompts[0][:6]]  # the second starts with 5 of the first's blocks
    roomy.generate(shared[:1], greedy, use_tqdm=False)
    again = roomy.generate(shared, greedy, use_tqdm=False)
    assert _tokens(again) == _tokens(plain.generate(shared, greedy, use_tqdm=False))
    assert [o.num_cached_tokens for o in again] == [28, 20]  # prefix-cache hits
    _no_leaks(roomy)
    # stop tokens met inside an accepted run of drafts: the tokens after them are dropped
    stops = [kiln.SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[t[5]]) for t in free]
    want = [t[: t.index(t[5]) + 1] for t in free]
    assert _tokens(tight.generate(prompts, stops, use_tqdm=False)) == want
    _no_leaks(tight)
    rid = tight.add_request(prompts[3], kiln.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    other = tight.add_request(prompts[0], kiln.SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    for _ in range(4):
        tight.step()
    assert tight.abort_request(rid)
    done = {}
    while tight.has_unfinished_requests():
        done.update((o.request_id, o) for o in tight.step() if o.finished)
    assert done[other].outputs[0].token_ids == free[0] and rid not in done
    tight.step()  # drains the step launched for the last request
    _no_leaks(tight)
    assert not tight.scheduler.num_pending and not tight._spec_async.history.slots


def test_a_logprobs_request_runs_the_batch_in_lockstep_and_async_resumes(model) -> None:
    prompts = _prompts()
    greedy = kiln.SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain = kiln.LLM(model, num_blocks=96, block_size=4, enable_prefix_caching=False, async_scheduling=False)
    want = _tokens(plain.generate(prompts[:2], greedy, use_tqdm=False))
    llm = kiln.LLM(model, num_blocks=96, block_size=4, speculative=NGRAM, async_scheduling=True)
    ids = [llm.add_request(p, greedy) for p in prompts[:2]]
    outs: dict = {}
    for _ in range(3):
        outs.update((o.request_id, o) for o in llm.step())
    assert llm._inflight is not None  # running ahead
    sampled = llm.add_request(
        prompts[2], kiln.SamplingParams(temperature=0.8, max_tokens=4, seed=1, ignore_eos=True, logprobs=2)
    )
    assert sampled in llm._sync_ids  # its logprobs are made on the host: this one runs in lockstep
    while llm.has_unfinished_requests():
        outs.update((o.request_id, o) for o in llm.step())
    assert [outs[i].outputs[0].token_ids for i in ids] == want
    assert len(outs[sampled].outputs[0].token_ids) == 4
    _no_leaks(llm)


@settings(max_examples=6, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 20), st.integers(1, 12), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.8])
        ),
        min_size=2,
        max_size=6,
    )
)
def test_random_async_speculative_workloads_leak_no_blocks(spec) -> None:
    torch.manual_seed(11)
    llm = kiln.LLM(hf_llama(layers=1), num_blocks=20, block_size=4, max_num_batched_tokens=24, speculative=NGRAM,
                   async_scheduling=True)  # fmt: skip
    ids = []
    for n, max_tokens, abort, speculative, temperature in spec:
        params = kiln.SamplingParams(temperature=temperature, max_tokens=max_tokens, speculative=speculative)
        ids.append((llm.add_request(_repetitive(n, n), params), abort))
    llm.step()
    llm.step()
    for rid, abort in ids:
        if abort:
            llm.abort_request(rid)
    while llm.has_unfinished_requests():
        llm.step()
    llm.step()
    _no_leaks(llm)
    assert not llm._spec_async.history.slots


def test_scheduler_counts_every_draft_pending_and_takes_back_the_rejected() -> None:
    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_num_seqs=2, max_num_batched_tokens=64,
                                      max_model_len=64))  # fmt: skip
    req = Request(
        request_id="a", prompt_token_ids=[1, 2, 3], sampling_params=kiln.SamplingParams(max_tokens=20)
    )
    sched.add_request(req)
    s0 = sched.schedule()
    sched.mark_pending(s0)
    assert sched.num_pending == {"a": 1}
    req.spec_token_ids = [PLACEHOLDER] * 3
    s1 = sched.schedule()  # before s0's token is known: the pending token and 3 drafts, all placeholders
    assert s1.scheduled_cached_reqs[0].new_token_ids == [PLACEHOLDER] * 4
    assert s1.scheduled_spec_decode_tokens == {"a": [PLACEHOLDER] * 3}
    sched.mark_pending(s1)
    assert sched.num_pending == {"a": 5} and req.num_computed_tokens == 7
    sched.update_from_output(s0, ModelRunnerOutput(sampled_token_ids={"a": [9]}))
    assert sched.num_pending == {"a": 4}
    sched.update_from_output(s1, ModelRunnerOutput(sampled_token_ids={"a": [4, 5]}))  # 1 of 3 drafts accepted
    assert not sched.num_pending and req.output_token_ids == [9, 4, 5]
    assert req.num_computed_tokens == 5  # prompt, 9 and 4 computed; 5 is the next input


def test_requests_whose_lookups_find_nothing_stop_verifying_padding() -> None:
    from kiln.runtime.spec_async import AsyncSpeculation
    from kiln.runtime.speculative import SpeculationPolicy

    spec = AsyncSpeculation(
        num_drafts=3, min_n=1, max_n=3, max_num_seqs=2, max_model_len=64, device=torch.device("cpu")
    )
    req = Request(
        request_id="a", prompt_token_ids=[1, 2, 3], sampling_params=kiln.SamplingParams(max_tokens=20)
    )
    req.num_computed_tokens = 3  # its first token is pending
    policy = SpeculationPolicy(3, 0.0, adaptive=False)
    spec.propose([req], {"a": 1}, policy, 0, 64)
    assert req.spec_token_ids == [PLACEHOLDER] * 3
    spec.dry["a"] = 2  # two lookups in a row found nothing
    req.spec_token_ids = []
    spec.propose([req], {"a": 1}, policy, 0, 64)
    assert req.spec_token_ids == []  # a plain decode step
    spec.propose(
        [req], {}, policy, 0, 64
    )  # no pending token: the host looks up itself (finds no 1-gram repeat)
    assert req.spec_token_ids == []


LOOKUP = SpeculativeConfig(method="ngram", num_speculative_tokens=2, adaptive=False, disable_by_batch_size=None,
                           prompt_lookup_min=1, prompt_lookup_max=3)  # fmt: skip


def _tiny_target() -> tuple[torch.nn.Module, list[int]]:
    """A 12-token model and a prompt whose lookups draft what it often samples: its own greedy
    continuation of a start, then the start again."""
    target = tiny_vocab_llama(11)
    prompt = [3, 7, 1, 5]
    with torch.no_grad():
        for _ in range(20):
            prompt.append(int(target(input_ids=torch.tensor([prompt])).logits[0, -1].argmax()))
    return target, [*prompt, 3, 7, 1, 5]


@pytest.mark.parametrize("setting", [dict(temperature=0.9, top_p=0.9), dict(temperature=1.2, top_k=4, min_p=0.02)])
def test_async_ngram_sampling_keeps_the_target_distribution(setting) -> None:
    """Point-mass drafts verified against a draw per position: tokens 1-4 follow the target's chain."""
    target, prompt = _tiny_target()
    v, n = 12, 600
    params = kiln.SamplingParams(max_tokens=4, ignore_eos=True, **setting)
    llm = kiln.LLM(target, num_blocks=2000, block_size=4, max_num_seqs=n, max_num_batched_tokens=8192,
                   speculative=LOOKUP, async_scheduling=True)  # fmt: skip
    torch.manual_seed(0)
    out = torch.tensor(_tokens(llm.generate([prompt] * n, params, use_tqdm=False)))  # (n, 4)
    assert not llm._sync_ids and llm.stats["draft_tokens"] > n  # verified on the device, not in lockstep
    assert 0.2 < llm.stats["acceptance_rate"] < 0.8  # drafts both kept and rejected
    with torch.no_grad():  # the exact distributions of tokens 1-4 under the target
        def probs(prefixes: list[list[int]]) -> torch.Tensor:
            ctx = torch.tensor([prompt + list(p) for p in prefixes])
            return processed_probs(target(input_ids=ctx).logits[:, -1], [params] * len(prefixes))

        p1 = probs([[]])[0]
        p2 = probs([[a] for a in range(v)])  # (a, b)
        p3 = probs([[a, b] for a in range(v) for b in range(v)]).view(v, v, v)
        p4 = probs([[a, b, c] for a in range(v) for b in range(v) for c in range(v)]).view(v, v, v, v)
    joint = p1[:, None] * p2  # (a, b)
    third = torch.einsum("ab,abc->abc", joint, p3)
    assert chi_square_p(torch.bincount(out[:, 0] * v + out[:, 1], minlength=v * v), joint) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 2], minlength=v), third.sum((0, 1))) > 1e-3
    assert chi_square_p(torch.bincount(out[:, 3], minlength=v), torch.einsum("abc,abcd->d", third, p4)) > 1e-3
    _no_leaks(llm)


def test_a_seeded_request_samples_the_same_tokens_with_or_without_speculation() -> None:
    """Keyed draws (seed, position): speculation (lockstep or asynchronous), chunked prefill, the batch
    and a lockstep switch forced by a neighbour change none of a seeded request's tokens."""
    target, prompt = _tiny_target()
    seeded = kiln.SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16, seed=123, ignore_eos=True)
    other = kiln.SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)

    def run(batch: list[list[int]], params: list[kiln.SamplingParams], **kw) -> list[list[int]]:  # noqa: ANN003
        llm = kiln.LLM(target, num_blocks=96, block_size=4, **kw)
        got = _tokens(llm.generate(batch, params, use_tqdm=False))
        _no_leaks(llm)
        return got

    (alone,) = run([prompt], [seeded], async_scheduling=False)  # no speculation, lockstep
    assert run([prompt], [seeded], async_scheduling=True) == [alone]  # no speculation, asynchronous
    assert run([prompt], [seeded], speculative=LOOKUP, async_scheduling=False) == [alone]  # lockstep verification
    assert run([prompt], [seeded], speculative=LOOKUP, async_scheduling=True) == [alone]  # on the device
    chunked = run([prompt], [seeded], speculative=LOOKUP, async_scheduling=True, max_num_batched_tokens=8)
    assert chunked == [alone]  # the prompt in 4 chunks
    mixed = run([prompt[4:], prompt, prompt[:9]], [other, seeded, other], speculative=LOOKUP, async_scheduling=True)
    assert mixed[1] == alone
    logprobs = dataclasses.replace(other, logprobs=1)  # a neighbour that forces lockstep steps
    assert run([prompt[:9], prompt], [logprobs, seeded], speculative=LOOKUP, async_scheduling=True)[1] == alone
    assert run([prompt], [dataclasses.replace(seeded, seed=124)], async_scheduling=False) != [alone]  # the seed decides
    llm = kiln.LLM(target, num_blocks=96, block_size=4, speculative=LOOKUP, async_scheduling=True)
    llm.generate([prompt], [seeded], use_tqdm=False)
    assert llm.stats["accepted_tokens"] > 0 and llm.stats["draft_tokens"] > llm.stats["accepted_tokens"]
