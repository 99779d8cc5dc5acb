"""Distillation of a drafter-sized student from kiln's shipped teacher (issue #9's figures), on the CPU.

Every method trains the same student shape (``models/kiln-drafter``'s config: 4 layers of 128,
1.84M parameters) for the same number of optimizer steps on the same ``batch x seq_len`` token
positions (equal student compute), then is scored on the whole held-out eval split (windows of
512 tokens, fp32): perplexity, and top-1 agreement with ``models/kiln-teacher``.

Two protocols:

- ``scratch``: from one random initialization. Target: knowledge distillation closes at least
  half of the perplexity gap between the hard-label student and the teacher.
- ``finetune``: from the shipped drafter. The drafters are then measured in speculative
  decoding (``kiln.LLM(teacher, speculative=SpeculativeConfig(method="draft_model", ...))``,
  greedy, k = 4 fixed, eval-split prompts as in ``benchmarks/speculative.py``). Target: the
  on-policy-distilled drafter accepts more than the shipped one. ``--save-drafter`` writes it
  (bf16, with tokenizer and model card) to ``models/kiln-drafter-distilled``.

Methods: ``hard`` (next-token CE), ``kd`` (forward KL to the teacher's top-k cache), ``data``
(CE on teacher-written continuations, generated once with ``kiln.LLM`` and shared by both
protocols), ``on_policy`` (GKD: half of the batches sampled by the student with ``kiln.LLM``,
forward KL on every token). ``--qat`` adds W4 (w4a16-g128) QAT of the teacher against its
full-precision self versus W4 post-training quantization (RTN, GPTQ).

Every run checkpoints in ``--work`` and its result goes to ``WORK/results-TAG.json``: rerunning a
command resumes an interrupted run and skips finished ones, and processes with different tags can
run side by side (the tables at the end merge every results file). The recorded run
(benchmarks/RESULTS.md) was, in this order::

    python benchmarks/distill.py --prepare --reference --methods kd     # teacher scores, top-k cache
    python benchmarks/distill.py --prepare --methods data --protocols ''  # teacher-written data
    python benchmarks/distill.py --protocols scratch --tag scratch      # hard, kd, data, on_policy
    python benchmarks/distill.py --protocols finetune --tag finetune
    python benchmarks/distill.py --protocols '' --acceptance --save-drafter --tag acc
    python benchmarks/distill.py --protocols '' --qat --tag qat
    python benchmarks/distill.py --quick --reference --prepare --methods kd,data --tag prep  # smoke run, then
    python benchmarks/distill.py --quick --acceptance --qat                                 # (minutes)

``--device cuda`` runs the same on a GPU (bf16 autocast in training; the QAT rows are CPU-tested only).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import kiln
from kiln.distill import (
    DataDistillation,
    DistillConfig,
    KnowledgeDistillation,
    LossConfig,
    OnPolicyDistillation,
    QATDistillation,
)
from kiln.distill.generate import generate_data
from kiln.eval import iter_windows, logits_of, resolve_tokens
from kiln.models import from_config, load_model, read_config, save_pretrained
from kiln.train import TokenWindows, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
TEACHER, DRAFTER = ROOT / "models" / "kiln-teacher", ROOT / "models" / "kiln-drafter"
OUT_DRAFTER = ROOT / "models" / "kiln-drafter-distilled"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ------------------------------------------------------------------------------- scoring


class Scorer:
    """Perplexity and top-1 agreement with the teacher on fixed eval windows (teacher pass cached)."""

    def __init__(self, teacher: torch.nn.Module, tokens: torch.Tensor, work: Path, seq_len: int = 512,
                 batch_size: int = 8, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.windows = [(x.to(device), y.to(device)) for x, y in iter_windows(tokens, seq_len=seq_len,
                                                                              batch_size=batch_size)]
        path = work / f"teacher_eval_{tokens.numel()}.safetensors"
        if path.is_file():
            saved = load_file(str(path))
            self.teacher_top1 = [saved[f"top1/{i}"].to(device) for i in range(len(self.windows))]
            self.teacher_ppl = float(saved["ppl"])
        else:
            self.teacher_top1 = []
            self.teacher_ppl = self._score(teacher, top1=self.teacher_top1)[0]
            save_file({"ppl": torch.tensor(self.teacher_ppl, dtype=torch.float64),
                       **{f"top1/{i}": t.cpu() for i, t in enumerate(self.teacher_top1)}}, str(path))

    @torch.no_grad()
    def _score(self, model: torch.nn.Module, top1: list[torch.Tensor] | None = None) -> tuple[float, float]:
        model.to(self.device).eval()
        nll, count, same = 0.0, 0, 0
        for i, (x, y) in enumerate(self.windows):
            logits = logits_of(model(x)).float()  # (B, T, V)
            nll += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
            if top1 is not None:
                top1.append(logits.argmax(-1))
            else:
                same += int((logits.argmax(-1) == self.teacher_top1[i]).sum())
        return math.exp(nll / count), same / count

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        start = time.perf_counter()
        ppl, agree = self._score(model)
        return {"perplexity": ppl, "agreement": agree, "eval_s": round(time.perf_counter() - start, 1)}


def acceptance(teacher_dir: Path, drafter: Path, prompts: list[list[int]], max_tokens: int, k: int,
               device: str = "cpu", temperature: float = 0.0) -> dict[str, float]:
    """Speculative decoding of ``prompts`` by the teacher with ``drafter`` (greedy by default): acceptance figures."""
    spec = kiln.SpeculativeConfig(method="draft_model", draft_model=str(drafter), num_speculative_tokens=k,
                                  adaptive=False, disable_by_batch_size=None)
    llm = kiln.LLM(str(teacher_dir), speculative=spec, device=device, dtype=torch.float32,
                   enable_prefix_caching=False, max_num_batched_tokens=4096)
    params = [kiln.SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, seed=i)
              for i in range(len(prompts))]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    s = llm.stats
    return {"alpha": s["accepted_tokens"] / max(s["accepted_tokens"] + s["spec_rejections"], 1),
            "accepted_per_drafted": s["accepted_tokens"] / max(s["draft_tokens"], 1),
            "tokens_per_verify_step": (s["accepted_tokens"] + s["spec_steps"]) / max(s["spec_steps"], 1),
            "spec_s": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------------------------- runs


def method_config(name: str, args: argparse.Namespace, cache_dir: Path) -> Any:
    fkl = LossConfig(divergence="forward_kl", temperature=1.0)
    if name == "hard":
        return KnowledgeDistillation(loss=LossConfig(hard_label_weight=1.0))
    if name == "kd":
        kd = LossConfig(divergence=args.kd_divergence, temperature=args.kd_temperature,
                        hard_label_weight=args.kd_hard_weight)
        if not args.top_k:  # dense teacher logits every step (no cache)
            return KnowledgeDistillation(loss=kd)
        return KnowledgeDistillation(loss=kd, top_k=args.top_k, cache_dir=str(cache_dir))
    if name == "data":
        return DataDistillation(prompt_tokens=args.data_prompt_tokens, num_prompts=args.num_prompts, samples_per_prompt=2,
                                temperature=args.data_temperature, top_p=0.95)
    if name == "on_policy":
        return OnPolicyDistillation(loss=fkl, lmbda=args.lmbda, prompt_tokens=args.prompt_tokens, temperature=1.0)
    raise SystemExit(f"unknown method {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / ".kiln-distill-bench"), help="checkpoints, caches, results-*.json")
    p.add_argument("--tag", default="main", help="this process's results file: WORK/results-TAG.json")
    p.add_argument("--protocols", default="scratch,finetune", help="'' for none")
    p.add_argument("--methods", default="hard,kd,data,on_policy")
    p.add_argument("--prepare", action="store_true", help="only the shared inputs: the methods' teacher top-k "
                   "cache / teacher data, and (unless --methods names neither) nothing else")
    p.add_argument("--reference", action="store_true", help="score the teacher and the shipped drafter")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--top-k", type=int, default=64, help="kd: cache the teacher's top-k (0: dense teacher, no cache)")
    p.add_argument("--kd-divergence", default="forward_kl", choices=["forward_kl", "reverse_kl", "jsd"])
    p.add_argument("--kd-temperature", type=float, default=1.0, help="kd: softmax temperature (soft term scaled by T^2)")
    p.add_argument("--kd-hard-weight", type=float, default=0.0, help="kd: weight of hard-label CE in the loss")
    p.add_argument("--lr", type=float, default=3e-3, help="scratch protocol: peak learning rate (cosine to a tenth)")
    p.add_argument("--lmbda", type=float, default=0.5)
    p.add_argument("--prompt-tokens", type=int, default=96, help="on-policy prompt length (the student writes the rest)")
    p.add_argument("--data-prompt-tokens", type=int, default=64, help="data: prompt length (the teacher writes the rest)")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--data-temperature", type=float, default=0.8)
    p.add_argument("--eval-tokens", type=int, default=None, help="score the first N eval tokens (default: all)")
    p.add_argument("--acceptance", action="store_true", help="speculative acceptance of the finetuned drafters")
    p.add_argument("--spec-prompts", type=int, default=16)
    p.add_argument("--spec-tokens", type=int, default=48)
    p.add_argument("--spec-temperature", type=float, default=0.0, help="0: greedy acceptance (default)")
    p.add_argument("--qat", action="store_true", help="W4 QAT with a teacher vs W4 PTQ (teacher-sized)")
    p.add_argument("--qat-steps", type=int, default=40)
    p.add_argument("--qat-eval-tokens", type=int, default=40960, help="QAT/PTQ rows: score the first N eval tokens")
    p.add_argument("--save-drafter", action="store_true", help=f"write the on-policy finetuned drafter to {OUT_DRAFTER}")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokens", default=None, help="a safetensors file with the 'train' and 'eval' token streams to use "
                   "(default: WORK/tokens.safetensors, else kiln.data's splits built by this interpreter)")
    p.add_argument("--save-tokens", default=None, help="write the token streams used to this file")
    p.add_argument("--device", default="cpu", help="cpu (the recorded figures) or cuda (bf16 autocast in training)")
    p.add_argument("--quick", action="store_true", help="tiny budgets (a smoke run of every path)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick and args.save_drafter:  # a smoke run must never replace the shipped model
        p.error(f"--save-drafter writes {OUT_DRAFTER}: not with --quick")
    if args.quick:
        args.steps, args.num_prompts, args.eval_tokens, args.spec_prompts, args.spec_tokens = 6, 16, 8192, 2, 16
        args.qat_steps, args.work = 4, args.work + "-quick"
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = work / f"results-{args.tag}.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def record(key: str, value: dict[str, Any]) -> None:
        results[key] = value
        results_path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"{key}: {json.dumps(value)}", flush=True)

    print(f"kiln distill benchmark: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} thread(s); steps {args.steps} x {args.batch_size} x {args.seq_len}", flush=True)
    teacher = load_model(str(TEACHER), dtype=torch.float32).eval().to(args.device)
    tok_path = Path(args.tokens) if args.tokens else work / "tokens.safetensors"
    if args.tokens and not tok_path.is_file():
        raise SystemExit(f"--tokens {tok_path}: no such file (write one with --save-tokens on the machine whose "
                         "Python built the teacher's training text)")
    loaded = tok_path.is_file()
    if loaded:
        saved = load_file(str(tok_path))
        train_tokens, eval_tokens = saved["train"], saved["eval"]
    else:
        train_tokens, eval_tokens = resolve_tokens("train", TEACHER), resolve_tokens("eval", TEACHER)
        save_file({"train": train_tokens, "eval": eval_tokens}, str(tok_path))
    if args.eval_tokens:
        eval_tokens = eval_tokens[: args.eval_tokens]
    if args.save_tokens:
        save_file({"train": train_tokens, "eval": eval_tokens}, args.save_tokens)
    # kiln.data builds the train split from the running interpreter's standard library: students trained on
    # another Python's text than the teacher's are not comparable with hard-label baselines (see RESULTS.md)
    source = f"from {tok_path}" if loaded else f"built from Python {platform.python_version()}'s library"
    print(f"train {train_tokens.numel():,} tokens ({source}), eval {eval_tokens.numel():,} tokens", flush=True)
    protocols_names = [x.strip() for x in args.protocols.split(",") if x.strip()]
    scorer = Scorer(teacher, eval_tokens, work, device=args.device) if (
        args.reference or protocols_names or args.save_drafter) else None
    if args.reference and scorer is not None:
        record("teacher", {"perplexity": scorer.teacher_ppl, "agreement": 1.0})
        record("shipped_drafter", scorer.score(load_model(str(DRAFTER), dtype=torch.float32)))

    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, min_lr=args.lr / 10,
                     warmup_steps=max(1, args.steps // 10), weight_decay=0.1, eval_every=max(1, args.steps // 4),
                     eval_batches=2, ckpt_every=max(1, args.steps // 4), log_every=max(1, args.steps // 20), seed=1234,
                     device=args.device, progress=not args.no_progress)
    protocols = {
        "scratch": tc,
        "finetune": dataclasses.replace(tc, lr=3e-4, min_lr=3e-5, warmup_steps=max(1, args.steps // 20)),
    }
    drafter_config = read_config(DRAFTER)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    cache_dir = work / f"teacher_topk_{args.top_k}"
    data_file = work / "teacher_data.safetensors"
    if args.prepare and "kd" in methods and args.top_k:  # the teacher's top-k over the training windows, shared by both protocols
        from kiln.distill import TopKCache
        from kiln.distill.cache import tensor_digest

        dev = torch.device(args.device)
        windows = TokenWindows(train_tokens, seq_len=tc.seq_len, batch_size=tc.batch_size, seed=tc.seed, device=dev)
        amp = tc.autocast_dtype(dev)  # the key and the teacher's precision must match what kiln.distill uses
        cache = TopKCache(cache_dir, teacher=teacher, batch_fn=windows.batch, k=args.top_k, temperature=1.0,
                          key={"data": tensor_digest(train_tokens), "seed": tc.seed, "batch_size": tc.batch_size,
                               "seq_len": tc.seq_len, "autocast": str(amp)}, progress=not args.no_progress,
                          autocast=(lambda: torch.autocast(dev.type, dtype=amp)) if amp is not None else
                          contextlib.nullcontext)
        start = time.perf_counter()
        cache.fill(args.steps * tc.grad_accum)
        record("teacher_topk", {"batches": cache.computed_batches, "bytes": cache.nbytes(),
                                "seconds": round(time.perf_counter() - start, 1)})
    if "data" in methods and not data_file.is_file():  # generated once, shared by both protocols
        spec = method_config("data", args, cache_dir)
        g = torch.Generator().manual_seed(tc.seed * 1_000_003 + 17)
        starts = torch.randint(0, train_tokens.numel() - spec.prompt_tokens, (spec.num_prompts,), generator=g)
        prompts = train_tokens[starts[:, None] + torch.arange(spec.prompt_tokens)]
        data = generate_data(teacher, prompts, length=tc.seq_len + 1, config=spec, seed=tc.seed, device=args.device,
                             eos_token_id=1, progress=not args.no_progress)
        data.save(data_file)
        record("teacher_data", data.stats)
    if args.prepare:
        protocols_names = []

    for protocol in protocols_names:
        assert scorer is not None
        for name in methods:
            key = f"{protocol}/{name}"
            if key in results:
                continue
            run_dir = work / protocol / name
            if name == "data":
                run_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(data_file, run_dir / "distill_data.safetensors")
            if protocol == "scratch":
                student = from_config(drafter_config, seed=tc.seed)
            else:
                student = load_model(str(DRAFTER), dtype=torch.float32)
            cfg = DistillConfig(train=protocols[protocol], agreement=True)
            print(f"--- {key}", flush=True)
            result = kiln.distill(student, teacher, train_tokens, method=method_config(name, args, cache_dir),
                                  config=cfg, eval_data=eval_tokens[: 2 * tc.batch_size * tc.seq_len + 1],
                                  out_dir=run_dir)
            row = {"steps": result.train.step, "tokens": result.train.tokens_seen,
                   "train_s": round(result.train.elapsed_s, 1), **scorer.score(result.student),
                   **{k: v for k, v in result.stats.items() if k not in ("data", "train_seconds")}}
            record(key, row)

    if args.save_drafter and (work / "finetune" / "on_policy" / "model").is_dir():
        save_drafter(work / "finetune" / "on_policy" / "model", merged_results(work), args)
        assert scorer is not None
        record("kiln-drafter-distilled", scorer.score(load_model(str(OUT_DRAFTER), dtype=torch.float32)))
        write_card(merged_results(work), args)
    if args.acceptance:
        import importlib.util

        spec_file = importlib.util.spec_from_file_location("kiln_bench_speculative", ROOT / "benchmarks" / "speculative.py")
        assert spec_file is not None and spec_file.loader is not None
        speculative = importlib.util.module_from_spec(spec_file)
        spec_file.loader.exec_module(speculative)
        prompts = speculative.eval_prompts(kiln.LLM(str(TEACHER), device="cpu", num_blocks=8).tokenizer, args.spec_prompts)
        drafters = {"shipped_drafter": DRAFTER}
        for name in methods:
            if (work / "finetune" / name / "model").is_dir():
                drafters[f"finetune/{name}"] = work / "finetune" / name / "model"
        if (OUT_DRAFTER / "model.safetensors").is_file():
            drafters["kiln-drafter-distilled"] = OUT_DRAFTER
        for key, folder in drafters.items():
            name = "acceptance" + ("" if (len(prompts), args.spec_temperature) == (16, 0.0) else
                                      f"[{len(prompts)} prompts, T={args.spec_temperature:g}]") + f"/{key}"
            if name not in results:
                record(name, acceptance(TEACHER, folder, prompts, args.spec_tokens, 4, args.device,
                                        args.spec_temperature))
        if (OUT_DRAFTER / "model.safetensors").is_file():
            write_card(merged_results(work), args)

    if args.qat:  # teacher-sized: scored on a prefix of the eval split (its fp32 figure beside it)
        qat_tokens = eval_tokens[: args.qat_eval_tokens] if args.qat_eval_tokens else eval_tokens
        qat_scorer = Scorer(teacher, qat_tokens, work, device=args.device)
        if "qat/fp32-teacher" not in results:
            record("qat/fp32-teacher", {"perplexity": qat_scorer.teacher_ppl, "agreement": 1.0,
                                        "eval_tokens": qat_tokens.numel()})
        run_qat(teacher, train_tokens, qat_tokens, qat_scorer, work, args, results, record)
    print_tables(merged_results(work), args)
    return 0


def merged_results(work: Path) -> dict[str, Any]:
    """Every process's results (``WORK/results-*.json``), merged."""
    merged: dict[str, Any] = {}
    for path in sorted(work.glob("results-*.json")):
        merged.update(json.loads(path.read_text()))
    return merged


def save_drafter(folder: Path, results: dict[str, Any], args: argparse.Namespace) -> None:
    """The on-policy finetuned drafter as a bf16 HF folder with tokenizer, training log and model card."""
    model = load_model(str(folder), dtype=torch.float32).to(torch.bfloat16)
    OUT_DRAFTER.mkdir(parents=True, exist_ok=True)
    save_pretrained(model, OUT_DRAFTER)
    for name in TOKENIZER_FILES:
        shutil.copy(TEACHER / name, OUT_DRAFTER / name)
    log = folder.parent / "train_log.jsonl"
    if log.is_file():
        shutil.copy(log, OUT_DRAFTER / "train_log.jsonl")
    write_card(results, args)


def write_card(results: dict[str, Any], args: argparse.Namespace) -> None:
    """``models/kiln-drafter-distilled/README.md`` from the benchmark's results."""
    r = results.get("kiln-drafter-distilled") or results.get("finetune/on_policy", {})
    base, run = results.get("shipped_drafter", {}), results.get("finetune/on_policy", {})
    acc = results.get("acceptance/kiln-drafter-distilled") or results.get("acceptance/finetune/on_policy")
    acc0 = results.get("acceptance/shipped_drafter")
    lines = [
        "# kiln-drafter-distilled", "",
        "`models/kiln-drafter` (1.84M parameters, same shape and tokenizer) fine-tuned by on-policy distillation "
        "(GKD, Agarwal et al. 2024) from `models/kiln-teacher` with `kiln.distill`: "
        f"`OnPolicyDistillation(lmbda={args.lmbda}, prompt_tokens={args.prompt_tokens}, "
        "loss=LossConfig(divergence='forward_kl'))`, "
        f"{args.steps} steps x {args.batch_size} x {args.seq_len} tokens, AdamW lr 3e-4 -> 3e-5, on the CPU. "
        f"{run.get('on_policy_batches', '?')} of the {args.steps} batches (a coin with p = {args.lmbda} per batch) "
        "were continuations sampled by the student itself with `kiln.LLM` (temperature 1), the others training "
        "windows; the teacher scored every token.", "",
        "| | shipped kiln-drafter | kiln-drafter-distilled |", "| --- | --- | --- |",
        f"| eval-split perplexity | {base.get('perplexity', float('nan')):.3f} | "
        f"{r.get('perplexity', float('nan')):.3f} |",
        f"| top-1 agreement with the teacher | {base.get('agreement', float('nan')):.4f} | "
        f"{r.get('agreement', float('nan')):.4f} |",
    ]
    if acc and acc0:
        lines += [f"| speculative alpha (greedy, k = 4, {args.spec_prompts} eval prompts) | {acc0['alpha']:.3f} | "
                  f"{acc['alpha']:.3f} |",
                  f"| accepted / drafted | {acc0['accepted_per_drafted']:.3f} | {acc['accepted_per_drafted']:.3f} |",
                  f"| tokens per verify step | {acc0['tokens_per_verify_step']:.2f} | "
                  f"{acc['tokens_per_verify_step']:.2f} |"]
    for setting in sorted({k.split("/", 1)[0] for k in results if k.startswith("acceptance[")}):
        a0, a1 = results.get(f"{setting}/shipped_drafter"), results.get(f"{setting}/kiln-drafter-distilled")
        if a0 and a1:
            label = setting.removeprefix("acceptance[").removesuffix("]")
            lines.append(f"| speculative alpha ({label}, k = 4) | {a0['alpha']:.3f} | {a1['alpha']:.3f} |")
    lines += ["", "Weights are bf16 safetensors; every figure above was measured on the bf16 weights (loaded as fp32, "
              "as the shipped drafter's). Reproduce with `python benchmarks/distill.py` (see "
              "benchmarks/RESULTS.md); measure the speedup on a GPU with "
              "`python benchmarks/speculative.py --workloads draft --drafter models/kiln-drafter-distilled`."]
    (OUT_DRAFTER / "README.md").write_text("\n".join(lines) + "\n")


def run_qat(teacher: torch.nn.Module, train_tokens: torch.Tensor, eval_tokens: torch.Tensor, scorer: Scorer,
            work: Path, args: argparse.Namespace, results: dict[str, Any], record: Any) -> None:
    """W4 (w4a16-g128): PTQ (RTN, GPTQ) of the teacher vs QAT of the teacher distilled from its fp32 self."""
    from kiln.quantize import QuantConfig
    from kiln.quantize.calibrate import calibration_tokens
    from kiln.quantize.report import as_module

    samples = 32 if not args.quick else 2
    calib = calibration_tokens(str(TEACHER), samples * 512, split="train")
    ids = calib[:16].reshape(2, 8)
    dynamic = {"input_ids": {0: "B", 1: "T"}}
    for method in ("rtn", "gptq"):
        if f"qat/ptq-{method}" not in results:
            start = time.perf_counter()
            cfg = QuantConfig.preset("w4a16-g128", method=method).with_calibration(
                calib, num_samples=samples, seq_len=512, progress=False)
            compiled = kiln.compile(teacher, (ids,), config=kiln.CompileConfig(quant=cfg, dynamic=dynamic))
            record(f"qat/ptq-{method}", {**scorer.score(as_module(compiled)),
                                         "quantize_s": round(time.perf_counter() - start, 1)})
    tc = TrainConfig(steps=args.qat_steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=5e-5,
                     min_lr=5e-6, warmup_steps=max(1, args.qat_steps // 10), weight_decay=0.0, eval_every=0,
                     ckpt_every=max(1, args.qat_steps // 4), log_every=max(1, args.qat_steps // 20), seed=1234,
                     device=args.device, progress=not args.no_progress, save_hf=False)
    for start_from, key in (("rtn", "qat/qat-kd"), ("gptq", "qat/qat-kd-from-gptq")):  # QAT starts from the PTQ solution
        if key in results:
            continue
        quant = QuantConfig.preset("w4a16-g128", method=start_from)
        if start_from != "rtn":
            quant = quant.with_calibration(calib, num_samples=samples, seq_len=512, progress=False)
        result = kiln.distill(teacher, teacher, train_tokens, config=DistillConfig(train=tc, agreement=False),
                              method=QATDistillation(quant=quant, loss=LossConfig(divergence="forward_kl")),
                              out_dir=work / "qat" / f"w4a16-g128-{start_from}")
        record(key, {**scorer.score(as_module(result.converted)), "steps": result.train.step,
                     "train_s": round(result.train.elapsed_s, 1)})


def print_tables(results: dict[str, Any], args: argparse.Namespace) -> None:
    t = results.get("teacher", {}).get("perplexity")
    print("\n| protocol | method | steps x batch x seq | perplexity | top-1 agreement | gap closed vs hard | train s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key in ("teacher", "shipped_drafter"):
        if key in results:
            r = results[key]
            print(f"| - | {key} | - | {r['perplexity']:.3f} | {r['agreement']:.4f} | - | - |")
    for protocol in ("scratch", "finetune"):
        hard = results.get(f"{protocol}/hard", {}).get("perplexity")
        for name in ("hard", "kd", "data", "on_policy"):
            r = results.get(f"{protocol}/{name}")
            if r is None:
                continue
            closed = "-" if hard is None or t is None or name == "hard" else f"{(hard - r['perplexity']) / (hard - t):.2f}"
            print(f"| {protocol} | {name} | {r['steps']} x {args.batch_size} x {args.seq_len} | {r['perplexity']:.3f} | "
                  f"{r['agreement']:.4f} | {closed} | {r['train_s']} |")
    acc = {k.removeprefix("acceptance"): v for k, v in results.items() if k.startswith("acceptance")}
    if acc:
        print("\n| drafter | alpha (per token) | accepted / drafted | tokens per verify step |")
        print("| --- | --- | --- | --- |")
        for k, v in acc.items():
            print(f"| {k.lstrip('/')} | {v['alpha']:.3f} | {v['accepted_per_drafted']:.3f} | {v['tokens_per_verify_step']:.2f} |")
    qat = {k.removeprefix("qat/"): v for k, v in results.items() if k.startswith("qat/")}
    if qat:
        print("\n| W4 (w4a16-g128) teacher | perplexity | top-1 agreement with fp32 teacher |")
        print("| --- | --- | --- |")
        for k, v in qat.items():
            print(f"| {k} | {v['perplexity']:.3f} | {v['agreement']:.4f} |")


if __name__ == "__main__":
    sys.exit(main())
