"""Quantize the shipped teacher to int4 weights (GPTQ), check its perplexity, export it to ONNX and run it.

    python examples/quantize_and_export.py

Each step is a visible rewrite of the captured graph: ``insert-qdq`` puts kiln::quantize /
dequantize on the weights at the requested granularity, GPTQ chooses the codes with calibration
data, ``lower-qdq`` folds them into kiln::qlinear_w4a16; the ONNX export turns those into
MatMulNBits, checked in onnxruntime against kiln's own quantized graph.
"""

import tempfile
from pathlib import Path

import torch

from kiln.data import load_tokenizer
from kiln.eval import perplexity, resolve_tokens
from kiln.models import load_pretrained
from kiln.quantize import QuantConfig, quantize
from kiln.quantize.calibrate import calibration_tokens
from kiln.quantize.report import as_module

TEACHER = Path(__file__).resolve().parents[1] / "models" / "kiln-teacher"


def main() -> None:
    model = load_pretrained(str(TEACHER), dtype=torch.float32).eval()
    tok = load_tokenizer(str(TEACHER))
    calib = calibration_tokens(tok, 8 * 256, split="train")  # GPTQ's calibration: train split only
    config = QuantConfig.preset("w4a16-g128", method="gptq").with_calibration(calib, num_samples=8, seq_len=256,
                                                                                      progress=False)
    compiled = quantize(model, config)
    counts = compiled.node_counts()
    print(f"quantized linears: {counts.get('kiln.qlinear_w4a16', 0)}; passes: "
          f"{', '.join(r.name for r in compiled.report.records if r.modified)}")
    eval_tokens = resolve_tokens("eval", str(TEACHER))[: 4 * 256]
    ppl_fp = perplexity(model, eval_tokens, seq_len=256, progress=False)
    ppl_q = perplexity(as_module(compiled), eval_tokens, seq_len=256, batch_size=1, progress=False)  # batch 1: as captured
    print(f"perplexity on {eval_tokens.numel()} eval tokens: fp32 {ppl_fp:.3f}, int4 GPTQ {ppl_q:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        report = compiled.export_onnx(str(Path(tmp) / "teacher-int4.onnx"))
        print(f"{report.path.name}: opset {report.opset}, {report.model_bytes / 2**20:.1f} MiB, "
              f"{report.ort_op_counts.get('com.microsoft.MatMulNBits', 0)} MatMulNBits; onnxruntime vs kiln: "
              f"max relative error {report.max_rel_error:.1e} over {', '.join(report.checks)}")


if __name__ == "__main__":
    main()
