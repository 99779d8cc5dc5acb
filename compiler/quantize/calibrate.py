"""Calibration: run the *prepared* graph (observers inserted as ``call_module`` nodes) over data.

After ``torch.ao``'s prepare / calibrate / convert flow, on kiln's IR: :func:`prepared`
inserts one observer per value to watch (a linear's input), so the printed IR shows
``%obs = module _kiln_observer_0(%x)`` where the observer sits; :func:`run_graph` runs the
graph node by node (``torch.fx.Interpreter``) over calibration samples with a tqdm bar;
leaving the context removes the observers again, leaving the graph as it was.

Calibration data (``Calibration.data``) may be:

- a 1-D token stream: ``num_samples`` windows of ``seq_len`` tokens, spread evenly over it;
- a 2-D ``(n, T)`` tensor: its first ``num_samples`` rows, one sample each;
- a list of tensors (each one sample's ``input_ids``) or of dicts (input name -> tensor);
- a :mod:`kiln.data` split name (``"train"``; use a split you do not evaluate on) with
  ``Calibration.tokenizer`` (a folder or ``tokenizers.Tokenizer``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter, Node
from tqdm.auto import tqdm

from kiln.errors import ConfigError
from kiln.quantize.config import Calibration
from kiln.quantize.observers import StopGraph

OBSERVER_PREFIX = "_kiln_observer_"


def input_names(gm: GraphModule) -> list[str]:
    """The graph's tensor inputs (placeholders whose example value is a tensor), in order."""
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder" and _is_tensor_input(n)]


def _is_tensor_input(node: Node) -> bool:
    val = node.meta.get("val")
    return val is None or isinstance(val, Tensor)


def _flat_inputs(gm: GraphModule, sample: Mapping[str, Tensor]) -> list[Any]:
    """One value per placeholder: the sample's tensors; constants (``use_cache=False``) as captured."""
    return [sample[str(n.target)] if _is_tensor_input(n) else n.meta["val"]
            for n in gm.graph.nodes if n.op == "placeholder"]


def _windows(tokens: Tensor, n: int, seq_len: int) -> list[Tensor]:
    if tokens.numel() < seq_len:
        return [tokens[None]]
    last = tokens.numel() - seq_len
    count = min(n, last // seq_len + 1)
    starts = torch.linspace(0, last, count).long().tolist()
    return [tokens[s : s + seq_len][None] for s in starts]  # each (1, seq_len)


def samples_of(calibration: Calibration, names: Sequence[str]) -> list[dict[str, Tensor]]:
    """Calibration samples as ``{input name: tensor}`` for a graph with inputs ``names``."""
    data = calibration.data
    if data is None:
        raise ConfigError("no calibration data: set QuantConfig.calibration.data (see kiln.quantize.calibrate)")
    if isinstance(data, str):
        from kiln.eval import resolve_tokens

        data = resolve_tokens(data, calibration.tokenizer)
    items: list[Any]
    if isinstance(data, Tensor) and data.dim() == 1:
        items = _windows(data.long(), calibration.num_samples, calibration.seq_len)
    elif isinstance(data, Tensor) and data.dim() == 2:
        items = [row[None] for row in data[: calibration.num_samples]]
    elif isinstance(data, Mapping):
        items = [data]
    elif isinstance(data, Sequence):
        items = list(data)[: calibration.num_samples]
    else:
        raise ConfigError(
            f"calibration data of type {type(data).__name__} is not supported: pass a 1-D token stream, "
            "an (n, T) tensor, a list of tensors or dicts, or a kiln.data split name"
        )
    out: list[dict[str, Tensor]] = []
    for item in items:
        if isinstance(item, Mapping):
            missing = [n for n in names if n not in item]
            if missing:
                raise ConfigError(f"calibration sample lacks inputs {missing}; the graph takes {list(names)}")
            out.append({n: item[n] for n in names})
        elif isinstance(item, Tensor):
            if len(names) != 1:
                raise ConfigError(f"the graph takes inputs {list(names)}: give calibration samples as dicts naming them")
            out.append({names[0]: item if item.dim() >= 2 else item[None]})
        else:
            raise ConfigError(f"a calibration sample must be a tensor or a dict, got {type(item).__name__}")
    if not out:
        raise ConfigError("calibration data holds no samples")
    return out


def insert_observers(gm: GraphModule, points: Mapping[Node, nn.Module], users: Mapping[Node, Sequence[Node]]) -> list[Node]:
    """Insert ``observer(x)`` after each value ``x`` in ``points``; ``users[x]`` read the observed value."""
    inserted: list[Node] = []
    for i, (node, observer) in enumerate(points.items()):
        name = f"{OBSERVER_PREFIX}{i}"
        gm.add_submodule(name, observer)
        with gm.graph.inserting_after(node):
            obs = gm.graph.call_module(name, (node,))
        obs.meta["val"] = node.meta.get("val")
        for user in users.get(node, ()):
            user.replace_input_with(node, obs)
        inserted.append(obs)
    return inserted


def remove_observers(gm: GraphModule, nodes: Sequence[Node]) -> None:
    """Undo :func:`insert_observers`: uses go back to the observed values, submodules are deleted."""
    for obs in nodes:
        obs.replace_all_uses_with(obs.args[0])  # type: ignore[arg-type]
        gm.graph.erase_node(obs)
        if hasattr(gm, str(obs.target)):
            delattr(gm, str(obs.target))


@contextlib.contextmanager
def prepared(
    gm: GraphModule, points: Mapping[Node, nn.Module], users: Mapping[Node, Sequence[Node]] | None = None
) -> Iterator[GraphModule]:
    """The graph with observers inserted at ``points`` for the duration of the block."""
    nodes = insert_observers(gm, points, users or {})
    gm.recompile()
    try:
        yield gm
    finally:
        remove_observers(gm, nodes)
        gm.recompile()


class _ConstantCachingInterpreter(Interpreter):
    """An Interpreter that computes each value depending on constants alone once (weight Q/DQ, RoPE tables)."""

    def __init__(self, gm: GraphModule) -> None:
        super().__init__(gm)
        self.constants: dict[Node, Any] = {}

    def run_node(self, n: Node) -> Any:
        if n in self.constants:
            return self.constants[n]
        out = super().run_node(n)
        if n.op == "get_attr" or (
            n.op == "call_function" and n.all_input_nodes and not n.is_impure()
            and all(a in self.constants for a in n.all_input_nodes)
        ):
            self.constants[n] = out
        return out


@torch.no_grad()
def run_graph(gm: GraphModule, samples: Sequence[Mapping[str, Tensor]], *, progress: bool = True,
              desc: str = "calibrating") -> int:
    """Run ``gm`` node by node over ``samples``; return how many ran."""
    interpreter = _ConstantCachingInterpreter(gm)
    for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress, leave=False):
        try:
            interpreter.run(*_flat_inputs(gm, sample))
        except StopGraph:  # the observers this run needs have all seen the sample
            pass
    return len(samples)


def calibrate(
    gm: GraphModule, points: Mapping[Node, nn.Module], calibration: Calibration,
    users: Mapping[Node, Sequence[Node]] | None = None, *, desc: str = "calibrating", stop_early: bool = True,
) -> int:
    """Insert observers at ``points``, run the calibration samples, remove them; return the sample count.

    ``stop_early``: each run ends at the last observer (in graph order) instead of the graph's output.
    """
    samples = samples_of(calibration, input_names(gm))
    if stop_early and points:
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        last = max(points, key=order.__getitem__)
        points[last].stop = True  # type: ignore[union-attr]
    try:
        with prepared(gm, points, users):
            return run_graph(gm, samples, progress=calibration.progress, desc=desc)
    finally:
        for obs in points.values():
            obs.stop = False  # type: ignore[union-attr]


def calibration_tokens(
    tokenizer: Any, n_tokens: int, *, split: str = "train", per_document: int = 1024, seed: int = 0
) -> Tensor:
    """``n_tokens`` tokens of ``split``: at most ``per_document`` from each of documents drawn at random
    (seeded), as one 1-D stream. For kiln's shipped models: calibrate on ``"train"``, evaluate on ``"eval"``.
    """
    from kiln.data import encode_documents, load_split, load_tokenizer

    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) or hasattr(tokenizer, "__fspath__") else tokenizer
    docs = load_split(split)  # type: ignore[arg-type]
    order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    chunks: list[Tensor] = []
    total = 0
    for i in order:
        ids = encode_documents(tok, [docs[i]], progress=False)[:per_document]
        chunks.append(ids)
        total += ids.numel()
        if total >= n_tokens:
            break
    return torch.cat(chunks)[:n_tokens]


__all__ = [
    "OBSERVER_PREFIX",
    "calibrate",
    "calibration_tokens",
    "input_names",
    "insert_observers",
    "prepared",
    "remove_observers",
    "run_graph",
    "samples_of",
]
