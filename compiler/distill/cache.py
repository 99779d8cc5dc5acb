"""A disk cache of the teacher's top-k log-probabilities for knowledge distillation.

Full teacher logits cost ``V`` floats per token (8192 for kiln's models: 32 KB in fp32); the
``k`` most likely tokens' log-probabilities and ids cost ``2k`` numbers, and the divergences of
:mod:`kiln.distill.losses` read them directly (the rest of the mass as one bucket). The cache
also saves the teacher's forward pass whenever batches repeat: several students, divergences
or hyper-parameters distilled from one teacher on one data order, or a resumed run.

Batches are a pure function of their index (:class:`kiln.train.TokenWindows`), so the cache is
keyed by batch index. Shards of ``shard_size`` consecutive batches are computed the first time
one of their batches is asked for and written as safetensors (``shard-00000.safetensors``:
``logprobs`` (S, B, T, k), ``indices`` (S, B, T, k) int32). ``cache.json`` records what the
entries depend on (teacher weights' digest, the token stream's digest, seed, batch shape, k,
temperature); opening a folder built for anything else raises instead of serving stale entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from kiln.distill.losses import TopK
from kiln.errors import ConfigError
from kiln.eval import logits_of


def tensor_digest(tensors: list[torch.Tensor] | torch.Tensor, limit: int | None = None) -> str:
    """SHA-256 (first 16 hex digits) of tensors' bytes, in order."""
    h = hashlib.sha256()
    for t in [tensors] if isinstance(tensors, torch.Tensor) else tensors:
        t = t.detach().cpu().contiguous()
        if limit is not None:
            t = t.flatten()[:limit]
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """A digest of a model's parameters and buffers (its name-ordered state dict)."""
    return tensor_digest([t for _, t in sorted(model.state_dict().items())])


class TopKCache:
    """The teacher's top-``k`` log-probabilities of every batch of a batch function, on disk.

    Args:
        folder: where shards and ``cache.json`` live (created).
        teacher: the teacher model (``forward(input_ids) -> logits``).
        batch_fn: ``batch_fn(index) -> (inputs, targets)``, e.g. ``TokenWindows.batch``.
        k, temperature: what to keep: log softmax(logits / temperature), top k.
        key: what the batches depend on (data digest, seed, shapes...); stored and checked.
        shard_size: batches per shard file.
        dtype: storage dtype of the log-probabilities (float32, or float16 / bfloat16 to halve it).
        autocast: a context manager factory for the teacher's forward (e.g. bf16 on CUDA).
    """

    def __init__(
        self, folder: str | Path, *, teacher: nn.Module, batch_fn: Callable[[int], Any], k: int,
        temperature: float, key: dict[str, Any], shard_size: int = 16, dtype: torch.dtype = torch.float32,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        progress: bool = True,
    ) -> None:
        if k < 1 or shard_size < 1:
            raise ConfigError(f"top-k cache needs k >= 1 and shard_size >= 1, got k={k}, shard_size={shard_size}")
        self.folder = Path(folder)
        self.teacher, self.batch_fn, self.k, self.temperature = teacher, batch_fn, k, float(temperature)
        self.shard_size, self.dtype, self.autocast, self.progress = shard_size, dtype, autocast, progress
        self.key = {"format": "kiln-topk-v1", "teacher": model_digest(teacher), "k": k,
                    "temperature": self.temperature, "shard_size": shard_size, "dtype": str(dtype), **key}
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "cache.json"
        if meta.is_file():
            found = json.loads(meta.read_text())
            if found != json.loads(json.dumps(self.key)):
                diff = sorted(k for k in set(found) | set(self.key) if found.get(k) != self.key.get(k))
                raise ConfigError(f"the top-k cache in {self.folder} was built for other inputs (differs in "
                                  f"{', '.join(diff)}); give another cache folder or delete this one")
        else:
            meta.write_text(json.dumps(self.key, indent=1) + "\n")
        self._loaded: tuple[int, dict[str, torch.Tensor]] | None = None
        self.computed_batches = 0  # batches whose teacher pass this object ran

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    @torch.no_grad()
    def _compute(self, shard: int) -> dict[str, torch.Tensor]:
        was_training = self.teacher.training
        self.teacher.eval()
        logprobs, indices = [], []
        first = shard * self.shard_size
        try:
            for index in tqdm(range(first, first + self.shard_size), desc=f"teacher top-{self.k} shard {shard}",
                              unit="batch", leave=False, disable=not self.progress):
                inputs, _ = self.batch_fn(index)
                with self.autocast():
                    logits = logits_of(self.teacher(inputs))  # (B, T, V)
                top = TopK.from_logits(logits, self.k, self.temperature)
                logprobs.append(top.logprobs.to(self.dtype).cpu())
                indices.append(top.indices.to(torch.int32).cpu())
        finally:
            self.teacher.train(was_training)
        self.computed_batches += self.shard_size
        tensors = {"logprobs": torch.stack(logprobs), "indices": torch.stack(indices)}  # (S, B, T, k)
        tmp = self.folder / f".shard-{shard:05d}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self._path(shard))
        return tensors

    def _shard(self, shard: int) -> dict[str, torch.Tensor]:
        if self._loaded is not None and self._loaded[0] == shard:
            return self._loaded[1]
        path = self._path(shard)
        tensors = load_file(str(path)) if path.is_file() else self._compute(shard)
        self._loaded = (shard, tensors)
        return tensors

    def get(self, index: int, device: torch.device | str = "cpu") -> TopK:
        """The teacher's top-k of batch ``index`` (computing its shard if missing), as (B, T, k) on ``device``."""
        shard, row = divmod(index, self.shard_size)
        tensors = self._shard(shard)
        return TopK(tensors["logprobs"][row].to(device=device, dtype=torch.float32),
                    tensors["indices"][row].to(device=device, dtype=torch.long), self.temperature)

    def fill(self, num_batches: int) -> None:
        """Compute every missing shard covering batches ``0 .. num_batches - 1`` now."""
        shards = -(-num_batches // self.shard_size)
        for shard in tqdm(range(shards), desc="teacher top-k cache", unit="shard", disable=not self.progress):
            if not self._path(shard).is_file():
                self._loaded = (shard, self._compute(shard))

    def nbytes(self) -> int:
        """Bytes of the shards on disk."""
        return sum(p.stat().st_size for p in self.folder.glob("shard-*.safetensors"))


__all__ = ["TopKCache", "model_digest", "tensor_digest"]
