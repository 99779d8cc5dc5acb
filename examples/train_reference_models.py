"""Train kiln's reference models: a Llama-architecture teacher (~12.6M parameters) and
drafter (~1.8M), sharing one byte-level BPE tokenizer, on the standard-library corpus.

    python examples/train_reference_models.py                 # everything, on this machine
    python examples/train_reference_models.py --smoke --out /tmp/smoke   # 20 CPU steps, tiny models

The work splits into stages, so the corpus and tokenizer can be built on one machine and
the models trained on another (a GPU machine without the tokenizer's training data):

    --stage prepare   corpus (kiln.data), tokenizer, token streams as uint16 .npy in --data
    --stage train     train the models named by --models from --data's token streams
    --stage finalize  score the saved models on the committed eval split (CPU, fp32),
                      add tokenizer files and a README model card to each folder

Each model folder (``--out/kiln-teacher``, ``--out/kiln-drafter``) is Hugging Face format:
config.json, model.safetensors (bf16, tied embeddings), tokenizer files, train_log.jsonl,
README.md. A validation set for monitoring is held out of the training split by path hash
(kiln.data.holdout); the committed eval split is never trained on or monitored.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kiln.eval import agreement, mean_nll
from kiln.train import StepInfo, TrainConfig, train

SEED = 1234
VALID_FRACTION = 0.04
MODELS = ("teacher", "drafter")

# architecture of each model (transformers.LlamaConfig fields)
ARCH = {
    "teacher": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=2),
    "drafter": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2),
}
SMOKE_ARCH = {
    "teacher": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=2, num_key_value_heads=1),
    "drafter": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1),
}
TRAIN = {
    "teacher": TrainConfig(steps=3000, batch_size=32, seq_len=512, lr=1e-3, min_lr=1e-4, warmup_steps=200,
                           weight_decay=0.1, grad_clip=1.0, eval_every=250, eval_batches=None,
                           ckpt_every=1000, log_every=50, seed=SEED),
    "drafter": TrainConfig(steps=3000, batch_size=32, seq_len=512, lr=2e-3, min_lr=2e-4, warmup_steps=200,
                           weight_decay=0.1, grad_clip=1.0, eval_every=250, eval_batches=None,
                           ckpt_every=1000, log_every=50, seed=SEED),
}
SMOKE_EVAL_TOKENS = 4096
#: residual dropout while training (the data is small: the teacher overfits without it)
DROPOUT = {"teacher": 0.2, "drafter": 0.0}
SMOKE_TRAIN = TrainConfig(steps=20, batch_size=4, seq_len=64, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                          eval_every=10, eval_batches=2, ckpt_every=10, log_every=5, seed=SEED,
                          device="cpu", progress=False)


def prepare(data_dir: Path, *, smoke: bool) -> None:
    """Build the corpus, train the tokenizer, write token streams and meta.json to ``data_dir``."""
    from kiln.data import encode_documents, holdout, load_split, save_tokenizer, train_tokenizer

    t0 = time.perf_counter()
    train_docs = load_split("train")
    eval_docs = load_split("eval")
    if smoke:
        train_docs, eval_docs = train_docs[:40], eval_docs[:2]
    fit_docs, valid_docs = holdout(train_docs, VALID_FRACTION)
    if smoke and not valid_docs:
        fit_docs, valid_docs = train_docs[:-4], train_docs[-4:]
    vocab = 512 if smoke else 8192
    print(f"corpus: {len(train_docs)} train documents ({sum(len(d.text) for d in train_docs):,} chars), "
          f"{len(valid_docs)} of them held out for validation; {len(eval_docs)} eval documents")
    tok = train_tokenizer((d.text for d in train_docs), vocab_size=vocab, length=len(train_docs))
    save_tokenizer(tok, data_dir / "tokenizer", model_max_length=512)
    meta: dict[str, object] = {"python": platform.python_version(), "vocab_size": tok.get_vocab_size(),
                               "seed": SEED, "valid_fraction": VALID_FRACTION}
    for name, docs in (("train", fit_docs), ("valid", valid_docs), ("eval", eval_docs)):
        ids = encode_documents(tok, docs, progress=False).numpy()
        assert ids.max() < 2**16
        np.save(data_dir / f"{name}.npy", ids.astype(np.uint16))
        meta[f"{name}_documents"] = len(docs)
        meta[f"{name}_tokens"] = int(ids.size)
        print(f"  {name}: {len(docs)} documents, {ids.size:,} tokens")
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"prepared {data_dir} in {time.perf_counter() - t0:.1f}s")


def load_stream(data_dir: Path, name: str) -> torch.Tensor:
    return torch.from_numpy(np.load(data_dir / f"{name}.npy").astype(np.int64))


def build_model(kind: str, vocab_size: int, *, smoke: bool, seq_len: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = (SMOKE_ARCH if smoke else ARCH)[kind]
    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=seq_len, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                         initializer_range=0.02, **arch)
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config)


def add_residual_dropout(model: torch.nn.Module, p: float) -> None:
    """Dropout (Srivastava et al., JMLR 2014) on each attention and MLP output and on the
    embeddings, in training mode only, as GPT-2's residual dropout; forward hooks, so the
    saved model and its config are unchanged."""
    if p <= 0:
        return

    def hook(module: torch.nn.Module, _inputs: object, output: object) -> object:
        if not module.training:
            return output
        if isinstance(output, tuple):
            return (torch.nn.functional.dropout(output[0], p, True), *output[1:])
        return torch.nn.functional.dropout(output, p, True)  # type: ignore[arg-type]

    for name, module in model.named_modules():
        if name.endswith((".self_attn", ".mlp", "embed_tokens")):
            module.register_forward_hook(hook)


def train_model(kind: str, args: argparse.Namespace) -> Path:
    """Train one model from ``args.data``'s streams; save it (bf16) to ``args.out/kiln-{kind}``."""
    data_dir = Path(args.data)
    meta = json.loads((data_dir / "meta.json").read_text())
    config = SMOKE_TRAIN if args.smoke else TRAIN[kind]
    steps = getattr(args, f"{kind}_steps")
    if steps is not None:
        config = dataclasses.replace(config, steps=steps, ckpt_every=min(config.ckpt_every, steps))
    if args.device is not None:
        config = dataclasses.replace(config, device=args.device)
    if args.no_progress:
        config = dataclasses.replace(config, progress=False)
    model = build_model(kind, meta["vocab_size"], smoke=args.smoke, seq_len=config.seq_len)
    dropout = DROPOUT[kind] if args.dropout is None else args.dropout
    add_residual_dropout(model, dropout)
    n_params = sum(p.numel() for p in model.parameters())
    train_tokens, valid_tokens = load_stream(data_dir, "train"), load_stream(data_dir, "valid")
    print(f"{kind}: {n_params:,} parameters, {train_tokens.numel():,} training tokens, "
          f"{config.steps} steps of {config.batch_size}x{config.seq_len} "
          f"({config.steps * config.batch_size * config.seq_len / train_tokens.numel():.1f} epochs)", flush=True)

    deadline = time.perf_counter() + args.time_limit if args.time_limit else None

    best: dict[str, object] = {"loss": math.inf, "step": None, "state": None}

    def report(info: StepInfo) -> bool:
        if info.eval_loss is not None and args.keep_best and info.eval_loss < best["loss"]:  # type: ignore[operator]
            best.update(loss=info.eval_loss, step=info.step,
                        state={k: v.detach().to("cpu", copy=True) for k, v in info.model.state_dict().items()})
        if info.eval_loss is not None:
            print(f"{kind} step {info.step}: train loss {info.loss:.4f}, valid loss {info.eval_loss:.4f} "
                  f"(ppl {math.exp(info.eval_loss):.2f}), lr {info.lr:.2e}", flush=True)
        return deadline is not None and time.perf_counter() > deadline

    work = Path(args.work) / kind
    result = train(model, train_tokens, config, eval_tokens=valid_tokens, out_dir=work, callbacks=[report])
    valid_loss = result.eval_loss
    if best["state"] is not None and best["loss"] < result.eval_loss:  # type: ignore[operator]
        model.load_state_dict(best["state"])  # type: ignore[arg-type]
        valid_loss = best["loss"]
        print(f"{kind}: keeping the weights of step {best['step']} (lowest validation loss {valid_loss:.4f})")
    eval_tokens = load_stream(data_dir, "eval")[: SMOKE_EVAL_TOKENS if args.smoke else None]
    with torch.autocast(device_type=config.resolved_device().type, dtype=torch.bfloat16,
                        enabled=config.resolved_device().type == "cuda"):
        eval_loss = mean_nll(model, eval_tokens, seq_len=config.seq_len, batch_size=16, progress=False)
    print(f"{kind}: done in {result.elapsed_s:.0f}s at step {result.step}"
          f"{' (stopped by --time-limit)' if result.stopped_early else ''}; train loss {result.train_loss:.4f}, "
          f"valid loss {valid_loss:.4f}, eval-split perplexity {math.exp(eval_loss):.3f}", flush=True)

    folder = Path(args.out) / f"kiln-{kind}"
    folder.mkdir(parents=True, exist_ok=True)
    model.to(device="cpu", dtype=torch.bfloat16)
    tmp = work / "hf"
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(tmp / name, folder / name)
    shutil.copyfile(work / "train_log.jsonl", folder / "train_log.jsonl")
    summary = {"model": kind, "params": n_params, "steps": result.step, "stopped_early": result.stopped_early,
               "train_loss": result.train_loss, "valid_loss": valid_loss, "eval_loss_bf16": eval_loss,
               "best_step": best["step"] if valid_loss != result.eval_loss else result.step,
               "dropout": dropout, "keep_best": args.keep_best,
               "elapsed_s": round(result.elapsed_s, 1), "device": str(config.resolved_device()),
               "torch": torch.__version__, "train_config": dataclasses.asdict(config)}
    with (folder / "train_log.jsonl").open("a") as f:
        f.write(json.dumps({"event": "summary", **summary}) + "\n")
    return folder


def finalize(args: argparse.Namespace) -> dict[str, float]:
    """Score saved models on the eval split (CPU, fp32); add tokenizer files and README.md."""
    from kiln.eval import load_model

    data_dir, out = Path(args.data), Path(args.out)
    seq_len = (SMOKE_TRAIN if args.smoke else TRAIN["teacher"]).seq_len
    eval_tokens = load_stream(data_dir, "eval")
    max_tokens = args.max_eval_tokens or (SMOKE_EVAL_TOKENS if args.smoke else None)
    if max_tokens:
        eval_tokens = eval_tokens[:max_tokens]
    models, numbers = {}, {}
    for kind in args.models:
        folder = out / f"kiln-{kind}"
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copyfile(data_dir / "tokenizer" / name, folder / name)
        models[kind] = load_model(folder, dtype=torch.float32)
        nll = mean_nll(models[kind], eval_tokens, seq_len=seq_len, batch_size=8)
        numbers[f"{kind}_ppl"] = math.exp(nll)
        print(f"{kind}: eval-split perplexity {math.exp(nll):.3f} ({eval_tokens.numel():,} tokens, fp32 on CPU)")
    if set(MODELS) <= set(models):
        numbers["agreement"] = agreement(models["drafter"], models["teacher"], eval_tokens, seq_len=seq_len,
                                         batch_size=8)
        print(f"drafter/teacher top-1 agreement: {numbers['agreement']:.4f}")
    for kind, model in models.items():
        write_card(out / f"kiln-{kind}", kind, model, numbers, int(eval_tokens.numel()), seq_len)
    return numbers


def write_card(folder: Path, kind: str, model: torch.nn.Module, numbers: dict[str, float],
               n_eval: int, seq_len: int) -> None:
    log = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines() if line.strip()]
    summary = next((r for r in reversed(log) if r.get("event") == "summary"), {})
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"# kiln-{kind}",
        "",
        f"A {n_params / 1e6:.2f}M-parameter Llama-architecture causal LM trained by kiln "
        f"(`examples/train_reference_models.py`) on the Python standard library's source and pydoc text "
        f"(`kiln.data`), as the {'target' if kind == 'teacher' else 'draft model'} for kiln's quality figures.",
        "",
        "| | |",
        "| --- | --- |",
        f"| parameters | {n_params:,} (tied input/output embeddings) |",
        f"| layers / hidden / heads / kv heads / MLP | {cfg.num_hidden_layers} / {cfg.hidden_size} / "
        f"{cfg.num_attention_heads} / {cfg.num_key_value_heads} / {cfg.intermediate_size} |",
        f"| vocabulary | {cfg.vocab_size} (byte-level BPE, `<|bos|>`=0 `<|eos|>`=1 `<|pad|>`=2) |",
        f"| context | {seq_len} tokens |",
        "| weights | bf16 safetensors |",
        f"| eval-split perplexity | **{numbers[f'{kind}_ppl']:.3f}** ({n_eval:,} tokens of "
        f"`kiln/data/eval_split.jsonl.xz`, windows of {seq_len}, fp32 on CPU) |",
    ]
    if "agreement" in numbers:
        lines.append(f"| drafter/teacher top-1 agreement | {numbers['agreement']:.4f} |")
    if summary:
        tc = summary.get("train_config", {})
        lines += [
            f"| training | {summary['steps']} steps x {tc.get('batch_size')} x {tc.get('seq_len')} tokens, "
            f"AdamW lr {tc.get('lr')} -> {tc.get('min_lr')} cosine, warmup {tc.get('warmup_steps')}, "
            f"weight decay {tc.get('weight_decay')}, residual dropout {summary.get('dropout', 0.0)}, "
            f"seed {tc.get('seed')}, {summary.get('elapsed_s')} s on "
            f"{summary.get('device')} (torch {summary.get('torch')}) |",
            f"| final losses | train {summary['train_loss']:.4f}, validation {summary['valid_loss']:.4f} (nats) |",
        ]
    lines += [
        "",
        "Load with `transformers.AutoModelForCausalLM.from_pretrained(folder)` and "
        "`transformers.AutoTokenizer.from_pretrained(folder)`. Score with "
        "`python -m kiln.eval models/kiln-teacher --draft models/kiln-drafter`.",
        "Reproduce with `python examples/train_reference_models.py` (its defaults are this model's "
        "configuration; a GPU is assumed). The full training log is `train_log.jsonl`.",
        "",
    ]
    (folder / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=["all", "prepare", "train", "finalize"], default="all")
    parser.add_argument("--models", default="teacher,drafter", help="comma-separated: teacher,drafter")
    parser.add_argument("--out", default="models", help="where kiln-teacher/ and kiln-drafter/ are written")
    parser.add_argument("--data", default=".kiln-data", help="corpus token streams and tokenizer")
    parser.add_argument("--work", default=".kiln-train", help="checkpoints and logs during training")
    parser.add_argument("--teacher-steps", type=int, default=None)
    parser.add_argument("--drafter-steps", type=int, default=None)
    parser.add_argument("--device", default=None, help="training device (default: cuda if available)")
    parser.add_argument("--dropout", type=float, default=None, help="residual dropout (default: per model)")
    parser.add_argument("--keep-best", action="store_true",
                        help="keep the weights of the evaluation with the lowest validation loss")
    parser.add_argument("--time-limit", type=float, default=None, help="stop each model's training after N s")
    parser.add_argument("--max-eval-tokens", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 20 CPU steps: a test of the script")
    args = parser.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    if unknown := set(args.models) - set(MODELS):
        parser.error(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    data_dir = Path(args.data)
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.stage in ("all", "prepare"):
        prepare(data_dir, smoke=args.smoke)
    if args.stage in ("all", "train"):
        for kind in args.models:
            train_model(kind, args)
    if args.stage in ("all", "finalize"):
        finalize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
