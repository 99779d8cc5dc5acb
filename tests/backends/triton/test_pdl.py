"""Programmatic dependent launch (``kiln.backends.triton._utils.PDL``): the same results with it as without.

With PDL each kernel lets the next start early, and the next waits (``griddepcontrol.wait``) before it
reads what earlier kernels wrote. A missing or misplaced wait shows as a race: a chain of dependent
kernels, replayed in a CUDA graph, gives other numbers. On the CPU (interpreter) PDL is never used.
"""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton import _utils
from kiln.backends.triton.gemv import launch as gemv_launch
from kiln.backends.triton.rms_norm import add_rms_norm, rms_norm
from kiln.backends.triton.silu_mul import silu_mul


def test_never_in_the_interpreter_or_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_utils, "PDL", True)
    assert not _utils.pdl_enabled(torch.device("cpu"), interpreted=False)
    assert not _utils.pdl_enabled(torch.device("cuda", 0), interpreted=True)
    monkeypatch.setattr(_utils, "PDL", False)
    assert not _utils.pdl_enabled(torch.device("cuda", 0), interpreted=False)


needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs a CUDA GPU of compute capability 9.0 or later (PDL)",
)


def _chain(x: torch.Tensor, layers: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """A decode step's MLP blocks: add + norm, gate/up GEMV, SwiGLU, down GEMV, each reading the one before."""
    h, res = x, torch.zeros_like(x)
    for norm_w, gate_up, down in layers:
        normed, res = add_rms_norm(h, res, norm_w, 1e-5, True)
        gu = gemv_launch(normed, gate_up, None, block_n=16, block_k=256, split_k=2)
        g, u = gu.chunk(2, dim=-1)
        h = gemv_launch(silu_mul(g, u), down, None, block_n=16, block_k=256, split_k=4)
    return rms_norm(h + res, layers[0][0], 1e-5, True)


@needs_hopper
def test_a_dependent_chain_in_a_cuda_graph_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    d, i = 1024, 2816
    layers = [
        (1 + 0.1 * torch.randn(d, device="cuda", dtype=torch.bfloat16),
         torch.randn(2 * i, d, device="cuda", dtype=torch.bfloat16) / d**0.5,
         torch.randn(d, i, device="cuda", dtype=torch.bfloat16) / i**0.5)
        for _ in range(6)
    ]  # fmt: skip
    x = torch.randn(1, d, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for pdl in (False, True):
        monkeypatch.setattr(_utils, "PDL", pdl)
        _chain(x, layers)  # compile outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = _chain(x, layers)
        got = []
        for _ in range(20):  # a race would differ between replays
            g.replay()
            got.append(out.clone())
        torch.cuda.synchronize()
        assert all(torch.equal(got[0], t) for t in got[1:])
        outs[pdl] = got[0]
    torch.testing.assert_close(outs[True], outs[False], rtol=0, atol=0)
