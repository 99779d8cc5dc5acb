"""kiln.backends.onnx: the compiled graph as an ONNX artifact, and a generation loop on ONNX Runtime.

``export_onnx(compiled, path)`` writes what kiln's passes produced (``kiln::`` ops through
:mod:`~kiln.backends.onnx.translations`, quantized ops through
:mod:`~kiln.backends.onnx.quant_translations`), validated in onnxruntime against eager;
``export_onnx(..., kv_cache=True)`` writes the decoder with past/present K/V that
:class:`OrtGenerator` drives, speculatively too (:mod:`~kiln.backends.onnx.speculative`).
"""

from kiln.backends.onnx import quant_translations  # noqa: F401  (registers the quantized ops' translations)
from kiln.backends.onnx.export import EXTERNAL_DATA_THRESHOLD, OnnxExportReport, export_onnx
from kiln.backends.onnx.generator import OrtGenerator
from kiln.backends.onnx.speculative import OrtDraftModelDrafter
from kiln.backends.onnx.translations import TRANSLATIONS, register_translation

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "TRANSLATIONS",
    "OnnxExportReport",
    "OrtDraftModelDrafter",
    "OrtGenerator",
    "export_onnx",
    "register_translation",
]
