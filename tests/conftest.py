"""Shared fixtures: small Hugging Face models built from configs (no downloads), seeded RNG."""

from __future__ import annotations

import os

os.environ.setdefault("KILN_DEBUG", "1")  # verify the IR after every pass in tests

import pytest
import torch

# The suite runs as 2 xdist workers on 2 cores: one thread each avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
