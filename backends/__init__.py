"""kiln.backends: where a rewritten graph runs.

``eager`` runs the graph with the plain-torch reference implementation of every op: the
oracle for every test. Other backends (``triton``, ``onnx``, ``mlir``) register here as
they land; asking for one that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.fx import GraphModule

from kiln.errors import ConfigError

Lowering = Callable[[GraphModule], Callable[..., object]]

#: backend name -> function lowering a rewritten graph to a callable taking flat inputs.
BACKENDS: dict[str, Lowering] = {}

#: backends that are planned but not built yet, with where they come from.
PLANNED = {
    "onnx": "running the graph through onnxruntime as a callable; export it with CompiledModel.export_onnx(path) "
    "and run it with onnxruntime or kiln.backends.onnx.OrtGenerator",
}


def register_backend(name: str, lower: Lowering) -> None:
    """Make ``name`` usable as ``CompileConfig(backend=name)``."""
    BACKENDS[name] = lower


def get_backend(name: str) -> Lowering:
    """The lowering of backend ``name``; ConfigError naming the available ones otherwise."""
    if name not in BACKENDS:
        from kiln.backends import eager  # noqa: F401  (registers itself)
    if name == "triton" and name not in BACKENDS:
        try:
            from kiln.backends import triton  # noqa: F401  (registers itself)
        except ImportError as e:
            raise ConfigError(f"backend 'triton' needs the triton package: pip install 'kiln[gpu]' ({e})") from e
    if name in BACKENDS:
        return BACKENDS[name]
    if name in PLANNED:
        raise ConfigError(f"backend {name!r} is not built yet ({PLANNED[name]}); available: {sorted(BACKENDS)}")
    raise ConfigError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}")


__all__ = ["BACKENDS", "PLANNED", "get_backend", "register_backend"]
