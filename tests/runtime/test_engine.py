"""kiln.LLM end to end on the CPU: equality with transformers, caching, batching, preemption, errors."""

import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln_testing import hf_llama

import kiln
from kiln.models import from_preset, save_pretrained

GREEDY = kiln.SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _hf_greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _tokens(llm: kiln.LLM, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _prompts(vocab: int, lengths=(3, 11, 26)) -> list[list[int]]:
    return [torch.randint(0, vocab, (n,)).tolist() for n in lengths]


def test_greedy_equals_transformers_generate_for_kiln_llama(tmp_path) -> None:
    model = from_preset("llama-tiny").eval()
    save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    prompts = _prompts(512)
    got = _tokens(kiln.LLM(model, num_blocks=32, block_size=4, max_num_batched_tokens=16), prompts)
    assert got == [_hf_greedy(hf, p, 10) for p in prompts]


def test_greedy_equals_transformers_generate_for_a_transformers_model() -> None:
    model = hf_llama()
    prompts = _prompts(128)
    got = _tokens(kiln.LLM(model, num_blocks=32, block_size=4), prompts)
    assert got == [_hf_greedy(model, p, 10) for p in prompts]


def test_prefix_cache_hit_gives_the_same_tokens_as_a_miss() -> None:
    model = hf_llama()
    shared = torch.randint(0, 128, (17,)).tolist()
    prompts = [shared + [5, 6], shared + [7]]
    cold = kiln.LLM(model, num_blocks=32, block_size=4, enable_prefix_caching=False)
    warm = kiln.LLM(model, num_blocks=32, block_size=4)
    want = _tokens(cold, prompts)
    first = warm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
    second = warm.generate([prompts[1]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and second.num_cached_tokens == 16  # four full blocks reused
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == want


def test_batched_request_equals_alone_also_when_sampling_with_seeds() -> None:
    model = hf_llama()
    prompts = _prompts(128, (4, 9, 15, 6))
    params = kiln.SamplingParams(temperature=0.8, top_p=0.9, max_tokens=8, seed=1234, ignore_eos=True)
    together = _tokens(kiln.LLM(model, num_blocks=64, block_size=4), prompts, params)
    alone = [_tokens(kiln.LLM(model, num_blocks=64, block_size=4), [p], params)[0] for p in prompts]
    assert together == alone


def test_n_completions_of_one_prompt() -> None:
    """SamplingParams(n=3): three child requests reported as one output; completion i seeds with seed + i."""
    model = hf_llama()
    prompts = _prompts(128, (6, 13))
    params = kiln.SamplingParams(n=3, temperature=0.9, max_tokens=7, seed=40, ignore_eos=True)
    llm = kiln.LLM(model, num_blocks=64, block_size=4)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.request_id for o in outs] == ["req-0", "req-1"] and all(o.finished for o in outs)
    for prompt, out in zip(prompts, outs, strict=True):
        assert [c.index for c in out.outputs] == [0, 1, 2] and out.prompt_token_ids == prompt
        alone = [_tokens(kiln.LLM(model, num_blocks=64, block_size=4), [prompt],
                         kiln.SamplingParams(temperature=0.9, max_tokens=7, seed=40 + i, ignore_eos=True))[0]
                 for i in range(3)]  # fmt: skip
        assert [c.token_ids for c in out.outputs] == alone
        assert len({tuple(t) for t in alone}) > 1  # the completions differ
    assert llm.scheduler.kv_cache_manager.num_free_blocks == 64 and not llm._fanout.parents
    # completions 1 and 2 wait for completion 0's prompt, then find its 4 full blocks in the prefix cache
    long = prompts[1] + prompts[0]  # 19 tokens
    cold = kiln.LLM(model, num_blocks=64, block_size=4, enable_prefix_caching=False)
    want = cold.generate([long], params, use_tqdm=False)[0]
    warm = kiln.LLM(model, num_blocks=64, block_size=4)
    got = warm.generate([long], params, use_tqdm=False)[0]
    assert [c.token_ids for c in got.outputs] == [c.token_ids for c in want.outputs]
    assert warm.stats["scheduled_tokens"] == cold.stats["scheduled_tokens"] - 2 * 16
    ahead = kiln.LLM(model, num_blocks=64, block_size=4, async_scheduling=True)  # blocks cached a step later
    assert [c.token_ids for c in ahead.generate([long], params, use_tqdm=False)[0].outputs] == [
        c.token_ids for c in want.outputs]  # fmt: skip
    assert ahead.stats["scheduled_tokens"] == cold.stats["scheduled_tokens"] - 2 * 16
    huge = kiln.SamplingParams(n=2, max_tokens=3, seed=2**64 - 1, ignore_eos=True)  # completion 1: seed 2^64 -> 0
    assert len(warm.generate([long], huge, use_tqdm=False)[0].outputs[1].token_ids) == 3
    short = kiln.SamplingParams(n=2, max_tokens=1, seed=3)  # completion 0 ends in its first step
    assert len(warm.generate([long], short, use_tqdm=False)[0].outputs[1].token_ids) == 1

    greedy = kiln.SamplingParams(n=2, temperature=0, max_tokens=5, ignore_eos=True)
    rid = llm.add_request(prompts[0], greedy)
    snaps = []
    while llm.has_unfinished_requests():
        step = llm.step()
        assert len(step) <= 1  # one merged snapshot a step, holding every completion's news
        snaps += step
    assert {o.request_id for o in snaps} == {rid} and snaps[-1].finished and not snaps[0].finished
    final = snaps[-1].outputs
    assert len(final) == 2 and final[0].token_ids == final[1].token_ids  # greedy: the same twice

    rid = llm.add_request(prompts[1], params)
    llm.step()
    with pytest.raises(kiln.ConfigError, match="already running"):
        llm.add_request(prompts[0], request_id=rid)
    with pytest.raises(kiln.ConfigError, match="already running .or names a completion"):
        llm.add_request(prompts[0], request_id=f"{rid}#1")
    with pytest.raises(kiln.ConfigError, match="one completion of"):
        llm.abort_request(f"{rid}#0")
    assert llm.abort_request(rid) and not llm.has_unfinished_requests()
    assert llm.scheduler.kv_cache_manager.num_free_blocks == 64 and not llm._fanout.parents
    with pytest.raises(kiln.KilnError, match="more than max_model_len"):  # a bad prompt adds no completion
        llm.add_request(list(range(100)) * 30, params)
    assert not llm._seqs and not llm._fanout.parents


def test_a_completions_id_is_refused_while_its_aborted_step_runs() -> None:
    llm = kiln.LLM(hf_llama(), num_blocks=64, block_size=4, async_scheduling=True)
    params = kiln.SamplingParams(n=2, max_tokens=6, ignore_eos=True)
    llm.add_request([1, 2, 3], params, request_id="a")
    llm.step()  # launched, not yet applied
    assert llm.abort_request("a")
    with pytest.raises(kiln.ConfigError, match="still running"):
        llm.add_request([4, 5], params, request_id="a")  # its old step's tokens would land on "a#0"
    llm.step()
    llm.add_request([4, 5], params, request_id="a")
    outs = []
    while llm.has_unfinished_requests():
        outs += llm.step()
    assert [len(c.token_ids) for c in outs[-1].outputs] == [6, 6] and outs[-1].prompt_token_ids == [4, 5]
    assert llm.scheduler.kv_cache_manager.num_free_blocks == 64


def test_preemption_does_not_change_outputs() -> None:
    model = hf_llama()
    prompts = _prompts(128, (9, 14, 12, 10))
    roomy = _tokens(kiln.LLM(model, num_blocks=64, block_size=4), prompts)
    tight = kiln.LLM(model, num_blocks=10, block_size=4, max_num_batched_tokens=64)  # 40 slots for 4 x ~22 tokens
    outs = tight.generate(prompts, GREEDY, use_tqdm=False)
    assert sum(o.metrics.num_preemptions for o in outs) > 0
    assert [o.outputs[0].token_ids for o in outs] == roomy
    assert tight.scheduler.kv_cache_manager.num_free_blocks == 10  # nothing leaked


@settings(max_examples=4, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(1, 6), st.booleans()), min_size=1, max_size=6))
def test_random_workloads_leak_no_blocks(spec) -> None:
    llm = _shared_llm()
    ids = []
    for n, max_tokens, abort in spec:
        rid = llm.add_request(torch.randint(0, 128, (n,)).tolist(), kiln.SamplingParams(temperature=0, max_tokens=max_tokens))
        ids.append((rid, abort))
    llm.step()
    for rid, abort in ids:
        if abort:
            llm.abort_request(rid)
    while llm.has_unfinished_requests():
        llm.step()
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks
    assert not llm._seqs  # finished and aborted requests leave no engine state behind


_LLM: list[kiln.LLM] = []


def _shared_llm() -> kiln.LLM:
    if not _LLM:
        _LLM.append(kiln.LLM(hf_llama(layers=1), num_blocks=12, block_size=4, max_num_batched_tokens=24))
    return _LLM[0]


def test_bad_requests_are_rejected_while_the_others_complete() -> None:
    llm = kiln.LLM(hf_llama(layers=1), num_blocks=16, block_size=4, max_model_len=40)
    good = [llm.add_request(p, GREEDY) for p in _prompts(128, (5, 7))]
    with pytest.raises(kiln.ConfigError, match="empty prompt"):
        llm.add_request([], GREEDY)
    with pytest.raises(kiln.CapacityError, match="max_model_len"):
        llm.add_request(list(range(41)), GREEDY)
    with pytest.raises(kiln.ConfigError, match="temperature"):
        llm.add_request([1, 2, 3], kiln.SamplingParams(temperature=-1.0))
    with pytest.raises(kiln.ConfigError, match="no tokenizer"):
        llm.add_request("text without a tokenizer", GREEDY)
    for bad in ([1, 128, 2], [3, -1]):  # outside the vocabulary of 128
        with pytest.raises(kiln.ConfigError, match=r"in \[0, 128\)"):
            llm.add_request(bad, GREEDY)
    for bad in ([1.5, 2.0], [[1, 2], [3, 4]]):
        with pytest.raises(kiln.ConfigError, match="flat sequence of int token ids"):
            llm.add_request(bad, GREEDY)
    done = {}
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out
    assert sorted(done) == sorted(good) and all(len(o.outputs[0].token_ids) == 10 for o in done.values())


class CharTokenizer:
    """A tiny character tokenizer: enough to test text prompts and stop strings."""

    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 128 for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 95) for i in ids)


def test_text_prompts_stop_strings_and_streaming() -> None:
    llm = kiln.LLM(hf_llama(), tokenizer=CharTokenizer(), num_blocks=32, block_size=4)
    full = llm.generate(["hello kiln"], GREEDY, use_tqdm=False)[0]
    text = full.outputs[0].text
    assert len(text) == 10
    stop = text[4:6]
    cut = llm.generate(["hello kiln"], kiln.SamplingParams(temperature=0, max_tokens=10, stop=[stop], ignore_eos=True),
                       use_tqdm=False)[0]
    assert cut.outputs[0].text == text[: text.index(stop)] and cut.outputs[0].finish_reason == "stop"
    snapshots = list(llm.stream(["hello kiln"], GREEDY))
    lengths = [len(s.outputs[0].token_ids) for s in snapshots]
    assert lengths == sorted(lengths) and lengths[-1] == 10 and snapshots[-1].finished
    assert snapshots[-1].outputs[0].text == text  # generate() detokenizes once at the end, stream() per step


def test_generate_text_equals_streamed_text_with_a_byte_level_tokenizer() -> None:
    llm = kiln.LLM("models/kiln-teacher", num_blocks=64)
    prompts = ["def read_config(path):", "Caf\u00e9 \u2014 na\u00efve r\u00e9sum\u00e9: \U0001f600"]  # multi-byte characters
    params = kiln.SamplingParams(temperature=0.9, seed=3, max_tokens=40, ignore_eos=True)
    full = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    last: dict = {}
    for out in llm.stream(prompts, params):
        last[out.prompt] = out.outputs[0]
    for f, p in zip(full, prompts, strict=True):
        assert f.text == last[p].text == llm.tokenizer.decode(f.token_ids, skip_special_tokens=True)


def test_pinned_document_stays_cached_under_pressure() -> None:
    llm = kiln.LLM(hf_llama(layers=1), num_blocks=14, block_size=4)
    doc = torch.randint(0, 128, (16,)).tolist()
    handle = llm.pin_prefix(doc)
    first = llm.generate([doc + [1, 2]], GREEDY, use_tqdm=False)[0]
    for _ in range(3):  # unrelated traffic that needs most of the cache
        llm.generate([torch.randint(0, 128, (20,)).tolist()], GREEDY, use_tqdm=False)
    later = llm.generate([doc + [3]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 and later.num_cached_tokens == 16
    llm.release(handle)


def test_compile_config_chooses_the_step_graph_passes() -> None:
    model = from_preset("llama-tiny").eval()
    live = kiln.CompileConfig(kv_cache=True, disable=("merge-parallel-linears",))
    llm = kiln.LLM(model, num_blocks=16, block_size=4, compile_config=live)
    graph = {t.data_ptr() for t in llm.runner.gm.parameters()}
    assert all(p.data_ptr() in graph for p in model.parameters())  # reads the model's own tensors
    merged = kiln.LLM(model, num_blocks=16, block_size=4)
    assert "merge-parallel-linears" in merged.runner.compiled.summary()
    prompts = _prompts(512)
    assert _tokens(llm, prompts) == _tokens(merged, prompts)
    sharded = kiln.CompileConfig(kv_cache=True, parallel=kiln.ParallelConfig(tensor_parallel_size=2))
    with pytest.raises(kiln.ConfigError, match="compile_config.parallel is set by tensor_parallel_size"):
        kiln.LLM(model, num_blocks=16, block_size=4, tensor_parallel_size=2, compile_config=sharded)
