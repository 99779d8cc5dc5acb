"""kiln's typed exceptions.

Every error says what was wrong and what to do about it. They all derive from
:class:`KilnError`, so a caller can catch kiln's failures without catching bugs.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class of every error kiln raises on purpose."""


class ConfigError(KilnError, ValueError):
    """A configuration value is invalid; the message names the field and a valid choice."""


class UnsupportedModelError(KilnError):
    """The model cannot be captured or compiled; the message names the construct and what to try."""


class ExportError(KilnError):
    """Exporting a compiled model to another format (ONNX, MLIR, a saved program) failed."""


class CapacityError(KilnError):
    """A request does not fit the configured memory (KV blocks, token budget)."""


class VerificationError(KilnError):
    """The IR is malformed: a verifier check failed. The message names the node."""


class PassError(KilnError):
    """A pass failed; the message names the pass, the passes before it and the node."""


__all__ = [
    "CapacityError",
    "ConfigError",
    "ExportError",
    "KilnError",
    "PassError",
    "UnsupportedModelError",
    "VerificationError",
]
