"""Sentencepiece training into an HF folder: exact round trip, same ids as sentencepiece, hashing."""

from __future__ import annotations

import json
import random

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from cprec.config import TokenizerConfig
from cprec.prepare.tokenize import (
    MARKER,
    batch_encoder,
    install_tokenizer,
    load_tokenizer,
    special_ids,
    text_codec,
    tokenizer_hash,
    train_sentencepiece,
)

WORDS = "coffee tea kettle pan knife fork spoon organic green black roast bean cup mug steel glass".split()
TRICKY = [
    "  two  spaces and\ttab\nnew line ",
    " leading space",
    "trailing space ",
    "Ünïcödé émoji 🎉 中文 never seen in training ½",
    "A user's history: [A] Coffee Mug, 12 oz; [B] Steel Knife (Pack of 2)",
    "",
    "1995)",
]


def corpus(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [
            rng.choice(WORDS).capitalize() if rng.random() < 0.3 else rng.choice(WORDS) for _ in range(8)
        ]
        lines.append(" ".join(words) + f", {rng.randint(1, 64)} oz (Pack of {rng.randint(1, 12)})")
    return lines


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "bpe"
    train_sentencepiece(corpus(), folder, TokenizerConfig(vocab_size=400))
    return folder


def test_folder_loads_with_autotokenizer(bpe_folder):
    tok = AutoTokenizer.from_pretrained(str(bpe_folder))
    assert special_ids(tok) == {"bos_id": 2, "eos_id": 3, "pad_id": 0}
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok("coffee mug", add_special_tokens=True)["input_ids"] == tok.encode(
        "coffee mug", add_special_tokens=False
    )
    assert json.loads((bpe_folder / MARKER).read_text())["ids_match_sentencepiece"] is True


def test_exact_round_trip_and_same_ids_as_sentencepiece(bpe_folder):
    tok = AutoTokenizer.from_pretrained(str(bpe_folder))
    sp = spm.SentencePieceProcessor(model_file=str(bpe_folder / "tokenizer.model"))
    texts = corpus(200, seed=1) + TRICKY
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == text  # exact, whitespace and unseen characters included
    assert 1 not in sum((sp.encode(t) for t in TRICKY), [])  # byte fallback: never <unk>


def test_text_codec_matches_hf(bpe_folder):
    encode, decode = text_codec(bpe_folder)
    tok = load_tokenizer(bpe_folder)
    texts = corpus(50, seed=2) + TRICKY
    assert (
        encode(texts) == batch_encoder(tok)(texts) == [tok.encode(t, add_special_tokens=False) for t in texts]
    )
    assert [decode(ids) for ids in encode(texts)] == texts
    one_thread, _ = text_codec(bpe_folder, threads=1)  # what a Ray task given one core encodes with
    assert one_thread(texts) == encode(texts)


def test_training_is_deterministic(tmp_path, bpe_folder):
    again = train_sentencepiece(corpus(), tmp_path / "again", TokenizerConfig(vocab_size=400))
    assert (again / "tokenizer.model").read_bytes() == (bpe_folder / "tokenizer.model").read_bytes()
    assert tokenizer_hash(again) == tokenizer_hash(bpe_folder)


def test_hash_stable_across_save_and_sensitive_to_vocab(tmp_path, bpe_folder):
    h = tokenizer_hash(bpe_folder)
    assert h == tokenizer_hash(load_tokenizer(bpe_folder))
    copy = install_tokenizer(bpe_folder, tmp_path / "copy")  # e.g. into an exported model folder
    assert tokenizer_hash(copy) == tokenizer_hash(tmp_path / "copy") == h
    other = train_sentencepiece(corpus(seed=5), tmp_path / "other", TokenizerConfig(vocab_size=420))
    assert tokenizer_hash(other) != h


def test_unigram_round_trip(tmp_path):
    folder = train_sentencepiece(
        corpus(), tmp_path / "uni", TokenizerConfig(vocab_size=400, model_type="unigram")
    )
    tok = load_tokenizer(folder)
    encode, decode = text_codec(folder)  # unigram: the HF tokenizer (ties may break differently)
    for text in corpus(50, seed=3) + TRICKY:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert decode(encode([text])[0]) == text


def test_bad_tokenizer_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises((ValueError, OSError)):
        load_tokenizer(tmp_path / "empty")


def test_empty_corpus_fails(tmp_path):
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece(["", ""], tmp_path / "x", TokenizerConfig())
