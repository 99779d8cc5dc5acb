"""kiln.data.corpus: deterministic documents, a stable hash split, the committed eval split."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from kiln.data import corpus
from kiln.errors import ConfigError


@pytest.fixture(scope="module")
def documents() -> list[corpus.Document]:
    return corpus.build_documents()


def test_build_documents_is_deterministic(documents: list[corpus.Document]) -> None:
    again = corpus.build_documents()
    assert [d.path for d in again] == [d.path for d in documents]
    assert all(a.text == b.text for a, b in zip(again, documents, strict=True))
    assert len(documents) > 100
    sources = [d.path for d in documents if not d.path.startswith(corpus.TOPICS_PREFIX)]
    assert sources == sorted(sources)
    assert any(d.path.startswith(corpus.TOPICS_PREFIX) for d in documents)


def test_excludes_tests_site_packages_and_build_files(documents: list[corpus.Document]) -> None:
    for d in documents:
        parts = d.path.split("/")
        assert not set(parts[:-1]) & {"test", "tests", "idle_test", "site-packages", "__pycache__"}, d.path
        assert not parts[-1].startswith("_sysconfigdata"), d.path
        assert "\r" not in d.text
    assert "pydoc_data/topics.py" not in {d.path for d in documents}


def test_source_walk_order_is_independent_of_creation_order(tmp_path: Path) -> None:
    for name in ["zeta.py", "alpha.py", "pkg/mid.py", "test/test_x.py", "pkg/tests/t.py",
                 "site-packages/lib.py", "crlf.py", "empty.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x = 1\r\ny = 2\r\n" if name == "crlf.py" else
                                      b"" if name == "empty.py" else f"# {name}\n".encode())
    docs = list(corpus.iter_source_documents(tmp_path))
    assert [d.path for d in docs] == ["alpha.py", "crlf.py", "pkg/mid.py", "zeta.py"]
    assert docs[1].text == "x = 1\ny = 2\n"


def test_split_is_a_pure_function_of_the_path(documents: list[corpus.Document]) -> None:
    paths = [d.path for d in documents]
    assert [corpus.split_of(p) for p in paths] == [corpus.split_of(p) for p in paths]
    n_eval = sum(corpus.split_of(p) == "eval" for p in paths)
    assert 0.5 * corpus.EVAL_FRACTION * len(paths) < n_eval < 2 * corpus.EVAL_FRACTION * len(paths)
    kept, held = corpus.holdout(documents, 0.1)
    assert len(kept) + len(held) == len(documents) and held
    assert {d.path for d in kept}.isdisjoint(d.path for d in held)


def test_train_and_eval_splits_are_disjoint() -> None:
    eval_docs = corpus.load_split("eval")
    train_docs = corpus.load_split("train")
    eval_paths = {d.path for d in eval_docs}
    assert len(eval_docs) >= 20
    assert all(corpus.split_of(p) == "eval" for p in eval_paths)
    assert eval_paths.isdisjoint(d.path for d in train_docs)
    assert all(corpus.split_of(d.path) == "train" for d in train_docs)
    assert sum(len(d.text) for d in train_docs) > 20 * sum(len(d.text) for d in eval_docs) / 2


def test_committed_eval_split_is_small_and_well_formed() -> None:
    size = corpus.EVAL_SPLIT_FILE.stat().st_size
    assert 10_000 < size < 2_000_000
    docs = corpus.read_eval_split()
    assert sum(len(d.text) for d in docs) <= corpus.EVAL_MAX_CHARS
    assert len({d.path for d in docs}) == len(docs)
    assert all(d.text.strip() for d in docs)


def test_write_eval_split_round_trips_and_caps(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(400):
        (root / f"m{i:03d}.py").write_text(f"def f{i}():\n    return {i}\n" * 5)
    out = tmp_path / "eval.jsonl.xz"
    docs = corpus.write_eval_split(out, root=root, max_chars=600)
    assert docs and sum(len(d.text) for d in docs) <= 600
    assert all(corpus.split_of(d.path) == "eval" for d in docs)
    assert corpus.read_eval_split(out) == docs
    first = out.read_bytes()
    corpus.write_eval_split(out, root=root, max_chars=600)
    assert out.read_bytes() == first  # byte-identical: no timestamps in the file
    assert lzma.decompress(first).decode().count("\n") == len(docs)


def test_bad_split_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown split"):
        corpus.load_split("valid")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="missing"):
        corpus.read_eval_split(tmp_path / "nope.jsonl.xz")
