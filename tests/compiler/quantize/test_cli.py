"""Tests of ``compiler/quantize/cli.py``: the ``kiln quantize`` sub-command."""

from __future__ import annotations

import argparse
import io
import json

from rich.console import Console

from kiln.quantize.cli import add_parser, run


def _run(argv: list[str]) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="kiln")
    add_parser(parser.add_subparsers(dest="command"))
    out = io.StringIO()
    code = run(parser.parse_args(argv), Console(file=out, width=200))
    return code, out.getvalue()


def test_quantize_with_report(tmp_path) -> None:
    report = tmp_path / "report.json"
    code, out = _run(["quantize", "llama-tiny", "--preset", "w8a8", "--calib-samples", "2", "--seq-len", "64",
                      "--report", "--json", str(report)])
    assert code == 0
    assert "insert-qdq: layers_skipped=1" in out and "qlinear_w8a8=14" in out
    assert "graph constants:" in out and "random tokens" in out
    assert "model.layers.1.mlp.down_proj" in out and "perplexity:" in out
    rows = json.loads(report.read_text())
    assert len(rows["layers"]) == 14 and rows["perplexity_q"] > 1


def test_quantize_options() -> None:
    code, out = _run(["quantize", "llama-tiny", "--preset", "w8a16", "--method", "gptq", "--act-order",
                      "--skip", "lm_head,mlp", "--calib-samples", "2", "--seq-len", "32"])
    assert code == 0 and "method gptq" in out and "qlinear_w8a16=8" in out
