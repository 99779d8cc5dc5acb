"""kiln.eval: perplexity against direct computation, uniform models, agreement."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kiln.errors import ConfigError
from kiln.eval import agreement, iter_windows, logits_of, perplexity


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and far faster when other work shares the CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Uniform(nn.Module):
    """Equal logits for every token: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*input_ids.shape, self.vocab)


class Shift(nn.Module):
    """Predicts (token + k) mod V with certainty."""

    def __init__(self, vocab: int, k: int) -> None:
        super().__init__()
        self.vocab, self.k = vocab, k

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot((input_ids + self.k) % self.vocab, self.vocab).float() * 10


def tiny_llama(vocab: int = 50) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=128)).eval()


def test_uniform_model_perplexity_is_vocab_size() -> None:
    tokens = torch.randint(0, 300, (1000,))
    assert perplexity(Uniform(300), tokens, seq_len=64, batch_size=4, progress=False) == pytest.approx(300, rel=1e-6)


def test_windows_cover_every_prediction_once() -> None:
    tokens = torch.arange(103)
    targets = torch.cat([y.flatten() for _, y in iter_windows(tokens, seq_len=10, batch_size=3)])
    assert torch.equal(targets, tokens[1:])
    capped = list(iter_windows(tokens, seq_len=10, batch_size=3, max_batches=2))
    assert len(capped) == 2 and all(x.shape == (3, 10) for x, _ in capped)


def test_perplexity_matches_direct_computation() -> None:
    model = tiny_llama()
    tokens = torch.randint(0, 50, (97,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # one window covering the whole text
        direct = F.cross_entropy(logits_of(model(tokens[None, :-1]))[0], tokens[1:]).exp().item()
        # windows of 16: each window a fresh context
        nll = [F.cross_entropy(model(tokens[None, s : s + 16]).logits[0], tokens[s + 1 : s + 17], reduction="sum")
               for s in range(0, 96, 16)]
        windowed = math.exp(sum(x.item() for x in nll) / 96)
    assert perplexity(model, tokens, seq_len=128, batch_size=2, progress=False) == pytest.approx(direct, rel=1e-5)
    assert perplexity(model, tokens, seq_len=16, batch_size=4, progress=False) == pytest.approx(windowed, rel=1e-5)
    assert perplexity(model, tokens.numpy(), seq_len=16, batch_size=4, progress=False) == pytest.approx(windowed,
                                                                                                        rel=1e-5)


def test_agreement() -> None:
    model = tiny_llama()
    tokens = torch.randint(0, 50, (300,))
    assert agreement(model, model, tokens, seq_len=32, batch_size=4, progress=False) == 1.0
    assert agreement(Shift(50, 1), Shift(50, 2), tokens, seq_len=32, progress=False) == 0.0
    assert 0.0 <= agreement(Shift(50, 1), model, tokens, seq_len=32, progress=False) < 1.0
    with pytest.raises(ConfigError, match="vocabulary"):
        agreement(Uniform(10), Uniform(50), tokens % 10, seq_len=32, progress=False)


def test_split_name_with_tokenizer() -> None:
    from kiln.data import corpus, train_tokenizer

    tok = train_tokenizer((d.text for d in corpus.read_eval_split()[:4]), vocab_size=300)
    ppl = perplexity(Uniform(300), "eval", tokenizer=tok, seq_len=64, batch_size=8, max_tokens=2000,
                     progress=False)
    assert ppl == pytest.approx(300, rel=1e-6)
    with pytest.raises(ConfigError, match="tokenizer"):
        perplexity(Uniform(300), "eval", seq_len=64)
    with pytest.raises(ConfigError, match="unknown split"):
        perplexity(Uniform(300), "valid", tokenizer=tok, seq_len=64)
    with pytest.raises(ConfigError, match="1-D"):
        perplexity(Uniform(300), torch.zeros(2, 5, dtype=torch.long), seq_len=64)


MODELS = Path(__file__).parents[2] / "models"


@pytest.mark.skipif(not (MODELS / "kiln-teacher" / "model.safetensors").is_file(), reason="no shipped models")
def test_shipped_reference_models() -> None:
    """The committed teacher is clearly better than the drafter, and they mostly agree."""
    from kiln.eval import load_model, resolve_tokens

    teacher, drafter = load_model(MODELS / "kiln-teacher"), load_model(MODELS / "kiln-drafter")
    tokens = resolve_tokens("eval", MODELS / "kiln-teacher")[:2049]
    kw = {"seq_len": 512, "batch_size": 4, "progress": False}
    ppl_teacher, ppl_drafter = perplexity(teacher, tokens, **kw), perplexity(drafter, tokens, **kw)
    assert 2.0 < ppl_teacher < 0.85 * ppl_drafter < 40.0
    assert 0.3 < agreement(drafter, teacher, tokens, **kw) < 1.0
