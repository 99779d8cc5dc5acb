"""Tests of ``passes/fuse_silu_mul.py``: each gated MLP's ``silu(gate) * up`` becomes ``kiln.silu_mul`` with
outputs equal to the original graph's, on kiln's Llama (fp32 and bf16), and what must stay."""

from __future__ import annotations

import pytest
import torch
from kiln_testing import canonical_graph, count_op
from torch import nn

import kiln
from kiln.ir import print_ir, verify
from kiln.models import from_preset
from kiln.passes.fuse_silu_mul import FuseSiluMul
from kiln.pipeline import pass_names

X = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_mlp_activation_becomes_one_op(dtype: torch.dtype) -> None:
    model = from_preset("llama-tiny", seed=0, dtype=dtype).eval()
    layers = model.config.num_hidden_layers
    gm = canonical_graph(model, torch.randint(0, 512, (1, 8)))
    want = {n: gm(input_ids=X[:, :n]) for n in (1, 9)}
    assert not FuseSiluMul()(gm).modified  # CPU tensors: no CUDA kernel here
    result = FuseSiluMul(devices=("cpu",))(gm)
    verify(result.gm)
    ir = print_ir(result.gm)
    assert result.stats == {"products_fused": layers}
    assert count_op(ir, "kiln.silu_mul") == layers and count_op(ir, "aten.silu") == 0
    assert "[fuse-silu-mul]" in ir
    for n, ref in want.items():  # the reference runs the same two ops: equal exactly
        assert torch.equal(result.gm(input_ids=X[:, :n]), ref)


def test_what_stays_unfused() -> None:
    class Acts(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, row: torch.Tensor) -> tuple[torch.Tensor, ...]:
            shared = torch.nn.functional.silu(a)
            twice = shared * b  # the silu is used again below
            broadcast = torch.nn.functional.silu(b) * row  # a (1, 8) row broadcast over b's rows
            fused = torch.nn.functional.silu(a + 1) * b
            return twice, shared + 1, broadcast, fused

    a, b, row = torch.randn(4, 8), torch.randn(4, 8), torch.randn(1, 8)
    module = Acts()
    gm = canonical_graph(module, a, b, row)
    result = FuseSiluMul(devices=("cpu",))(gm)
    assert result.stats == {"products_fused": 1}
    got, want = result.gm(a=a, b=b, row=row), module(a, b, row)
    assert all(torch.equal(x, y) for x, y in zip(got, want, strict=True))


def test_in_the_runtime_graph_only() -> None:
    names = pass_names(kiln.CompileConfig(kv_cache=True))
    assert names.index("kv-cache") < names.index("fuse-silu-mul")
    assert "fuse-silu-mul" not in pass_names(kiln.CompileConfig())
