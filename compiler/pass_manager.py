"""Passes and the pass manager.

A pass is a small class in its own file under ``passes/``: a ``name``, a docstring with
*Matches / Rewrites to / Requires / Establishes*, ``requires(gm)``, ``call(gm) ->
PassResult`` and ``ensures(gm)`` (after torch.fx's pass infrastructure and ExecuTorch).
The manager runs an ordered list of them (``kiln.pipeline``), verifies the IR after each
one when asked, times each, stamps the nodes a pass creates with its name (provenance),
skips disabled passes, prints the IR after all / changed / named passes and writes dumps.
Errors name the failing pass, the passes before it and the node.
"""

from __future__ import annotations

import operator
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch.fx import GraphModule, Node

from kiln.errors import KilnError, PassError
from kiln.ir import PASS_KEY, infer_meta, print_ir, provenance, verify


@dataclass
class PassResult:
    """What a pass returns: the (possibly new) graph, whether it changed, and counters."""

    gm: GraphModule  # the graph after the pass (usually the same object, rewritten in place)
    modified: bool  # whether the pass changed anything
    stats: dict[str, int] = field(default_factory=dict)  # what it did, e.g. {"attention_fused": 12}


class RewriteError(KilnError):
    """Raised by a pass about a specific node; the manager adds the pass context."""

    def __init__(self, message: str, node: Node | None = None) -> None:
        super().__init__(message)
        self.node = node


class Pass(ABC):
    """Base class of every kiln pass. Subclasses set ``name`` and implement ``call``."""

    name: ClassVar[str]

    def requires(self, gm: GraphModule) -> None:  # noqa: B027 - optional hook
        """Check preconditions; raise :class:`RewriteError` if the graph is not ready for this pass."""

    @abstractmethod
    def call(self, gm: GraphModule) -> PassResult:
        """Rewrite ``gm`` (in place or into a new module) and report what changed."""

    def ensures(self, gm: GraphModule) -> None:  # noqa: B027 - optional hook
        """Check postconditions; raise :class:`RewriteError` if the pass did not establish them."""

    def __call__(self, gm: GraphModule) -> PassResult:
        self.requires(gm)
        result = self.call(gm)
        if result.modified:
            result.gm.recompile()
        self.ensures(result.gm)
        return result

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def copy_meta(src: Node, dst: Node) -> Node:
    """Give a replacement node its origin's provenance (module stack and user source line)."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
        if key in src.meta and key not in dst.meta:
            dst.meta[key] = src.meta[key]
    return dst


def replace_with_call(out: Node, target: object, args: tuple, pass_name: str, inner: Iterable[Node] = ()) -> int:
    """Replace ``out`` by a new ``target(*args)`` node in its place, stamped with ``pass_name``'s provenance.

    ``inner`` are the matched pattern's other nodes, output side first (users before what they use);
    each left without users is erased too. Returns how many of them were erased.
    """
    graph = out.graph
    with graph.inserting_before(out):
        new = graph.call_function(target, args)  # type: ignore[arg-type]
    copy_meta(out, new)
    new.meta[PASS_KEY] = pass_name
    infer_meta(new)
    out.replace_all_uses_with(new)
    graph.erase_node(out)
    removed = 0
    for n in inner:
        if not n.users and not getattr(n, "_erased", False):
            graph.erase_node(n)
            removed += 1
    return removed


def replace_with_tuple_call(at: Node, outs: Sequence[Node], target: object, args: tuple, pass_name: str) -> Node:
    """Replace the nodes ``outs`` by the outputs of one new ``target(*args)`` node (a tuple: one ``getitem``
    per replaced node, in order), inserted before ``at``; returns the new node. ``outs`` are erased in order,
    so a node that uses a later one comes first."""
    graph = at.graph
    with graph.inserting_before(at):
        call = graph.call_function(target, args)  # type: ignore[arg-type]
        items = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outs))]
    for new, src in ((call, outs[0]), *zip(items, outs, strict=True)):
        copy_meta(src, new)
        new.meta[PASS_KEY] = pass_name
        infer_meta(new)
    for old, new in zip(outs, items, strict=True):
        old.replace_all_uses_with(new)
    for old in outs:
        graph.erase_node(old)
    return call


@dataclass
class PassRecord:
    """One step of a pipeline run, for reports, dumps and bisection."""

    index: int  # 1-based position in the pipeline
    name: str  # the pass's name
    skipped: bool  # disabled by name
    modified: bool  # whether the pass changed the graph
    stats: dict[str, int]  # the pass's counters
    seconds: float  # wall time of requires + call + ensures (+ verify)
    nodes_before: int  # node count before the pass
    nodes_after: int  # node count after the pass
    ir: str | None = None  # IR text after the pass, when it was printed or dumped


@dataclass
class PipelineReport:
    """The whole run: the input IR and one record per pass."""

    records: list[PassRecord] = field(default_factory=list)
    input_ir: str | None = None  # IR text before the first pass, when recorded
    seconds: float = 0.0  # total time of all passes

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """Per-pass statistics and timings: ``{"cse": {"nodes_removed": 3, "seconds": 0.01}}``."""
        return {r.name: {**r.stats, "seconds": r.seconds} for r in self.records if not r.skipped}


PrintSpec = str | Sequence[str] | None


def _wants_print(spec: PrintSpec, name: str, modified: bool) -> bool:
    if spec is None:
        return False
    if spec == "all":
        return True
    if spec == "change":
        return modified
    names = [spec] if isinstance(spec, str) else list(spec)
    return name in names


class PassManager:
    """Runs passes in order with verification, timing, provenance, printing and dumps.

    Args:
        passes: the ordered pipeline.
        verify_each: run :func:`kiln.ir.verify` after every pass (debug mode and tests).
        disable: names of passes to skip.
        print_ir_after: ``"all"``, ``"change"`` or pass names: print the IR after those passes.
        dump_dir: write ``000_input.txt``, ``{i:03d}_{pass}.txt`` and ``index.html`` there.
        on_step: called after each pass with its record and the graph (used by bisection).
        printer: where printed IR goes (``print`` by default).
        progress: called with each pass's name before it runs (progress displays).
        record_ir: keep the IR text before and after every pass in the report.
    """

    def __init__(
        self,
        passes: Iterable[Pass],
        *,
        verify_each: bool = False,
        disable: Iterable[str] = (),
        print_ir_after: PrintSpec = None,
        dump_dir: str | Path | None = None,
        on_step: Callable[[PassRecord, GraphModule], None] | None = None,
        printer: Callable[[str], None] = print,
        progress: Callable[[str], None] | None = None,
        record_ir: bool = False,
    ) -> None:
        self.passes = list(passes)
        names = [p.name for p in self.passes]
        unknown = sorted(set(disable) - set(names))
        if unknown:
            raise KilnError(f"cannot disable unknown pass(es) {unknown}; the pipeline has {names}")
        if print_ir_after not in (None, "all", "change"):
            wanted = [print_ir_after] if isinstance(print_ir_after, str) else list(print_ir_after)
            missing = sorted(set(wanted) - set(names))
            if missing:
                raise KilnError(f"print_ir_after names unknown pass(es) {missing}; the pipeline has {names}")
        self.verify_each = verify_each
        self.disable = set(disable)
        self.print_ir_after = print_ir_after
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.on_step = on_step
        self.printer = printer
        self.progress = progress
        self.record_ir = record_ir

    def run(self, gm: GraphModule) -> tuple[GraphModule, PipelineReport]:
        """Run every enabled pass on ``gm``; return the final graph and the report."""
        report = PipelineReport()
        keep_text = self.record_ir or self.dump_dir is not None
        if keep_text:
            report.input_ir = print_ir(gm)
        if self.verify_each:
            verify(gm)
        start_all = time.perf_counter()
        for i, p in enumerate(self.passes, start=1):
            n_before = len(gm.graph.nodes)
            if p.name in self.disable:
                report.records.append(PassRecord(i, p.name, True, False, {}, 0.0, n_before, n_before))
                continue
            if self.progress:
                self.progress(p.name)
            before = set(gm.graph.nodes)
            start = time.perf_counter()
            try:
                result = p(gm)
                gm = result.gm
                if result.modified:
                    for node in gm.graph.nodes:
                        if node not in before:
                            node.meta.setdefault(PASS_KEY, p.name)
                if self.verify_each:
                    verify(gm)
            except Exception as e:
                raise self._error(p, i, e) from e
            seconds = time.perf_counter() - start
            record = PassRecord(i, p.name, False, result.modified, dict(result.stats), seconds, n_before, len(gm.graph.nodes))
            printed = _wants_print(self.print_ir_after, p.name, result.modified)
            if keep_text or printed:
                record.ir = print_ir(gm)
            if printed:
                self.printer(f"// ----- IR after {p.name} ({i}/{len(self.passes)}) -----\n{record.ir}")
            report.records.append(record)
            if self.on_step:
                self.on_step(record, gm)
        report.seconds = time.perf_counter() - start_all
        if self.dump_dir is not None:
            from kiln.dump import write_dump

            write_dump(self.dump_dir, report)
        return gm, report

    def _error(self, p: Pass, index: int, e: Exception) -> PassError:
        before = [q.name for q in self.passes[: index - 1] if q.name not in self.disable]
        node = getattr(e, "node", None)
        where = f"\n  at node %{node.name}  # {provenance(node)}" if isinstance(node, Node) else ""
        return PassError(
            f"pass {p.name!r} ({index}/{len(self.passes)}) failed: {type(e).__name__}: {e}{where}\n"
            f"  passes run before it: {', '.join(before) or '(none)'}\n"
            f"  to skip it: CompileConfig(disable=({p.name!r},)) or --disable {p.name}"
        )


__all__ = ["Pass", "PassManager", "PassRecord", "PassResult", "PipelineReport", "RewriteError", "copy_meta", "replace_with_call"]
