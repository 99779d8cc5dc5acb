"""Step graphs: static padded buffers for decode and mixed steps, and CUDA-graph capture.

On the CPU the padded static buffers run through the step graph without capture, so the
padding, slicing and scratch-block logic is checked against unpadded steps on random
weights; the capture itself is checked only where CUDA exists.
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kiln_testing import hf_llama

import kiln
from kiln.models import from_preset
from kiln.runtime.cuda_graphs import StepGraphs, batch_buckets, token_buckets
from kiln.runtime.model_runner import ModelRunner, SequenceStep

MODELS = {"kiln-llama": lambda: from_preset("llama-tiny").eval(), "hf-llama": lambda: hf_llama()}


def test_batch_buckets_are_powers_of_two_capped_by_max_num_seqs() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    with pytest.raises(kiln.ConfigError):
        batch_buckets(0)
    assert token_buckets(100) == [16, 32, 64, 100] and token_buckets(16) == [16] and token_buckets(8) == [8]
    assert token_buckets(1000) == [16, 32, 64, 128, 256, 512, 768, 1000]


def _warm(runner: ModelRunner, vocab: int, lengths: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """Prefill sequences of ``lengths`` tokens into disjoint blocks; returns (tokens, block tables)."""
    seqs, tables, nxt = [], [], 0
    for n in lengths:
        need = -(-(n + 4) // runner.block_size)
        tables.append(list(range(nxt, nxt + need))[::-1])  # blocks out of order
        nxt += need
        seqs.append(torch.randint(0, vocab, (n,)).tolist())
    runner.execute([SequenceStep(s, 0, t) for s, t in zip(seqs, tables, strict=True)])
    return seqs, tables


def _poisoned(name: str, lengths: list[int]) -> tuple[ModelRunner, int, list[list[int]], list[list[int]]]:
    """A runner of model ``name`` whose caches hold NaN except for prefilled sequences of ``lengths`` tokens."""
    model = MODELS[name]()
    runner = ModelRunner(model, num_blocks=40, block_size=4)
    for c in runner.caches:
        c.fill_(float("nan"))  # a read of an unwritten slot poisons the logits
    seqs, tables = _warm(runner, model.config.vocab_size, lengths)
    return runner, model.config.vocab_size, seqs, tables


def _changed_slots(after: torch.Tensor, before: torch.Tensor) -> set[int]:
    """Flat slots whose keys or values differ (NaN equal to NaN)."""
    same = (after == before) | (after.isnan() & before.isnan())
    changed = ~same.flatten(3).all(-1).all(0)  # (blocks, block_size)
    return {int(i) for i in changed.flatten().nonzero()}


def _run_both(
    runner: ModelRunner, steps: list[SequenceStep]
) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """(padded logits, unpadded logits, caches before, caches after the padded run), from one cache state."""
    before = [c.clone() for c in runner.caches]
    got = runner.execute(steps)
    after = [c.clone() for c in runner.caches]
    for c, b in zip(runner.caches, before, strict=True):
        c.copy_(b)
    graphs, runner.graphs = runner.graphs, None
    want = runner.execute(steps)  # the same rows, unpadded, op by op
    runner.graphs = graphs
    return got, want, before, after


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_decode_rows_match_unpadded_steps_and_touch_only_the_scratch_block(name: str) -> None:
    runner, vocab, seqs, tables = _poisoned(name, [5, 12, 3])
    graphs = runner.enable_cuda_graphs(max_num_seqs=8, max_model_len=32, capture=False)
    assert graphs.seq_buckets == [1, 2, 4, 8] and graphs.max_blocks == 8 and not graphs.captured
    new = torch.randint(0, vocab, (3,)).tolist()
    steps = [SequenceStep([t], len(s), b) for t, s, b in zip(new, seqs, tables, strict=True)]
    assert graphs.key_for(steps) == (True, (4, 4, 4))  # three rows padded to the bucket of four
    got, want, before, after = _run_both(runner, steps)
    assert got.shape == (3, vocab) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = {b[len(s) // 4] * 4 + len(s) % 4 for s, b in zip(seqs, tables, strict=True)}
    for a, b in zip(after, before, strict=True):
        slots = _changed_slots(a, b)
        assert {s for s in slots if s // 4 != runner.scratch_block} == written  # padding wrote only scratch
        assert any(s // 4 == runner.scratch_block for s in slots)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_padded_mixed_steps_match_unpadded_steps_and_write_nothing_else(name: str) -> None:
    runner, vocab, seqs, tables = _poisoned(name, [5, 9])
    graphs = runner.enable_cuda_graphs(max_num_seqs=4, max_model_len=32, max_num_tokens=40, capture=False)
    assert graphs.token_buckets == [16, 32, 40]
    fresh = torch.randint(0, vocab, (7,)).tolist()
    steps = [
        SequenceStep(fresh, 0, [30, 31]),  # a new prompt
        SequenceStep(
            torch.randint(0, vocab, (3,)).tolist(), len(seqs[0]), tables[0]
        ),  # a chunk after a prefix
        SequenceStep([11], len(seqs[1]), tables[1]),  # a decode
    ]
    assert graphs.key_for(steps) == (False, (16, 4, 4))  # 11 tokens of 3 sequences: padded to 16 and 4
    got, want, before, after = _run_both(runner, steps)
    assert got.shape == (3, vocab) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    written = {30 * 4 + i for i in range(4)} | {31 * 4 + i for i in range(3)}
    written |= {tables[0][p // 4] * 4 + p % 4 for p in range(5, 8)} | {tables[1][9 // 4] * 4 + 1}
    for a, b in zip(after, before, strict=True):
        assert _changed_slots(a, b) == written  # padding tokens wrote nothing
    assert graphs.key_for([SequenceStep(list(range(41)), 0, list(range(11)))]) is None  # over the token cap
    assert graphs.key_for([SequenceStep([1, 2], 0, [0], num_logits=2)]) == (
        False,
        (16, 1, 2),
    )  # 2 logits rows
    assert (
        graphs.key_for([SequenceStep(list(range(6)), 0, [0, 1], num_logits=5)]) is None
    )  # over max_num_logits 4


@pytest.mark.parametrize("name", sorted(MODELS))
def test_verification_steps_with_several_logits_rows_match_unpadded_steps(name: str) -> None:
    runner, vocab, seqs, tables = _poisoned(name, [5, 9, 6])
    graphs = runner.enable_cuda_graphs(
        max_num_seqs=4, max_model_len=32, max_num_tokens=40, max_num_logits=20, capture=False
    )
    assert graphs.logits_buckets == [1, 2, 4, 8, 16, 20]
    steps = [  # a verified token + 3 drafts, one + 1 draft, and a plain decode in one step
        SequenceStep(torch.randint(0, vocab, (4,)).tolist(), len(seqs[0]), tables[0], num_logits=4),
        SequenceStep(torch.randint(0, vocab, (2,)).tolist(), len(seqs[1]), tables[1], num_logits=2),
        SequenceStep([11], len(seqs[2]), tables[2]),
    ]
    assert graphs.key_for(steps) == (False, (16, 4, 8))  # 7 tokens, 3 sequences, 7 rows of logits
    got, want, before, after = _run_both(runner, steps)
    assert got.shape == (7, vocab) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(after, before, strict=True):
        assert len(_changed_slots(a, b)) == 7  # each real token wrote its slot; padding wrote nothing


@pytest.mark.parametrize("name", sorted(MODELS))
def test_engine_with_static_step_buffers_generates_the_same_tokens(name: str) -> None:
    model = MODELS[name]()
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (n,)).tolist() for n in (3, 14, 7)]
    params = [kiln.SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 6)]
    want = [
        o.outputs[0].token_ids
        for o in kiln.LLM(model, num_blocks=48, block_size=4).generate(prompts, params, use_tqdm=False)
    ]
    llm = kiln.LLM(model, num_blocks=48, block_size=4, max_num_seqs=4, max_num_batched_tokens=16)
    assert not llm.cuda_graphs and llm.runner.graphs is None  # off on the CPU by default
    graphs = llm.runner.enable_cuda_graphs(
        max_num_seqs=4, max_model_len=llm.max_model_len, max_num_tokens=16, capture=False
    )
    used: list = []
    fill = graphs.fill
    graphs.fill = lambda steps, sources=None, key=None: used.append(fill(steps, sources, key)) or used[-1]  # type: ignore[method-assign]
    calls = []
    step_gm = llm.runner.step_gm
    llm.runner.step_gm = lambda *a: calls.append(1) or step_gm(*a)  # the op-by-op path
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert {(True, (4, 4, 4)), (True, (2, 2, 2)), (True, (1, 1, 1))} <= set(
        used
    )  # decode batches of 3, 2 and 1 rows
    assert (
        any(not decode for decode, _ in used) and not calls
    )  # prompts ran in mixed buckets, nothing op by op
    manager = llm.scheduler.kv_cache_manager
    assert manager.num_free_blocks == manager.num_blocks


def test_step_graphs_reject_rows_that_do_not_fit() -> None:
    runner = ModelRunner(from_preset("llama-tiny").eval(), num_blocks=16, block_size=4)
    graphs = runner.enable_cuda_graphs(max_num_seqs=2, max_model_len=8, capture=False)
    long_row = SequenceStep([1], 9, [0, 1, 2])  # three blocks, the graph holds two per row
    assert not graphs.supports([long_row]) and not graphs.supports([SequenceStep([1], 0, [0])] * 3)
    assert not graphs.supports([SequenceStep([1, 2], 0, [0])])  # no mixed buckets without max_num_tokens
    with pytest.raises(kiln.ConfigError, match="do not fit"):
        graphs.fill([long_row])
    with pytest.raises(kiln.CapacityError, match="does not fit"):
        graphs.fill([SequenceStep([1], 8, [0, 1])])  # position 8 needs a third block
    out = runner.execute([SequenceStep([1], 0, [0]), long_row])  # falls back to the op-by-op step
    assert out.shape[0] == 2 and torch.isfinite(out).all()


def test_engine_cuda_graph_options_are_validated() -> None:
    model = from_preset("llama-tiny").eval()
    with pytest.raises(kiln.ConfigError, match="needs a CUDA device"):
        kiln.LLM(model, num_blocks=8, cuda_graphs=True)
    with pytest.raises(kiln.ConfigError, match="enforce_eager"):
        kiln.LLM(model, num_blocks=8, enforce_eager=True, torch_compile=True)
    with pytest.raises(kiln.ConfigError, match="torch_compile"):
        kiln.LLM(model, num_blocks=8, torch_compile=True)
    with pytest.raises(kiln.ConfigError, match="CUDA graphs need a CUDA device"):
        ModelRunner(model, num_blocks=8, block_size=4).enable_cuda_graphs(
            max_num_seqs=2, max_model_len=8, capture=True
        )
    with pytest.raises(
        kiln.ConfigError, match="max-autotune-no-cudagraphs"
    ):  # inductor's own graphs would clash
        ModelRunner(model, num_blocks=8, block_size=4).enable_cuda_graphs(
            max_num_seqs=2, max_model_len=8, capture=False, torch_compile="reduce-overhead"
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_captured_decode_graphs_match_eager_steps_on_the_gpu() -> None:
    model = from_preset("llama-tiny", dtype=torch.bfloat16, device="cuda").eval()
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 14, 7, 30, 5)]
    params = kiln.SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = kiln.LLM(model, num_blocks=64, block_size=16, enforce_eager=True)
    graphed = kiln.LLM(model, num_blocks=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=64)
    assert graphed.cuda_graphs and set(graphed.runner.graphs.captured) == set(graphed.runner.graphs.keys)
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    agree = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
    assert agree >= 0.9 * 12 * len(prompts)  # bf16: a near-tie may flip a token, then the rest diverge
    runner = graphed.runner
    steps = [SequenceStep([7], 3, [0]), SequenceStep([9], 10, [1])]
    for c in runner.caches:
        c.normal_()
    saved = [c.clone() for c in runner.caches]
    got_logits = runner.execute(steps)
    for c, s in zip(runner.caches, saved, strict=True):
        c.copy_(s)
    graphs, runner.graphs = runner.graphs, None
    want_logits = runner.execute(steps)
    runner.graphs = graphs
    torch.testing.assert_close(got_logits, want_logits, rtol=2e-2, atol=2e-2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 20), st.integers(1, 9)), min_size=1, max_size=9))
def test_loop_and_vectorized_mixed_fills_write_the_same_buffers(rows) -> None:
    graphs = StepGraphs(
        lambda *a: None,
        lambda *a: None,
        [],
        {},
        max_num_seqs=16,
        max_num_tokens=128,
        max_blocks=8,
        block_size=4,
        scratch_block=99,
        num_blocks=64,
        device=torch.device("cpu"),
        capture=False,
        max_num_logits=128,
    )
    g = torch.Generator().manual_seed(len(rows))
    steps = []
    for n, start, logits in rows:
        blocks = torch.randperm(64, generator=g)[: -(-(start + n) // 4)].tolist()
        steps.append(
            SequenceStep(
                torch.randint(0, 500, (n,), generator=g).tolist(), start, blocks, num_logits=min(logits, n)
            )
        )
    written = []
    for fill in (graphs._fill_mixed_loop, graphs._fill_mixed_vectorized):
        for a in graphs.buffer.host.values():
            a.fill(-7)  # poison: a field one path forgets to write differs
        written.append((fill(steps), {k: a.copy() for k, a in graphs.buffer.host.items()}))
    (t1, r1), h1 = written[0]
    (t2, r2), h2 = written[1]
    assert (t1, r1) == (t2, r2) == (sum(n for n, _, _ in rows), sum(s.num_logits for s in steps))
    for name in h1:
        np.testing.assert_array_equal(h1[name], h2[name], err_msg=name)


def test_torch_compile_fuses_mixed_steps_with_one_compile_per_batch_kind() -> None:
    """torch_compile compiles the mixed step graph with dynamic sizes: token buckets share one compile
    (buckets of one sequence compile apart, sizes of 1 being specialized), and the logits are the
    op-by-op step's. The largest bucket runs first, as capture_all captures it."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    runner = ModelRunner(from_preset("llama-tiny").eval(), num_blocks=64, block_size=4)
    steps = [
        [SequenceStep(list(range(1, 60)), 0, list(range(30, 46)))],  # 59 tokens: the largest bucket (64)
        [SequenceStep(list(range(1, 10)), 0, [0, 1, 2])],  # 9 tokens: bucket 16, the first compile reused
        [SequenceStep(list(range(1, 30)), 0, list(range(8)))],  # 29 tokens: bucket 32
        [SequenceStep(list(range(5, 12)), 8, list(range(10, 14))), SequenceStep([3], 5, [20, 21])],  # 2 sequences
    ]
    want = [runner.execute(s) for s in steps]
    runner.enable_cuda_graphs(
        max_num_seqs=4, max_model_len=64, max_num_tokens=64, capture=False, torch_compile=True
    )
    before = counters["stats"]["unique_graphs"]
    for s, w in zip(steps, want, strict=True):
        torch.testing.assert_close(runner.execute(s), w, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] - before == 2  # one sequence, several sequences
