"""Scheduler tests against a simulated model runner.

``FakeRunner`` consumes only ``SchedulerOutput``, as a real runner would: it keeps block
tables, writes each input token into a simulated KV cache at its slot, and before
sampling reads the whole context back through the block table, checking it is the
request's true token sequence. So a wrong prefix hit, a block freed while in use or a bad
slot mapping fails loudly. Its "model" is a deterministic function of the context, so
every request has a reference output to compare with, whatever the batching.
"""

from __future__ import annotations

import dataclasses
import random

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kiln.errors import CapacityError, ConfigError
from kiln.runtime import (
    ModelRunnerOutput,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    StepOutput,
)

VOCAB = 50


def next_token(context: list[int]) -> int:
    return hash(tuple(context)) % VOCAB  # ints hash deterministically


def reference(prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    seq, out = list(prompt), []
    while len(out) < max_tokens:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if t == eos:
            break
    return out


class FakeRunner:
    def __init__(self, config: SchedulerConfig) -> None:
        self.bs = config.block_size
        self.cache = [-1] * (config.num_blocks * config.block_size)  # slot -> token whose KV is there
        self.tokens: dict[str, list[int]] = {}  # the runner's view of each request's true tokens
        self.tables: dict[str, list[int]] = {}
        self.accept: dict[str, int] = {}  # tests can force how many drafts get accepted

    def slot(self, rid: str, pos: int) -> int:
        return self.tables[rid][pos // self.bs] * self.bs + pos % self.bs

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for rid in out.finished_req_ids | out.preempted_req_ids:
            self.tokens.pop(rid, None)
            self.tables.pop(rid, None)
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())
        sampled: dict[str, list[int]] = {}
        work = []
        for d in out.scheduled_new_reqs:
            assert d.request_id not in self.tables
            self.tokens[d.request_id] = d.prompt_token_ids + d.output_token_ids
            self.tables[d.request_id] = list(d.block_ids)
            # a prefix hit must find the request's own tokens in the cache
            for pos in range(d.num_computed_tokens):
                assert self.cache[self.slot(d.request_id, pos)] == self.tokens[d.request_id][pos]
            work.append(d)
        for d in out.scheduled_cached_reqs:
            self.tables[d.request_id].extend(d.new_block_ids)
            work.append(d)
        for d in work:
            rid, start, inputs = d.request_id, d.num_computed_tokens, d.new_token_ids
            assert len(inputs) == out.num_scheduled_tokens[rid] > 0
            drafts = out.scheduled_spec_decode_tokens.get(rid, [])
            known = self.tokens[rid]
            real = inputs[: len(inputs) - len(drafts)]
            assert known[start : start + len(real)] == real[: len(known) - start]
            known.extend(real[len(known) - start :])
            assert len(self.tables[rid]) * self.bs >= start + len(inputs)
            for j, t in enumerate(inputs):
                self.cache[self.slot(rid, start + j)] = t
        for d in work:  # attention reads after every write of the step, as in a real layer
            rid, start, inputs = d.request_id, d.num_computed_tokens, d.new_token_ids
            if not d.sample:
                assert start + len(inputs) < len(self.tokens[rid])
                continue
            drafts = out.scheduled_spec_decode_tokens.get(rid, [])
            seq_len = start + len(inputs)
            context = [self.cache[self.slot(rid, p)] for p in range(seq_len)]
            known = self.tokens[rid]
            assert context == known + drafts, f"{rid}: the cache does not hold the request's tokens"
            got = []  # exact verification: accept drafts while they equal the model's choice
            for j in range(len(drafts) + 1):
                t = next_token(context[: len(known) + j])
                got.append(t)
                if j == len(drafts) or drafts[j] != t or j >= self.accept.get(rid, len(drafts)):
                    break
            sampled[rid] = got
            known.extend(got)
        return ModelRunnerOutput(sampled_token_ids=sampled)


def config(**kw) -> SchedulerConfig:
    base = dict(num_blocks=64, block_size=4, max_num_seqs=8, max_num_batched_tokens=32, max_model_len=64)
    return SchedulerConfig(**{**base, **kw})


def req(rid: str, n: int, max_tokens: int = 4, seed: int | None = None, **kw) -> Request:
    rng = random.Random(seed if seed is not None else hash(rid))
    return Request(request_id=rid, prompt_token_ids=[rng.randrange(VOCAB) for _ in range(n)],
                   sampling_params=SamplingParams(max_tokens=max_tokens, ignore_eos=kw.pop("ignore_eos", True)),
                   **kw)


def run(sched: Scheduler, runner: FakeRunner, max_steps: int = 1000,
        on_step=None) -> tuple[dict[str, list[int]], dict[str, str], list[SchedulerOutput]]:
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    history = []
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        history.append(out)
        step = sched.update_from_output(out, runner.execute(out))
        for s in step:
            tokens.setdefault(s.request_id, []).extend(s.new_token_ids)
            if s.finished:
                reasons[s.request_id] = s.finish_reason
        sched.kv_cache_manager.check_invariants(sched.running)
        if on_step is not None:
            on_step(out, step)
    else:
        raise AssertionError("did not finish")
    return tokens, reasons, history


def assert_no_leaks(sched: Scheduler) -> None:
    kv = sched.kv_cache_manager
    assert not sched.requests and not sched.running and not sched.waiting
    assert kv.req_to_blocks == {} and kv.num_cached_blocks == {}
    assert all(b.ref_cnt == b.pin_cnt for b in kv.block_pool.blocks)
    assert kv.num_free_blocks == kv.num_blocks - kv.num_pinned_blocks
    kv.check_invariants()


def test_outputs_match_the_reference_and_the_budget_holds_every_step() -> None:
    cfg = config(max_num_batched_tokens=16)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    reqs = [req(f"r{i}", n, max_tokens=m) for i, (n, m) in enumerate([(5, 7), (30, 3), (1, 9), (12, 12), (17, 1)])]
    for r in reqs:
        sched.add_request(r)
    tokens, reasons, history = run(sched, runner)
    for r in reqs:
        assert tokens[r.request_id] == reference(r.prompt_token_ids, r.sampling_params.max_tokens)
        assert r.output_token_ids == tokens[r.request_id] and reasons[r.request_id] == "length"
        assert r.status is RequestStatus.FINISHED_LENGTH and r.metrics.first_token_time is not None
    for out in history:
        assert 0 < out.total_num_scheduled_tokens <= 16
        assert len(out.num_scheduled_tokens) <= cfg.max_num_seqs
    assert_no_leaks(sched)


def test_chunked_prefill_splits_a_long_prompt_then_decodes_one_token_a_step() -> None:
    cfg = config(max_num_batched_tokens=8, max_model_len=32)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    r = req("long", 20, max_tokens=3)
    sched.add_request(r)
    _, _, history = run(sched, runner)
    assert [o.num_scheduled_tokens["long"] for o in history] == [8, 8, 4, 1, 1]
    assert [o.scheduled_cached_reqs[0].num_computed_tokens for o in history[1:]] == [8, 16, 20, 21]
    assert [d.sample for o in history for d in o.scheduled_new_reqs + o.scheduled_cached_reqs] == [
        False, False, True, True, True]
    assert history[1].scheduled_cached_reqs[0].new_token_ids == r.prompt_token_ids[8:16]


def test_long_prefill_threshold_caps_tokens_per_request() -> None:
    cfg = config(max_num_batched_tokens=32, long_prefill_token_threshold=5)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    sched.add_request(req("a", 12, max_tokens=1))
    sched.add_request(req("b", 12, max_tokens=1))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 5, "b": 5}
    sched.update_from_output(out, runner.execute(out))


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_it_fits_whole() -> None:
    cfg = config(max_num_batched_tokens=64, max_model_len=64, enable_chunked_prefill=False)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    sched.add_request(req("a", 40, max_tokens=4))
    sched.add_request(req("b", 40, max_tokens=4))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 40}  # b's 40 do not fit the 24 left, and are not split
    sched.update_from_output(out, runner.execute(out))
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"a": 1, "b": 40}
    chunked = Scheduler(dataclasses.replace(cfg, enable_chunked_prefill=True))
    chunked.add_request(req("a", 40))
    chunked.add_request(req("b", 40))
    assert chunked.schedule().num_scheduled_tokens == {"a": 40, "b": 24}
    with pytest.raises(ConfigError, match="max_num_batched_tokens .* must be >= max_model_len"):
        config(max_num_batched_tokens=16, enable_chunked_prefill=False)


def test_fcfs_and_admission_stops_when_blocks_run_out() -> None:
    cfg = config(num_blocks=10, max_num_batched_tokens=64)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    sched.add_request(req("a", 16, max_tokens=8))  # 4 blocks now, 6 at the end
    sched.add_request(req("b", 16, max_tokens=8))
    sched.add_request(req("c", 16, max_tokens=8))  # no room: 2 blocks left
    sched.add_request(req("d", 2, max_tokens=1))  # would fit, but must not overtake c
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    sched.update_from_output(out, runner.execute(out))
    _, _, history = run(sched, runner)
    admitted = [d.request_id for o in history for d in o.scheduled_new_reqs if not d.output_token_ids]
    assert admitted == ["c", "d"]  # first admissions in arrival order
    assert_no_leaks(sched)


def test_max_num_seqs_limits_the_running_set() -> None:
    cfg = config(max_num_seqs=2)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    for i in range(4):
        sched.add_request(req(f"r{i}", 3, max_tokens=2))
    _, _, history = run(sched, runner)
    assert max(len(o.num_scheduled_tokens) for o in history) == 2


def test_preemption_under_memory_pressure_recomputes_and_completes() -> None:
    cfg = config(num_blocks=8, max_num_batched_tokens=32, max_model_len=32)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    a, b = req("a", 12, max_tokens=12), req("b", 12, max_tokens=12)  # 6 blocks each at the end, 8 in all
    sched.add_request(a)
    sched.add_request(b)
    tokens, reasons, history = run(sched, runner)
    preempting = [o for o in history if o.preempted_req_ids]
    assert preempting and preempting[0].preempted_req_ids == {"b"}  # the most recently admitted
    resumed = next(d for o in history[history.index(preempting[0]):] for d in o.scheduled_new_reqs
                   if d.request_id == "b")
    assert resumed.output_token_ids  # the tokens generated before preemption are kept and recomputed
    assert b.metrics.num_preemptions >= 1 and a.metrics.num_preemptions == 0
    for r in (a, b):  # recomputation does not change outputs
        assert tokens[r.request_id] == reference(r.prompt_token_ids, 12) and reasons[r.request_id] == "length"
    assert_no_leaks(sched)


def test_preempted_request_resumes_from_its_own_cached_blocks() -> None:
    cfg = config(num_blocks=9, max_num_batched_tokens=32, max_model_len=32)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    sched.add_request(req("a", 12, max_tokens=16))
    sched.add_request(req("b", 8, max_tokens=12))
    _, _, history = run(sched, runner)
    resumed = [d for o in history for d in o.scheduled_new_reqs if d.output_token_ids]
    assert resumed and resumed[0].num_computed_tokens > 0  # prefix hit on its freed, still cached blocks


def test_abort_frees_blocks_wherever_the_request_is() -> None:
    cfg = config(num_blocks=6, max_num_batched_tokens=32)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    a, b = req("a", 16, max_tokens=8), req("b", 16, max_tokens=4)
    sched.add_request(a)
    sched.add_request(b)
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["a"] and sched.kv_cache_manager.num_free_blocks == 2
    assert sched.abort_request("a")  # aborted between schedule and update: the update ignores it
    assert sched.update_from_output(out, runner.execute(out)) == []
    assert a.status is RequestStatus.FINISHED_ABORTED and a.to_output().outputs[0].finish_reason == "abort"
    assert sched.kv_cache_manager.num_free_blocks == 6
    out = sched.schedule()
    assert out.finished_req_ids == {"a"} and list(out.num_scheduled_tokens) == ["b"]
    sched.update_from_output(out, runner.execute(out))
    assert sched.abort_request("b") and not sched.abort_request("b") and not sched.abort_request("zzz")
    sched.add_request(c := req("c", 4))
    assert sched.abort_request("c") and c.status is RequestStatus.FINISHED_ABORTED  # from the queue
    assert_no_leaks(sched)


def test_stop_token_eos_and_ignore_eos() -> None:
    cfg = config()
    prompt = [3, 1, 4, 1, 5]
    first, second = reference(prompt, 2)
    cases = {
        "eos": (dict(eos_token_id=first, ignore_eos=False), 1, "stop", None),
        "ignore": (dict(eos_token_id=first, ignore_eos=True), 4, "length", None),
        "stop_id": (dict(stop_token_ids=[second]), 2, "stop", second),
    }
    for name, (kw, n_out, reason, stop_reason) in cases.items():
        sched, runner = Scheduler(cfg), FakeRunner(cfg)
        params = SamplingParams(max_tokens=4, ignore_eos=kw.pop("ignore_eos", True),
                                stop_token_ids=kw.pop("stop_token_ids", ()))
        r = Request(request_id=name, prompt_token_ids=prompt, sampling_params=params, **kw)
        sched.add_request(r)
        tokens, reasons, _ = run(sched, runner)
        assert len(tokens[name]) == n_out and reasons[name] == reason and r.stop_reason == stop_reason, name
        assert_no_leaks(sched)


def test_engine_finishes_a_request_on_a_stop_string() -> None:
    cfg = config()
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    r = req("a", 4, max_tokens=10)
    sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    assert sched.finish_request("a", RequestStatus.FINISHED_STOPPED, "###")
    assert r.to_output().outputs[0].finish_reason == "stop" and r.stop_reason == "###"
    with pytest.raises(ConfigError, match="finished status"):
        sched.finish_request("a", RequestStatus.RUNNING)
    assert_no_leaks(sched)


def test_bad_requests_are_rejected_and_the_others_complete() -> None:
    cfg = config(num_blocks=8, max_model_len=48)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    good = req("good", 6, max_tokens=5)
    sched.add_request(good)
    bad = [
        (req("empty", 0), ConfigError, "empty prompt"),
        (req("long", 50), CapacityError, "more than max_model_len=48"),
        (req("sum", 40, max_tokens=10), CapacityError, "lower max_tokens to at most 8"),
        (req("blocks", 30, max_tokens=10), CapacityError, "need 10 KV blocks of 4 tokens, but the cache has 8"),
        (req("good", 3), ConfigError, "already in use"),
        (Request(request_id="neg", prompt_token_ids=[1, -3]), ConfigError, "negative token ids"),
    ]
    for r, err, msg in bad:
        with pytest.raises(err, match=msg):
            sched.add_request(r)
    assert list(sched.requests) == ["good"]
    tokens, reasons, _ = run(sched, runner)
    assert tokens == {"good": reference(good.prompt_token_ids, 5)}
    assert_no_leaks(sched)


def test_prefix_cache_hit_skips_the_shared_prefix_and_keeps_outputs() -> None:
    cfg = config()
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    doc = req("doc", 20, seed=1).prompt_token_ids
    first = Request(request_id="q1", prompt_token_ids=doc + [1, 2], sampling_params=SamplingParams(max_tokens=3))
    sched.add_request(first)
    run(sched, runner)
    second = Request(request_id="q2", prompt_token_ids=doc + [3, 4, 5], sampling_params=SamplingParams(max_tokens=3))
    sched.add_request(second)
    tokens, _, history = run(sched, runner)
    assert history[0].scheduled_new_reqs[0].num_computed_tokens == 20
    assert history[0].num_scheduled_tokens == {"q2": 3}
    assert second.metrics.num_cached_tokens == 20 and tokens["q2"] == reference(second.prompt_token_ids, 3)
    stats = sched.kv_cache_manager.stats
    assert stats.hits == 20 and stats.queries == 22 + 23


def test_pinned_prefix_survives_traffic_and_later_requests_hit_it() -> None:
    cfg = config(num_blocks=16, max_model_len=48, max_num_batched_tokens=48)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    kv = sched.kv_cache_manager
    doc = req("doc", 16, seed=7).prompt_token_ids
    handle = kv.pin_prefix(doc)
    sched.add_request(Request(request_id="first", prompt_token_ids=doc + [1], sampling_params=SamplingParams(max_tokens=2)))
    run(sched, runner)
    assert kv.num_pinned_tokens(handle) == 16
    for i in range(6):  # traffic that needs every unpinned block
        sched.add_request(req(f"t{i}", 40, max_tokens=8, seed=100 + i))
    run(sched, runner)
    late = Request(request_id="late", prompt_token_ids=doc + [9, 9], sampling_params=SamplingParams(max_tokens=2))
    sched.add_request(late)
    tokens, _, _ = run(sched, runner)
    assert late.metrics.num_cached_tokens == 16 and tokens["late"] == reference(late.prompt_token_ids, 2)
    kv.release(handle)
    assert_no_leaks(sched)
    assert kv.num_free_blocks == kv.num_blocks


def test_a_request_that_cannot_fit_beside_the_pins_is_aborted_not_hung() -> None:
    cfg = config(num_blocks=8)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    sched.kv_cache_manager.pin_prefix(list(range(24)))  # 6 of 8 blocks reserved
    sched.add_request(Request(request_id="doc", prompt_token_ids=list(range(24)) + [1],
                              sampling_params=SamplingParams(max_tokens=1)))
    sched.add_request(req("big", 20, max_tokens=8))  # 7 blocks: only 2 left besides the pins
    tokens, reasons, _ = run(sched, runner)
    assert reasons == {"doc": "length", "big": "abort"}
    assert_no_leaks(sched)


def test_speculative_drafts_are_verified_and_rejected_ones_given_back() -> None:
    cfg = config()
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    r = req("s", 6, max_tokens=10)
    sched.add_request(r)
    truth = reference(r.prompt_token_ids, 10)
    out = sched.schedule()
    sched.update_from_output(out, runner.execute(out))
    assert r.output_token_ids == truth[:1]
    drafts = [truth[1], truth[2], (truth[3] + 1) % VOCAB]  # two right, one wrong
    r.spec_token_ids = list(drafts)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {"s": 4} and out.scheduled_spec_decode_tokens == {"s": drafts}
    assert out.scheduled_cached_reqs[0].new_token_ids == [truth[0], *drafts]
    assert r.spec_token_ids == []  # consumed: the drafter proposes again after verification
    steps = sched.update_from_output(out, runner.execute(out))
    assert steps[0].new_token_ids == truth[1:4]  # two accepted drafts + the model's correction
    assert r.num_computed_tokens == r.num_tokens - 1  # the wrong draft's slot is given back
    r.spec_token_ids = truth[4:20]  # more drafts than max_tokens allows: trimmed
    out = sched.schedule()
    assert out.scheduled_spec_decode_tokens["s"] == truth[4:9]
    steps = sched.update_from_output(out, runner.execute(out))
    assert r.output_token_ids == truth  # all five drafts accepted + 1: max_tokens reached
    assert steps[0].new_token_ids == truth[4:] and steps[0].finish_reason == "length"
    assert_no_leaks(sched)


@dataclasses.dataclass
class Workload:
    prompts: list[int]
    max_tokens: list[int]
    aborts: dict[int, int]  # request index -> step at which to abort it
    arrivals: list[int]  # step at which each request arrives
    pin_len: int
    num_blocks: int
    budget: int
    chunked: bool
    caching: bool


@st.composite
def workloads(draw) -> Workload:
    n = draw(st.integers(1, 8))
    return Workload(
        prompts=draw(st.lists(st.integers(1, 30), min_size=n, max_size=n)),
        max_tokens=draw(st.lists(st.integers(1, 12), min_size=n, max_size=n)),
        aborts=draw(st.dictionaries(st.integers(0, n - 1), st.integers(0, 15), max_size=3)),
        arrivals=draw(st.lists(st.integers(0, 6), min_size=n, max_size=n)),
        pin_len=draw(st.sampled_from([0, 0, 8, 13])),
        num_blocks=draw(st.integers(11, 24)),
        budget=draw(st.sampled_from([8, 16, 48])),
        chunked=draw(st.booleans()),
        caching=draw(st.booleans()),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads(), seed=st.integers(0, 2**16))
def test_random_workloads_finish_with_the_right_tokens_and_leak_no_blocks(w: Workload, seed: int) -> None:
    cfg = config(num_blocks=w.num_blocks, max_num_batched_tokens=w.budget if w.chunked else 48,
                 max_model_len=42, enable_chunked_prefill=w.chunked, enable_prefix_caching=w.caching, max_num_seqs=4)
    sched, runner = Scheduler(cfg), FakeRunner(cfg)
    rng = random.Random(seed)
    shared = [rng.randrange(VOCAB) for _ in range(16)]  # some prompts share a prefix
    handle = sched.kv_cache_manager.pin_prefix(shared[: w.pin_len]) if w.pin_len and w.caching else None
    reqs = []
    for i, (p, m) in enumerate(zip(w.prompts, w.max_tokens, strict=True)):
        head = shared[: rng.choice([0, 4, 9, 16])]
        prompt = (head + [rng.randrange(VOCAB) for _ in range(p)])[: max(p, 1)] if head else \
            [rng.randrange(VOCAB) for _ in range(p)]
        reqs.append(Request(request_id=f"r{i}", prompt_token_ids=prompt,
                            sampling_params=SamplingParams(max_tokens=m, ignore_eos=True)))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    step = 0
    while step < 500:
        for i, r in enumerate(reqs):
            if w.arrivals[i] == step:
                sched.add_request(r)
            if w.aborts.get(i) == step and sched.abort_request(r.request_id):
                reasons[r.request_id] = "abort"
        if step > max(w.arrivals) and not sched.has_unfinished_requests():
            break
        out = sched.schedule()
        assert out.total_num_scheduled_tokens <= cfg.max_num_batched_tokens
        if out.preempted_req_ids:
            event("preemption")
        if any(d.num_computed_tokens for d in out.scheduled_new_reqs):
            event("prefix hit")
        for s in sched.update_from_output(out, runner.execute(out)):
            tokens.setdefault(s.request_id, []).extend(s.new_token_ids)
            if s.finished:
                reasons[s.request_id] = s.finish_reason
        sched.kv_cache_manager.check_invariants(sched.running)
        step += 1
    else:
        raise AssertionError("the workload did not finish")
    event(f"finish reasons: {sorted(set(reasons.values()))}")
    for r in reqs:
        assert r.is_finished
        if reasons[r.request_id] == "abort":
            assert r.status is RequestStatus.FINISHED_ABORTED
            assert r.output_token_ids == reference(r.prompt_token_ids, r.sampling_params.max_tokens)[
                : len(r.output_token_ids)]
        else:
            assert reasons[r.request_id] == "length"
            assert tokens[r.request_id] == reference(r.prompt_token_ids, r.sampling_params.max_tokens)
    if handle is not None:
        sched.kv_cache_manager.release(handle)
    assert_no_leaks(sched)
    assert sched.kv_cache_manager.num_free_blocks == cfg.num_blocks


def test_step_output_and_empty_steps() -> None:
    sched = Scheduler(config())
    out = sched.schedule()
    assert out.is_empty and out.num_reqs == 0 and sched.update_from_output(out, {}) == []
    assert StepOutput(request_id="x", new_token_ids=[], finish_reason="stop").finished


def test_a_runner_that_drops_a_wanted_token_is_reported() -> None:
    sched = Scheduler(config())
    sched.add_request(req("a", 3))
    out = sched.schedule()
    with pytest.raises(RuntimeError, match="no token for request 'a'"):
        sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={}))
