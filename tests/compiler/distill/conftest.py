"""Fixtures of the distillation tests: a tiny trained teacher, tiny students and a learnable token stream."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kiln.models import LlamaConfig, from_config
from kiln.train import TrainConfig, train

VOCAB = 64
CONFIG = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=1,
)


def stream(n: int = 6000, seed: int = 0) -> torch.Tensor:
    """Mostly a fixed cycle through ids 3..63, with 15% random tokens (no EOS, so samples run full length)."""
    cycle = torch.randperm(VOCAB - 3, generator=torch.Generator().manual_seed(0)) + 3
    g = torch.Generator().manual_seed(seed + 1)
    noise = torch.randint(3, VOCAB, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < 0.15, noise, cycle[torch.arange(n) % (VOCAB - 3)])


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return stream()


@pytest.fixture(scope="session")
def eval_tokens() -> torch.Tensor:
    return stream(1200, seed=5)


@pytest.fixture(scope="session")
def _teacher() -> nn.Module:
    model = from_config(CONFIG, seed=1)
    train(
        model,
        stream(),
        TrainConfig(
            steps=60,
            batch_size=8,
            seq_len=32,
            lr=1e-2,
            warmup_steps=5,
            device="cpu",
            progress=False,
            save_hf=False,
        ),
    )
    return model.eval()


@pytest.fixture
def teacher(_teacher: nn.Module) -> nn.Module:
    """A tiny Llama trained for 60 steps on the stream (a fresh copy per test)."""
    return copy.deepcopy(_teacher)


@pytest.fixture(scope="session")
def make_student() -> Callable[..., nn.Module]:
    """``make_student(seed=2)``: an untrained tiny Llama of the teacher's shape."""

    def make(seed: int = 2) -> nn.Module:
        return from_config(CONFIG, seed=seed)

    return make
