import pytest
import torch
from kiln_testing import HF_MODELS

import kiln
from kiln.models import from_preset
from kiln.runtime.model_runner import ModelRunner, SequenceStep

MODELS = {**{f"hf-{k}": v for k, v in HF_MODELS.items()},
          "kiln-llama": lambda: from_preset("llama-tiny").eval(), "kiln-gpt2": lambda: from_preset("gpt2-tiny").eval()}


def _last_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tokens]))
    return (out.logits if hasattr(out, "logits") else out)[0, -1]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_step_graph_matches_the_model_across_prefill_chunks_and_decode(name: str) -> None:
    model = MODELS[name]()
    runner = ModelRunner(model, num_blocks=24, block_size=4)
    for cache in runner.caches:
        cache.fill_(float("nan"))  # a slot read before it is written poisons the logits
    assert "kiln.paged_attention(" in runner.compiled.ir and "kiln.attention(" not in runner.compiled.ir
    assert "position_ids" in runner.layout.input_names
    vocab = model.config.vocab_size
    a = torch.randint(0, vocab, (11,)).tolist()
    b = torch.randint(0, vocab, (6,)).tolist()
    out = runner.execute([SequenceStep(a[:7], 0, [3, 0]), SequenceStep(b, 0, [5, 6])])  # two prefills, one chunked
    torch.testing.assert_close(out[0], _last_logits(model, a[:7]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], _last_logits(model, b), rtol=1e-4, atol=1e-5)
    out = runner.execute([SequenceStep(a[7:], 7, [3, 0, 9]), SequenceStep([a[0]], 6, [5, 6])])  # chunk + decode
    torch.testing.assert_close(out[0], _last_logits(model, a), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], _last_logits(model, b + [a[0]]), rtol=1e-4, atol=1e-5)


def test_runner_rejects_steps_that_overflow_their_blocks() -> None:
    runner = ModelRunner(from_preset("llama-tiny").eval(), num_blocks=4, block_size=4)
    with pytest.raises(kiln.CapacityError, match="do not fit"):
        runner.execute([SequenceStep(list(range(9)), 0, [0, 1])])
