"""A small, reusable training loop for causal language models.

The loop nanoGPT made familiar (Karpathy, 2022): AdamW with decoupled weight decay
(Loshchilov and Hutter, "Decoupled Weight Decay Regularization", ICLR 2019), linear warmup
then cosine decay of the learning rate (Loshchilov and Hutter, "SGDR", ICLR 2017), gradient
clipping, bf16 autocast on CUDA, random windows from one token stream. Model-agnostic: any
``nn.Module`` whose ``forward(input_ids)`` returns logits ``(B, T, V)`` or an object with
``.logits``. The loss is pluggable (``loss_fn(model, inputs, targets) -> scalar``), so
knowledge distillation and quantization-aware training reuse the same loop.

Batches come from a 1-D token stream (:class:`TokenWindows`) or from any
:class:`BatchSource` (``batch(index)``; ``kiln.distill`` uses teacher-scored and generated
batches); a tuple batch is passed to ``loss_fn(model, *batch)``, any other object as
``loss_fn(model, batch)``. Evaluation every ``eval_every`` steps scores the eval tokens'
perplexity and any ``eval_metrics(model)`` (e.g. top-1 agreement with a teacher).

Checkpoints are a safetensors/JSON pair (``ckpt-00001000.safetensors`` holds the model
weights, the optimizer's tensors, the RNG states and the batch source's state;
``ckpt-00001000.json`` the step, the config and the optimizer's scalars): no pickles. Beside
each, ``ckpt-00001000/`` holds the model alone as a Hugging Face-format folder
(``config.json`` + ``model.safetensors``, loadable with ``from_pretrained``) when the model
is a kiln or ``transformers`` causal LM. Training resumes from the latest checkpoint. Batches
are a pure function of ``(seed, step)`` and the saved state, and the learning rate of the
step, so a resumed run repeats an uninterrupted one exactly (bit for bit on the CPU). A
JSON-lines log records every logged step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from kiln.errors import ConfigError
from kiln.eval import logits_of, mean_nll

#: ``loss_fn(model, inputs (B, T), targets (B, T)) -> scalar loss`` (or ``loss_fn(model, batch)``
#: for a :class:`BatchSource` whose batches are not tuples).
LossFn = Callable[..., torch.Tensor]
#: ``eval_metrics(model) -> {name: value}``, run at every evaluation.
EvalMetrics = Callable[[nn.Module], Mapping[str, float]]
CKPT_FORMAT = "kiln-ckpt-v1"
LOG_NAME = "train_log.jsonl"


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`. Derive variants with ``dataclasses.replace``."""

    steps: int = 1000  # optimizer steps in total (a resumed run continues up to this)
    batch_size: int = 32  # sequences per micro-batch
    seq_len: int = 512  # tokens per sequence
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4  # peak learning rate, reached at the end of warmup
    min_lr: float = 3e-5  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps to lr
    weight_decay: float = 0.1  # AdamW decoupled decay, on matrices (ndim >= 2) only
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None: no clipping
    eval_every: int = 0  # evaluate every N steps (and at the end) when eval tokens are given; 0: end only
    eval_batches: int | None = 16  # cap on eval batches (of batch_size x seq_len); None: whole stream
    ckpt_every: int = 0  # checkpoint every N steps (and at the end) when out_dir is given; 0: end only
    keep_checkpoints: int = 2  # newest checkpoints kept on disk
    log_every: int = 10  # log the mean training loss every N steps
    seed: int = 0  # seeds the batch order and torch's RNG
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False  # torch.compile the forward pass
    progress: bool = True  # tqdm progress bar
    save_hf: bool | None = None  # each checkpoint's model also as a HF folder ckpt-N/ (None: when the model can)

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
                raise ConfigError(f"TrainConfig.{name}={value!r} must be an integer >= {0 if allow_zero else 1}")

        for name in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "keep_checkpoints"):
            positive(name)
        for name in ("warmup_steps", "eval_every", "ckpt_every", "seed"):
            positive(name, allow_zero=True)
        if self.eval_batches is not None:
            positive("eval_batches")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"TrainConfig.lr={self.lr} must be a positive finite number, e.g. 3e-4")
        if not (0 <= self.min_lr <= self.lr):
            raise ConfigError(f"TrainConfig.min_lr={self.min_lr} must lie in [0, lr={self.lr}]")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay={self.weight_decay} must be >= 0, e.g. 0.1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"TrainConfig.betas={self.betas} must be two numbers in [0, 1), e.g. (0.9, 0.95)")
        if self.eps <= 0:
            raise ConfigError(f"TrainConfig.eps={self.eps} must be > 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"TrainConfig.grad_clip={self.grad_clip} must be > 0, or None to disable")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError(f"TrainConfig.precision={self.precision!r}; use 'auto', 'bf16' or 'fp32'")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise ConfigError(f"TrainConfig.device={self.device!r} is not a torch device: {e}") from e

    def resolved_device(self) -> torch.device:
        """The device training runs on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def autocast_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device``, or None for plain fp32."""
        if self.precision == "bf16" or (self.precision == "auto" and device.type == "cuda"):
            return torch.bfloat16
        return None

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimizer step; returning True from it stops training."""

    step: int  # optimizer steps completed
    loss: float  # this step's training loss (mean over its micro-batches)
    lr: float  # learning rate used for this step
    eval_loss: float | None  # set on steps where evaluation ran
    model: nn.Module
    optimizer: torch.optim.Optimizer
    eval_metrics: dict[str, float] | None = None  # eval_metrics' values, on steps where evaluation ran


Callback = Callable[[StepInfo], bool | None]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`."""

    step: int  # optimizer steps completed (including those of a resumed run)
    train_loss: float | None  # mean training loss of the last logged interval
    eval_loss: float | None  # last evaluation's mean next-token loss (nats)
    eval_perplexity: float | None  # exp(eval_loss)
    tokens_seen: int  # training tokens consumed, all runs included
    elapsed_s: float  # wall-clock seconds of training, all runs included
    resumed_from: int | None  # step of the checkpoint this run resumed from
    checkpoint: Path | None  # last checkpoint written
    stopped_early: bool  # a callback stopped training before config.steps
    history: list[dict[str, Any]] = field(default_factory=list)  # this run's log records
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last evaluation's eval_metrics values


@runtime_checkable
class BatchSource(Protocol):
    """Where :func:`train` takes its batches from.

    ``batch(index)`` returns micro-batch ``index`` (``step * grad_accum + micro``): a tuple
    ``(inputs, targets)`` or any object the loss understands, on the training device. It must
    be a pure function of ``index`` and of the state that ``state_dict()`` (optional: a dict of
    tensors, restored with ``load_state_dict``) saves into checkpoints, so that a resumed run
    sees the batches an uninterrupted one would. A batch with a ``num_tokens`` attribute
    counts that many training tokens (default ``batch_size * seq_len``).
    """

    def batch(self, index: int) -> Any: ...


class TokenWindows:
    """Random training windows from one token stream; batch ``i`` depends only on (seed, i)."""

    def __init__(
        self, tokens: torch.Tensor | np.ndarray, *, seq_len: int, batch_size: int, seed: int,
        device: torch.device | str = "cpu",
    ) -> None:
        stream = torch.as_tensor(np.asarray(tokens, dtype=np.int64)) if isinstance(tokens, np.ndarray) else tokens
        if stream.ndim != 1:
            raise ConfigError(f"training tokens must be a 1-D stream, got shape {tuple(stream.shape)}")
        if stream.numel() < seq_len + 2:
            raise ConfigError(f"{stream.numel()} training tokens are too few for seq_len={seq_len}; "
                              "lower seq_len or give more text")
        self.tokens = stream.to(device=device, dtype=torch.long)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self._offsets = torch.arange(seq_len + 1, device=device)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T), of batch ``index``."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (2**63))
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=gen)
        window = self.tokens[starts.to(self.tokens.device)[:, None] + self._offsets]  # (B, T + 1)
        return window[:, :-1], window[:, 1:]


def next_token_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Default loss: mean cross-entropy of the next token, computed in fp32."""
    logits = logits_of(model(inputs))  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _call_loss(loss_fn: LossFn, model: nn.Module, batch: Any) -> torch.Tensor:
    if isinstance(batch, tuple):
        return loss_fn(model, *batch)
    if loss_fn is next_token_loss:
        raise ConfigError(f"batches of type {type(batch).__name__} need a loss_fn(model, batch); "
                          "the default loss takes (inputs, targets) tuples")
    return loss_fn(model, batch)


def can_save_hf(model: nn.Module) -> bool:
    """Whether :func:`save_hf` can write ``model`` as a Hugging Face-format folder."""
    from kiln.models import GPT2LMHeadModel, LlamaForCausalLM

    if isinstance(model, LlamaForCausalLM | GPT2LMHeadModel):
        return True
    return callable(getattr(model, "save_pretrained", None)) and hasattr(model, "config")


def save_hf(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model`` as a Hugging Face-format folder (``config.json`` + ``model.safetensors``)."""
    from kiln.models import GPT2LMHeadModel, LlamaForCausalLM, save_pretrained

    folder = Path(folder)
    if isinstance(model, LlamaForCausalLM | GPT2LMHeadModel):
        save_pretrained(model, folder)
    elif can_save_hf(model):
        model.save_pretrained(str(folder))  # type: ignore[operator]  (transformers: safetensors)
    else:
        raise ConfigError(f"{type(model).__name__} cannot be saved as a Hugging Face folder: it is neither a kiln "
                          "LlamaForCausalLM/GPT2LMHeadModel nor a transformers model; set TrainConfig.save_hf=False")
    return folder


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=fused or None)


# ---------------------------------------------------------------- checkpoints


def _ckpt_stem(step: int) -> str:
    return f"ckpt-{step:08d}"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``out_dir`` (their ``.json`` written), oldest first."""
    folder = Path(out_dir)
    stems = sorted(p.stem for p in folder.glob("ckpt-*.json") if p.with_suffix(".safetensors").is_file())
    return [folder / f"{s}.json" for s in stems]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The newest complete checkpoint's ``.json`` in ``out_dir``, or None."""
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def save_checkpoint(
    out_dir: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer, step: int,
    config: TrainConfig, extra: dict[str, Any] | None = None, source_state: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``ckpt-{step}.safetensors`` (and the HF folder ``ckpt-{step}/`` when ``config.save_hf``
    allows), then its ``.json`` (the completion marker). ``source_state`` is the batch source's state."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def put(key: str, t: torch.Tensor) -> None:
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        if ptr in seen or not t.is_contiguous():  # safetensors refuses shared (tied) storage
            t = t.clone(memory_format=torch.contiguous_format)
        tensors[key] = t.cpu()
        seen.add(ptr)

    for name, t in model.state_dict().items():
        put(f"model/{name}", t)
    state = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in state["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                put(f"optim/{idx}/{key}", value)
            else:
                scalars.setdefault(str(idx), {})[key] = value
    for key, value in (source_state or {}).items():
        put(f"source/{key}", value)
    put("rng/cpu", torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            put(f"rng/cuda/{i}", s)
    stem = _ckpt_stem(step)
    tmp = folder / f".{stem}.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": CKPT_FORMAT, "step": str(step)})
    os.replace(tmp, folder / f"{stem}.safetensors")
    if config.save_hf or (config.save_hf is None and can_save_hf(model)):
        hf_tmp = folder / f".{stem}.hf.tmp"
        shutil.rmtree(hf_tmp, ignore_errors=True)
        save_hf(model, hf_tmp)
        shutil.rmtree(folder / stem, ignore_errors=True)
        os.replace(hf_tmp, folder / stem)
    meta = {
        "format": CKPT_FORMAT, "step": step, "config": dataclasses.asdict(config),
        "param_groups": state["param_groups"], "optim_scalars": scalars, **(extra or {}),
    }
    tmp_json = folder / f".{stem}.json.tmp"
    tmp_json.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_json, folder / f"{stem}.json")
    return folder / f"{stem}.json"


def load_checkpoint(
    path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True, source: Any = None,
) -> dict[str, Any]:
    """Load a checkpoint (its ``.json`` or ``.safetensors``) into ``model``, ``optimizer`` and the
    batch ``source`` (when it has ``load_state_dict``); return its JSON metadata."""
    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    if meta.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path} is not a kiln checkpoint (format {meta.get('format')!r})")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    tensors = load_file(str(path.with_suffix(".safetensors")), device=str(device))
    model_sd = {k.removeprefix("model/"): v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(model_sd, strict=True)
    if optimizer is not None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, idx, name = key.split("/", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, values in meta["optim_scalars"].items():
            state.setdefault(int(idx), {}).update(values)
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if source is not None and callable(getattr(source, "load_state_dict", None)):
        source.load_state_dict({k.removeprefix("source/"): v for k, v in tensors.items() if k.startswith("source/")})
    if restore_rng:
        torch.set_rng_state(tensors["rng/cpu"].cpu())
        cuda_states = [tensors[k].cpu() for k in sorted(tensors) if k.startswith("rng/cuda/")]
        if cuda_states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    return meta


# ---------------------------------------------------------------- the loop


def train(
    model: nn.Module,
    train_tokens: torch.Tensor | np.ndarray | BatchSource,
    config: TrainConfig,
    *,
    eval_tokens: torch.Tensor | np.ndarray | None = None,
    out_dir: str | Path | None = None,
    loss_fn: LossFn | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    resume: bool = True,
    callbacks: Sequence[Callback] = (),
    eval_metrics: EvalMetrics | None = None,
) -> TrainResult:
    """Train ``model`` in place on random windows of ``train_tokens`` (a 1-D token stream) or on
    the batches of a :class:`BatchSource`.

    Moves ``model`` to ``config``'s device. With ``out_dir``, writes checkpoints and
    ``train_log.jsonl`` there and, when ``resume``, continues from the newest checkpoint.
    ``eval_tokens`` (1-D) are scored every ``config.eval_every`` steps and at the end, together
    with ``eval_metrics(model)`` (logged beside the eval loss).
    """
    device = config.resolved_device()
    amp_dtype = config.autocast_dtype(device)
    loss_fn = next_token_loss if loss_fn is None else loss_fn
    torch.manual_seed(config.seed)
    model.to(device)
    optimizer = make_optimizer(model, config) if optimizer is None else optimizer
    if isinstance(train_tokens, torch.Tensor | np.ndarray):
        source: Any = TokenWindows(train_tokens, seq_len=config.seq_len, batch_size=config.batch_size,
                                   seed=config.seed, device=device)
        n_train_tokens: int | None = source.tokens.numel()
    elif isinstance(train_tokens, BatchSource):
        source, n_train_tokens = train_tokens, None
    else:
        raise ConfigError(f"train() takes a 1-D token stream or a BatchSource (with batch(index)), "
                          f"got {type(train_tokens).__name__}")
    eval_stream = None
    if eval_tokens is not None:
        eval_stream = torch.as_tensor(np.asarray(eval_tokens, dtype=np.int64)) \
            if isinstance(eval_tokens, np.ndarray) else eval_tokens.long()
    forward_model: nn.Module = torch.compile(model) if config.compile else model  # type: ignore[assignment]
    out = Path(out_dir) if out_dir is not None else None

    step, tokens_seen, elapsed_before, resumed_from = 0, 0, 0.0, None
    last_ckpt: Path | None = None
    if out is not None and resume and (ckpt := latest_checkpoint(out)) is not None:
        meta = load_checkpoint(ckpt, model=model, optimizer=optimizer, source=source)
        step = resumed_from = int(meta["step"])
        last_ckpt = ckpt
        tokens_seen, elapsed_before = int(meta.get("tokens_seen", 0)), float(meta.get("elapsed_s", 0.0))

    history: list[dict[str, Any]] = []
    log_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log_file = (out / LOG_NAME).open("a")

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=amp_dtype)

    def evaluate() -> tuple[float | None, dict[str, float]]:
        loss = None
        with autocast():
            if eval_stream is not None:
                loss = mean_nll(model, eval_stream, seq_len=config.seq_len, batch_size=config.batch_size,
                                device=device, max_batches=config.eval_batches, progress=False)
            metrics = {k: float(v) for k, v in eval_metrics(model).items()} if eval_metrics is not None else {}
        return loss, metrics

    def eval_record(at: int, loss: float | None, metrics: dict[str, float]) -> dict[str, Any]:
        record: dict[str, Any] = {"event": "eval", "step": at}
        if loss is not None:
            record.update(eval_loss=loss, eval_ppl=math.exp(min(loss, 50.0)))
        return {**record, **metrics}

    evaluating = eval_stream is not None or eval_metrics is not None

    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    log({"event": "start", "step": step, "resumed_from": resumed_from, "params": n_params,
         "train_tokens": n_train_tokens, "device": str(device),
         "config": dataclasses.asdict(config)})

    start_time = time.perf_counter()
    train_loss: float | None = None
    eval_loss: float | None = None
    last_metrics: dict[str, float] = {}
    evaluated = False
    stopped_early = False
    interval_loss = torch.zeros((), device=device)
    interval_steps = 0
    tokens_per_batch = config.batch_size * config.seq_len

    def checkpoint(at: int) -> Path | None:
        if out is None:
            return None
        state = source.state_dict() if callable(getattr(source, "state_dict", None)) else None
        path = save_checkpoint(out, model=model, optimizer=optimizer, step=at, config=config, source_state=state,
                               extra={"tokens_seen": tokens_seen,
                                      "elapsed_s": elapsed_before + time.perf_counter() - start_time})
        for old in list_checkpoints(out)[: -config.keep_checkpoints]:
            old.with_suffix(".safetensors").unlink(missing_ok=True)
            shutil.rmtree(old.with_suffix(""), ignore_errors=True)
            old.unlink(missing_ok=True)
        log({"event": "checkpoint", "step": at, "path": path.name})
        return path

    bar = tqdm(total=config.steps, initial=step, desc="train", unit="step", disable=not config.progress,
               dynamic_ncols=True)
    try:
        model.train()
        while step < config.steps:
            lr = config.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                batch = source.batch(step * config.grad_accum + micro)
                with autocast():
                    loss = _call_loss(loss_fn, forward_model, batch)
                (loss / config.grad_accum).backward()
                step_loss += loss.detach().float() / config.grad_accum
                tokens_seen += int(getattr(batch, "num_tokens", tokens_per_batch))
            if not torch.isfinite(step_loss):
                raise FloatingPointError(
                    f"training loss is {step_loss.item()} at step {step}; lower TrainConfig.lr or check the data")
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            if config.grad_clip is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            interval_loss += step_loss
            interval_steps += 1
            bar.update(1)

            eval_loss_now: float | None = None
            metrics_now: dict[str, float] | None = None
            if evaluating and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                eval_loss_now, metrics_now = evaluate()
                eval_loss, last_metrics, evaluated = eval_loss_now, metrics_now, True
                model.train()
                log(eval_record(step, eval_loss_now, metrics_now))
            if step % config.log_every == 0 or step == config.steps:
                train_loss = (interval_loss / interval_steps).item()
                interval_loss.zero_()
                interval_steps = 0
                elapsed = time.perf_counter() - start_time
                log({"event": "train", "step": step, "loss": train_loss, "lr": lr,
                     "grad_norm": float(grad_norm), "tokens": tokens_seen,
                     "elapsed_s": round(elapsed_before + elapsed, 3)})
                postfix = {"loss": f"{train_loss:.3f}", "lr": f"{lr:.2e}"}
                if eval_loss is not None:
                    postfix["eval"] = f"{eval_loss:.3f}"
                bar.set_postfix(postfix)
            if callbacks:
                info = StepInfo(step=step, loss=float(step_loss), lr=lr, eval_loss=eval_loss_now,
                                model=model, optimizer=optimizer, eval_metrics=metrics_now)
                if any([bool(cb(info)) for cb in callbacks]):
                    stopped_early = step < config.steps
                    break
            if config.ckpt_every and step % config.ckpt_every == 0 and step < config.steps:
                last_ckpt = checkpoint(step)
        if interval_steps:
            train_loss = (interval_loss / interval_steps).item()
        if evaluating and not evaluated:  # resumed at the end, or stopped early
            eval_loss, last_metrics = evaluate()
            log(eval_record(step, eval_loss, last_metrics))
        if out is not None and (last_ckpt is None or not last_ckpt.stem.endswith(f"{step:08d}")):
            last_ckpt = checkpoint(step)
        elapsed_total = elapsed_before + time.perf_counter() - start_time
        log({"event": "end", "step": step, "train_loss": train_loss, "eval_loss": eval_loss,
             "tokens": tokens_seen, "elapsed_s": round(elapsed_total, 3), "stopped_early": stopped_early})
    finally:
        bar.close()
        model.eval()
        if log_file is not None:
            log_file.close()
    return TrainResult(
        step=step, train_loss=train_loss, eval_loss=eval_loss,
        eval_perplexity=None if eval_loss is None else math.exp(min(eval_loss, 50.0)),
        tokens_seen=tokens_seen, elapsed_s=elapsed_total, resumed_from=resumed_from,
        checkpoint=last_ckpt, stopped_early=stopped_early, history=history, eval_metrics=last_metrics,
    )


__all__ = [
    "BatchSource",
    "Callback",
    "EvalMetrics",
    "LossFn",
    "StepInfo",
    "TokenWindows",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_optimizer",
    "next_token_loss",
    "can_save_hf",
    "save_checkpoint",
    "save_hf",
    "train",
]
