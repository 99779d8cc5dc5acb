"""``kiln.distill(student, teacher, data, method=..., config=...)``: one entry point for every method.

It resolves the models (modules, Hugging Face-format folders or presets) and the data (token
streams or the :mod:`kiln.data` split names ``"train"`` / ``"eval"``), builds the method's
batch source and loss (:mod:`kiln.distill.sources`), and runs :func:`kiln.train` -- progress
bar, evaluation every ``eval_every`` steps (perplexity and top-1 agreement with the teacher),
checkpoints with a Hugging Face-format folder of the student, exact resume. The trained student
is written to ``OUT_DIR/model`` (with the teacher's tokenizer files when it has them).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kiln.distill.cache import TopKCache, tensor_digest
from kiln.distill.config import (
    DataDistillation,
    DistillConfig,
    KnowledgeDistillation,
    MethodConfig,
    OnPolicyDistillation,
    QATDistillation,
    resolve_method,
)
from kiln.distill.generate import GeneratedData, generate_data
from kiln.distill.sources import DistillLossFn, GeneratedSource, OnPolicySource, WindowSource
from kiln.errors import ConfigError
from kiln.eval import iter_windows, logits_of, resolve_tokens
from kiln.train import TokenWindows, TrainResult, can_save_hf, save_hf, train

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class DistillResult:
    """Outcome of :func:`distill`."""

    method: str  # hard, kd, data, on_policy or qat
    student: nn.Module  # the trained student (for QAT: the fake-quantized QATModel)
    train: TrainResult  # the training loop's result (steps, losses, checkpoints, history)
    eval_perplexity: float | None  # last evaluation's perplexity on the eval tokens
    agreement: float | None  # last evaluation's top-1 agreement with the teacher
    model_dir: Path | None  # the student as a Hugging Face-format folder (OUT_DIR/model)
    converted: Any = None  # QAT: the deployed kiln.CompiledModel (kiln.quantize.convert_qat)
    stats: dict[str, Any] = field(default_factory=dict)  # method statistics (generated data, samples, cache)


class TeacherAgreement:
    """``eval_metrics`` for :func:`kiln.train`: top-1 agreement of a model with the teacher.

    The teacher's argmax over the eval windows is computed once (it does not change).
    """

    def __init__(self, teacher: nn.Module, tokens: Tensor, *, seq_len: int, batch_size: int,
                 max_batches: int | None, device: torch.device) -> None:
        self.windows = [x.to(device) for x, _ in iter_windows(tokens, seq_len=seq_len, batch_size=batch_size,
                                                               max_batches=max_batches)]
        with torch.no_grad():
            self.targets = [logits_of(teacher(x)).argmax(-1) for x in self.windows]

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        same = count = 0
        try:
            for x, t in zip(self.windows, self.targets, strict=True):
                same += int((logits_of(model(x)).argmax(-1) == t).sum())
                count += t.numel()
        finally:
            model.train(was_training)
        return {"agreement": same / count}


def _load(model: nn.Module | str | Path, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    from kiln.models import load_model

    try:
        return load_model(str(model), dtype=torch.float32)
    except ConfigError as e:
        raise ConfigError(f"{role}: {e}") from e


def _tokens(data: Any, tokenizer: Any, role: str) -> Tensor:
    if isinstance(data, str) and tokenizer is None:
        raise ConfigError(f"{role} data {data!r} is a split name: pass tokenizer= (a folder with tokenizer.json), "
                          "or give the teacher as a model folder")
    return resolve_tokens(data, tokenizer).cpu()


def _eos(model: nn.Module) -> int | None:
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    return eos[0] if isinstance(eos, list | tuple) and eos else eos


def distill(
    student: nn.Module | str | Path,
    teacher: nn.Module | str | Path,
    data: Tensor | str,
    method: str | MethodConfig = "kd",
    config: DistillConfig | None = None,
    *,
    eval_data: Tensor | str | None = None,
    out_dir: str | Path | None = None,
    tokenizer: Any = None,
    resume: bool = True,
    callbacks: tuple[Any, ...] = (),
    example_inputs: Any = None,
) -> DistillResult:
    """Distill ``teacher`` into ``student`` (trained in place) with ``method``.

    Args:
        student, teacher: modules (``forward(input_ids) -> logits``), HF-format folders or presets;
            they must share the vocabulary. The teacher is frozen and put in eval mode. For QAT the
            student may be the teacher itself (a quantized deployment of the teacher).
        data: the training token stream (1-D) or a split name (``"train"``) with a tokenizer.
        method: ``"hard"``, ``"kd"``, ``"data"``, ``"on_policy"``, ``"qat"`` or a method config
            (:class:`KnowledgeDistillation`, :class:`DataDistillation`, :class:`OnPolicyDistillation`,
            :class:`QATDistillation`).
        config: :class:`DistillConfig` (its ``train`` is the :class:`kiln.train.TrainConfig`).
        eval_data: tokens or split name (``"eval"``) scored every ``eval_every`` steps and at the end.
        out_dir: checkpoints, ``train_log.jsonl``, caches, generated data and ``model/``; a run
            with the same ``out_dir`` resumes.
        tokenizer: for split names (default: the teacher's folder when given as a path).
        callbacks: :func:`kiln.train` callbacks.
        example_inputs: QAT only: the inputs ``prepare_qat`` captures with (default: its own, (2, 8) ids).
    """
    spec = resolve_method(method)
    config = config or DistillConfig()
    tc = config.train
    if tokenizer is None and isinstance(teacher, str | Path) and (Path(teacher) / "tokenizer.json").is_file():
        tokenizer = Path(teacher)
    teacher_dir = Path(teacher) if isinstance(teacher, str | Path) else None
    student_m, teacher_m = _load(student, "student"), _load(teacher, "teacher")
    if student_m is teacher_m:
        if not isinstance(spec, QATDistillation):
            raise ConfigError("student and teacher are the same module; pass a copy as the student "
                              "(only QAT distills a model from its own full-precision self)")
        student_m = copy.deepcopy(teacher_m)  # prepare_qat copies it again; the teacher stays untouched
    device = tc.resolved_device()
    teacher_m.to(device).eval().requires_grad_(False)
    student_m.to(device)
    train_tokens = _tokens(data, tokenizer, "training")
    eval_tokens = _tokens(eval_data, tokenizer, "eval") if eval_data is not None else None
    if eval_tokens is not None and config.eval_max_tokens is not None:
        eval_tokens = eval_tokens[: config.eval_max_tokens]
    out = Path(out_dir) if out_dir is not None else None
    windows = TokenWindows(train_tokens, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, device=device)
    stats: dict[str, Any] = {}
    model = student_m
    loss_cfg = spec.loss
    cache: TopKCache | None = None

    if isinstance(spec, KnowledgeDistillation):
        if spec.top_k is not None:
            folder = spec.cache_dir or (out / "teacher_topk" if out is not None else None)
            if folder is None:
                raise ConfigError("a top-k teacher cache needs KnowledgeDistillation.cache_dir or out_dir")
            amp = tc.autocast_dtype(device)
            cache = TopKCache(
                folder, teacher=teacher_m, batch_fn=windows.batch, k=spec.top_k, temperature=spec.loss.temperature,
                key={"data": tensor_digest(train_tokens), "seed": tc.seed, "batch_size": tc.batch_size,
                     "seq_len": tc.seq_len, "autocast": str(amp)},
                dtype=getattr(torch, spec.cache_dtype), progress=tc.progress,
                autocast=(lambda: torch.autocast(device.type, dtype=amp)) if amp is not None else contextlib.nullcontext,
            )
        source: Any = WindowSource(windows, cache)
    elif isinstance(spec, DataDistillation):
        source = GeneratedSource(*_data_set(spec, teacher_m, windows, out, device, stats, tc.progress),
                                 batch_size=tc.batch_size, seed=tc.seed, device=device)
    elif isinstance(spec, OnPolicyDistillation):
        source = OnPolicySource(student_m, windows, prompt_tokens=spec.prompt_tokens, lmbda=spec.lmbda,
                                temperature=spec.temperature, top_p=spec.top_p, seed=tc.seed, eos_token_id=_eos(student_m))
    elif isinstance(spec, QATDistillation):
        model = _prepare_qat(student_m, spec, example_inputs, device)
        source = WindowSource(windows)
    else:  # resolve_method admits nothing else
        raise ConfigError(f"unsupported method config {type(spec).__name__}")

    metrics = None
    if config.agreement and eval_tokens is not None:
        metrics = TeacherAgreement(teacher_m, eval_tokens, seq_len=tc.seq_len, batch_size=tc.batch_size,
                                   max_batches=tc.eval_batches, device=device)
    start = time.perf_counter()
    result = train(model, source, tc, eval_tokens=eval_tokens, out_dir=out,
                   loss_fn=DistillLossFn(teacher_m, loss_cfg), resume=resume, callbacks=callbacks, eval_metrics=metrics)
    stats["train_seconds"] = round(time.perf_counter() - start, 2)
    if isinstance(source, OnPolicySource):
        stats.update(on_policy_batches=source.samples, sampled_tokens=source.sampled_tokens)
    if cache is not None:
        stats.update(cache_batches_computed=cache.computed_batches, cache_bytes=cache.nbytes())

    converted = None
    model_dir = None
    if isinstance(spec, QATDistillation):
        from kiln.quantize import convert_qat

        converted = convert_qat(model)
    elif out is not None and can_save_hf(student_m):
        model_dir = save_hf(student_m, out / "model")
        for name in TOKENIZER_FILES:
            if teacher_dir is not None and (teacher_dir / name).is_file():
                shutil.copy(teacher_dir / name, model_dir / name)
    if out is not None:
        summary = {"method": spec.name, "config": _jsonable(dataclasses.asdict(spec)), "steps": result.step,
                   "eval_perplexity": result.eval_perplexity, **result.eval_metrics, **stats}
        (out / "distill_summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return DistillResult(method=spec.name, student=model, train=result, eval_perplexity=result.eval_perplexity,
                         agreement=result.eval_metrics.get("agreement"), model_dir=model_dir, converted=converted,
                         stats=stats)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _data_set(spec: DataDistillation, teacher: nn.Module, windows: TokenWindows, out: Path | None,
              device: torch.device, stats: dict[str, Any], progress: bool) -> tuple[Tensor, Tensor]:
    """The teacher-written training set: loaded from OUT_DIR/distill_data.safetensors, or generated (and saved)."""
    path = out / "distill_data.safetensors" if out is not None else None
    if path is not None and path.is_file():
        data = GeneratedData.load(path)
    else:
        length = windows.seq_len + 1
        if spec.prompt_tokens >= length:
            raise ConfigError(f"DataDistillation.prompt_tokens={spec.prompt_tokens} must be < seq_len + 1 = {length}")
        g = torch.Generator().manual_seed(windows.seed * 1_000_003 + 17)
        starts = torch.randint(0, windows.tokens.numel() - spec.prompt_tokens, (spec.num_prompts,), generator=g)
        prompts = windows.tokens.cpu()[starts[:, None] + torch.arange(spec.prompt_tokens)]  # (P, prompt_tokens)
        data = generate_data(teacher, prompts, length=length, config=spec, seed=windows.seed, device=device,
                             eos_token_id=_eos(teacher), progress=progress)
        if path is not None:
            data.save(path)
    stats.update(data=data.stats)
    return data.sequences, data.trained


def _prepare_qat(student: nn.Module, spec: QATDistillation, example_inputs: Any, device: torch.device) -> nn.Module:
    try:
        from kiln.quantize import QuantConfig, prepare_qat
    except ImportError as e:
        raise ConfigError("QAT with a teacher needs kiln.quantize.prepare_qat (issue #7), which this "
                          f"installation lacks: {e}") from e
    quant = QuantConfig.preset(spec.quant) if isinstance(spec.quant, str) else spec.quant
    kwargs: dict[str, Any] = {"learn_scales": spec.learn_scales}
    if example_inputs is not None:
        kwargs["example_inputs"] = example_inputs
    qat = prepare_qat(student, quant, **kwargs)
    return qat.to(device)


__all__ = ["DistillResult", "TeacherAgreement", "distill"]
