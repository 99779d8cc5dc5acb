"""kiln.data.tokenizer: a byte-level BPE that round-trips text, deterministic, loadable by HF."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from kiln.data import corpus
from kiln.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from kiln.errors import ConfigError

TRICKY = "def f(x):\n\tif x:\r\n        return 'héllo ∑ 😀'  # \x00 nul\n\n\n   trailing   \n"


@pytest.fixture(scope="module")
def docs() -> list[corpus.Document]:
    return corpus.read_eval_split()[:8]


@pytest.fixture(scope="module")
def tok(docs: list[corpus.Document]) -> Tokenizer:
    return train_tokenizer((d.text for d in docs), vocab_size=300)


def test_special_tokens_and_vocab(tok: Tokenizer) -> None:
    assert tok.get_vocab_size() == 300
    assert [tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")] == [BOS_ID, EOS_ID, PAD_ID]
    assert tok.encode("x = 1").ids[0] == BOS_ID


def test_round_trip(tok: Tokenizer, docs: list[corpus.Document]) -> None:
    for text in [TRICKY, "", " ", *(d.text for d in docs)]:
        ids = tok.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok.encode(docs[0].text).ids) < len(docs[0].text.encode())  # merges compress


def test_training_is_deterministic(tok: Tokenizer, docs: list[corpus.Document]) -> None:
    again = train_tokenizer((d.text for d in docs), vocab_size=300)
    assert again.to_str() == tok.to_str()


def test_save_load_and_transformers(tok: Tokenizer, tmp_path: Path) -> None:
    save_tokenizer(tok, tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in tmp_path.iterdir()}
    assert load_tokenizer(tmp_path).to_str() == tok.to_str()
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tmp_path)
    ids = hf(TRICKY)["input_ids"]
    assert ids == tok.encode(TRICKY).ids
    assert hf.decode(ids, skip_special_tokens=True) == TRICKY
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (BOS_ID, EOS_ID, PAD_ID)


def test_encode_documents_layout(tok: Tokenizer) -> None:
    stream = encode_documents(tok, ["a = 1\n", "b = 2\n"], progress=False)
    assert stream.dtype.is_floating_point is False and stream.ndim == 1
    ids = stream.tolist()
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and ids.count(BOS_ID) == 2 and ids.count(EOS_ID) == 2
    split = ids.index(EOS_ID)
    assert tok.decode(ids[: split + 1], skip_special_tokens=True) == "a = 1\n"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer(["x"], vocab_size=100)
    with pytest.raises(ConfigError, match="no tokenizer"):
        load_tokenizer(tmp_path)
