"""Quantization configs: what to quantize, to which format, at which granularity, by which method.

After torchao's configs (frozen dataclasses; granularity is a small family of frozen
dataclasses; the method is a config whose *type* selects its handler in
:mod:`kiln.quantize.methods`). Invalid combinations raise :class:`kiln.ConfigError` saying
what to change; checks that need the model's shapes (a group size that must divide every
quantized layer's input dimension, skip patterns that must match something) run when the
config meets the model (:meth:`QuantConfig.check_model`, called by ``kiln.compile``).

Scale shapes, for a tensor ``x`` (weights are ``W (N, K)``: out features, in features):

============== ================================= ======================== =============================
granularity    one scale per                      scale shape               e.g. W (N, K)
============== ================================= ======================== =============================
PerTensor()    the whole tensor                   ``()``                    ``()``
PerAxis(0)     slice along ``axis``               ``(x.shape[axis],)``      ``(N,)`` (per output channel)
PerGroup(g)    ``g`` consecutive elements of the  ``(*x.shape[:-1], K//g)`` ``(N, K // g)``
               last axis
PerToken()     row (all axes but the last)        ``(*x.shape[:-1], 1)``    (activations only)
============== ================================= ======================== =============================

Zero points (asymmetric integer formats) have the scale's shape and the codes' dtype.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.errors import ConfigError

# --------------------------------------------------------------------------------------
# Granularities
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PerTensor:
    """One scale (and zero point) for the whole tensor: scale shape ``()``."""


@dataclass(frozen=True)
class PerAxis:
    """One scale per slice along ``axis``: scale shape ``(x.shape[axis],)``. Weights: ``axis=0``."""

    axis: int = 0


@dataclass(frozen=True)
class PerGroup:
    """One scale per ``group_size`` consecutive elements of the last axis (K for weights)."""

    group_size: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 2:
            raise ConfigError(f"PerGroup(group_size={self.group_size!r}): the group size must be an integer >= 2")


@dataclass(frozen=True)
class PerToken:
    """One scale per token (every axis but the last), computed at run time: activations only."""


Granularity = PerTensor | PerAxis | PerGroup | PerToken
_GRANULARITIES = (PerTensor, PerAxis, PerGroup, PerToken)


def scale_shape(shape: Sequence[int], granularity: Granularity) -> tuple[int, ...]:
    """The documented scale shape of a tensor of ``shape`` quantized at ``granularity``."""
    if isinstance(granularity, PerTensor):
        return ()
    if isinstance(granularity, PerAxis):
        return (shape[granularity.axis],)
    if isinstance(granularity, PerGroup):
        return (*shape[:-1], shape[-1] // granularity.group_size)
    return (*shape[:-1], 1)


# --------------------------------------------------------------------------------------
# Formats and specs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Format:
    """A quantized number format: its storage dtype and code range."""

    name: str  # "int8", "int4", "fp8_e4m3"
    storage: torch.dtype  # dtype of the codes in the Q/DQ graph (int4 codes live in int8)
    bits: int  # bits per code once packed
    symmetric_range: tuple[int, int]  # (qmin, qmax) with symmetric=True
    asymmetric_range: tuple[int, int] | None  # (qmin, qmax) with symmetric=False; None: no zero point

    @property
    def is_float(self) -> bool:
        return self.storage.is_floating_point


FORMATS: dict[str, Format] = {
    "int8": Format("int8", torch.int8, 8, (-128, 127), (-128, 127)),
    "int4": Format("int4", torch.int8, 4, (-8, 7), (0, 15)),
    "fp8_e4m3": Format("fp8_e4m3", torch.float8_e4m3fn, 8, (-448, 448), None),
}
_DTYPE_ALIASES = {torch.int8: "int8", torch.float8_e4m3fn: "fp8_e4m3", "fp8": "fp8_e4m3", "e4m3": "fp8_e4m3"}
OBSERVERS = ("minmax", "percentile", "mse")


@dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How one kind of tensor (weights, activations, KV cache) is quantized."""

    dtype: str = "int8"  # "int8", "int4" or "fp8_e4m3" (torch.int8 / torch.float8_e4m3fn accepted)
    granularity: Granularity = PerAxis(0)  # see the table in the module docstring
    symmetric: bool = True  # False: integer formats get a zero point (asymmetric range)
    dynamic: bool = False  # activations: scales computed at run time from each input
    observer: str = "minmax"  # how static ranges are chosen: "minmax", "percentile" or "mse"
    percentile: float = 99.99  # the percentile observer's clipping percentile

    def __post_init__(self) -> None:
        dtype = _DTYPE_ALIASES.get(self.dtype, self.dtype)  # type: ignore[call-overload]
        if dtype not in FORMATS:
            raise ConfigError(f"QuantSpec.dtype={self.dtype!r} is not a quantized format; use one of {list(FORMATS)}")
        object.__setattr__(self, "dtype", dtype)
        if not isinstance(self.granularity, _GRANULARITIES):
            raise ConfigError(
                f"QuantSpec.granularity={self.granularity!r}: use PerTensor(), PerAxis(axis), PerGroup(size) or PerToken()"
            )
        if self.observer not in OBSERVERS:
            raise ConfigError(f"QuantSpec.observer={self.observer!r}: use one of {list(OBSERVERS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"QuantSpec.percentile={self.percentile}: use a value in (50, 100], e.g. 99.99")
        if self.format.is_float and not self.symmetric:
            raise ConfigError(f"{self.dtype} has no zero point: set symmetric=True")
        if self.format.is_float and isinstance(self.granularity, PerGroup):
            raise ConfigError(f"{self.dtype} is scaled per tensor, per channel or per token: use PerAxis(0) or PerTensor()")
        if self.dtype == "int4" and isinstance(self.granularity, PerGroup) and self.granularity.group_size % 2:
            raise ConfigError(
                f"int4 codes are packed two per byte along K: use an even group size, not {self.granularity.group_size}"
            )

    @property
    def format(self) -> Format:
        return FORMATS[self.dtype]

    @property
    def qmin(self) -> int:
        return self.qrange[0]

    @property
    def qmax(self) -> int:
        return self.qrange[1]

    @property
    def qrange(self) -> tuple[int, int]:
        fmt = self.format
        return fmt.symmetric_range if self.symmetric or fmt.asymmetric_range is None else fmt.asymmetric_range

    @property
    def storage(self) -> torch.dtype:
        return self.format.storage

    def describe(self) -> str:
        """Short text: ``int4 g128 asym``, ``int8 per-channel``, ``int8 per-token dynamic``."""
        g = self.granularity
        gran = {PerTensor: "per-tensor", PerToken: "per-token"}.get(type(g))
        if isinstance(g, PerAxis):
            gran = "per-channel" if g.axis == 0 else f"per-axis({g.axis})"
        if isinstance(g, PerGroup):
            gran = f"g{g.group_size}"
        return f"{self.dtype} {gran}" + ("" if self.symmetric else " asym") + (" dynamic" if self.dynamic else "")


# --------------------------------------------------------------------------------------
# Methods: the handler of each lives in kiln.quantize.methods, looked up by type.
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RTN:
    """Round to nearest: each weight group is scaled by its observer's range and rounded."""

    name = "rtn"


@dataclass(frozen=True, kw_only=True)
class GPTQ:
    """GPTQ (Frantar et al. 2022): column-by-column rounding with second-order error feedback."""

    name = "gptq"
    block_size: int = 128  # columns updated lazily per block
    damp: float = 0.01  # fraction of the Hessian's mean diagonal added to its diagonal
    act_order: bool = True  # quantize columns by decreasing Hessian diagonal (static groups: no run-time cost)
    sequential: bool = False  # True: each block's Hessians come from inputs through the already-quantized blocks
    mse: bool = True  # search each group's range for the least squared rounding error (else the spec's observer)

    def __post_init__(self) -> None:
        if self.block_size < 1 or not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"GPTQ(block_size={self.block_size}, damp={self.damp}): need block_size >= 1, 0 <= damp < 1")


@dataclass(frozen=True, kw_only=True)
class AWQ:
    """AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then weight clipping."""

    name = "awq"
    grid: int = 20  # candidate exponents alpha = i / grid for s = mean|x|^alpha
    duo_scaling: bool = True  # s = mean|x|^alpha / mean|w|^(1 - alpha) (AutoAWQ's default) rather than mean|x|^alpha
    clip: bool = True  # also search a per-group clipping of the weight range
    max_shrink: float = 0.5  # clipping tries ranges down to (1 - max_shrink) of the min-max range
    tokens: int = 1024  # calibration tokens kept per layer input for the searches
    sequential: bool = False  # True: each block is searched on inputs through the already-quantized blocks

    def __post_init__(self) -> None:
        if self.grid < 1 or not 0.0 <= self.max_shrink < 1.0 or self.tokens < 16:
            raise ConfigError(f"AWQ(grid={self.grid}, max_shrink={self.max_shrink}, tokens={self.tokens}) out of range")


@dataclass(frozen=True, kw_only=True)
class SmoothQuant:
    """SmoothQuant (Xiao et al. 2022): migrate activation outliers into the weights (W8A8)."""

    name = "smoothquant"
    alpha: float = 0.5  # migration strength: s_j = max|x_j|^alpha / max|w_j|^(1 - alpha)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"SmoothQuant(alpha={self.alpha}): alpha must be in [0, 1]")


Method = RTN | GPTQ | AWQ | SmoothQuant
METHODS: dict[str, type] = {"rtn": RTN, "gptq": GPTQ, "awq": AWQ, "smoothquant": SmoothQuant}


# --------------------------------------------------------------------------------------
# Calibration and the whole config
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """Where calibration inputs come from and how many run through the prepared graph."""

    data: Any = field(default=None, compare=False, repr=False)  # see kiln.quantize.calibrate.samples_of
    num_samples: int = 128  # windows (or given samples) run through the graph (GPTQ's paper: 128)
    seq_len: int = 512  # tokens per window when ``data`` is a token stream
    tokenizer: Any = field(default=None, compare=False, repr=False)  # for a kiln.data split name
    progress: bool = True  # tqdm bar while calibrating

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.seq_len < 2:
            raise ConfigError(f"Calibration(num_samples={self.num_samples}, seq_len={self.seq_len}): need >= 1 and >= 2")


@dataclass(frozen=True, kw_only=True)
class QuantConfig:
    """What ``kiln.compile`` quantizes. Build one from a preset: ``QuantConfig.preset("w4a16-g128", method="gptq")``."""

    weights: QuantSpec | None = QuantSpec()  # linear weights; None: keep them in full precision
    activations: QuantSpec | None = None  # inputs of the quantized linears; None: keep them in full precision
    kv_cache: QuantSpec | None = None  # the paged KV cache: int8 / fp8_e4m3, PerToken() or PerTensor() (kiln.passes.kv_cache)
    method: Method | str = RTN()  # "rtn", "gptq", "awq", "smoothquant" or a method config
    skip: tuple[str, ...] = ("lm_head",)  # module-path patterns left in full precision (see skips())
    calibration: Calibration = Calibration()  # calibration inputs (needed by gptq, awq, smoothquant, static activations)

    def __post_init__(self) -> None:
        method = self.method
        if isinstance(method, str):
            if method.lower() not in METHODS:
                raise ConfigError(f"QuantConfig.method={method!r}: use one of {list(METHODS)} or a method config")
            method = METHODS[method.lower()]()
        if not isinstance(method, tuple(METHODS.values())):
            raise ConfigError(f"QuantConfig.method={method!r}: use one of {list(METHODS)} or RTN()/GPTQ()/AWQ()/SmoothQuant()")
        object.__setattr__(self, "method", method)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        object.__setattr__(self, "skip", skip)
        if isinstance(self.calibration, dict):
            object.__setattr__(self, "calibration", Calibration(**self.calibration))
        self._check()

    def _check(self) -> None:
        w, a = self.weights, self.activations
        if w is None and a is None and self.kv_cache is None:
            raise ConfigError(
                "QuantConfig quantizes nothing: give weights=QuantSpec(...), activations=QuantSpec(...) "
                "and/or kv_cache=QuantSpec(...)"
            )
        if self.kv_cache is not None:
            # the paged cache's formats live with its pass
            from kiln.passes.kv_cache import check_kv_cache_spec

            try:
                check_kv_cache_spec(self.kv_cache)
            except ConfigError as e:
                raise ConfigError(f"QuantConfig.kv_cache: {e}; or leave kv_cache=None") from None
        if w is not None:
            if w.dynamic:
                raise ConfigError("weights are constants, quantized once at compile time: set dynamic=False on the weights spec")
            if isinstance(w.granularity, PerToken):
                raise ConfigError(
                    "PerToken() is for activations; quantize weights PerAxis(0) (per output channel), "
                    "PerGroup(size) or PerTensor()"
                )
            if isinstance(w.granularity, PerAxis) and w.granularity.axis not in (0, -2):
                raise ConfigError(
                    f"weights PerAxis({w.granularity.axis}): a linear weight W (out, in) is scaled per output "
                    "channel, PerAxis(0); for scales along the input use PerGroup(size)"
                )
        if a is not None:
            if a.dtype == "int4":
                raise ConfigError("int4 activations are not supported: quantize activations to int8 or fp8_e4m3")
            if isinstance(a.granularity, PerGroup | PerAxis):
                raise ConfigError(
                    "activations are quantized PerTensor() (static or dynamic) or PerToken() (dynamic); "
                    f"{a.granularity!r} is not supported"
                )
            if isinstance(a.granularity, PerToken) and not a.dynamic:
                raise ConfigError("PerToken() activation scales are computed at run time: set dynamic=True")
            if a.dynamic and not a.symmetric:
                raise ConfigError("dynamic activations are quantized symmetrically: set symmetric=True")
        method = self.method
        if isinstance(method, SmoothQuant) and (a is None or w is None):
            raise ConfigError(
                "SmoothQuant moves activation outliers into the weights, for W8A8: quantize both weights and "
                "activations (preset 'w8a8'), or use method='rtn', 'gptq' or 'awq' for weight-only"
            )
        if isinstance(method, GPTQ | AWQ) and (w is None or w.format.is_float):
            raise ConfigError(f"{method.name} rounds integer weights: use weights=QuantSpec(dtype='int4' or 'int8')")

    # -- presets and derivation ---------------------------------------------------------

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QuantConfig:
        """A named configuration (``w8a16``, ``w4a16-g128``, ``w8a8``, ``fp8``), fields overridden by keyword."""
        if name not in PRESETS:
            raise ConfigError(f"unknown quantization preset {name!r}; use one of {list(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def with_calibration(self, data: Any, **fields: Any) -> QuantConfig:
        """This config with calibration inputs ``data`` (and other Calibration fields) set."""
        return dataclasses.replace(self, calibration=dataclasses.replace(self.calibration, data=data, **fields))

    # -- questions the passes ask -------------------------------------------------------

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing runs calibration inputs through the graph."""
        static_acts = self.activations is not None and not self.activations.dynamic
        return not isinstance(self.method, RTN) or static_acts

    def skips(self, path: str) -> bool:
        """Whether the module at ``path`` stays in full precision.

        A pattern matches a module path when it matches it whole (``fnmatch``: ``*.mlp.*``) or
        is a run of its dot-separated components: ``lm_head``, ``down_proj``, ``mlp`` (every
        MLP linear), ``self_attn.o_proj``, ``model.layers.0`` (that block; not ``layers.10``).
        """
        return any(_matches(path, p) for p in self.skip)

    def describe(self) -> str:
        w = self.weights.describe() if self.weights else "full precision"
        a = self.activations.describe() if self.activations else "full precision"
        kv = f", kv cache {self.kv_cache.describe()}" if self.kv_cache else ""
        return f"weights {w}, activations {a}{kv}, method {self.method.name}"  # type: ignore[union-attr]

    def check_model(self, model: torch.nn.Module) -> list[str]:
        """Check this config against ``model``'s linear layers; return the paths it will quantize.

        Raises :class:`ConfigError` when a group size does not divide a quantized layer's input
        dimension, a skip pattern matches no linear layer, no layer is left to quantize, or
        calibration data is needed but missing.
        """
        if self.weights is None and self.activations is None:
            return []  # a KV-cache-only config touches no linear layer
        layers = linear_layers(model)
        return self.check_layers(layers)

    def check_layers(self, layers: dict[str, tuple[int, int]]) -> list[str]:
        """:meth:`check_model` on ``{module path: (out features, in features)}``."""
        for pattern in self.skip:
            if not any(_matches(path, pattern) for path in layers):
                raise ConfigError(
                    f"skip pattern {pattern!r} matches no linear layer; the model's linear layers are "
                    f"{_abbrev(layers)}. Fix the pattern or pass skip=()"
                )
        chosen = [p for p in layers if not self.skips(p)]
        if not chosen:
            raise ConfigError(f"skip={self.skip!r} leaves no linear layer to quantize (layers: {_abbrev(layers)})")
        if self.weights is not None:
            for path in chosen:
                check_weight_shape(self.weights, path, layers[path])
        if self.needs_calibration and self.calibration.data is None:
            why = f"method {self.method.name}" if not isinstance(self.method, RTN) else "static activation scales"  # type: ignore[union-attr]
            raise ConfigError(
                f"{why} needs calibration data: pass calibration_data to kiln.quantize.quantize(...), or "
                "QuantConfig(...).with_calibration(tokens) (a 1-D token stream, (n, T) rows, a list of inputs "
                "or a kiln.data split name with a tokenizer)"
            )
        return chosen


def check_weight_shape(spec: QuantSpec, path: str, shape: tuple[int, int]) -> None:
    """ConfigError when weights of ``shape`` (N, K) at ``path`` cannot be quantized by ``spec``."""
    n, k = shape
    g = spec.granularity
    if isinstance(g, PerGroup) and k % g.group_size:
        divisors = [d for d in (256, 128, 64, 32, 16) if k % d == 0 and (d % 2 == 0)]
        hint = f"e.g. PerGroup({divisors[0]})" if divisors else "or PerAxis(0)"
        raise ConfigError(
            f"group size {g.group_size} does not divide the input dimension {k} of {path} (weight {n}x{k}): "
            f"choose a group size dividing every quantized layer's input dimension ({hint}), "
            f"or skip the layer with skip=({path!r},)"
        )
    if spec.dtype == "int4" and k % 2:
        raise ConfigError(f"int4 weights pack two codes per byte along K, but {path} has odd K={k}: skip it")


def linear_layers(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{module path: (out features, in features)}`` of ``model``'s linear maps (nn.Linear, HF Conv1D)."""
    out: dict[str, tuple[int, int]] = {}
    for path, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Linear) and isinstance(w, torch.Tensor):
            out[path] = (int(w.shape[0]), int(w.shape[1]))
        elif type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
            out[path] = (int(w.shape[1]), int(w.shape[0]))  # Conv1D stores (in, out)
    return out


def _matches(path: str, pattern: str) -> bool:
    if fnmatch.fnmatchcase(path, pattern):
        return True
    parts, want = path.split("."), pattern.split(".")
    return any(parts[i : i + len(want)] == want for i in range(len(parts) - len(want) + 1))


def _abbrev(names: Iterable[str], n: int = 6) -> str:
    names = list(names)
    shown = names if len(names) <= n else [*names[: n - 1], "...", names[-1]]
    return f"[{', '.join(shown)}] ({len(names)} in all)"


PRESETS: dict[str, QuantConfig] = {
    # int8 weights, one scale per output channel; activations stay in the model's dtype.
    "w8a16": QuantConfig(weights=QuantSpec(dtype="int8", granularity=PerAxis(0))),
    # int4 weights with a scale and zero point per 128 input elements (packed two per byte).
    "w4a16-g128": QuantConfig(weights=QuantSpec(dtype="int4", granularity=PerGroup(128), symmetric=False)),
    # int8 weights per channel x int8 activations per token (dynamic), smoothed (SmoothQuant, alpha 0.5).
    "w8a8": QuantConfig(
        weights=QuantSpec(dtype="int8", granularity=PerAxis(0)),
        activations=QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True),
        method=SmoothQuant(alpha=0.5),
    ),
    # fp8 e4m3 weights per channel x fp8 e4m3 activations per token (dynamic).
    "fp8": QuantConfig(
        weights=QuantSpec(dtype="fp8_e4m3", granularity=PerAxis(0)),
        activations=QuantSpec(dtype="fp8_e4m3", granularity=PerToken(), dynamic=True),
    ),
}

__all__ = [
    "AWQ",
    "FORMATS",
    "GPTQ",
    "PRESETS",
    "RTN",
    "Calibration",
    "Format",
    "Granularity",
    "Method",
    "PerAxis",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "QuantConfig",
    "QuantSpec",
    "SmoothQuant",
    "check_weight_shape",
    "linear_layers",
    "scale_shape",
]
