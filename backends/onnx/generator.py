"""``OrtGenerator``: a generation loop on ``onnxruntime.InferenceSession`` over kiln's decoder artifact.

The artifact is ``export_onnx(compiled, path, kv_cache=True)``: inputs ``input_ids``
(B, T) (``position_ids`` / ``attention_mask`` when the model was captured with them) and
``past_key_values.{i}.key/value`` (B, Hkv, P, D); outputs ``logits`` (B, T, V) and
``present.{i}.key/value`` (B, Hkv, P + T, D). The first step feeds the whole prompt with
an empty cache (P = 0); each later step feeds one token and the previous presents. Token
choice is :func:`kiln.generate.sample_next`, the eager oracle's, so greedy output equals
``kiln.generate.generate`` token for token and sampling with a seed draws alike.

With ``speculative=SpeculativeConfig(...)`` (the runtime's config) the loop speculates
(:mod:`.speculative`): prompt lookup or a draft model exported as its own decoder proposes
tokens, the target scores them all in one call, the runtime's exact verification keeps the
accepted prefix, and the cache is truncated back over the rejected drafts. Greedy output is
the same as without speculation; sampled output has the same distribution (not the same
draws). ``OrtGenerator.stats`` then holds acceptance figures, ``last_metrics`` one
:class:`~kiln.runtime.request.RequestMetrics` per row.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.backends.onnx.validate import SESSION_CONFIG
from kiln.errors import ConfigError, ExportError
from kiln.generate import _check_sampling, sample_next

if TYPE_CHECKING:
    from kiln.runtime.request import RequestMetrics
    from kiln.runtime.speculative import SpeculativeConfig

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class OrtGenerator:
    """Greedy and sampled generation with an ONNX Runtime session over a KV-cache decoder.

    Args:
        path: the ``.onnx`` file ``export_onnx(..., kv_cache=True)`` wrote.
        providers: ONNX Runtime execution providers (default: CPU).
        threads: intra-op threads (default: ONNX Runtime's choice).
    """

    def __init__(self, path: str | os.PathLike[str], *, providers: list[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        for key, value in SESSION_CONFIG.items():
            so.add_session_config_entry(key, value)
        if threads:
            so.intra_op_num_threads = threads
        self.path = str(path)
        self.session = ort.InferenceSession(str(path), so, providers=providers or ["CPUExecutionProvider"])
        self.stats: dict[str, float] = {}  # speculative decoding counters of the last generate (see speculative.py)
        self.last_metrics: list[RequestMetrics] = []  # ... per row
        self._drafters: dict[int, Any] = {}  # id(config) -> (config, drafter): draft sessions load once
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        if "input_ids" not in inputs or not self.past_names:
            raise ExportError(
                f"{path} is not a kiln generation artifact (inputs {list(inputs)}); "
                "write one with export_onnx(compiled, path, kv_cache=True)"
            )
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        missing = [n for n in self.present_names if n not in self.output_names]
        if missing:
            raise ExportError(f"{path} lacks the outputs {missing} matching its past inputs")
        self.has_positions = "position_ids" in inputs
        self.has_mask = "attention_mask" in inputs
        self._cache_shapes = []
        for name in self.past_names:
            shape = inputs[name].shape  # [batch_size, Hkv, past_sequence_length, D]
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise ExportError(f"{name} needs static head count and head dim, got {shape}")
            self._cache_shapes.append((shape[1], shape[3], _NUMPY_TYPES.get(inputs[name].type, np.float32)))

    @property
    def layers(self) -> int:
        """Attention layers (caches) of the decoder."""
        return len(self.past_names) // 2

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """Zero-length past K/V for ``batch`` rows, one per past input."""
        return [np.zeros((batch, h, 0, d), dtype=dt) for h, d, dt in self._cache_shapes]

    def step(self, input_ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: logits (B, T, V) and the presents (the next past)."""
        batch, tokens = input_ids.shape
        start = past[0].shape[2]
        feed: dict[str, Any] = {"input_ids": input_ids.astype(np.int64)}
        if self.has_positions:
            feed["position_ids"] = np.broadcast_to(np.arange(start, start + tokens, dtype=np.int64), (batch, tokens)).copy()
        if self.has_mask:
            feed["attention_mask"] = np.ones((batch, tokens), dtype=np.int64)
        feed.update(zip(self.past_names, past, strict=True))
        out = dict(zip(self.output_names, self.session.run(None, feed), strict=True))
        logits = out["logits"] if "logits" in out else out[self.output_names[0]]
        return logits, [out[n] for n in self.present_names]

    def generate(
        self,
        input_ids: torch.Tensor | np.ndarray,
        max_new_tokens: int,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        eos_token_id: int | None = None,
        speculative: SpeculativeConfig | None = None,
    ) -> torch.Tensor:
        """Prompt plus up to ``max_new_tokens`` tokens, (B, T + n) int64, as ``kiln.generate.generate``.

        ``speculative``: speculative decoding (``kiln.runtime.speculative.SpeculativeConfig``;
        a draft model is the path of its own ``export_onnx(..., kv_cache=True)`` artifact).
        Rows then run one at a time; rows that stop early at ``eos_token_id`` are padded with it.
        """
        ids = torch.as_tensor(np.asarray(input_ids)).long()
        if ids.dim() != 2:
            raise ConfigError(f"input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample:
            _check_sampling(temperature, top_k, top_p)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if speculative is not None:
            return self._generate_speculative(ids, max_new_tokens, speculative, do_sample, temperature, top_k, top_p,
                                              generator, eos_token_id)
        past = self.empty_cache(ids.shape[0])
        feed = ids.numpy()
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            logits, past = self.step(feed, past)
            last = torch.from_numpy(np.ascontiguousarray(logits[:, -1, :]))
            nxt = sample_next(last, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                              generator=generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            feed = nxt[:, None].numpy()
            if eos_token_id is not None and bool(done.all()):
                break
        return ids

    def _generate_speculative(
        self, ids: torch.Tensor, max_new_tokens: int, config: SpeculativeConfig, do_sample: bool, temperature: float,
        top_k: int | None, top_p: float | None, generator: torch.Generator | None, eos_token_id: int | None,
    ) -> torch.Tensor:
        from kiln.backends.onnx import speculative as spec
        from kiln.runtime.speculative import SpeculationPolicy, SpeculativeConfig

        if not isinstance(config, SpeculativeConfig):
            raise ConfigError(f"speculative must be a SpeculativeConfig or None, got {type(config).__name__}")
        cached = self._drafters.get(id(config))
        if cached is None or cached[0] is not config:
            cached = (config, spec.make_ort_drafter(config, self, self.vocab_size))
            self._drafters = {id(config): cached}
        drafter = cached[1]
        policy = SpeculationPolicy(config.num_speculative_tokens, spec.default_cost(config, self, drafter),
                                   config.adaptive)
        params = spec.sampling_params(do_sample, temperature, top_k, top_p, max_new_tokens)
        self.stats, self.last_metrics = spec.empty_stats(), []
        calls = getattr(drafter, "calls", 0)
        rows = []
        for b in range(ids.shape[0]):
            tokens, metrics = spec.speculative_generate(
                self, ids[b].tolist(), max_new_tokens, drafter=drafter, policy=policy, params=params,
                generator=generator, eos_token_id=eos_token_id, request_id=f"row{b}", stats=self.stats,
            )
            rows.append(tokens)
            self.last_metrics.append(metrics)
        spec.finish_stats(self.stats, drafter, calls)
        width = max((len(r) for r in rows), default=0)
        pad = eos_token_id if eos_token_id is not None else 0
        new = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(len(rows), width)
        return torch.cat([ids, new], dim=1)

    @property
    def vocab_size(self) -> int | None:
        """The logits' last axis when static in the artifact."""
        out = self.session.get_outputs()[0].shape
        return out[-1] if out and isinstance(out[-1], int) else None


__all__ = ["OrtGenerator"]
