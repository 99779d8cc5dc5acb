"""The RoPE kernel (``kiln.backends.triton.rotary``) against ``kiln::rotary``'s plain-torch reference.

Interpreted on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on random data: the layouts the step
graph gives (queries and keys as permuted views of a merged projection, cos / sin broadcast over heads),
ragged head dims (half not a power of two), more and fewer dims, and every float dtype. The kernel rounds
as the op-by-op graph does, so results are equal, not close.
"""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton.rotary import MAX_D, rotary, rotary_pair
from kiln.ops import rotary_pair_reference, rotary_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _tables(t: int, d: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.randint(0, 4096, (t, 1), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat((pos * inv, pos * inv), -1)  # (T, D)
    return emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "t", "d"), [(4, 1, 16), (3, 7, 24), (2, 33, 64)])
def test_permuted_projection_views_equal_the_reference(dtype: torch.dtype, heads: int, t: int, d: int) -> None:
    g = torch.Generator().manual_seed(heads * 100 + t + d)
    proj = (torch.randn(1, t, (heads + 2) * d, generator=g) * 2).to(DEVICE, dtype)  # a merged q/k projection
    q = proj[..., : heads * d].reshape(1, t, heads, d).permute(0, 2, 1, 3)  # (1, H, T, D), not contiguous
    cos, sin = _tables(t, d, dtype, g)
    cos, sin = cos[None, None], sin[None, None]  # (1, 1, T, D): broadcast over heads
    got, want = rotary(q, cos, sin), rotary_reference(q, cos, sin)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 4, 5, 12)])
def test_fewer_and_more_dims(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=g).to(DEVICE)
    cos, sin = (torch.randn(shape[-2:], generator=g).to(DEVICE) for _ in range(2))  # broadcast over leading dims
    assert torch.equal(rotary(x, cos, sin), rotary_reference(x, cos, sin))


def test_refusals() -> None:
    x = torch.randn(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="share one of"):
        rotary(x, x.double(), x)
    with pytest.raises(ValueError, match="even"):
        rotary(x[:, :7], x[:, :7], x[:, :7])
    with pytest.raises(ValueError, match="must broadcast"):
        rotary(x, torch.randn(3, 8, device=DEVICE), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wide_heads_are_rotated_in_column_chunks(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    # Heads wider than MAX_D share their columns out over the grid's second axis: a real 2 * MAX_D + 4 head, and
    # with MAX_D lowered to 16, heads of 40 and 100 (chunks of 8 columns per half, the last one ragged); both
    # rotary and rotary_pair, bit-equal to the reference.
    from kiln.backends.triton import rotary as mod

    g = torch.Generator().manual_seed(5)
    for d, max_d in ((2 * MAX_D + 4, MAX_D), (40, 16), (100, 16)):
        monkeypatch.setattr(mod, "MAX_D", max_d)
        x, y = ((torch.randn(2, 3, d, generator=g) * 2).to(DEVICE, dtype) for _ in range(2))
        cos, sin = _tables(3, d, dtype, g)
        assert torch.equal(rotary(x, cos, sin), rotary_reference(x, cos, sin)), d
        ox, oy = rotary_pair(x, y, cos, sin)
        assert torch.equal(ox, rotary_reference(x, cos, sin)) and torch.equal(oy, rotary_reference(y, cos, sin)), d


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("hq", "hkv", "t"), [(4, 2, 1), (3, 1, 19)])
def test_pair_of_query_and_key_views_equals_the_reference(dtype: torch.dtype, hq: int, hkv: int, t: int) -> None:
    # a layer's queries and keys, views of one merged projection with different head counts, one table
    g = torch.Generator().manual_seed(hq * 10 + t)
    d = 24
    proj = (torch.randn(1, t, (hq + 2 * hkv) * d, generator=g) * 2).to(DEVICE, dtype)
    q = proj[..., : hq * d].reshape(1, t, hq, d).permute(0, 2, 1, 3)
    k = proj[..., hq * d : (hq + hkv) * d].reshape(1, t, hkv, d).permute(0, 2, 1, 3)
    cos, sin = _tables(t, d, dtype, g)
    got = rotary_pair(q, k, cos[None, None], sin[None, None])
    want = rotary_pair_reference(q, k, cos[None, None], sin[None, None])
    assert all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(got[1], rotary(k, cos[None, None], sin[None, None]))


def test_pair_refusals() -> None:
    x, cos = torch.randn(2, 3, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="share the last dimension"):
        rotary_pair(x, x[..., :4], cos, cos)
    with pytest.raises(ValueError, match="must broadcast"):
        rotary_pair(x, torch.randn(2, 5, 8, device=DEVICE), cos, cos)
