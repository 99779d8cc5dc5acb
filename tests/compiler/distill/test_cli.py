"""``kiln distill`` on the command line: tiny models with the shipped tokenizer, the eval split as data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kiln.cli import main
from kiln.distill import DataDistillation, KnowledgeDistillation, OnPolicyDistillation
from kiln.distill.cli import add_parser, method_from_args
from kiln.models import LlamaConfig, from_config, save_pretrained

SHIPPED = Path(__file__).parents[3] / "models" / "kiln-teacher"


def _folder(path: Path, seed: int, layers: int) -> str:
    config = LlamaConfig(
        vocab_size=8192,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
    )
    save_pretrained(from_config(config, seed=seed), path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHIPPED / name, path / name)
    return str(path)


def test_kiln_distill_trains_saves_and_resumes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher, student = _folder(tmp_path / "t", 1, 2), _folder(tmp_path / "s", 2, 1)
    out = tmp_path / "run"

    def argv(steps: int) -> list[str]:
        return [
            "distill",
            student,
            "--teacher",
            teacher,
            "--method",
            "kd",
            "--out",
            str(out),
            "--data",
            "eval",
            "--eval-tokens",
            "2000",
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--eval-every",
            "3",
            "--eval-batches",
            "2",
            "--ckpt-every",
            "3",
            "--no-progress",
            "--temperature",
            "2",
        ]

    assert main(argv(3)) == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement with teacher" in printed and "eval perplexity" in printed
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (out / "model" / name).is_file()
    summary = json.loads((out / "distill_summary.json").read_text())
    assert (
        summary["steps"] == 3 and summary["config"]["loss"]["temperature"] == 2.0 and "agreement" in summary
    )
    assert main(argv(4)) == 0  # the same run, longer: resumes from step 3
    assert "resumed from 3" in capsys.readouterr().out


def test_method_from_args() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["distill", "s", "--teacher", "t", "--out", "o"]
    kd = method_from_args(parser.parse_args([*base, "--top-k", "16", "--divergence", "reverse_kl"]))
    assert isinstance(kd, KnowledgeDistillation) and kd.top_k == 16 and kd.loss.divergence == "reverse_kl"
    hard = method_from_args(parser.parse_args([*base, "--method", "hard"]))
    assert isinstance(hard, KnowledgeDistillation) and hard.loss.hard_label_weight == 1.0
    data = method_from_args(parser.parse_args([*base, "--method", "data", "--keep-fraction", "0.5"]))
    assert (
        isinstance(data, DataDistillation)
        and data.keep_fraction == 0.5
        and data.loss.hard_label_weight == 1.0
    )
    gkd = method_from_args(parser.parse_args([*base, "--method", "on-policy", "--lmbda", "0.25"]))
    assert isinstance(gkd, OnPolicyDistillation) and gkd.lmbda == 0.25 and gkd.loss.divergence == "jsd"
