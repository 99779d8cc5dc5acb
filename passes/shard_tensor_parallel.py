"""shard-tensor-parallel: rewrite the graph into one rank's shard of Megatron-style tensor parallelism.

Shoeybi et al. 2019, "Megatron-LM: Training Multi-Billion Parameter Language Models Using Model
Parallelism" (arXiv:1909.08053): attention heads and MLP hidden units are split over ranks, so
each transformer layer needs exactly two all-reduces; the vocabulary of the embedding and the
LM head is split too. GQA after Ainslie et al. 2023 (arXiv:2305.13245).

Matches (by propagation on the graph, :mod:`kiln.parallel.tp_solver`; no module names):
    attention   every ``kiln.attention``: its heads are split evenly; the values feeding q, k, v
                are traced back (through head reshapes, rotary embeddings, splits of a fused QKV
                projection) to the linears computing them, and the output forward to the linear
                contracting it;
    MLP         a linear whose input, split evenly along its last dim, traces back through
                per-element ops only to linears of a common whole input (gate/up -> down,
                fc -> fc2): tried for every linear not yet placed, rejected with a reason otherwise;
    vocabulary  the LM head (a linear whose output is a graph output) and every embedding lookup
                into a table of the same vocabulary size (tied or not).
Rewrites to, for rank ``rank`` of ``world_size``:
    column-parallel linears (q, k, v, gate, up, fused QKV, fc): weight rows and bias sliced;
    quantized linears (``kiln::qlinear_*``, from ``lower-qdq``) are placed like linears: their
        codes, per-channel or group-wise scales and zero points are sliced with the weight (a
        row-parallel slice of packed int4 on 8-code blocks, of group-wise scales on whole groups,
        else the region is rejected with that reason); a row-parallel input's dynamic activation
        scale (``kiln::dynamic_scale``, max|x| / qmax over its slice) gets an all-reduce of the
        maximum, so every rank quantizes its slice with the whole input's scale;
    row-parallel linears (o, down): weight columns sliced, then ``_c10d_functional.all_reduce`` +
        ``wait_tensor``, then the bias;
    heads: reshapes with head counts get the per-rank counts; kv heads are split when the ranks'
        query heads cover whole GQA groups, replicated (a rank keeps the kv head its query heads
        read) when a group spans ranks;
    embedding: rows ``[r*V/w, (r+1)*V/w)``, looked up by ``kiln::vocab_embedding`` (ids outside give
        zeros; one kernel on CUDA); all-reduce;
    LM head: rows sliced (a quantized head's per-row scales and zero points with them);
        ``all_gather_into_tensor`` along the vocabulary (padded to a multiple
        of ``world_size`` with zero rows, sliced back to V).
Requires: canonical forms (``canonicalize``) and fused attention (``fuse-attention``).
Establishes: one all-reduce per row-parallel linear and per embedding; the graph computes, summed
    over ranks by those collectives, exactly the unsharded graph's outputs.
Statistics: ``attention_sharded``, ``mlp_sharded``, ``column_linears``, ``row_linears``,
    ``all_reduces``, ``scale_all_reduces``, ``all_gathers``, ``weights_sliced``, ``kv_heads_replicated``,
    ``vocab_parallel_embeddings``, ``vocab_parallel_lm_heads``, ``vocab_padding``.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn
from torch.fx import GraphModule, Node

from kiln.errors import ConfigError
from kiln.ir import infer_meta
from kiln.parallel.tp_collectives import ALL_REDUCE, ROLE_KEY, Emitter, default_group_name
from kiln.parallel.tp_embedding import vocab_embedding  # noqa: F401  (registers kiln::vocab_embedding)
from kiln.parallel.tp_solver import (
    ATTENTION,
    LINEAR,
    LINEARS,
    RESHAPES,
    Solver,
    gqa,
    operand,
    slot_index,
    split_dim,
    weight_of,
)
from kiln.parallel.tp_specs import Shard, static, val
from kiln.pass_manager import Pass, PassResult, RewriteError

aten = torch.ops.aten
VOCAB_EMBEDDING = torch.ops.kiln.vocab_embedding.default
_PASS_THROUGH = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default}


def _source(w: object) -> tuple[Node, bool] | None:
    """``(get_attr, transposed)`` when ``w`` is a constant weight or its 2-D transpose."""
    if isinstance(w, Node) and w.op == "get_attr":
        return w, False
    if isinstance(w, Node) and w.target == aten.permute.default and list(w.args[1]) == [1, 0]:
        inner = w.args[0]
        if isinstance(inner, Node) and inner.op == "get_attr":
            return inner, True
    return None


def _get(gm: GraphModule, target: str) -> torch.Tensor:
    obj: object = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def _set(gm: GraphModule, target: str, value: torch.Tensor) -> None:
    """Replace the tensor ``target`` names (a parameter stays a parameter, without gradients)."""
    path, _, name = target.rpartition(".")
    mod = gm.get_submodule(path) if path else gm
    if isinstance(getattr(mod, name), nn.Parameter):
        setattr(mod, name, nn.Parameter(value, requires_grad=False))
    elif name in mod._buffers:
        mod._buffers[name] = value
    else:
        setattr(mod, name, value)


def _slice(t: torch.Tensor, dim: int, intervals: tuple[tuple[int, int], ...], rows: int | None = None) -> torch.Tensor:
    """The rank's intervals of ``t`` along ``dim``, concatenated (zero-padded to ``rows`` when given)."""
    pieces = [t.narrow(dim, a, b - a) for a, b in intervals]
    have = sum(b - a for a, b in intervals)
    if rows is not None and rows > have:
        shape = list(t.shape)
        shape[dim] = rows - have
        pieces.append(t.new_zeros(shape))
    return torch.cat(pieces, dim).contiguous() if pieces else t.narrow(dim, 0, 0).clone()


class ShardTensorParallel(Pass):
    """Slice weights, heads and vocabulary for one rank; insert the all-reduces and the logits all-gather."""

    name = "shard-tensor-parallel"

    def __init__(self, world_size: int, rank: int, group_name: str | None = None) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, {world_size}), got {rank}")
        self.world, self.rank = world_size, rank
        self.group = group_name
        self.skipped: list[tuple[str, str]] = []  # (linear, why it is not a row-parallel MLP projection)

    def requires(self, gm: GraphModule) -> None:
        for n in gm.graph.nodes:
            if n.target in (aten.view.default, aten.transpose.int, aten.t.default, aten.addmm.default):
                raise RewriteError(f"{n.target} is not canonical: run canonicalize before shard-tensor-parallel", n)

    def call(self, gm: GraphModule) -> PassResult:
        self.skipped = []
        self._expected_reduces = 0
        self._cache: dict[str, Node] = {}
        stats: Counter[str] = Counter()
        if self.world == 1:
            return PassResult(gm, False, {})
        solver = Solver(self.world)
        for attn in [n for n in gm.graph.nodes if n.target == ATTENTION]:
            self._attention(solver, attn, stats)
        head = self._lm_head(gm)
        for lin in [n for n in gm.graph.nodes if n.target in LINEARS]:
            plan = solver.plan
            if lin is head or lin in plan.row or lin in plan.specs or _source(weight_of(lin)) is None:
                continue
            k = static(val(lin.args[0]).shape[-1])  # type: ignore[union-attr]
            spec = Shard.even(val(lin.args[0]).dim() - 1, k, self.world) if k else None  # type: ignore[union-attr]
            reason = solver.attempt(rows={lin: spec}) if spec else f"{k} inputs do not split over {self.world} ranks"
            if reason is None:
                stats["mlp_sharded"] += 1
            else:
                self.skipped.append((lin.name, reason))
        self._rewrite(gm, solver, stats)
        if head is not None:
            self._vocab_parallel(gm, head, stats)
        return PassResult(gm, True, dict(stats))

    def ensures(self, gm: GraphModule) -> None:
        reduces = [n for n in gm.graph.nodes if n.target == ALL_REDUCE]
        if len(reduces) != self._expected_reduces:
            raise RewriteError(f"expected {self._expected_reduces} all-reduces, the graph has {len(reduces)}")

    # -- matching -------------------------------------------------------------------------

    def _attention(self, solver: Solver, attn: Node, stats: Counter[str]) -> None:
        hq, hkv = int(val(attn.args[0]).shape[1]), int(val(attn.args[1]).shape[1])  # type: ignore[union-attr]
        spec = Shard.even(1, hq, self.world)
        if spec is None:
            raise RewriteError(f"{hq} attention heads do not split over {self.world} ranks", attn)
        kv = gqa(spec, hq, hkv)
        if isinstance(kv, str):
            raise RewriteError(f"{kv}: choose a tensor_parallel_size that divides or is divided by {hkv}", attn)
        reason = solver.attempt({attn: spec})
        if reason is not None:
            raise RewriteError(f"cannot shard this attention over {self.world} ranks: {reason}", attn)
        stats["attention_sharded"] += 1
        stats["kv_heads_replicated"] += kv is None or sum(b - a for p in kv.parts for a, b in p) > hkv

    def _lm_head(self, gm: GraphModule) -> Node | None:
        """The LM head: a linear with a constant weight whose output is a graph output (through casts),
        projecting onto a vocabulary some embedding lookup reads (same table size)."""
        out = next(n for n in gm.graph.nodes if n.op == "output")
        leaves = [x for x in torch.utils._pytree.tree_leaves(out.args[0]) if isinstance(x, Node)]
        tables = {static(val(e.args[0]).shape[0]) for e in gm.graph.nodes if e.target == aten.embedding.default}  # type: ignore[union-attr]
        for leaf in leaves:
            n = leaf
            while n.target in _PASS_THROUGH and isinstance(n.args[0], Node):
                n = n.args[0]
            if n.target in LINEARS and _source(weight_of(n)) is not None and static(val(n).shape[-1]) in tables:  # type: ignore[union-attr]
                return n
        return None

    # -- rewriting ------------------------------------------------------------------------

    def _group(self) -> str:
        return self.group if self.group is not None else default_group_name()

    def _rewrite(self, gm: GraphModule, solver: Solver, stats: Counter[str]) -> None:
        plan, r = solver.plan, self.rank
        touched: set[Node] = set()
        for g, spec in plan.params.items():
            sliced = _slice(_get(gm, str(g.target)), spec.dim, spec.parts[r])
            users = plan.param_users[g]
            if set(g.users) <= users:
                _set(gm, str(g.target), sliced)
                touched.add(g)
            else:  # also read whole elsewhere: the slice gets its own attribute
                name = f"{str(g.target).replace('.', '_')}_shard{r}"
                gm.register_buffer(name, sliced)
                with gm.graph.inserting_after(g):
                    copy = gm.graph.get_attr(name)
                for u in users:
                    u.replace_input_with(g, copy)
                touched.add(copy)
            stats["weights_sliced"] += 1
        for n, spec in plan.specs.items():
            if n.target in RESHAPES or n.target == aten.expand.default:
                sizes = list(n.args[1])  # type: ignore[arg-type]
                if isinstance(sizes[spec.dim], int) and sizes[spec.dim] != -1:
                    sizes[spec.dim] = spec.local(r)
                    n.args = (n.args[0], sizes, *n.args[2:])
        for t, outs in plan.tuples.items():
            dim = split_dim(t)
            if any(s.dim == dim for s in outs.values()):
                t.target = aten.split_with_sizes.default
                t.args, t.kwargs = (t.args[0], [outs[i].local(r) for i in range(len(outs))], dim), {}
        stats["column_linears"] += len(plan.column)
        stats["row_linears"] += len(plan.row)
        for lin in plan.column:
            lin.meta[ROLE_KEY] = "column"  # its input is whole on every rank (sequence-parallel gathers it)
        for lin, spec in plan.row.items():
            self._all_reduce_after(gm, lin, spec, stats)
        for scale in plan.max_scales:  # a sliced activation's dynamic scale: the maximum over every rank's slice
            emit = Emitter(gm, scale, scale, self.world, self._group())
            out = emit.all_reduce(scale, "activation_scale", op="max")
            made = set(emit.created)
            scale.replace_all_uses_with(out, delete_user_cb=lambda u, m=made: u not in m)  # type: ignore[misc]
            stats["scale_all_reduces"] += 1
        touched |= set(plan.specs) | set(plan.tuples) | set(plan.row)
        self._embeddings(gm, plan.params, stats, touched)
        self._expected_reduces += int(stats["scale_all_reduces"])
        self._reinfer(gm, touched)

    def _all_reduce_after(self, gm: GraphModule, lin: Node, spec: Shard, stats: Counter[str]) -> None:
        i = slot_index(lin, "bias")
        bias = operand(lin, "bias")
        args = list(lin.args)
        if lin.target == LINEAR:
            args = args[:2]
        elif len(args) > i:
            args[i] = None
        g = slot_index(lin, "group_size")
        if g is not None and args[g] == sum(spec.local(r) for r in range(self.world)):
            args[g] = spec.local(self.rank)  # per-channel int4: one group of the whole (now local) K
        lin.args, lin.kwargs = tuple(args), {kw: v for kw, v in lin.kwargs.items() if kw != "bias"}
        emit = Emitter(gm, lin, lin, self.world, self._group())
        out = emit.all_reduce(lin, "row")
        if isinstance(bias, Node):
            out = emit(aten.add.Tensor, out, bias)
        made = set(emit.created)
        lin.replace_all_uses_with(out, delete_user_cb=lambda u: u not in made)
        stats["all_reduces"] += 1

    def _vocab(self, size: int) -> tuple[int, int]:
        """(rows per rank, padded vocabulary) for a vocabulary of ``size``."""
        chunk = -(-size // self.world)
        return chunk, chunk * self.world

    def _vocab_weight(self, gm: GraphModule, w: Node, transposed: bool, cache: dict[str, Node]) -> Node:
        """A get_attr of this rank's rows of the vocabulary table ``w`` (shared by tied uses)."""
        key = str(w.target)
        if key not in cache:
            table = _get(gm, key)
            dim = 1 if transposed else 0
            chunk, _ = self._vocab(table.shape[dim])
            lo, hi = self.rank * chunk, min((self.rank + 1) * chunk, table.shape[dim])
            name = f"{key.replace('.', '_')}_vocab{self.rank}"
            gm.register_buffer(name, _slice(table, dim, ((lo, hi),) if hi > lo else (), rows=chunk))
            with gm.graph.inserting_after(w):
                cache[key] = gm.graph.get_attr(name)
            infer_meta(cache[key])
        return cache[key]

    def _embeddings(self, gm: GraphModule, params: dict[Node, Shard], stats: Counter[str], touched: set[Node]) -> None:
        head = self._lm_head(gm)
        vocab = static(val(head).shape[-1]) if head is not None else None  # type: ignore[union-attr]
        self._expected_reduces = int(stats["all_reduces"])
        tied = _source(head.args[1]) if head is not None else None
        inputs = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
        for emb in [n for n in gm.graph.nodes if n.target == aten.embedding.default]:
            w, ids = emb.args[:2]
            if not isinstance(w, Node) or w.op != "get_attr" or w in params or val(w).shape[0] != vocab:  # type: ignore[union-attr]
                continue
            token_ids = ids is inputs.get("input_ids") or ("input_ids" not in inputs and ids in inputs.values())
            if not (token_ids or (tied is not None and tied[0].target == w.target)):
                continue  # a table of another index (positions) that happens to have the vocabulary's size
            chunk, _ = self._vocab(int(vocab))  # type: ignore[arg-type]
            emit = Emitter(gm, emb, emb, self.world, self._group())
            # this rank's rows, zeros for ids outside them (one kernel: kiln::vocab_embedding)
            local = emit(VOCAB_EMBEDDING, self._vocab_weight(gm, w, False, self._cache), ids, self.rank * chunk)
            out = emit.all_reduce(local, "embedding")
            emb.replace_all_uses_with(out)
            gm.graph.erase_node(emb)
            touched.add(local)
            stats["vocab_parallel_embeddings"] += 1
            stats["all_reduces"] += 1
            self._expected_reduces += 1

    def _vocab_parallel(self, gm: GraphModule, head: Node, stats: Counter[str]) -> None:
        w = weight_of(head)
        src, transposed = _source(w)  # type: ignore[misc]
        vocab = int(val(head).shape[-1])  # type: ignore[union-attr]
        chunk, padded = self._vocab(vocab)
        local_w = self._vocab_weight(gm, src, transposed, self._cache)
        if transposed:
            with gm.graph.inserting_before(head):
                local_w = gm.graph.call_function(aten.permute.default, (local_w, [1, 0]))
            infer_meta(local_w)
        args = list(head.args)
        args[slot_index(head, "w")] = local_w  # type: ignore[index]
        for slot in ("w_scale", "w_zero_point", "bias"):  # a quantized head's per-row scales follow its rows
            t, i = operand(head, slot), slot_index(head, slot)
            if isinstance(t, Node) and i is not None and val(t).dim() > 0 and static(val(t).shape[0]) == vocab:  # type: ignore[union-attr]
                if i >= len(args):
                    args += [None] * (i + 1 - len(args))
                args[i] = self._vocab_weight(gm, t, False, self._cache)
        head.args = tuple(args)
        head.kwargs = {k: v for k, v in head.kwargs.items() if k not in ("w", "w_scale", "w_zero_point", "bias")}
        head.meta[ROLE_KEY] = "lm_head"
        infer_meta(head)
        emit = Emitter(gm, head, head, self.world, self._group())
        with emit.unit():
            out = emit.all_gather(head, -1, "lm_head")
            if padded != vocab:
                out = emit(aten.slice.Tensor, out, val(head).dim() - 1, 0, vocab)  # type: ignore[union-attr]
                stats["vocab_padding"] += padded - vocab
        made = set(emit.created)
        for node in made:
            node.meta[ROLE_KEY] = "lm_head_gather"  # per-row nodes select-logits-before-gather moves rows through
        head.replace_all_uses_with(out, delete_user_cb=lambda u: u not in made)
        stats["vocab_parallel_lm_heads"] += 1
        stats["all_gathers"] += 1
        for g in [n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in self._cache and not n.users]:
            gm.graph.erase_node(g)  # the whole tables: every use reads this rank's rows now

    @staticmethod
    def _reinfer(gm: GraphModule, touched: set[Node]) -> None:
        """Recompute shape metadata of every node whose operands' shapes changed."""
        changed: set[Node] = set()
        for n in gm.graph.nodes:
            if n.op not in ("call_function", "get_attr"):
                continue
            if n in touched or any(i in changed for i in n.all_input_nodes):
                before = str(n.meta.get("val"))
                infer_meta(n)
                if str(n.meta.get("val")) != before or n in touched:
                    changed.add(n)


class SelectLogitsBeforeGather(Pass):
    """select-logits-before-gather: the kv-cache pass's row selection moves in front of a vocabulary-parallel LM head.

    Matches: ``index_select(g, d, logits_indices)`` where ``g`` is the LM head's vocabulary all-gather
        (nodes shard-tensor-parallel tagged ``lm_head_gather``) of ``linear(x, W_local)``.
    Rewrites to: ``g`` of ``linear(index_select(x, d, logits_indices), W_local)``: the LM head and its
        all-gather run on the selected rows only (see :mod:`kiln.parallel.tp_logits`).
    Requires: shard-tensor-parallel, then kv-cache with ``gather_logits``.
    Establishes: no row selection after the LM head's all-gather.
    Statistics: ``selections_moved``.
    """

    name = "select-logits-before-gather"

    def call(self, gm: GraphModule) -> PassResult:
        from kiln.parallel.tp_logits import select_rows_before_gather

        moved = select_rows_before_gather(gm)
        return PassResult(gm, moved > 0, {"selections_moved": moved})


__all__ = ["SelectLogitsBeforeGather", "ShardTensorParallel"]
