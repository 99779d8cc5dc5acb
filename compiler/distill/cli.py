"""``kiln distill STUDENT --teacher TEACHER --method M --out DIR``: distillation from the shell.

STUDENT and TEACHER are Hugging Face-format folders or kiln presets sharing one vocabulary;
the data are the :mod:`kiln.data` splits (``--data train``, ``--eval-data eval``) tokenized
with the teacher's ``tokenizer.json`` (or ``--tokenizer``). Training shows a progress bar,
evaluates every ``--eval-every`` steps (perplexity and top-1 agreement with the teacher),
checkpoints into ``--out`` (rerun the same command to resume) and writes the student to
``OUT/model``. A summary table ends the run.

Wiring (in ``kiln/cli.py``)::

    from kiln.distill.cli import add_parser as add_distill_parser
    add_distill_parser(sub)                      # in _parser()
    commands["distill"] = _cmd_distill           # in main(), calling kiln.distill.cli.run
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.distill.config import (
    DataDistillation,
    DistillConfig,
    KnowledgeDistillation,
    MethodConfig,
    OnPolicyDistillation,
    QATDistillation,
)
from kiln.distill.losses import DIVERGENCES, LossConfig
from kiln.train import TrainConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``distill`` sub-command to ``subparsers``."""
    p = subparsers.add_parser("distill", help="distill a teacher into a student (kd, data, on-policy, qat)")
    p.add_argument("model", nargs="?", help="the student: a Hugging Face-format folder or a preset name")
    p.add_argument("--teacher", required=True, help="the teacher: a Hugging Face-format folder or a preset name")
    p.add_argument("--method", default="kd", choices=["hard", "kd", "data", "on-policy", "qat"])
    p.add_argument("--out", required=True, help="checkpoints, log, caches and the trained model (OUT/model)")
    p.add_argument("--data", default="train", help="training split (default train)")
    p.add_argument("--eval-data", default="eval", help="evaluation split (default eval; 'none' to skip)")
    p.add_argument("--tokenizer", help="folder with tokenizer.json (default: the teacher's)")
    p.add_argument("--eval-tokens", type=int, help="score only the first N eval tokens")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seq-len", type=int, default=128)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--min-lr", type=float, help="end of the cosine decay (default lr / 10)")
    t.add_argument("--warmup", type=int, default=20)
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--eval-batches", type=int, default=8)
    t.add_argument("--ckpt-every", type=int, default=100)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto")
    t.add_argument("--no-progress", action="store_true")
    loss = p.add_argument_group("loss")
    loss.add_argument("--divergence", choices=list(DIVERGENCES), help="default: forward_kl (jsd for on-policy)")
    loss.add_argument("--beta", type=float, default=0.5, help="jsd: the teacher's weight in the mixture")
    loss.add_argument("--temperature", type=float, default=1.0, help="softening of both distributions")
    loss.add_argument("--hard-weight", type=float, help="weight of hard-label CE (default 0; 1 for data)")
    m = p.add_argument_group("methods")
    m.add_argument("--top-k", type=int, help="kd: cache the teacher's top-k log-probabilities in OUT/teacher_topk")
    m.add_argument("--lmbda", type=float, default=0.5, help="on-policy: fraction of batches the student samples")
    m.add_argument("--prompt-tokens", type=int, default=32, help="data / on-policy: prompt length")
    m.add_argument("--sample-temperature", type=float, help="data / on-policy: sampling temperature")
    m.add_argument("--num-prompts", type=int, default=256, help="data: prompts the teacher continues")
    m.add_argument("--samples-per-prompt", type=int, default=2, help="data: continuations per prompt")
    m.add_argument("--keep-fraction", type=float, default=1.0, help="data: keep the most likely fraction")
    m.add_argument("--quant", default="w4a16-g128", help="qat: a kiln.quantize preset")
    p.set_defaults(list_presets=False)
    return p


def method_from_args(args: argparse.Namespace) -> MethodConfig:
    """The method config the arguments describe."""
    name = args.method.replace("-", "_")
    divergence = args.divergence or ("jsd" if name == "on_policy" else "forward_kl")
    hard = args.hard_weight if args.hard_weight is not None else {"hard": 1.0, "data": 1.0}.get(name, 0.0)
    loss = LossConfig(divergence=divergence, beta=args.beta, temperature=args.temperature, hard_label_weight=hard)
    if name in ("hard", "kd"):
        return KnowledgeDistillation(loss=loss, top_k=args.top_k)
    if name == "data":
        extra = {} if args.sample_temperature is None else {"temperature": args.sample_temperature}
        return DataDistillation(loss=loss, num_prompts=args.num_prompts, samples_per_prompt=args.samples_per_prompt,
                                prompt_tokens=args.prompt_tokens, keep_fraction=args.keep_fraction, **extra)
    if name == "on_policy":
        extra = {} if args.sample_temperature is None else {"temperature": args.sample_temperature}
        return OnPolicyDistillation(loss=loss, lmbda=args.lmbda, prompt_tokens=args.prompt_tokens, **extra)
    return QATDistillation(loss=loss, quant=args.quant)


def run(args: argparse.Namespace, console: Console) -> int:
    """Run ``kiln distill``; returns the exit code."""
    from kiln.distill.api import distill

    method = method_from_args(args)
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        min_lr=args.min_lr if args.min_lr is not None else args.lr / 10, warmup_steps=args.warmup,
        eval_every=args.eval_every, eval_batches=args.eval_batches, ckpt_every=args.ckpt_every, seed=args.seed,
        device=args.device, progress=not args.no_progress, log_every=max(1, min(10, args.steps)),
    )
    config = DistillConfig(train=train, eval_max_tokens=args.eval_tokens)
    eval_data = None if args.eval_data == "none" else args.eval_data
    result = distill(args.model, args.teacher, args.data, method=method, config=config, eval_data=eval_data,
                     out_dir=args.out, tokenizer=args.tokenizer)
    table = Table(title=f"kiln distill {args.model} <- {args.teacher} ({result.method})")
    table.add_column("")
    table.add_column("value", justify="right")
    tr = result.train
    rows = [
        ("steps", f"{tr.step}" + (f" (resumed from {tr.resumed_from})" if tr.resumed_from is not None else "")),
        ("training tokens", f"{tr.tokens_seen:,}"),
        ("last train loss", "-" if tr.train_loss is None else f"{tr.train_loss:.4f}"),
        ("eval perplexity", "-" if result.eval_perplexity is None else f"{result.eval_perplexity:.3f}"),
        ("top-1 agreement with teacher", "-" if result.agreement is None else f"{result.agreement:.4f}"),
        ("time", f"{tr.elapsed_s:.1f} s"),
        ("model", str(result.model_dir or "-")),
        ("checkpoint", str(tr.checkpoint or "-")),
    ]
    for key, value in result.stats.items():
        if key != "train_seconds":
            rows.append((key, str(value)))
    for key, value in rows:
        table.add_row(key, value)
    console.print(table)
    return 0


__all__ = ["add_parser", "method_from_args", "run"]
