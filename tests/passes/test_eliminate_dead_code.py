import torch

import kiln
from kiln.ir import print_ir, verify
from kiln.passes.eliminate_dead_code import EliminateDeadCode


class Dead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = torch.nn.Parameter(torch.randn(4))
        self.unused = torch.nn.Parameter(torch.randn(4))
        self.register_buffer("counter", torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _ = torch.exp(x) * self.unused  # dead computation reading a weight only it needs
        self.counter.add_(1)  # a side effect: must stay
        return x * self.used


def test_removes_dead_nodes_and_weights_keeps_side_effects() -> None:
    model = Dead()
    x = torch.randn(3, 4)
    gm = kiln.capture(model, (x,), dynamic=False).gm
    before = print_ir(gm)
    assert "aten.exp(" in before and '"unused"' in before
    result = EliminateDeadCode()(gm)
    verify(result.gm)
    after = print_ir(result.gm)
    assert "aten.exp(" not in after and '"unused"' not in after
    assert not hasattr(result.gm, "unused") and hasattr(model, "unused")  # the model keeps its weight
    assert result.stats["nodes_removed"] >= 2 and result.stats["weights_removed"] == 1
    assert "copy_" in after or "add_" in after or "aten.add" in after  # the buffer update survives
    counter_before = result.gm.counter.clone()
    torch.testing.assert_close(result.gm(x=x), x * model.used)
    assert torch.equal(result.gm.counter, counter_before + 1)


def test_nothing_to_remove_is_not_modified() -> None:
    class Live(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sin(x)

    gm = kiln.capture(Live(), (torch.randn(2),), dynamic=False).gm
    result = EliminateDeadCode()(gm)
    assert not result.modified and result.stats["nodes_removed"] == 0
