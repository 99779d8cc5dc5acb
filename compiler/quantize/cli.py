"""``kiln quantize MODEL --preset P [--method M] [--report]``: post-training quantization from the shell.

Quantizes MODEL (a Hugging Face-format folder or a kiln preset name) through ``kiln.compile``
with ``CompileConfig(quant=QuantConfig.preset(P, method=M))``, calibrating on the *train*
split of :mod:`kiln.data` when the folder has a ``tokenizer.json`` (random tokens otherwise),
and prints what each quantization pass did and the memory the graph holds before and after.
``--report`` adds, per layer, the weight error and the output error against full precision,
and perplexity on the *eval* split (:func:`kiln.quantize.report.quant_report`).

Wiring (in ``kiln/cli.py``)::

    from kiln.quantize import cli as quantize_cli
    quantize_cli.add_parser(sub)                 # in _parser(), beside the other sub-commands
    commands["quantize"] = quantize_cli.run      # in main()
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kiln.quantize.config import METHODS, PRESETS, QuantConfig


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``quantize`` sub-command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    p = subparsers.add_parser("quantize", help="quantize a model (PTQ) and report what it cost")
    p.add_argument("model", nargs="?", help="a Hugging Face-format folder or a preset name")
    p.add_argument("--preset", default="w8a16", choices=list(PRESETS), help="quantization preset (default w8a16)")
    p.add_argument("--method", choices=list(METHODS), help="PTQ method (default: the preset's)")
    p.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diagonal")
    p.add_argument("--skip", help="comma-separated module-path patterns kept in full precision (default lm_head)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration windows (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration/evaluation window (default 512)")
    p.add_argument("--report", action="store_true", help="per-layer errors, memory and eval-split perplexity")
    p.add_argument("--eval-tokens", type=int, help="score only the eval split's first N tokens")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--dump-dir", help="write IR dumps ({i:03d}_{pass}.txt, index.html) here")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(list_presets=False, disable="")
    return p


def _tokenizer_dir(name: str) -> Path | None:
    path = Path(name)
    return path if (path / "tokenizer.json").is_file() else None


def _random_tokens(model: torch.nn.Module, n: int, seed: int) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def run(args: argparse.Namespace, console: Console) -> int:
    """Handler of ``kiln quantize``; returns the exit code."""
    import dataclasses

    import kiln
    from kiln.models import load_model
    from kiln.quantize.report import graph_bytes, quant_report

    start = time.perf_counter()
    with console.status(f"loading {args.model}"):
        model = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    overrides: dict[str, Any] = {}
    if args.method:
        overrides["method"] = args.method
    if args.skip is not None:
        overrides["skip"] = tuple(s for s in args.skip.split(",") if s)
    config = QuantConfig.preset(args.preset, **overrides)
    if args.act_order:
        from kiln.quantize.config import GPTQ

        if not isinstance(config.method, GPTQ):
            console.print("[yellow]--act-order applies to --method gptq; ignored[/]")
        else:
            config = dataclasses.replace(config, method=dataclasses.replace(config.method, act_order=True))
    tok = _tokenizer_dir(args.model)
    n_calib = args.calib_samples * args.seq_len
    if tok is not None:
        from kiln.quantize.calibrate import calibration_tokens

        with console.status("tokenizing calibration text (train split)"):
            calib = calibration_tokens(tok, n_calib, split="train")
        source = f"{calib.numel():,} tokens of the train split"
    else:
        calib, source = _random_tokens(model, n_calib, seed=1), f"{n_calib:,} random tokens (no tokenizer.json)"
    config = config.with_calibration(calib, num_samples=args.calib_samples, seq_len=args.seq_len)
    ids = calib[:16].reshape(2, 8)
    compile_config = kiln.CompileConfig(quant=config, dynamic={"input_ids": {0: "B", 1: "T"}}, dump_dir=args.dump_dir)
    console.print(f"quantizing {args.model}: {config.describe()}; calibration: {source}", highlight=False)
    with console.status("capturing with torch.export") as status:
        compiled = kiln.compile(model, (ids,), config=compile_config, progress=lambda n: status.update(f"running pass {n}"))
    stats = compiled.stats
    for name in ("insert-qdq", "lower-qdq"):
        if name in stats:
            shown = ", ".join(f"{k}={v}" for k, v in stats[name].items() if k != "seconds")
            console.print(f"{name}: {shown} ({stats[name]['seconds']:.1f} s)", highlight=False)
    before, after = graph_bytes(compiled.capture.gm), graph_bytes(compiled.graph_module)
    console.print(f"graph constants: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB ({after / before:.1%}); "
                  f"{time.perf_counter() - start:.1f} s", highlight=False)
    if not args.report:
        return 0
    if tok is not None:
        from kiln.eval import resolve_tokens

        eval_tokens = resolve_tokens("eval", tok)
        what = "eval split"
    else:
        eval_tokens, what = _random_tokens(model, 8 * args.seq_len, seed=2), "random tokens"
    if args.eval_tokens:
        eval_tokens = eval_tokens[: args.eval_tokens]
    with console.status(f"measuring: per-layer errors and perplexity on {eval_tokens.numel():,} tokens ({what})"):
        rep = quant_report(model, compiled, eval_tokens=eval_tokens, seq_len=args.seq_len, progress=False)
    table = Table(title=f"kiln quantize {args.model} --preset {args.preset} ({config.method.name})")  # type: ignore[union-attr]
    for col in ("layer", "shape", "weights", "activations", "op", "weight err", "output err", "KiB fp -> q"):
        table.add_column(col, justify="right" if "err" in col or "KiB" in col else "left")
    for r in rep.layers:
        kib = f"{r.bytes_fp / 1024:.0f} -> {r.bytes_q / 1024:.0f}" if r.bytes_fp and r.bytes_q else "-"
        table.add_row(r.name, f"{r.shape[0]}x{r.shape[1]}", r.weights, r.activations, r.op,
                      f"{r.weight_error:.4f}" if r.weight_error is not None else "-",
                      f"{r.output_error:.4f}" if r.output_error is not None else "-", kib)
    console.print(table)
    console.print("\n".join(rep.summary()), highlight=False)
    if args.json:
        Path(args.json).write_text(rep.to_json())
    return 0


__all__ = ["add_parser", "run"]
