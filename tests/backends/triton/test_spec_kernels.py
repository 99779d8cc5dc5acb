"""The asynchronous-speculation kernel against its plain-Python reference (interpreted on the CPU)."""

from __future__ import annotations

import pytest
import torch

from kiln.runtime.drafters import NgramDrafter
from kiln.runtime.spec_async import DeviceHistory, spec_advance_reference

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(seed: int, k: int, vocab: int, lengths: list[int]):  # noqa: ANN202
    """A step over len(lengths) sequences (one not sampling), histories of small-vocabulary random tokens."""
    g = torch.Generator().manual_seed(seed)
    hist = DeviceHistory(len(lengths) + 2, 600, k, torch.device("cpu"))
    rows, ids, info = [], [], []
    for i, n in enumerate(lengths):
        slot = hist.slot(f"r{i}", torch.randint(0, vocab, (n,), generator=g).tolist())
        hist.real[slot] = int(torch.randint(0, k + 1, (1,), generator=g))
        kd = int(torch.randint(0, k + 1, (1,), generator=g))
        # the step's tokens: the last known token, then kd drafts; rows: kd + 1 argmax rows
        d0 = len(ids) + 1
        drafts = torch.randint(0, vocab, (kd,), generator=g).tolist()
        ids += [0, *drafts]
        preds = torch.randint(0, vocab, (kd + 1,), generator=g)
        m = int(torch.randint(0, kd + 1, (1,), generator=g))  # make a prefix of the drafts match
        preds[:m] = torch.tensor(drafts[:m], dtype=torch.int64)
        info.append(
            [slot if i != 1 else -1, len(rows), kd, d0, kd if i == 2 else -1]
        )  # sequence 2: host drafts
        rows += preds.tolist()
    return torch.tensor(rows), torch.tensor(ids), torch.tensor(info), hist


@pytest.mark.parametrize(("min_n", "max_n"), [(1, 3), (2, 3), (1, 1), (1, 2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_spec_advance_kernel_equals_reference(min_n: int, max_n: int, seed: int, monkeypatch) -> None:  # noqa: ANN001
    import kiln.backends.triton.spec_kernels as sk

    monkeypatch.setattr(sk, "_BLOCK", 64)  # the 300-token history takes several search blocks
    k = 4
    lengths = [1, 7, 2, 300, 41, 3]
    best, ids, info, hist = _case(seed, k, vocab=5, lengths=lengths)
    ref_hist = DeviceHistory(len(lengths) + 2, 600, k, torch.device("cpu"))
    ref_hist.tokens.copy_(hist.tokens)
    ref_hist.lengths.copy_(hist.lengths)
    ref_hist.real.copy_(hist.real)
    want_out, want_next = spec_advance_reference(best, ids, info, ref_hist, min_n, max_n)
    dev_hist = DeviceHistory(len(lengths) + 2, 600, k, DEV)
    dev_hist.tokens.copy_(hist.tokens)
    dev_hist.lengths.copy_(hist.lengths)
    dev_hist.real.copy_(hist.real)
    got_out, got_next = sk.spec_advance_triton(
        best.to(DEV), ids.to(DEV), info.to(DEV), dev_hist, min_n, max_n
    )
    rows = info[:, 0] >= 0
    torch.testing.assert_close(got_out.cpu()[rows], want_out[rows])
    torch.testing.assert_close(got_next.cpu()[rows], want_next[rows])
    torch.testing.assert_close(dev_hist.lengths.cpu(), ref_hist.lengths)
    torch.testing.assert_close(dev_hist.real.cpu(), ref_hist.real)
    for s in range(len(lengths)):
        n = int(ref_hist.lengths[s])
        assert dev_hist.tokens[s, :n].cpu().tolist() == ref_hist.tokens[s, :n].tolist()
    # the drafts are NgramDrafter's proposal over the grown history (padding after it)
    for i, (slot, *_rest) in enumerate(info.tolist()):
        if slot < 0:
            continue
        history = ref_hist.tokens[slot, : int(ref_hist.lengths[slot])].tolist()
        prop = NgramDrafter(min_n=min_n, max_n=max_n).lookup(history, k)
        assert got_next[i, 1 : 1 + len(prop)].cpu().tolist() == prop
        assert int(dev_hist.real[slot]) == len(prop)
        assert int(got_next[i, 0]) == history[-1]


def test_spec_advance_counts() -> None:
    """Acceptance stops at the first mismatch and at the real (not padded) drafts."""
    k = 3
    hist = DeviceHistory(2, 64, k, torch.device("cpu"))
    s = hist.slot("a", [5, 6, 7, 5, 6])
    hist.real[s] = 2  # the last proposal had 2 real drafts, 1 padding token
    ids = torch.tensor([6, 7, 5, 0])  # last token 6, drafts 7 5 | pad 0
    best = torch.tensor([7, 5, 0, 9])  # the target agrees with all three (the pad included)
    info = torch.tensor([[s, 0, 3, 1, -1]])
    out, nxt = spec_advance_reference(best, ids, info, hist, 1, 3)
    assert out[0, :3].tolist() == [7, 5, 0]  # 2 accepted (the pad never is), then the target's token 0
    assert out[0, k + 1 : k + 4].tolist() == [3, 2, 1]  # 3 tokens out, 2 real drafts, 1 position rolled back
    assert hist.tokens[s, :8].tolist() == [5, 6, 7, 5, 6, 7, 5, 0]
    assert int(nxt[0, 0]) == 0


@pytest.mark.parametrize("rollback", [True, False])
def test_apply_feed_kernel_equals_reference(rollback: bool) -> None:
    import kiln.backends.triton.spec_kernels as sk
    from kiln.runtime.step_inputs import DeviceFeed, apply_feed_reference

    g = torch.Generator().manual_seed(5)
    bs, t, n = 4, 24, 5

    def views() -> dict[str, torch.Tensor]:
        g.manual_seed(6)
        return {
            "input_ids": torch.randint(0, 50, (1, t), generator=g),
            "position_ids": torch.randint(8, 30, (1, t), generator=g),
            "slot_mapping": torch.randint(0, 99, (t,), generator=g),
            "seq_lens": torch.randint(30, 40, (n,), generator=g, dtype=torch.int32),
            "block_tables": torch.randint(0, 64, (n, 10), generator=g, dtype=torch.int32),
        }

    tokens = torch.randint(0, 50, (3, 4), generator=g)  # the last step's rows: new token + 3 drafts
    back = (
        torch.tensor([[9, 2], [9, 0], [9, 3]])[:, 1] if rollback else None
    )  # a strided view, as the engine's
    feed = DeviceFeed(tokens, [2, -1, 0, 1, -1], [4, 0, 2, 1, 0], back)
    starts = [0, 4, 9, 13, 20]
    tok, seq = torch.zeros(4, t, dtype=torch.int64), torch.zeros(2, n, dtype=torch.int64)
    nt, ns = feed.fill(starts, tok.numpy(), seq.numpy())
    assert (nt, ns) == (7, 3)
    want, got = views(), views()
    apply_feed_reference(want, feed, tok[:, :nt], seq[:, :ns], bs)
    sk.apply_feed_triton(got, feed, tok[:, :nt], seq[:, :ns], bs)
    for name in want:
        torch.testing.assert_close(got[name], want[name])
    assert (
        got["input_ids"][0, :4].tolist() == tokens[2].tolist()
        and got["input_ids"][0, 9:11].tolist() == tokens[0, :2].tolist()
    )
    if rollback:
        assert (
            want["position_ids"] != views()["position_ids"]
        ).sum() == 6  # sequence 0 (4 tokens) 3 back, sequence 2 (2 tokens) 2 back, 3: 0


@pytest.mark.parametrize("graphs", [False, True], ids=["op-by-op", "static-buffers"])
def test_engine_async_speculation_through_the_kernels(graphs: bool, monkeypatch) -> None:  # noqa: ANN001
    """The engine's asynchronous prompt lookup with the Triton kernels in place of the references (as on a GPU)."""
    from kiln_testing import hf_llama

    import kiln
    import kiln.backends.triton.spec_kernels as sk
    import kiln.runtime.cuda_graphs as cg
    import kiln.runtime.model_runner as mr
    import kiln.runtime.spec_async as sa
    from kiln.runtime.speculative import SpeculativeConfig

    used = {"advance": 0, "feed": 0}

    def advance(*a):  # noqa: ANN002, ANN202
        used["advance"] += 1
        return sk.spec_advance_triton(*a)

    def feed(*a):  # noqa: ANN002, ANN202
        used["feed"] += 1
        return sk.apply_feed_triton(*a)

    monkeypatch.setattr(sa, "spec_advance", advance)
    monkeypatch.setattr(cg, "apply_feed", feed)
    monkeypatch.setattr(mr, "apply_feed", feed)
    torch.manual_seed(7)
    model = hf_llama(layers=1)
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, 128, (5,), generator=g).tolist()
    prompts = [(motif * 6)[:23], torch.randint(0, 128, (9,), generator=g).tolist(), (motif * 6)[:12]]
    params = kiln.SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain = kiln.LLM(model, num_blocks=64, block_size=4, enable_prefix_caching=False, async_scheduling=False)
    want = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    spec = SpeculativeConfig(
        method="ngram", num_speculative_tokens=3, adaptive=False, disable_by_batch_size=None
    )
    llm = kiln.LLM(model, num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16, speculative=spec,
                   async_scheduling=True)  # fmt: skip
    if graphs:
        llm.runner.enable_cuda_graphs(max_num_seqs=4, max_model_len=llm.max_model_len, max_num_tokens=16,
                                      max_num_logits=16, capture=False)  # fmt: skip
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert used["advance"] > 5 and used["feed"] > 5 and llm.stats["accepted_tokens"] > 0
