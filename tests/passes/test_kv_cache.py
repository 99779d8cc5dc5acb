import pytest
import torch

import kiln
from kiln.ir import print_ir
from kiln.passes.kv_cache import layout_of

BLOCK = 4


class Toy(torch.nn.Module):
    """Two causal attention layers with GQA, written with kiln::attention directly."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({
            "q": torch.nn.Linear(16, 16), "k": torch.nn.Linear(16, 8), "v": torch.nn.Linear(16, 8), "o": torch.nn.Linear(16, 16),
        }) for _ in range(2))
        self.head = torch.nn.Linear(16, 50)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(input_ids) + torch.sin(position_ids[..., None].float() * 0.3)  # (1, T, 16)
        b, t, _ = x.shape
        for layer in self.layers:
            q = layer["q"](x).view(b, t, 4, 4).transpose(1, 2)  # (B, 4, T, 4)
            k = layer["k"](x).view(b, t, 2, 4).transpose(1, 2)  # (B, 2, T, 4)
            v = layer["v"](x).view(b, t, 2, 4).transpose(1, 2)
            a = torch.ops.kiln.attention(q, k, v, None, True, None)
            x = x + layer["o"](a.transpose(1, 2).reshape(b, t, 16))
        return self.head(x)


def _step(gm, layout, caches, seqs):
    """Run one step: seqs = [(all_token_ids, num_cached, num_new, block_ids)]."""
    ids, pos, slots, tables, lens, starts, last = [], [], [], [], [], [0], []
    width = max(len(s[3]) for s in seqs)
    for tokens, cached, new, blocks in seqs:
        for p in range(cached, cached + new):
            ids.append(tokens[p])
            pos.append(p)
            slots.append(blocks[p // BLOCK] * BLOCK + p % BLOCK)
        tables.append(blocks + [0] * (width - len(blocks)))
        lens.append(cached + new)
        starts.append(starts[-1] + new)
        last.append(starts[-1] - 1)
    args = {
        "input_ids": torch.tensor([ids]), "position_ids": torch.tensor([pos]),
        "slot_mapping": torch.tensor(slots), "block_tables": torch.tensor(tables, dtype=torch.int32),
        "seq_lens": torch.tensor(lens, dtype=torch.int32), "query_start_loc": torch.tensor(starts, dtype=torch.int32),
        "logits_indices": torch.tensor(last),
    }
    args.update({f"kv_cache_{i}": c for i, c in enumerate(caches)})
    (logits,) = gm(*[args[name] for name in layout.input_names])
    return logits[0]  # (S, V)


def _compiled(model: torch.nn.Module):
    ids, pos = torch.randint(0, 50, (1, 6)), torch.arange(6)[None]
    compiled = kiln.compile(model, (ids, pos), config=kiln.CompileConfig(kv_cache=True))
    layout = layout_of(compiled.graph_module)
    # poisoned: a slot read before it is written would turn the logits into nan
    caches = [torch.full((2, 16, BLOCK, h, d), float("nan")) for h, d in zip(layout.num_kv_heads, layout.head_dim, strict=True)]
    return compiled, layout, caches


def test_ir_after_rewrite() -> None:
    compiled, layout, _ = _compiled(Toy().eval())
    text = compiled.ir
    assert text.count("kiln.paged_attention(") == 2 and "kiln.attention(" not in text
    assert layout.input_names[:2] == ("input_ids", "position_ids")
    assert layout.input_names[2:4] == ("kv_cache_0", "kv_cache_1") and layout.num_kv_heads == (2, 2)
    assert "aten.index_select(" in text and ": f32[1, L, 50]" in text
    assert compiled.stats["kv-cache"]["attention_paged"] == 2


def test_batched_prefill_decode_and_chunks_match_the_model() -> None:
    model = Toy().eval()
    compiled, layout, caches = _compiled(model)
    gm = compiled.graph_module
    a = torch.randint(0, 50, (9,)).tolist()
    b = torch.randint(0, 50, (5,)).tolist()
    ref = lambda toks: model(torch.tensor([toks]), torch.arange(len(toks))[None])[0, -1]  # noqa: E731
    with torch.no_grad():
        # a: chunked prefill 6 + 2 tokens; b: whole prompt at once, in the same step as a's first chunk
        out = _step(gm, layout, caches, [(a, 0, 6, [3, 7]), (b, 0, 5, [1, 9])])
        torch.testing.assert_close(out[0], ref(a[:6]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], ref(b), rtol=1e-5, atol=1e-5)
        out = _step(gm, layout, caches, [(a, 6, 2, [3, 7]), (b + [a[0]], 5, 1, [1, 9])])  # chunk + decode
        torch.testing.assert_close(out[0], ref(a[:8]), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[1], ref(b + [a[0]]), rtol=1e-5, atol=1e-5)
        out = _step(gm, layout, caches, [(a, 8, 1, [3, 7, 2])])  # a crosses into a third block
        torch.testing.assert_close(out[0], ref(a), rtol=1e-5, atol=1e-5)


class Masked(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.one_hot(input_ids, 8).float().unsqueeze(1)  # (1, 1, T, 8)
        return torch.ops.kiln.attention(x, x, x, None, False, None)  # not causal: must not match


def test_non_causal_attention_is_refused() -> None:
    ids, pos = torch.randint(0, 8, (1, 4)), torch.arange(4)[None]
    with pytest.raises(kiln.PassError, match="needs causal attention"):
        kiln.compile(Masked(), (ids, pos), config=kiln.CompileConfig(kv_cache=True))


def test_position_ids_are_required() -> None:
    class NoPos(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = torch.nn.functional.one_hot(input_ids, 8).float().unsqueeze(1)
            return torch.ops.kiln.attention(x, x, x, None, True, None)

    with pytest.raises(kiln.PassError, match="position_ids"):
        kiln.compile(NoPos(), (torch.randint(0, 8, (1, 4)),), config=kiln.CompileConfig(kv_cache=True))
    assert "kiln.attention" in print_ir(kiln.capture(NoPos(), (torch.randint(0, 8, (1, 4)),)).gm)
