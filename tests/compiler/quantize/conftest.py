"""Fixtures of the quantization tests: kiln's llama-tiny (hidden 64, MLP 176, 2 layers) and token streams."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.models import from_preset


@pytest.fixture(scope="session")
def tiny_llama() -> nn.Module:
    """llama-tiny with seeded random weights (never modified by a test: tests check that too)."""
    return from_preset("llama-tiny", seed=0).eval()


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    """A 1-D stream of 2048 random token ids below llama-tiny's vocabulary (512)."""
    return torch.randint(0, 512, (2048,), generator=torch.Generator().manual_seed(1))
