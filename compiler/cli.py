"""The ``kiln`` command line.

    kiln compile MODEL [--dump-dir D] [--print-ir-after all|change|NAMES] [--disable NAMES]
    kiln ir MODEL [--captured] [--mlir DIALECT]
    kiln export-onnx MODEL -o PATH [--kv-cache]
    kiln generate MODEL "prompt" [--max-tokens N] [--temperature T] [--stream] [--speculative ngram|DRAFT]
    kiln eval MODEL [--draft DRAFT]
    kiln quantize MODEL --preset w4a16-g128 [--method gptq] --report [--mlir torch|linalg|stablehlo|tosa]
    kiln distill STUDENT --teacher TEACHER --method hard|kd|data|on-policy|qat --out DIR [--steps N]
    kiln export-onnx MODEL -o PATH [--kv-cache] [--opset N] [--no-validate] [--quant PRESET]

MODEL is a Hugging Face-format folder (``config.json`` + ``model.safetensors``) or a preset
name (``kiln compile --list-presets`` lists them). ``compile`` shows each pass as it runs,
then a summary table (passes, time, node counts before/after) and the check that the
compiled model computes what the model computes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch
from rich.console import Console
from rich.table import Table

import kiln
from kiln.errors import KilnError


def _print_spec(value: str | None) -> str | tuple[str, ...] | None:
    if value is None or value in ("all", "change"):
        return value
    return tuple(v for v in value.split(",") if v)


def _load(name: str, dtype: str) -> torch.nn.Module:
    from kiln.models import load_model

    return load_model(name, dtype=getattr(torch, dtype))


def _example_ids(model: torch.nn.Module, tokens: int, seed: int = 0) -> torch.Tensor:
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 256))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (1, tokens), generator=gen).to(device)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an inference compiler for transformer LMs")
    parser.add_argument("--version", action="version", version=f"kiln {kiln.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("model", nargs="?", help="a Hugging Face-format folder or a preset name")
        p.add_argument("--tokens", type=int, default=8, help="example sequence length for capture (default 8)")
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--disable", default="", help="comma-separated pass names to skip")
        p.add_argument("--list-presets", action="store_true", help="list preset names and exit")

    c = sub.add_parser("compile", help="compile a model and show what each pass did")
    add_model_args(c)
    c.add_argument("--dump-dir", help="write {i:03d}_{pass}.txt and index.html here")
    c.add_argument("--print-ir-after", help="'all', 'change' or comma-separated pass names")
    c.add_argument("--verify", action="store_true", help="verify the IR after every pass")
    c.add_argument("--no-check", action="store_true", help="skip comparing compiled and eager outputs")

    i = sub.add_parser("ir", help="print a model's IR after the pipeline (or as captured)")
    add_model_args(i)
    i.add_argument("--captured", action="store_true", help="print the captured IR, before any pass")
    i.add_argument("--mlir", choices=["torch", "linalg", "stablehlo", "tosa"], help="print MLIR in this dialect (torch-mlir)")

    e = sub.add_parser("export-onnx", help="write the compiled graph as ONNX, checked in onnxruntime")
    add_model_args(e)
    e.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    e.add_argument("--kv-cache", action="store_true", help="the generation decoder (past/present K/V)")
    e.add_argument("--opset", type=int, help="ONNX opset (default 23)")
    e.add_argument("--external-data", choices=["auto", "yes", "no"], default="auto")
    e.add_argument("--no-validate", action="store_true", help="skip onnx.checker and the onnxruntime check")
    e.add_argument("--quant", help="quantize first with this preset (w8a16, w4a16-g128, w8a8, fp8): "
                   "QuantizeLinear/DequantizeLinear, MatMulNBits for int4")

    g = sub.add_parser("generate", help="generate text with kiln's runtime (paged KV cache, continuous batching)")
    g.add_argument("model", nargs="?", help="a Hugging Face-format folder with tokenizer.json (or a preset: token ids)")
    g.add_argument("prompt", nargs="*", help="one or more prompts")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--n", type=int, default=1, help="completions per prompt (completion i samples with seed + i)")
    g.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    g.add_argument("--stream", action="store_true", help="print the first prompt's text as it is generated")
    g.add_argument("--speculative", metavar="ngram|DRAFT", default=None,
                   help="speculative decoding: 'ngram' (prompt lookup) or a draft model's folder or preset")
    g.add_argument("--num-speculative-tokens", type=int, default=4, help="draft tokens per step at most (k)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="store the paged KV cache quantized")
    g.add_argument("--quant", help="quantize first with this preset, round to nearest: w8a16, w4a16-g128, fp8 "
                   "(w8a8 smooths with calibration data: use kiln quantize)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="shard the model over this many ranks (worker processes; one GPU each on CUDA)")
    g.add_argument("--torch-compile", action="store_true",
                   help="fuse the step graphs with inductor before capturing them (a GPU; longer start-up)")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when there is one)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    g.set_defaults(list_presets=False)

    v = sub.add_parser("eval", help="perplexity on the committed eval split (and agreement with a draft)")
    v.add_argument("model", nargs="?", help="a Hugging Face-format folder with tokenizer.json")
    v.add_argument("--draft", help="a draft model folder: its perplexity and top-1 agreement with MODEL")
    v.add_argument("--split", default="eval", choices=["eval", "train"])
    v.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens only")
    v.add_argument("--seq-len", type=int, default=512)
    v.set_defaults(list_presets=False)

    from kiln.quantize.cli import add_parser as add_quantize_parser

    add_quantize_parser(sub)
    from kiln.distill.cli import add_parser as add_distill_parser

    add_distill_parser(sub)
    return parser


def _list_presets(console: Console) -> int:
    from kiln.models import PRESETS

    table = Table(title="kiln presets")
    table.add_column("name")
    table.add_column("architecture")
    for name, config in PRESETS.items():
        table.add_row(name, type(config).__name__.replace("Config", ""))
    console.print(table)
    return 0


def _cmd_compile(args: argparse.Namespace, console: Console) -> int:
    start = time.perf_counter()
    with console.status(f"loading {args.model}"):
        model = _load(args.model, args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    ids = _example_ids(model, args.tokens)
    config = kiln.CompileConfig(
        dump_dir=args.dump_dir,
        print_ir_after=_print_spec(args.print_ir_after),
        disable=tuple(d for d in args.disable.split(",") if d),
        verify=True if args.verify else None,
    )
    with console.status("capturing with torch.export") as status:
        compiled = kiln.compile(model, (ids,), config=config, progress=lambda name: status.update(f"running pass {name}"))
    seconds = time.perf_counter() - start
    table = Table(title=f"kiln compile {args.model}  ({n_params / 1e6:.2f}M parameters, {args.dtype})")
    for col in ("#", "pass", "changed", "nodes", "ms", "stats"):
        table.add_column(col, justify="right" if col in ("#", "ms") else "left")
    for r in compiled.report.records:
        changed = "skipped" if r.skipped else ("yes" if r.modified else "no")
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items()) or "-"
        table.add_row(str(r.index), r.name, changed, f"{r.nodes_before} -> {r.nodes_after}", f"{r.seconds * 1e3:.1f}", stats)
    console.print(table)
    console.print(
        f"captured {compiled.nodes_before} nodes -> {len(compiled.graph_module.graph.nodes)} after the pipeline; "
        f"passes {compiled.report.seconds:.2f} s, total {seconds:.2f} s (load + capture + passes)"
    )
    if not args.no_check:
        with torch.no_grad():
            for tokens in sorted({1, args.tokens, 2 * args.tokens + 3}):
                x = _example_ids(model, tokens, seed=tokens)
                err = (compiled(x).float() - model(x).float()).abs().max().item()
                console.print(f"check: {tokens:3d} tokens, max |compiled - eager| = {err:.3g}")
    if args.dump_dir:
        console.print(f"IR dumps: {args.dump_dir}/index.html")
    return 0


def _cmd_ir(args: argparse.Namespace, console: Console) -> int:
    model = _load(args.model, args.dtype)
    ids = _example_ids(model, args.tokens)
    if args.captured:
        from kiln.ir import print_ir

        sys.stdout.write(print_ir(kiln.capture(model, (ids,)).gm))
        return 0
    config = kiln.CompileConfig(disable=tuple(d for d in args.disable.split(",") if d))
    compiled = kiln.compile(model, (ids,), config=config)
    if args.mlir:
        from kiln.backends.mlir import to_mlir

        sys.stdout.write(to_mlir(compiled, args.mlir))
        return 0
    sys.stdout.write(compiled.ir)
    return 0


def _cmd_export_onnx(args: argparse.Namespace, console: Console) -> int:
    from kiln.backends.onnx import export_onnx

    model = _load(args.model, args.dtype)
    quant = None
    if args.quant:
        from kiln.backends.onnx.quant_translations import cli_quant_config

        quant = cli_quant_config(args.model, model, args.quant)
    config = kiln.CompileConfig(disable=tuple(d for d in args.disable.split(",") if d), quant=quant)
    with console.status(f"compiling {args.model}") as status:
        compiled = kiln.compile(model, (_example_ids(model, args.tokens),), config=config)
        report = export_onnx(
            compiled, args.output, opset=args.opset, kv_cache=args.kv_cache, validate=not args.no_validate,
            external_data={"auto": "auto", "yes": True, "no": False}[args.external_data],
            progress=lambda step: status.update(step),
        )
    console.print(report.summary(), highlight=False)
    if report.checks:
        console.print(f"checked in onnxruntime against eager: {', '.join(report.checks)}", highlight=False)
    return 0


def _cmd_generate(args: argparse.Namespace, console: Console) -> int:
    if not args.prompt:
        console.print("[red]error:[/] give at least one prompt")
        return 2
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    spec = None
    if args.speculative == "ngram":
        spec = kiln.SpeculativeConfig(method="ngram", num_speculative_tokens=args.num_speculative_tokens)
    elif args.speculative:
        spec = kiln.SpeculativeConfig(method="draft_model", draft_model=args.speculative,
                                      num_speculative_tokens=args.num_speculative_tokens)
    config = kiln.CompileConfig(kv_cache=True, quant=kiln.QuantConfig.preset(args.quant)) if args.quant else None
    with console.status(f"loading and compiling {args.model}"):
        llm = kiln.LLM(args.model, device=device, dtype=dtype, speculative=spec, kv_cache_dtype=args.kv_cache_dtype,
                       torch_compile=args.torch_compile, compile_config=config,
                       tensor_parallel_size=args.tensor_parallel_size)
    with llm:
        return _generate(llm, args, spec, console)


def _generate(llm: kiln.LLM, args: argparse.Namespace, spec: object, console: Console) -> int:
    params = kiln.SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
        seed=args.seed, stop=tuple(args.stop), n=args.n,
    )
    start = time.perf_counter()
    if args.stream and args.n > 1:
        console.print("[red]error:[/] --stream shows one completion; drop it or --n")
        return 2
    if args.stream:
        shown = 0
        for out in llm.stream(args.prompt[0], params):
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
        sys.stdout.write("\n")
        outs = [out]
    else:
        outs = llm.generate(args.prompt, params)
        for prompt, out in zip(args.prompt, outs, strict=True):
            for c in out.outputs:
                console.rule(repr(prompt)[:60] + (f" (completion {c.index})" if args.n > 1 else ""))
                sys.stdout.write(prompt + c.text + "\n")
    seconds = time.perf_counter() - start
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    console.print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s), {llm.stats['steps']} steps")
    if spec is not None:
        s = llm.stats
        console.print(f"speculative ({args.speculative}): acceptance {s['acceptance_rate']:.2f}, "
                      f"{s['accepted_tokens_per_step']:.2f} tokens per verified step")
    return 0


def _cmd_eval(args: argparse.Namespace, console: Console) -> int:
    from kiln.eval import main as eval_main

    argv = [args.model, "--split", args.split, "--seq-len", str(args.seq_len)]
    if args.draft:
        argv += ["--draft", args.draft]
    if args.max_tokens:
        argv += ["--max-tokens", str(args.max_tokens)]
    return eval_main(argv)


def _cmd_quantize(args: argparse.Namespace, console: Console) -> int:
    from kiln.quantize.cli import run

    return run(args, console)


def _cmd_distill(args: argparse.Namespace, console: Console) -> int:
    from kiln.distill.cli import run

    return run(args, console)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` script; returns the process exit code."""
    args = _parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    try:
        if args.list_presets:
            return _list_presets(console)
        if not args.model:
            console.print("[red]error:[/] name a model: a Hugging Face-format folder or a preset (--list-presets)")
            return 2
        commands = {
            "compile": _cmd_compile,
            "ir": _cmd_ir,
            "export-onnx": _cmd_export_onnx,
            "generate": _cmd_generate,
            "eval": _cmd_eval,
            "quantize": _cmd_quantize,
            "distill": _cmd_distill,
        }
        return commands[args.command](args, console)
    except KilnError as e:
        console.print(f"[red]error:[/] {type(e).__name__}: {e}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
