"""Tests of ``passes/fuse_rotary_table.py``: the op-by-op rotary cos / sin tables become one
``kiln.rotary_table`` with outputs equal to the unfused graph's, and what stays op by op."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op, hf_llama
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.fuse_rotary_table import FuseRotaryTable
from kiln.pipeline import INDUCTOR_FUSES, pass_names

X = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("which", ["kiln-llama", "hf-llama"])
def test_the_model_table_becomes_one_op_with_equal_outputs(which: str) -> None:
    torch.manual_seed(0)
    model = from_preset("llama-tiny", seed=0, dtype=torch.bfloat16) if which == "kiln-llama" else hf_llama(2)
    model = model.to(torch.bfloat16).eval()
    gm = canonical_graph(model, torch.randint(0, 128, (1, 8)))
    extra = {} if which == "kiln-llama" else {"use_cache": False}
    want = {n: gm(input_ids=X[:, :n], **extra) for n in (1, 9)}
    result = FuseRotaryTable(devices=("cpu",))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats == {"tables_fused": 1, "nodes_removed": 7}  # to, mul, cat, cos, sin, two casts
    assert (
        count_op(ir, "kiln.rotary_table") == 1
        and count_op(ir, "aten.cos.default") == count_op(ir, "aten.sin.default") == 0
    )
    assert "[fuse-rotary-table]" in ir
    for n, ref in want.items():
        got = result.gm(input_ids=X[:, :n], **extra)
        got, ref = (got, ref) if which == "kiln-llama" else (got.logits, ref.logits)
        assert torch.equal(got, ref)


class _Tables(nn.Module):
    """Tables spelled as the models do, with a scale (``attention_scaling``) and a cast to a dtype; ``keep``:
    the frequencies are also an output (used outside the pattern)."""

    def __init__(self, cos_scale: float, sin_scale: float, dtype: torch.dtype, sin_dtype: torch.dtype | None = None,
                 keep: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16)))
        self.cos_scale, self.sin_scale, self.dtype, self.keep = cos_scale, sin_scale, dtype, keep
        self.sin_dtype = sin_dtype or dtype

    def forward(self, pos: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = pos[..., None].float() * self.inv_freq
        e = torch.cat((f, f), -1)
        cos = x + (e.cos() * self.cos_scale).to(self.dtype)
        sin = x.to(self.sin_dtype) + (e.sin() * self.sin_scale).to(self.sin_dtype)
        return (cos, sin, f * 2) if self.keep else (cos, sin)


@pytest.mark.parametrize(("cos_scale", "sin_scale", "dtype", "sin_dtype", "ops_left", "casts_gone"), [
    (0.5, 0.5, torch.float16, None, 0, 3),  # scale and cast both absorbed (and the positions' cast)
    (0.5, 0.25, torch.float16, None, 2, 1),  # different scales: the products stay, so do the casts after them
    (0.5, 0.5, torch.float16, torch.bfloat16, 0, 1),  # one scale, two casts: the scale absorbed, the casts stay
    (1.5, 1.5, torch.float32, None, 0, 1),  # no casts to fp32 in the canonical graph
])  # fmt: skip
def test_scale_and_cast_are_absorbed_only_when_both_tables_agree(
    cos_scale: float, sin_scale: float, dtype: torch.dtype, sin_dtype: torch.dtype | None, ops_left: int,
    casts_gone: int,
) -> None:  # fmt: skip
    pos = torch.randint(0, 100000, (1, 7), generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 7, 16).to(dtype)
    module = _Tables(cos_scale, sin_scale, dtype, sin_dtype)
    gm = canonical_graph(module, pos, x)
    casts_before = count_op(print_ir(gm), "aten.to.dtype")
    result = FuseRotaryTable(devices=("cpu",))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats["tables_fused"] == 1
    assert count_op(ir, "aten.mul.Tensor") == ops_left and count_op(ir, "aten.cos.default") == 0
    assert count_op(ir, "aten.to.dtype") == casts_before - casts_gone
    for got, want in zip(result.gm(pos=pos, x=x), module(pos, x), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for n in result.gm.graph.nodes:  # the op's fake gives every table the shape and dtype it replaced
        if n.op == "call_function" and n.target is torch.ops.kiln.rotary_table.default:
            for item in n.users:
                assert item.meta["val"].shape == (1, 7, 16) and item.meta["val"].dtype == n.args[3]


def test_nodes_used_outside_the_pattern_stay() -> None:
    pos = torch.randint(0, 100000, (1, 5), generator=torch.Generator().manual_seed(2))
    x = torch.randn(1, 5, 16)
    module = _Tables(1.0, 1.0, torch.float32, keep=True)
    gm = canonical_graph(module, pos, x)
    result = FuseRotaryTable(devices=("cpu",))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats == {"tables_fused": 1, "nodes_removed": 3}  # cos, sin, cat; the frequencies stay
    assert count_op(ir, "kiln.rotary_table") == 1 and count_op(ir, "aten.cat.default") == 0
    for got, want in zip(result.gm(pos=pos, x=x), module(pos, x), strict=True):
        assert torch.equal(got, want)


def test_what_stays_op_by_op() -> None:
    class Other(nn.Module):
        def forward(self, pos: torch.Tensor, fpos: torch.Tensor, inv: torch.Tensor) -> tuple:
            f = pos[..., None].float() * inv
            mixed = torch.cat((f, f * 2), -1)  # not one tensor twice
            g = fpos[..., None] * inv  # float positions: no integer source
            e = torch.cat((g, g), -1)
            h = torch.cat((f, f), -1)
            return mixed.cos(), mixed.sin(), e.cos(), e.sin(), h.cos(), h.exp()  # h: no sine

    args = (torch.randint(0, 50, (1, 5)), torch.rand(1, 5), torch.rand(4))
    gm = canonical_graph(Other(), *args)
    before = print_ir(gm)
    result = FuseRotaryTable(devices=("cpu",))(gm)
    assert not result.modified and print_ir(result.gm) == before


def test_only_on_the_listed_devices_and_in_the_runtime_graph() -> None:
    gm = canonical_graph(_Tables(1.0, 1.0, torch.float32), torch.randint(0, 9, (1, 3)), torch.randn(1, 3, 16))
    assert not FuseRotaryTable()(gm).modified  # default: CUDA only
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("fuse-rotary-pairs") < names.index("fuse-rotary-table")
    assert "fuse-rotary-table" not in pass_names(kiln.CompileConfig())
    assert "fuse-rotary-table" in INDUCTOR_FUSES
