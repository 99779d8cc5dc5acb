"""Tests of ``passes/fuse_attention.py``: IR text, numerics, and attentions that must not fuse."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from kiln_testing import HF_MODELS
from torch import nn

import kiln
import kiln.models
from kiln.capture import capture
from kiln.compile import CompileConfig, CompiledModel
from kiln.ir import print_ir, verify
from kiln.pass_manager import PassManager
from kiln.passes.canonicalize import Canonicalize
from kiln.passes.fuse_attention import FuseAttention

LENGTHS = (1, 5, 17)  # one capture must serve decode (1), odd and longer-than-capture lengths


def lines(ir: str, op: str) -> int:
    """How many nodes of the printed IR compute an op whose name starts with ``op``."""
    return sum(f"= {op}" in line for line in ir.splitlines())


def attention_lines(ir: str) -> list[str]:
    return [line for line in ir.splitlines() if "= kiln.attention(" in line]


def fused(compiled: CompiledModel) -> dict[str, float]:
    return compiled.stats["fuse-attention"]


def kv_heads(compiled: CompiledModel) -> list[tuple[int, int]]:
    """(query heads, kv heads) of every kiln.attention node."""
    nodes = [n for n in compiled.graph_module.graph.nodes if n.target == torch.ops.kiln.attention.default]
    return [(n.args[0].meta["val"].shape[1], n.args[1].meta["val"].shape[1]) for n in nodes]


def logits(out: object) -> torch.Tensor:
    return getattr(out, "logits", out)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# Models: kiln's and Hugging Face's (sdpa and eager attention)
# --------------------------------------------------------------------------------------

MODELS = ["kiln:llama-tiny", "kiln:gpt2-tiny"] + [f"hf:{m}:{impl}" for m in HF_MODELS for impl in ("sdpa", "eager")]


def build(spec: str) -> nn.Module:
    kind, name, *impl = spec.split(":")
    if kind == "kiln":
        return kiln.models.from_preset(name).eval()
    model = HF_MODELS[name](layers=2)
    model.set_attn_implementation(impl[0])  # transformers 5: picks the attention function per forward
    return model


@pytest.fixture(scope="module", params=MODELS)
def compiled_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module, CompiledModel]:
    torch.manual_seed(0)
    model = build(request.param)
    return request.param, model, kiln.compile(model, {"input_ids": torch.randint(0, 100, (1, 6))})


def test_models_fuse_every_layer_into_causal_kiln_attention(compiled_model: tuple[str, nn.Module, CompiledModel]) -> None:
    spec, model, compiled = compiled_model
    layers = model.config.num_hidden_layers
    ir = compiled.ir
    verify(compiled.graph_module)
    assert fused(compiled)["attention_fused"] == layers
    att = attention_lines(ir)
    assert len(att) == layers
    assert all("mask=None, causal=True" in line for line in att), att
    # HF sdpa passes scaling explicitly; eager multiplies by it; kiln's models leave SDPA's default
    assert all(("scale=None" if spec.startswith("kiln") else "scale=0.3535533905932738") in line for line in att)
    for op in ("aten.scaled_dot_product_attention", "aten.softmax", "aten._softmax", "aten.repeat_interleave"):
        assert lines(ir, op) == 0, op
    if spec.startswith("hf"):  # HF's mask construction (arange/index/le/eq/and/where) and repeat_kv are gone
        assert fused(compiled)["causal_masks_proven"] == layers
        for op in ("aten.index", "aten.le", "aten.eq", "aten.__and__", "aten.where", "aten.cumsum", "aten.diff"):
            assert lines(ir, op) == 0, op
        # repeat_kv's expand: none in the attention modules (the rotary embedding's expand of inv_freq, a free
        # layout op of one buffer that fold-constants keeps by policy, appears under transformers 5.17)
        attn = "\n".join(line for line in ir.splitlines() if "attn" in line.split("#")[-1])
        assert lines(attn, "aten.expand") == 0, attn
    hq, hkv = kv_heads(compiled)[0]
    assert (hq, hkv) == ((4, 4) if "gpt2" in spec else (4, 2))  # GQA by head counts, K/V never repeated


def test_models_match_eager_at_every_length(compiled_model: tuple[str, nn.Module, CompiledModel]) -> None:
    spec, model, compiled = compiled_model
    kwargs = {"use_cache": False} if spec.startswith("hf") else {}
    for length in LENGTHS:
        ids = torch.randint(0, 100, (1, length))
        with torch.no_grad():
            expected = logits(model(input_ids=ids, **kwargs))
            got = logits(compiled(input_ids=ids))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{spec} at T={length}")


def test_hf_padding_mask_is_kept_beside_the_proven_causal_part() -> None:
    model = build("hf:llama:sdpa")
    example = {"input_ids": torch.randint(0, 100, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    compiled = kiln.compile(model, example)
    att = attention_lines(compiled.ir)
    assert fused(compiled)["causal_masks_proven"] == 2 and fused(compiled)["masks_kept"] == 2
    assert all("causal=True" in line and "mask=None" not in line for line in att)  # causal AND padding[b, kv]
    for length in (5, 17):
        ids, mask = torch.randint(0, 100, (1, length)), torch.ones(1, length, dtype=torch.long)
        mask[0, -2:] = 0  # right padding: no query row is masked entirely
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Hand-written attentions
# --------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Decomposed attention over (B, H, T, D): the forms models write by hand.

    ``gqa``: "none", "repeat_interleave" or "repeat_kv"; ``mask``: builds the *masked* positions
    (True = hidden) from T; ``prescale``: scale q before the product instead of the scores.
    """

    def __init__(self, gqa: str = "none", mask: Callable[[int], torch.Tensor] | None = None, prescale: bool = False,
                 softmax_dim: int = -1, fill: float = float("-inf"), mask_op: str = "masked_fill") -> None:
        super().__init__()
        self.kv_heads = 4 if gqa == "none" else 2
        self.qkv = nn.Linear(32, 32 + 2 * 8 * self.kv_heads)
        self.gqa, self.prescale, self.softmax_dim, self.fill, self.mask_op = gqa, prescale, softmax_dim, fill, mask_op
        self.mask = mask or (lambda t: torch.triu(torch.ones(t, t), 1).bool())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split([32, 8 * self.kv_heads, 8 * self.kv_heads], dim=-1)
        q = q.view(B, T, 4, 8).transpose(1, 2)  # (B, 4, T, 8)
        k = k.view(B, T, self.kv_heads, 8).transpose(1, 2)  # (B, Hkv, T, 8)
        v = v.view(B, T, self.kv_heads, 8).transpose(1, 2)
        if self.gqa == "repeat_interleave":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        elif self.gqa == "repeat_kv":  # HF's repeat_kv
            k = k[:, :, None].expand(B, 2, 2, T, 8).reshape(B, 4, T, 8)
            v = v[:, :, None].expand(B, 2, 2, T, 8).reshape(B, 4, T, 8)
        if self.prescale:
            scores = (q * 8**-0.5) @ k.transpose(-2, -1)
        else:
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(8)  # (B, 4, T, T)
        if self.mask_op == "masked_fill":
            scores = scores.masked_fill(self.mask(T), self.fill)
        elif self.mask_op == "where":
            scores = torch.where(~self.mask(T), scores, torch.finfo(scores.dtype).min)
        else:  # an additive float mask built from the boolean one
            scores = scores + torch.zeros(T, T).masked_fill(self.mask(T), self.fill)
        probs = torch.softmax(scores.float(), dim=self.softmax_dim).to(q.dtype)  # fp32 softmax, cast back
        return (probs @ v).transpose(1, 2).reshape(B, T, 32)


def compile_tokens(model: nn.Module, *inputs: torch.Tensor, dynamic: dict | None = None) -> CompiledModel:
    return kiln.compile(model.eval(), inputs, config=CompileConfig(dynamic=dynamic or {"x": {1: "T"}}))


def check_outputs(model: nn.Module, compiled: CompiledModel, dtype: torch.dtype = torch.float32, atol: float = 1e-5) -> None:
    for length in LENGTHS:
        x = torch.randn(1, length, 32, dtype=dtype)
        torch.testing.assert_close(compiled(x), model(x), atol=atol, rtol=atol, msg=f"T={length}")


@pytest.mark.parametrize(("gqa", "prescale"), [("none", False), ("repeat_interleave", False), ("repeat_kv", True)])
def test_decomposed_attention_with_triu_mask_fuses(gqa: str, prescale: bool) -> None:
    model = Attention(gqa, prescale=prescale)
    compiled = compile_tokens(model, torch.randn(1, 6, 32))
    ir = compiled.ir
    assert fused(compiled)["attention_fused"] == 1 and fused(compiled)["causal_masks_proven"] == 1
    (att,) = attention_lines(ir)
    assert "mask=None, causal=True, scale=0.3535533905932" in att
    for op in ("aten.softmax", "aten.triu", "aten.ones", "aten.masked_fill", "aten.repeat_interleave", "aten.expand", "aten.matmul"):
        assert lines(ir, op) == 0, op
    assert kv_heads(compiled) == [(4, model.kv_heads)]
    check_outputs(model, compiled)


@pytest.mark.parametrize("mask_op", ["where", "additive"])
def test_where_and_additive_masks_are_proven_causal(mask_op: str) -> None:
    model = Attention(mask_op=mask_op)
    compiled = compile_tokens(model, torch.randn(1, 6, 32))
    assert "mask=None, causal=True" in attention_lines(compiled.ir)[0]
    assert lines(compiled.ir, "aten.where") == lines(compiled.ir, "aten.add") == 0
    check_outputs(model, compiled)


def test_bf16_softmax_casts_are_absorbed() -> None:
    model = Attention("repeat_kv").to(torch.bfloat16)
    captured = capture(model.eval(), (torch.randn(1, 6, 32, dtype=torch.bfloat16),), dynamic={"x": {1: "T"}})
    assert lines(print_ir(Canonicalize()(captured.gm).gm), "aten.to") == 3  # .bool(), and softmax's fp32 casts survive
    compiled = compile_tokens(model, torch.randn(1, 6, 32, dtype=torch.bfloat16))
    assert fused(compiled)["attention_fused"] == 1 and "causal=True" in attention_lines(compiled.ir)[0]
    assert lines(compiled.ir, "aten.softmax") == lines(compiled.ir, "aten._to_copy") == lines(compiled.ir, "aten.to") == 0
    check_outputs(model, compiled, torch.bfloat16, atol=3e-2)


def _offset_mask(t: int) -> torch.Tensor:
    return torch.triu(torch.ones(t, t), 2).bool()  # hides j > i + 1: one key too many for causal


def _window_mask(t: int) -> torch.Tensor:
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    return (j > i) | (j < i - 2)  # causal AND a sliding window of 3


def _rounded_mask(t: int) -> torch.Tensor:
    pos = torch.arange(t).float() + 1e20  # fp32 rounds every position to 1e20: j > i is never true
    return pos[None, :] > pos[:, None]


MASKS = {  # name: (mask builder, proven causal, mask operand kept)
    "triu": (lambda t: torch.triu(torch.ones(t, t), 1).bool(), True, False),
    "arange_gt": (lambda t: torch.arange(t)[None, :] > torch.arange(t)[:, None], True, False),
    "tril_eq_0": (lambda t: torch.tril(torch.ones(t, t, dtype=torch.long)) == 0, True, False),
    "sliding_window": (_window_mask, True, True),
    "offset_by_one": (_offset_mask, False, True),
    "anti_causal": (lambda t: torch.arange(t)[None, :] < torch.arange(t)[:, None], False, True),
    "float_positions": (_rounded_mask, False, True),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_are_labelled_causal_only_when_proven(name: str) -> None:
    builder, causal, kept = MASKS[name]
    model = Attention(mask=builder)
    compiled = compile_tokens(model, torch.randn(1, 6, 32))
    (att,) = attention_lines(compiled.ir)
    assert f"causal={causal}" in att and ("mask=None" not in att) == kept
    assert fused(compiled)["causal_masks_proven"] == int(causal)
    x = torch.randn(1, 17, 32)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5, equal_nan=True)  # anti-causal: row 0 is NaN


def test_static_capture_proves_a_folded_constant_mask() -> None:
    model = Attention()
    compiled = compile_tokens(model, torch.randn(1, 7, 32), dynamic=False)  # FoldConstants may fold the triu
    assert "mask=None, causal=True" in attention_lines(compiled.ir)[0]
    x = torch.randn(1, 7, 32)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------
# Must not match, or must keep the mask
# --------------------------------------------------------------------------------------


class SDPA(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv, self.dropout = nn.Linear(32, 96), dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, 4, 8).transpose(1, 2) for t in self.qkv(x).split(32, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout)  # explicit dropout
        return y.transpose(1, 2).reshape(B, T, 32)


class SoftmaxOfLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj, self.v = nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        scores = self.proj(x).view(B, T, 4, 8).transpose(1, 2)  # (B, 4, T, 8): not a q @ kᵀ product
        v = self.v(x).view(B, T, 4, 8).transpose(1, 2)
        return torch.softmax(scores, dim=-1) @ v.transpose(-2, -1)


def fuse_directly(model: nn.Module, *inputs: torch.Tensor, dynamic: dict) -> tuple[str, FuseAttention, Callable]:
    """Run canonicalize + fuse-attention with verification: the IR, the pass (for its reasons), the graph."""
    gm = capture(model.eval(), inputs, dynamic=dynamic).gm
    fuse = FuseAttention()
    gm, report = PassManager([Canonicalize(), fuse], verify_each=True).run(gm)
    assert report.records[-1].stats["attention_fused"] == 0
    return print_ir(gm), fuse, gm


def test_sdpa_with_dropout_is_not_matched() -> None:
    ir, fuse, _ = fuse_directly(SDPA(dropout=0.1), torch.randn(1, 6, 32), dynamic={"x": {1: "T"}})
    assert lines(ir, "aten.scaled_dot_product_attention") == 1 and not attention_lines(ir)
    assert "dropout_p=0.1" in fuse.skipped[0][1]


@pytest.mark.parametrize("model", [Attention(softmax_dim=-2), SoftmaxOfLinear()], ids=["softmax_over_queries", "softmax_of_linear"])
def test_softmax_that_is_not_attention_is_not_matched(model: nn.Module) -> None:
    ir, fuse, gm = fuse_directly(model, torch.randn(1, 6, 32), dynamic={"x": {1: "T"}})
    assert lines(ir, "aten.softmax") == 1 and not attention_lines(ir)
    assert fuse.skipped, "a reason is recorded"
    for length in LENGTHS:
        x = torch.randn(1, length, 32)
        torch.testing.assert_close(gm(x=x), model(x), atol=1e-5, rtol=1e-5)


def test_fill_that_does_not_mask_is_not_matched() -> None:
    ir, fuse, _ = fuse_directly(Attention(fill=-1e4), torch.randn(1, 6, 32), dynamic={"x": {1: "T"}})
    assert lines(ir, "aten.softmax") == 1 and "masking fill" in fuse.skipped[0][1]


def test_arbitrary_boolean_mask_is_kept_as_operand() -> None:
    model = SDPA()
    mask = torch.rand(1, 1, 6, 6) > 0.5
    compiled = compile_tokens(model, torch.randn(1, 6, 32), mask, dynamic={"x": {1: "T"}, "mask": {2: "T", 3: "T"}})
    (att,) = attention_lines(compiled.ir)
    assert "mask=%mask, causal=False, scale=None" in att
    assert fused(compiled)["masks_kept"] == 1 and fused(compiled)["causal_masks_proven"] == 0
    for length in LENGTHS:
        x, mask = torch.randn(1, length, 32), torch.rand(1, 1, length, length) > 0.5
        mask |= torch.eye(length, dtype=torch.bool)  # no row masked entirely
        torch.testing.assert_close(compiled(x, mask), model(x, mask), atol=1e-5, rtol=1e-5)


def test_decomposed_boolean_mask_input_is_kept_inverted() -> None:
    class MaskedInput(Attention):
        def forward(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            self.mask = lambda t: hidden
            return super().forward(x)

    model = MaskedInput()
    hidden = torch.rand(6, 6) > 0.5
    compiled = compile_tokens(model, torch.randn(1, 6, 32), hidden, dynamic={"x": {1: "T"}, "hidden": {0: "T", 1: "T"}})
    (att,) = attention_lines(compiled.ir)
    assert "causal=False" in att and lines(compiled.ir, "aten.logical_not") == 1  # True = attend in kiln
    x, hidden = torch.randn(1, 9, 32), (torch.rand(9, 9) > 0.5) & ~torch.eye(9, dtype=torch.bool)
    torch.testing.assert_close(compiled(x, hidden), model(x, hidden), atol=1e-5, rtol=1e-5)
