"""The rotary-table kernel (``kiln.backends.triton.rotary_table``) against ``kiln::rotary_table``'s reference.

Interpreted on the CPU (``conftest.py`` sets ``TRITON_INTERPRET=1``) on random positions up to Llama 3's
context: the interpreter's cos / sin are numpy's, which may differ from torch's in the last fp32 bit, so
tables agree to a unit or two in the last place of their dtype (on the GPU both are libdevice's).
"""

from __future__ import annotations

import pytest
import torch

from kiln.backends.triton.rotary_table import rotary_table
from kiln.rotary_table import rotary_table_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inv_freq(half: int, base: float = 500000.0) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, 2 * half, 2).float() / (2 * half)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("lead", "half", "scale"), [((1, 1), 4, 1.0), ((1, 37), 12, 0.5), ((2, 3, 17), 64, 1.25)]
)
def test_tables_equal_the_reference_to_the_last_place(
    dtype: torch.dtype, lead: tuple, half: int, scale: float
) -> None:
    g = torch.Generator().manual_seed(half + len(lead))
    pos = torch.randint(0, 131072, (*lead, 1), generator=g).to(DEVICE)
    inv = (
        _inv_freq(half).to(DEVICE).reshape(*([1] * (len(lead) - 1)), half)
    )  # leading ones, as a graph's buffer
    got, want = rotary_table(pos, inv, scale, dtype), rotary_table_reference(pos, inv, scale, dtype)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape == (*lead, 2 * half) and a.dtype == b.dtype == dtype
        ulp = torch.finfo(dtype).eps * b.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert ((a.float() - b.float()).abs() <= 2 * ulp).all()
        assert torch.equal(a[..., :half], a[..., half:])  # the concatenated halves
    assert (got[0].float() - want[0].float()).abs().max() < 0.01 and got[
        0
    ].float().std() > 0.1  # not constant


def test_the_op_schema_and_fake_agree_with_the_reference() -> None:
    pos = torch.randint(0, 4096, (1, 9, 1))
    torch.library.opcheck(torch.ops.kiln.rotary_table.default, (pos, _inv_freq(8), 0.5, torch.bfloat16))


def test_strided_int32_positions_as_the_step_graph_gives_them() -> None:
    ids = torch.randint(0, 4096, (2, 50), dtype=torch.int32).to(DEVICE)
    pos = ids[1].unsqueeze(0).unsqueeze(-1)[:, ::3]  # (1, 17, 1), stride 3
    inv = _inv_freq(8).to(DEVICE)
    got, want = (
        rotary_table(pos, inv, 1.0, torch.float32),
        rotary_table_reference(pos, inv, 1.0, torch.float32),
    )
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("pos", "inv", "dtype", "message"),
    [
        (torch.zeros(3, 1), torch.ones(4), torch.float32, "int32 or int64"),
        (torch.zeros(3, 2, dtype=torch.long), torch.ones(4), torch.float32, "last dimension of 1"),
        (torch.zeros(3, 1, dtype=torch.long), torch.ones(4, dtype=torch.float16), torch.float32, "fp32"),
        (torch.zeros(3, 1, dtype=torch.long), torch.ones(2, 4), torch.float32, "leading dimensions"),
        (torch.zeros(3, 1, dtype=torch.long), torch.ones(4), torch.int32, "dtype must be"),
    ],
)
def test_bad_inputs_are_rejected(
    pos: torch.Tensor, inv: torch.Tensor, dtype: torch.dtype, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        rotary_table(pos.to(DEVICE), inv.to(DEVICE), 1.0, dtype)
