"""Shared fixtures: small Hugging Face models built from configs (no downloads), seeded RNG."""

from __future__ import annotations

import os

os.environ.setdefault("KILN_DEBUG", "1")  # verify the IR after every pass in tests

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
