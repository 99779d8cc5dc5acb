"""kiln: an inference compiler and runtime for transformer language models.

``kiln.compile(model, example_inputs)`` captures a model with ``torch.export``, rewrites
it with a pipeline of inspectable passes and returns a callable with the model's own
calling convention. See ``kiln.pipeline`` for the passes, ``kiln.ir`` for the IR.
"""

from kiln import (
    distill,  # kiln.distill(student, teacher, data, method=...) and its package
    ops,  # noqa: F401  (registers the kiln:: operators)
)
from kiln.capture import Capture, capture
from kiln.compile import CompileConfig, CompiledModel, compile
from kiln.errors import (
    CapacityError,
    ConfigError,
    ExportError,
    KilnError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)
from kiln.parallel import ParallelConfig
from kiln.pass_manager import Pass, PassManager, PassResult
from kiln.quantize import PerAxis, PerGroup, PerTensor, PerToken, QuantConfig, QuantSpec
from kiln.runtime.engine import LLM
from kiln.runtime.request import RequestOutput, SamplingParams
from kiln.runtime.speculative import SpeculativeConfig

__version__ = "0.1.0"

if __import__("torch").cuda.is_available():  # Triton kernels become the CUDA implementations of kiln ops
    try:
        from kiln.backends.triton import register_cuda_kernels

        register_cuda_kernels()
    except ImportError:
        import warnings

        warnings.warn("triton is not installed: kiln ops run their plain-torch reference on CUDA", stacklevel=1)

__all__ = [
    "CapacityError",
    "Capture",
    "CompileConfig",
    "CompiledModel",
    "ConfigError",
    "ExportError",
    "KilnError",
    "LLM",
    "Pass",
    "PassError",
    "PassManager",
    "ParallelConfig",
    "PassResult",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QuantConfig",
    "QuantSpec",
    "RequestOutput",
    "SamplingParams",
    "SpeculativeConfig",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
    "capture",
    "compile",
    "distill",
]
