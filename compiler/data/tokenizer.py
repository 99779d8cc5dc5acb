"""Byte-level BPE tokenizer for kiln's reference models.

Byte-pair encoding as in Sennrich, Haddow and Birch, "Neural Machine Translation of Rare
Words with Subword Units" (ACL 2016), over bytes rather than characters as in GPT-2
(Radford et al., 2019), so every string round-trips exactly. Trained with the Hugging Face
``tokenizers`` library; saved as ``tokenizer.json`` plus ``tokenizer_config.json`` and
``special_tokens_map.json``, which ``transformers.AutoTokenizer.from_pretrained`` reads.

Every encoded document starts with ``<|bos|>`` (the post-processor adds it); training
streams also end each document with ``<|eos|>``. No normalizer: the text is kept exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

from kiln.data.corpus import Document
from kiln.errors import ConfigError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
#: Special tokens, in id order: ``<|bos|>`` = 0, ``<|eos|>`` = 1, ``<|pad|>`` = 2.
SPECIAL_TOKENS = (BOS, EOS, PAD)
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
DEFAULT_VOCAB_SIZE = 8192


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
    length: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` (deterministic for the same texts)."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size={vocab_size} is below the 256 bytes + 3 special tokens; use >= 259")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    ids = [tok.token_to_id(t) for t in SPECIAL_TOKENS]
    if ids != [BOS_ID, EOS_ID, PAD_ID]:  # BpeTrainer places special tokens first
        raise AssertionError(f"special token ids {ids} != {[BOS_ID, EOS_ID, PAD_ID]}")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, folder: str | Path, *, model_max_length: int = 512) -> Path:
    """Write ``tokenizer.json`` and the Hugging Face side files into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,  # keep decoded text byte-exact
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    special_map = {k: v for k, v in special.items() if v is not None}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return folder / "tokenizer.json"


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load ``tokenizer.json`` from a file or a model folder."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no tokenizer at {file}; train one with kiln.data.train_tokenizer()")
    return Tokenizer.from_file(str(file))


def encode_documents(
    tok: Tokenizer,
    docs: Sequence[Document] | Sequence[str],
    *,
    add_eos: bool = True,
    batch: int = 64,
    progress: bool = True,
) -> torch.Tensor:
    """One token stream for ``docs``: ``<|bos|> doc <|eos|>`` each, concatenated, as int64 (N,)."""
    texts = [d.text if isinstance(d, Document) else d for d in docs]
    chunks: list[np.ndarray] = []
    eos = np.array([EOS_ID], dtype=np.int64)
    for start in tqdm(range(0, len(texts), batch), desc="tokenize", unit="batch", disable=not progress):
        for enc in tok.encode_batch(texts[start : start + batch]):
            chunks.append(np.asarray(enc.ids, dtype=np.int64))
            if add_eos:
                chunks.append(eos)
    if not chunks:
        return torch.empty(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(chunks))


__all__ = [
    "BOS",
    "BOS_ID",
    "DEFAULT_VOCAB_SIZE",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "encode_documents",
    "load_tokenizer",
    "save_tokenizer",
    "train_tokenizer",
]
