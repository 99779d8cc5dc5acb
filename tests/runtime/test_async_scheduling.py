"""Asynchronous scheduling: each step is launched before the previous step's tokens reach the host.

The outputs must be exactly those of lockstep scheduling (on the CPU the device work is
synchronous, but the bookkeeping, placeholders, device-side token feed and late stops are
the same code as on a GPU).
"""

import pytest
import torch
from kiln_testing import hf_llama

import kiln
from kiln.runtime.scheduler import PLACEHOLDER

MAX = [9, 4, 6, 12, 3]


def _prompts(vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in (3, 14, 7, 22, 5)]


def _run(llm: kiln.LLM, prompts, params) -> list[list[int]]:
    outs = llm.generate(prompts, params, use_tqdm=False)
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks  # no leaked block
    assert not llm.scheduler.num_pending or llm._inflight is not None
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return hf_llama(layers=1)


def _params(**kw) -> list[kiln.SamplingParams]:
    return [kiln.SamplingParams(max_tokens=m, ignore_eos=True, **kw) for m in MAX]


@pytest.mark.parametrize("graphs", [False, True], ids=["op-by-op", "static-buffers"])
def test_async_greedy_and_seeded_sampling_equal_lockstep(model, graphs: bool) -> None:
    prompts = _prompts(128)
    greedy = _params(temperature=0)
    seeded = [kiln.SamplingParams(max_tokens=m, ignore_eos=True, temperature=0.8, top_k=20, seed=i)
              for i, m in enumerate(MAX)]
    sync = kiln.LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=16, async_scheduling=False)
    want = [_run(sync, prompts, greedy), _run(sync, prompts, seeded)]
    llm = kiln.LLM(model, num_blocks=64, block_size=4, max_num_batched_tokens=16, max_num_seqs=4,
                   async_scheduling=True)
    assert llm.async_scheduling
    if graphs:
        llm.runner.enable_cuda_graphs(max_num_seqs=4, max_model_len=llm.max_model_len, max_num_tokens=16,
                                      capture=False)
    fed = []
    execute = llm.runner.execute
    llm.runner.execute = lambda steps, feed=None: fed.append(feed is not None) or execute(steps, feed)
    assert [_run(llm, prompts, greedy), _run(llm, prompts, seeded)] == want
    assert sum(fed) > 10  # most steps took their tokens from the step before, on the device


def test_async_late_stops_preemption_and_abort(model) -> None:
    prompts = _prompts(128)
    sync = kiln.LLM(model, num_blocks=64, block_size=4, async_scheduling=False)
    free = _run(sync, prompts, _params(temperature=0))
    stops = [kiln.SamplingParams(max_tokens=m, temperature=0, stop_token_ids=[t[1]])
             for m, t in zip(MAX, free, strict=True)]  # each request stops at its second token
    want = _run(sync, prompts, stops)
    assert all(len(w) == 2 for w in want)
    tight = kiln.LLM(model, num_blocks=12, block_size=4, max_num_batched_tokens=64, async_scheduling=True)
    assert _run(tight, prompts, stops) == want  # the extra step of a stopped request is dropped
    assert _run(tight, prompts, _params(temperature=0)) == free  # 48 slots for 5 requests: preemption
    rid = tight.add_request(prompts[3], kiln.SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    other = tight.add_request(prompts[0], kiln.SamplingParams(max_tokens=9, temperature=0, ignore_eos=True))
    for _ in range(4):
        tight.step()
    assert tight.abort_request(rid)
    done = {}
    while tight.has_unfinished_requests():
        done.update((o.request_id, o) for o in tight.step() if o.finished)
    assert done[other].outputs[0].token_ids == free[0] and rid not in done
    tight.step()  # drains the step launched for the last request
    manager = tight.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks and not tight.scheduler.num_pending


def test_requests_needing_every_token_on_the_host_run_in_lockstep(model) -> None:
    prompts = _prompts(128)
    penalized = _params(temperature=0, repetition_penalty=1.3)
    want = _run(kiln.LLM(model, num_blocks=64, block_size=4, async_scheduling=False), prompts, penalized)
    llm = kiln.LLM(model, num_blocks=64, block_size=4, async_scheduling=True)
    llm.add_request(prompts[0], kiln.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    for _ in range(3):
        llm.step()
    assert llm._inflight is not None and llm.scheduler.num_pending  # running ahead
    got = llm.generate(prompts, penalized, use_tqdm=False)  # drains, then steps in lockstep
    assert [o.outputs[0].token_ids for o in got] == want
    assert llm._inflight is None


def test_scheduler_counts_pending_tokens_and_feeds_placeholders() -> None:
    from kiln.runtime.request import Request
    from kiln.runtime.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_num_batched_tokens=32, max_model_len=32))
    sched.add_request(Request(request_id="a", prompt_token_ids=[1, 2, 3],
                              sampling_params=kiln.SamplingParams(max_tokens=2, ignore_eos=True)))
    s1 = sched.schedule()
    sched.mark_pending(s1)
    assert sched.num_pending == {"a": 1}
    s2 = sched.schedule()  # before s1's token is known
    (cached,) = s2.scheduled_cached_reqs
    assert cached.new_token_ids == [PLACEHOLDER] and cached.sample and cached.num_computed_tokens == 3
    sched.mark_pending(s2)
    assert sched.schedule().is_empty  # two pending tokens reach max_tokens=2: nothing more to run
    sched.update_from_output(s1, {"a": [7]})
    out = sched.update_from_output(s2, {"a": [8]})
    assert out[0].new_token_ids == [8] and out[0].finish_reason == "length" and not sched.num_pending


def test_speculative_pending_bounds_max_tokens_by_the_fewest_tokens() -> None:
    """Asynchronous speculation: a step verifying k drafts makes between 1 and k + 1 tokens. Blocks are
    reserved for k + 1, but max_tokens only stops scheduling once even 1 token per step in flight reaches
    it: a request near its end keeps verifying drafts (what lands past max_tokens is dropped)."""
    from kiln.runtime.request import Request
    from kiln.runtime.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(num_blocks=16, block_size=4, max_num_batched_tokens=32, max_model_len=64))
    req = Request(request_id="a", prompt_token_ids=[1, 2, 3],
                  sampling_params=kiln.SamplingParams(max_tokens=6, ignore_eos=True))  # fmt: skip
    sched.add_request(req)
    s1 = sched.schedule()
    sched.update_from_output(s1, {"a": [7]})  # prefill: one output token
    req.spec_token_ids = [4, 5, 6]
    s2 = sched.schedule()
    assert s2.scheduled_spec_decode_tokens == {"a": [4, 5, 6]}
    sched.mark_pending(s2)
    assert sched.num_pending == {"a": 4} and sched.num_pending_min == {"a": 1}
    # 1 output + 4 pending would reach max_tokens = 6 only if every draft were accepted
    req.spec_token_ids = [PLACEHOLDER] * 3
    s3 = sched.schedule()
    assert s3.num_scheduled_tokens == {"a": 4}  # scheduled, with 3 drafts (room 6 - 1 - 1 = 4 tokens)
    assert s3.scheduled_spec_decode_tokens == {"a": [PLACEHOLDER] * 3}
    sched.mark_pending(s3)
    out = sched.update_from_output(s2, {"a": [4, 5, 6, 9]})  # all accepted: 5 outputs
    assert out[0].new_token_ids == [4, 5, 6, 9] and out[0].finish_reason is None
    out = sched.update_from_output(s3, {"a": [10, 11]})  # the 6th token finishes it; the 7th is dropped
    assert out[0].new_token_ids == [10] and out[0].finish_reason == "length"
    assert req.output_token_ids == [7, 4, 5, 6, 9, 10]
    assert not sched.num_pending and not sched.num_pending_min and sched.kv_cache_manager.block_pool.num_free_blocks == 16


def test_drafts_past_max_tokens_give_way_before_a_preemption() -> None:
    """Drafts that count only if earlier ones are rejected are dropped when their blocks are short,
    rather than preempting a request (here the only one) for them."""
    from kiln.runtime.request import Request
    from kiln.runtime.scheduler import Scheduler, SchedulerConfig

    sched = Scheduler(SchedulerConfig(num_blocks=2, block_size=4, max_num_batched_tokens=32, max_model_len=64))
    req = Request(request_id="a", prompt_token_ids=[1, 2, 3],
                  sampling_params=kiln.SamplingParams(max_tokens=5, ignore_eos=True))  # fmt: skip
    sched.add_request(req)  # 3 + 5 tokens: the 2 blocks
    sched.update_from_output(sched.schedule(), {"a": [7]})
    req.spec_token_ids = [4, 5, 6]
    s2 = sched.schedule()
    sched.mark_pending(s2)
    req.spec_token_ids = [PLACEHOLDER] * 3
    s3 = sched.schedule()  # 3 drafts would need a 3rd block
    assert s3.num_scheduled_tokens == {"a": 1} and not s3.scheduled_spec_decode_tokens
    assert not s3.preempted_req_ids and req.status.name == "RUNNING"


def test_async_scheduling_option_is_validated(model) -> None:
    with pytest.raises(kiln.ConfigError, match="prompt-lookup"):
        kiln.LLM(model, num_blocks=8, async_scheduling=True,
                 speculative=kiln.SpeculativeConfig(method="draft_model", draft_model="models/kiln-drafter",
                                                    num_speculative_tokens=2))
    with pytest.raises(kiln.ConfigError, match="at most 3 tokens"):
        kiln.LLM(model, num_blocks=8, async_scheduling=True,
                 speculative=kiln.SpeculativeConfig(method="ngram", num_speculative_tokens=2, prompt_lookup_max=4))
    assert not kiln.LLM(model, num_blocks=8).async_scheduling  # off on the CPU by default
