"""QAT with a teacher: the fake-quantized student (kiln.quantize.prepare_qat) learns from the full-precision teacher."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

import kiln
from kiln.distill import DistillConfig, LossConfig, QATDistillation, distill
from kiln.eval import logits_of
from kiln.quantize import PerAxis, QuantConfig
from kiln.train import TrainConfig


def test_qat_with_teacher_lowers_its_loss_and_converts(
    teacher: nn.Module, tokens: torch.Tensor, eval_tokens: torch.Tensor, tmp_path: Path
) -> None:
    # W4 per output channel: coarse enough on hidden 32 that quantization costs something to recover
    w4 = QuantConfig.preset("w4a16-g128")
    quant = dataclasses.replace(w4, weights=dataclasses.replace(w4.weights, granularity=PerAxis(0)))
    tc = TrainConfig(
        steps=8,
        batch_size=4,
        seq_len=24,
        lr=3e-4,
        min_lr=3e-5,
        warmup_steps=1,
        eval_every=4,
        eval_batches=2,
        ckpt_every=4,
        log_every=2,
        seed=3,
        device="cpu",
        progress=False,
    )
    before = copy.deepcopy(teacher.state_dict())
    result = distill(
        teacher,  # the student is the teacher itself: a W4 deployment of it
        teacher,
        tokens,
        method=QATDistillation(quant=quant, loss=LossConfig(divergence="forward_kl")),
        config=DistillConfig(train=tc),
        eval_data=eval_tokens,
        out_dir=tmp_path,
    )
    curve = [r["loss"] for r in result.train.history if r["event"] == "train"]
    assert curve[-1] < curve[0], curve
    assert result.method == "qat" and result.agreement is not None and result.agreement > 0.5
    for name, value in teacher.state_dict().items():  # the teacher is never trained
        assert torch.equal(value, before[name]), name
    # the deployed form (qlinear with packed int4 codes) computes what the trained fake-quant graph computes
    assert isinstance(result.converted, kiln.CompiledModel)
    assert "qlinear" in result.converted.ir
    x = eval_tokens[:40][None]
    with torch.no_grad():
        torch.testing.assert_close(
            logits_of(result.converted(x)), logits_of(result.student(x)), rtol=1e-4, atol=1e-4
        )
    # training moved the quantized student toward the teacher: its KL to the teacher fell
    with torch.no_grad():
        p = torch.log_softmax(teacher(x), -1)
        fresh = kiln.quantize.prepare_qat(teacher, quant)
        kl_before = torch.nn.functional.kl_div(
            torch.log_softmax(logits_of(fresh(x)), -1), p, log_target=True, reduction="batchmean"
        )
        kl_after = torch.nn.functional.kl_div(
            torch.log_softmax(logits_of(result.student(x)), -1), p, log_target=True, reduction="batchmean"
        )
    assert kl_after < kl_before
    assert (
        result.model_dir is None
    )  # a quantized graph is not a Hugging Face folder; result.converted is the model
