"""kv-cache: turn a batch-1 graph into one step graph over a block-paged KV cache.

After vLLM (Kwon et al. 2023, PagedAttention): every op but attention acts per token, so
the new tokens of many sequences can share one token axis. This pass makes the graph
captured with batch 1 and a dynamic token axis serve prefill, decode, chunked prefill,
prefix-cache hits and any mix of them in one call.

Matches: every ``kiln::attention(q, k, v, None, causal=True, scale)`` (run fuse-attention
    first); placeholders ``input_ids`` and ``position_ids`` of shape (1, T).
Rewrites to: ``kiln::paged_attention(q, k, v, kv_cache_i, slot_mapping, block_tables,
    seq_lens, query_start_loc, scale)``; new graph inputs, in order after the existing ones:
    ``kv_cache_0 .. kv_cache_{L-1}`` (2, blocks, block_size, Hkv, D), ``slot_mapping`` (T,),
    ``block_tables`` (S, max_blocks), ``seq_lens`` (S,), ``query_start_loc`` (S+1,) and, with
    ``gather_logits``, ``logits_indices`` (L,): the LM head then runs only on those rows (one
    per sequence, or several for speculative verification), so the logits output is (1, L, V)
    instead of (1, T, V).
    A graph captured without ``position_ids`` (the model computes ``arange(T)`` itself, as
    Hugging Face models do when none are given) gets a ``position_ids`` input: every
    remaining integer ``arange`` over the token count is a position source, since the
    mask code that also used it is gone once attention is fused and proven causal, and it
    is rebound to ``position_ids[0]``.
Quantized cache (``kv_quant``: a :class:`kiln.QuantSpec`, from ``QuantConfig.kv_cache`` or
    :func:`kv_cache_spec`): ``kv_cache_i`` holds int8 or fp8 e4m3 codes and each paged op takes
    a tenth operand ``kv_scales_i`` (see :func:`kiln.ops.check_kv_scales`):

    - ``PerToken()`` (dynamic): one fp32 scale per cached (token, KV head), written with the
      codes: new graph inputs ``kv_scales_0 .. kv_scales_{L-1}`` (2, blocks, block_size, Hkv)
      after the caches. The default for int8, whose 8 bits need a tight range (the int8 KV
      caches of LMDeploy and of KIVI-style methods scale per token and head).
    - ``PerTensor()`` (static): one scale for the keys and one for the values of each layer, a
      (2,) fp32 constant ``kv_scales_i`` in the graph: vLLM's ``k_scale`` / ``v_scale`` for
      fp8, the default for fp8, whose exponent covers the dynamic range of a whole layer.
      Calibrated when ``calibration`` has data (observers on every attention's k and v,
      ``QuantSpec.observer`` picks the range; ``amax / qmax``), else 1.0 as vLLM without
      checkpoint scales (fp8 only: static int8 needs calibration).
Requires: fused, causal, unmasked attention; ``position_ids`` as a graph input, or positions
    computed as ``arange(T)``.
Establishes: no ``kiln::attention`` remains; the module takes flat positional inputs in the
    order of ``gm.meta["kiln_kv_cache"].input_names``; with ``kv_quant`` every paged op has its
    ``kv_scales`` operand and the caches have the format's storage dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node
from torch.fx.graph import CodeGen

from kiln.errors import ConfigError
from kiln.ir import SYMBOLS_KEY, fake_mode, infer_meta
from kiln.pass_manager import Pass, PassResult, RewriteError, copy_meta
from kiln.quantize.config import Calibration, PerTensor, PerToken, QuantSpec

ATTENTION = torch.ops.kiln.attention.default
PAGED = torch.ops.kiln.paged_attention.default
aten = torch.ops.aten

LAYOUT_KEY = "kiln_kv_cache"

#: ``kv_cache_dtype`` names (``kiln.LLM(..., kv_cache_dtype=...)``) and the QuantSpec each stands for.
KV_CACHE_DTYPES: dict[str, QuantSpec] = {
    "int8": QuantSpec(dtype="int8", granularity=PerToken(), dynamic=True),  # a scale per (token, KV head)
    "fp8": QuantSpec(dtype="fp8_e4m3", granularity=PerTensor()),  # static k/v scales per layer (vLLM)
    "fp8_e4m3": QuantSpec(dtype="fp8_e4m3", granularity=PerTensor()),
    "fp8-per-token": QuantSpec(dtype="fp8_e4m3", granularity=PerToken(), dynamic=True),
}


def kv_cache_spec(kv_cache_dtype: str | QuantSpec | None) -> QuantSpec | None:
    """The QuantSpec of a ``kv_cache_dtype`` option: a name of :data:`KV_CACHE_DTYPES`, a spec, or
    ``None`` / ``"auto"`` (the cache keeps the model's dtype)."""
    if kv_cache_dtype is None or kv_cache_dtype == "auto":
        return None
    if isinstance(kv_cache_dtype, QuantSpec):
        check_kv_cache_spec(kv_cache_dtype)
        return kv_cache_dtype
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ConfigError(
            f"kv_cache_dtype={kv_cache_dtype!r}: use 'auto', one of {list(KV_CACHE_DTYPES)} or a kiln.QuantSpec"
        )
    return KV_CACHE_DTYPES[kv_cache_dtype]  # type: ignore[index]


def check_kv_cache_spec(spec: QuantSpec) -> None:
    """ConfigError unless ``spec`` is a KV-cache format the paged kernels implement."""
    if spec.dtype not in ("int8", "fp8_e4m3"):
        raise ConfigError(f"a {spec.dtype} KV cache is not supported: use dtype='int8' or 'fp8_e4m3'")
    if not spec.symmetric:
        raise ConfigError("the KV cache is quantized symmetrically (no zero point): set symmetric=True")
    if isinstance(spec.granularity, PerToken):
        if not spec.dynamic:
            raise ConfigError(
                "PerToken() KV-cache scales are computed as each token is written: set dynamic=True"
            )
    elif isinstance(spec.granularity, PerTensor):
        if spec.dynamic:
            raise ConfigError(
                "PerTensor() KV-cache scales are static (calibrated, or 1.0): set dynamic=False, or use PerToken()"
            )
    else:
        raise ConfigError(
            f"KV-cache scales are PerToken() (one per token and KV head, dynamic) or PerTensor() (static, one "
            f"for the keys and one for the values of each layer), not {spec.granularity!r}"
        )


@dataclass(frozen=True)
class KVCacheLayout:
    """What a model runner needs to feed the rewritten graph."""

    num_layers: int  # attention layers, one cache tensor each
    num_kv_heads: tuple[int, ...]  # per layer
    head_dim: tuple[int, ...]  # per layer
    dtype: torch.dtype  # dtype of keys and values as the graph computes them
    input_names: tuple[str, ...]  # every graph input, in call order
    gather_logits: bool  # whether the graph takes logits_indices and returns (1, S, V)
    cache_dtype: torch.dtype | None = (
        None  # storage dtype of kv_cache_i when it differs (int8, float8_e4m3fn)
    )
    kv_quant: QuantSpec | None = None  # how the cache is quantized (None: values stored as computed)
    static_kv_scales: tuple[tuple[float, float], ...] | None = None  # per layer (k, v) scales of PerTensor()

    @property
    def storage_dtype(self) -> torch.dtype:
        """The dtype the runner allocates ``kv_cache_i`` in (``dtype`` unless quantized)."""
        return self.cache_dtype or self.dtype

    @property
    def per_token_scales(self) -> bool:
        """Whether the graph takes ``kv_scales_i`` (2, blocks, block_size, Hkv) fp32 inputs."""
        return self.kv_quant is not None and isinstance(self.kv_quant.granularity, PerToken)

    def bytes_per_block(self, block_size: int) -> int:
        """Bytes one block takes across all layers: keys and values (and their per-token scales)."""
        elem = torch.empty((), dtype=self.storage_dtype).element_size()
        scale = 4 if self.per_token_scales else 0  # one fp32 per (token, KV head)
        return sum(
            2 * block_size * h * (d * elem + scale)
            for h, d in zip(self.num_kv_heads, self.head_dim, strict=True)
        )


def _placeholder(gm: GraphModule, name: str, after: Node, val: object) -> Node:
    with gm.graph.inserting_after(after):
        node = gm.graph.placeholder(name)
    node.meta["val"] = val
    return node


class PageKVCache(Pass):
    """Rewrite fused attention into paged attention over per-layer block caches."""

    name = "kv-cache"

    def __init__(
        self,
        gather_logits: bool = True,
        kv_quant: QuantSpec | None = None,
        calibration: Calibration | None = None,
    ) -> None:
        if kv_quant is not None:
            check_kv_cache_spec(kv_quant)
        self.gather_logits = gather_logits
        self.kv_quant = kv_quant
        self.calibration = calibration

    def requires(self, gm: GraphModule) -> None:
        attn = [n for n in gm.graph.nodes if n.target == ATTENTION]
        if not attn:
            raise RewriteError("no kiln::attention in the graph: run fuse-attention before kv-cache")
        for n in attn:
            mask = n.args[3] if len(n.args) > 3 else n.kwargs.get("mask")
            causal = n.args[4] if len(n.args) > 4 else n.kwargs.get("causal", False)
            if mask is not None or not causal:
                raise RewriteError(
                    "the paged KV cache needs causal attention without a mask operand; this attention "
                    f"has causal={causal} and mask={'%' + mask.name if isinstance(mask, Node) else mask}",
                    n,
                )
        names = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
        if "input_ids" not in names:
            raise RewriteError(f"kv-cache needs an input_ids graph input, got {sorted(names)}")
        if "position_ids" not in names and not _position_sources(gm):
            raise RewriteError(
                f"kv-cache needs a position_ids graph input or positions computed as arange(T); inputs are "
                f"{sorted(names)}: capture with position_ids among the example inputs"
            )
        spec = self.kv_quant
        calibrated = self.calibration is not None and self.calibration.data is not None
        if (
            spec is not None
            and isinstance(spec.granularity, PerTensor)
            and spec.dtype == "int8"
            and not calibrated
        ):
            raise RewriteError(
                "static per-tensor int8 KV-cache scales need calibration data (QuantConfig(...).with_calibration"
                "(tokens)); or quantize per token: QuantSpec(dtype='int8', granularity=PerToken(), dynamic=True)"
            )

    def call(self, gm: GraphModule) -> PassResult:
        graph = gm.graph
        mode = fake_mode(gm)
        env = mode.shape_env
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        ids = next(n for n in placeholders if n.name == "input_ids")
        tokens = ids.meta["val"].shape[1]  # the symbolic token count T
        attn = [n for n in graph.nodes if n.target == ATTENTION]
        kvals = [n.args[1].meta["val"] for n in attn]  # (1, Hkv, T, D) per layer

        bound = (
            self._bind_positions(gm, ids, mode) if "position_ids" not in {n.name for n in placeholders} else 0
        )
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]

        spec = self.kv_quant
        static = spec is not None and isinstance(spec.granularity, PerTensor)
        static_scales = self._static_scales(gm, attn, ids) if static else None
        storage = {None: None, "int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}[
            spec.dtype if spec else None
        ]

        syms = {}
        for label in ("blocks", "block_size", "S", "max_blocks", "L"):
            syms[label] = env.create_unbacked_symint() if env is not None else 1
            gm.meta.setdefault(SYMBOLS_KEY, {})[str(syms[label])] = label
        last = placeholders[-1]
        caches: list[Node] = []
        scales: list[Node | None] = [None] * len(kvals)
        with mode:
            for i, k in enumerate(kvals):
                shape = (2, syms["blocks"], syms["block_size"], k.shape[1], k.shape[3])
                val = torch.empty(*shape, dtype=storage or k.dtype, device=k.device)
                last = _placeholder(gm, f"kv_cache_{i}", last, val)
                caches.append(last)
            if spec is not None and not static:  # per-token scales: inputs beside the caches
                for i, k in enumerate(kvals):
                    val = torch.empty(
                        2,
                        syms["blocks"],
                        syms["block_size"],
                        k.shape[1],
                        dtype=torch.float32,
                        device=k.device,
                    )
                    last = scales[i] = _placeholder(gm, f"kv_scales_{i}", last, val)
            device = ids.meta["val"].device
            slot = last = _placeholder(
                gm, "slot_mapping", last, torch.empty(tokens, dtype=torch.int64, device=device)
            )
            tables = last = _placeholder(
                gm,
                "block_tables",
                last,
                torch.empty(syms["S"], syms["max_blocks"], dtype=torch.int32, device=device),
            )
            lens = last = _placeholder(
                gm, "seq_lens", last, torch.empty(syms["S"], dtype=torch.int32, device=device)
            )
            qsl = last = _placeholder(
                gm, "query_start_loc", last, torch.empty(syms["S"] + 1, dtype=torch.int32, device=device)
            )
            if self.gather_logits:
                indices = last = _placeholder(
                    gm, "logits_indices", last, torch.empty(syms["L"], dtype=torch.int64, device=device)
                )

        for i, (node, cache) in enumerate(zip(attn, caches, strict=True)):
            q, k, v = node.args[:3]
            scale = node.args[5] if len(node.args) > 5 else node.kwargs.get("scale")
            args = (q, k, v, cache, slot, tables, lens, qsl, scale)
            if static_scales is not None:  # a (2,) fp32 constant: (k_scale, v_scale)
                attr = f"kv_scales_{i}"
                gm.register_buffer(
                    attr, torch.tensor(static_scales[i], dtype=torch.float32, device=kvals[i].device)
                )
                with graph.inserting_before(node):
                    scales[i] = graph.get_attr(attr)
                infer_meta(scales[i])  # type: ignore[arg-type]
            # kv_scales always given (None for a float cache): the op's schema has no default for it
            args = (*args, scales[i] if spec is not None else None)
            with graph.inserting_before(node):
                paged = graph.call_function(PAGED, args)
            copy_meta(node, paged)
            paged.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(paged)
            graph.erase_node(node)

        gathered = self._gather_logits(gm, indices, mode) if self.gather_logits else 0
        graph.set_codegen(CodeGen())  # flat positional inputs and outputs from now on
        gm._forward_pre_hooks.clear()  # the pytree input check of the captured module no longer applies
        names = tuple(n.name for n in graph.nodes if n.op == "placeholder")
        gm.meta[LAYOUT_KEY] = KVCacheLayout(
            num_layers=len(kvals),
            num_kv_heads=tuple(int(k.shape[1]) for k in kvals),
            head_dim=tuple(int(k.shape[3]) for k in kvals),
            dtype=kvals[0].dtype,
            input_names=names,
            gather_logits=self.gather_logits,
            cache_dtype=storage,
            kv_quant=spec,
            static_kv_scales=static_scales,
        )
        stats = {"attention_paged": len(kvals), "logits_gathered": gathered, "positions_bound": bound}
        if spec is not None:
            stats["kv_cache_quantized"] = len(kvals)
            stats["kv_scales_calibrated"] = len(kvals) if static and self._calibrated else 0
        return PassResult(gm, True, stats)

    @property
    def _calibrated(self) -> bool:
        return self.calibration is not None and self.calibration.data is not None

    def _static_scales(self, gm: GraphModule, attn: list[Node], ids: Node) -> tuple[tuple[float, float], ...]:
        """Per-layer ``(k_scale, v_scale)``: ``amax / qmax`` over the calibration data, or 1.0 without any."""
        if not self._calibrated:
            return tuple((1.0, 1.0) for _ in attn)  # vLLM's default when a checkpoint carries no scales
        from kiln.quantize.calibrate import prepared, run_graph, samples_of
        from kiln.quantize.observers import make_observer

        spec, calibration = self.kv_quant, self.calibration
        assert spec is not None and calibration is not None
        observers = {}
        for node in attn:
            for operand in node.args[1:3]:
                if operand not in observers:
                    observers[operand] = make_observer(spec)
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last = max(observers, key=order.__getitem__)
        observers[last].stop = True  # a run ends once every k and v is seen (the LM head need not run)
        device = ids.meta["val"].device
        has_positions = any(n.op == "placeholder" and n.name == "position_ids" for n in gm.graph.nodes)
        samples = []
        for sample in samples_of(calibration, ["input_ids"]):
            tokens = sample["input_ids"].to(device)
            sample = {"input_ids": tokens}
            if has_positions:
                sample["position_ids"] = torch.arange(tokens.shape[-1], device=device)[None]
            samples.append(sample)
        try:
            with prepared(gm, observers):
                run_graph(gm, samples, progress=calibration.progress, desc="calibrating kv cache")
        finally:
            observers[last].stop = False
        out = []
        for node in attn:
            k_obs, v_obs = observers[node.args[1]], observers[node.args[2]]
            out.append((float(k_obs.qparams(spec)[0]), float(v_obs.qparams(spec)[0])))
        return tuple(out)

    def _bind_positions(self, gm: GraphModule, ids: Node, mode: object) -> int:
        """Add a ``position_ids`` input and rebind every ``arange(T)`` position source to it."""
        sources = _position_sources(gm)
        with mode:  # type: ignore[attr-defined]
            val = torch.empty_like(ids.meta["val"], dtype=torch.int64)
        pos = _placeholder(gm, "position_ids", ids, val)
        with gm.graph.inserting_after(pos):
            row = gm.graph.call_function(aten.select.int, (pos, 0, 0))  # (T,)
        with mode:  # type: ignore[attr-defined]
            row.meta["val"] = val[0]
        for node in sources:
            node.replace_all_uses_with(row)
            gm.graph.erase_node(node)
        return len(sources)

    def _gather_logits(self, gm: GraphModule, indices: Node, mode: object) -> int:
        """Select the rows of the hidden states the sampler needs, before the LM head."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaves = [a for a in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(a, Node)]
        logits = next(
            (a for a in leaves if isinstance(a.meta.get("val"), torch.Tensor) and a.meta["val"].dim() == 3),
            None,
        )
        if logits is None:
            raise RewriteError("no (1, T, V) logits output to gather rows from")
        target = logits.args[0] if logits.target == aten.linear.default else logits
        with gm.graph.inserting_after(target):
            picked = gm.graph.call_function(aten.index_select.default, (target, 1, indices))
        copy_meta(target, picked)
        with mode:  # type: ignore[attr-defined]
            picked.meta["val"] = torch.ops.aten.index_select.default(
                target.meta["val"], 1, indices.meta["val"]
            )
        if target is logits:
            logits.replace_all_uses_with(picked, delete_user_cb=lambda u: u is not picked)
        else:
            logits.replace_input_with(target, picked)
            # (1, L, V): built rather than re-run through linear's fake kernel, whose
            # decomposition guards on the unbacked L under torch 2.11.
            old = logits.meta["val"]
            with mode:  # type: ignore[attr-defined]
                logits.meta["val"] = picked.meta["val"].new_empty(
                    (*picked.meta["val"].shape[:-1], old.shape[-1]), dtype=old.dtype
                )
        return 1


def _position_sources(gm: GraphModule) -> list[Node]:
    """Integer ``arange(0, T, 1)`` nodes over the token count of ``input_ids``."""
    ids = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids"), None)
    if ids is None or not isinstance(ids.meta.get("val"), torch.Tensor):
        return []
    tokens = str(ids.meta["val"].shape[-1])
    out = []
    for n in gm.graph.nodes:
        if n.target not in (aten.arange.default, aten.arange.start, aten.arange.start_step):
            continue
        val = n.meta.get("val")
        if (
            not isinstance(val, torch.Tensor)
            or val.dtype != torch.int64
            or val.dim() != 1
            or str(val.shape[0]) != tokens
        ):
            continue
        start = n.args[0] if n.target != aten.arange.default else 0
        step = n.args[2] if n.target == aten.arange.start_step else 1
        if start == 0 and step == 1:
            out.append(n)
    return out


def layout_of(gm: GraphModule) -> KVCacheLayout:
    """The KV-cache layout the kv-cache pass recorded on ``gm``."""
    layout = gm.meta.get(LAYOUT_KEY)
    if layout is None:
        raise RewriteError("this graph has no paged KV cache: compile with CompileConfig(kv_cache=True)")
    return layout


__all__ = [
    "KV_CACHE_DTYPES",
    "LAYOUT_KEY",
    "KVCacheLayout",
    "PageKVCache",
    "check_kv_cache_spec",
    "kv_cache_spec",
    "layout_of",
]
