"""kiln.quantize: post-training quantization as visible rewrites of the IR.

One way in, through the compiler (quantization is phase 3 of the pipeline)::

    config = kiln.QuantConfig.preset("w4a16-g128", method="gptq").with_calibration(tokens)
    compiled = kiln.compile(model, (ids,), config=kiln.CompileConfig(quant=config))

and a front end doing exactly that, with the calibration data as an argument::

    compiled = kiln.quantize.quantize(model, "w4a16-g128", tokens, method="gptq")

The pipeline gains ``insert-qdq`` (Q/DQ pairs on weights and activations, calibration, the
PTQ method), ``lower-qdq`` (Q/DQ + linear -> ``kiln::qlinear_*`` holding packed codes) and
``eliminate-dead-code``. ``CompileConfig(disable=("lower-qdq",))`` keeps the Q/DQ form (to
inspect it, or for export as ONNX QuantizeLinear/DequantizeLinear). ``report.quant_report`` measures
what it cost: per-layer weight and output errors, memory before/after, perplexity.

Quantization-aware training (:mod:`kiln.quantize.qat`) trains through the same Q/DQ graph::

    qat = kiln.quantize.prepare_qat(model, config, example_inputs)   # trainable nn.Module (kiln.fake_quantize, STE)
    kiln.train.train(qat, train_tokens, TrainConfig(...), loss_fn=...)  # any loss: distillation included
    compiled = kiln.quantize.convert_qat(qat)                         # CompiledModel with kiln::qlinear_*

Modules: ``config`` (QuantConfig, QuantSpec, granularities, presets), ``ops`` (the kiln::
quantization operators and their references), ``observers`` (ranges and scales),
``calibrate`` (the prepared graph), ``methods`` (RTN, GPTQ, AWQ, SmoothQuant), ``qat``
(quantization-aware training), ``report``, ``cli`` (``kiln quantize``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from kiln.quantize import ops  # noqa: F401  (registers kiln::quantize, kiln::dequantize, kiln::qlinear_*)
from kiln.quantize.config import (
    AWQ,
    GPTQ,
    PRESETS,
    RTN,
    Calibration,
    PerAxis,
    PerGroup,
    PerTensor,
    PerToken,
    QuantConfig,
    QuantSpec,
    SmoothQuant,
)
from kiln.quantize.qat import QATModel, convert_qat, prepare_qat


def quantize(
    model: torch.nn.Module,
    config: QuantConfig | str,
    calibration_data: Any = None,
    *,
    example_inputs: Any = None,
    compile_config: Any = None,
    progress: Any = None,
    **overrides: Any,
) -> Any:
    """Quantize ``model`` with ``config`` (a QuantConfig or a preset name) and compile it.

    Args:
        model: the model to quantize; it is not modified.
        config: a :class:`QuantConfig` or a preset name (``w8a16``, ``w4a16-g128``, ``w8a8``, ``fp8``).
        calibration_data: calibration inputs (see :mod:`kiln.quantize.calibrate`); needed by
            GPTQ, AWQ, SmoothQuant and static activation scales.
        example_inputs: inputs to capture with; default ``input_ids`` of 8 tokens. The token
            axis is dynamic; pass ``compile_config=CompileConfig(dynamic={"input_ids": {0: "B", 1: "T"}})``
            for a dynamic batch as well.
        compile_config: a base :class:`kiln.CompileConfig` (its ``quant`` is replaced).
        progress: the ``kiln.compile`` progress callback.
        **overrides: QuantConfig fields, e.g. ``method="gptq"``, ``skip=()``.

    Returns:
        the :class:`kiln.CompiledModel`, called like ``model``.
    """
    from kiln.compile import CompileConfig, compile

    if isinstance(config, str):
        config = QuantConfig.preset(config, **overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if calibration_data is not None:
        config = config.with_calibration(calibration_data)
    base = compile_config or CompileConfig()
    if example_inputs is None:
        vocab = int(getattr(getattr(model, "config", None), "vocab_size", 256))
        example_inputs = (torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0)),)
    return compile(model, example_inputs, config=dataclasses.replace(base, quant=config), progress=progress)


__all__ = [
    "AWQ",
    "GPTQ",
    "PRESETS",
    "RTN",
    "Calibration",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QATModel",
    "QuantConfig",
    "QuantSpec",
    "SmoothQuant",
    "convert_qat",
    "prepare_qat",
    "quantize",
]
