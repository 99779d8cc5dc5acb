"""Run the Triton kernels in the CPU interpreter when there is no GPU.

Triton decides interpreted vs compiled when ``@triton.jit`` runs, i.e. when a kernel module
is imported; this conftest is imported before any test module of this folder, so it sets
``TRITON_INTERPRET=1`` early enough. With CUDA the kernels compile for the GPU as usual.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
