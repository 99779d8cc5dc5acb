"""kiln: an inference compiler and runtime for transformer language models."""

from kiln.errors import (
    CapacityError,
    ConfigError,
    ExportError,
    KilnError,
    PassError,
    UnsupportedModelError,
    VerificationError,
)

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "ConfigError",
    "ExportError",
    "KilnError",
    "PassError",
    "UnsupportedModelError",
    "VerificationError",
    "__version__",
]
