"""A deterministic text corpus that every machine with Python already has.

Documents are the running interpreter's standard-library source files (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, sorted by relative path, test directories,
``site-packages`` and build-specific files left out) and the topics of the ``pydoc_data``
help text that ``pydoc`` serves. Each document is assigned to a split by hashing its
relative path (SHA-256 with a fixed salt), so the assignment does not depend on the
machine, the file's contents or the order files are found in: about 95% train, 5% eval
(5% rather than 2% so the held-out text is tens of documents, not one dominant file).

The evaluation split is committed in the repository (``eval_split.jsonl.xz``), so quality
figures are comparable across machines and Python versions: :func:`load_split` reads
``"eval"`` from that file, and builds ``"train"`` from the running interpreter, leaving out
every document whose path hashes into the evaluation split. Training on repeated epochs of
a small corpus follows Muennighoff et al., "Scaling Data-Constrained Language Models" (2023).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kiln.errors import ConfigError

Split = Literal["train", "eval"]

#: Salt mixed into the path hash: changing it reshuffles the splits (and obsoletes the committed file).
SPLIT_SALT = "kiln-corpus-v1"
#: Fraction of documents, by path hash, that belong to the evaluation split.
EVAL_FRACTION = 0.05
#: Cap on the committed evaluation split's text (characters); documents past it are unused.
EVAL_MAX_CHARS = 2_000_000
#: The committed evaluation split, one JSON object ``{"path", "text"}`` per line, xz-compressed.
EVAL_SPLIT_FILE = Path(__file__).with_name("eval_split.jsonl.xz")

#: Directory names whose contents are never part of the corpus.
EXCLUDED_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"}
)
#: Prefix of the pydoc help-topic documents' paths.
TOPICS_PREFIX = "pydoc_data/topics/"


@dataclass(frozen=True)
class Document:
    """One corpus document: a source file or a pydoc topic."""

    path: str  # relative POSIX path, e.g. "json/decoder.py" or "pydoc_data/topics/assert"
    text: str  # contents, newlines normalized to "\n"


def path_bucket(path: str, salt: str = SPLIT_SALT) -> float:
    """A number in [0, 1) fixed by ``path`` and ``salt`` alone (salted SHA-256)."""
    digest = hashlib.sha256(f"{salt}:{path}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") % 10_000) / 10_000


def split_of(path: str) -> Split:
    """The split a document belongs to, from a salted SHA-256 of its relative path."""
    return "eval" if path_bucket(path) < EVAL_FRACTION else "train"


def holdout(
    docs: Sequence[Document], fraction: float, *, salt: str = "kiln-valid-v1"
) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` by path hash into ``(kept, held_out)``, ``fraction`` of them held out
    (e.g. a validation set carved from the training split)."""
    held = [d for d in docs if path_bucket(d.path, salt) < fraction]
    kept = [d for d in docs if path_bucket(d.path, salt) >= fraction]
    return kept, held


def _excluded(rel: Path) -> bool:
    parts = rel.parts
    if any(p in EXCLUDED_DIRS or p.startswith("config-") for p in parts[:-1]):
        return True
    name = parts[-1]
    return (
        name.startswith("test_")
        or name.startswith("_sysconfigdata")  # build-machine specific
        or rel.as_posix() == "pydoc_data/topics.py"  # its text is the topics documents
    )


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def iter_source_documents(root: Path | None = None) -> Iterator[Document]:
    """Standard-library ``*.py`` files under ``root``, sorted by relative path."""
    root = stdlib_root() if root is None else Path(root)
    rels = sorted(
        (p.relative_to(root) for p in root.rglob("*.py") if p.is_file()), key=lambda r: r.as_posix()
    )
    for rel in rels:
        if not _excluded(rel):
            text = _read_text(root / rel)
            if text.strip():
                yield Document(rel.as_posix(), text)


def iter_topic_documents() -> Iterator[Document]:
    """The ``pydoc_data.topics`` help texts, one document per topic, sorted by name."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].replace("\r\n", "\n")
        if text.strip():
            yield Document(f"{TOPICS_PREFIX}{name}", text)


def build_documents(root: Path | None = None) -> list[Document]:
    """Every corpus document of this interpreter, in a deterministic order (both splits)."""
    return [*iter_source_documents(root), *iter_topic_documents()]


def _eval_cap(docs: Sequence[Document], max_chars: int) -> list[Document]:
    kept: list[Document] = []
    total = 0
    for doc in docs:
        if total + len(doc.text) > max_chars:
            continue
        kept.append(doc)
        total += len(doc.text)
    return kept


def write_eval_split(
    path: Path = EVAL_SPLIT_FILE, *, root: Path | None = None, max_chars: int = EVAL_MAX_CHARS
) -> list[Document]:
    """Write this interpreter's evaluation documents (capped at ``max_chars``) to ``path``.

    Run once by the maintainers; the committed file is what every machine evaluates on.
    """
    docs = _eval_cap([d for d in build_documents(root) if split_of(d.path) == "eval"], max_chars)
    payload = "".join(json.dumps({"path": d.path, "text": d.text}) + "\n" for d in docs)
    # preset 9 | extreme, no timestamps: the file's bytes depend only on the documents
    Path(path).write_bytes(lzma.compress(payload.encode(), preset=9 | lzma.PRESET_EXTREME))
    return docs


def read_eval_split(path: Path = EVAL_SPLIT_FILE) -> list[Document]:
    """The committed evaluation documents."""
    if not Path(path).is_file():
        raise ConfigError(
            f"evaluation split file {path} is missing; reinstall kiln (it ships as package data) "
            "or regenerate it with kiln.data.write_eval_split()"
        )
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [Document(**json.loads(line)) for line in f if line.strip()]


def load_split(name: Split, *, root: Path | None = None) -> list[Document]:
    """The documents of split ``name``: ``"eval"`` from the committed file, ``"train"`` from
    this interpreter, without any document whose path hashes into the evaluation split."""
    if name == "eval":
        return read_eval_split()
    if name == "train":
        return [d for d in build_documents(root) if split_of(d.path) == "train"]
    raise ConfigError(f"unknown split {name!r}; use 'train' or 'eval'")


def corpus_text(docs: Sequence[Document]) -> Iterator[str]:
    """The documents' texts, in order (what a tokenizer trainer consumes)."""
    return (d.text for d in docs)


__all__ = [
    "EVAL_FRACTION",
    "EVAL_SPLIT_FILE",
    "Document",
    "Split",
    "build_documents",
    "corpus_text",
    "holdout",
    "iter_source_documents",
    "iter_topic_documents",
    "load_split",
    "path_bucket",
    "read_eval_split",
    "split_of",
    "stdlib_root",
    "write_eval_split",
]
