"""Tiny evaluation fixtures made here: a prepared folder (eval parquet + HF tokenizer) and a model.

The data has a learnable pattern: within a domain, item i is followed by item i+1 (mod the domain
size), so SASRec and fine-tuning have something to find. Domain A has 12 items, B has 16.
"""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cprec.config import PromptConfig

N_ITEMS = {"A": 12, "B": 16}
WORDS = ["salt", "sweet", "green", "spicy", "crisp", "steel", "wooden", "glass", "sharp", "soft"]


def item_id(domain: str, i: int) -> str:
    return f"{domain.lower()}{i}"


def title(domain: str, i: int) -> str:
    kind = "snack" if domain == "A" else "pan"
    return f"{WORDS[i % len(WORDS)]} {WORDS[(i * 3 + 1) % len(WORDS)]} {kind} {i}"


def make_sequence(rng: random.Random, length: int) -> list[tuple[str, int]]:
    """A mixed sequence: runs of consecutive items (i, i+1, ...) in one domain, then the other."""
    out = []
    domain = rng.choice("AB")
    i = rng.randrange(N_ITEMS[domain])
    while len(out) < length:
        out.append((domain, i))
        if rng.random() < 0.2:
            domain = "B" if domain == "A" else "A"
            i = rng.randrange(N_ITEMS[domain])
        else:
            i = (i + 1) % N_ITEMS[domain]
    return out


def write_tokenizer(folder: Path, texts: list[str], vocab_size: int = 300, kind: str = "bpe") -> None:
    """A BPE (or unigram) HF tokenizer trained on ``texts``, saved into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>")
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(folder))


def make_prepared(
    folder: Path, n_train: int = 60, n_eval: int = 16, seed: int = 0, vocab_size: int = 300, kind: str = "bpe"
) -> Path:
    """Write ``folder/eval/*.parquet`` and ``folder/tokenizer/`` (``kind`` bpe or unigram, trained
    here with ``vocab_size``); returns the folder."""
    rng = random.Random(seed)
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    prompt = PromptConfig()
    items = {"item": [], "domain": [], "title": [], "text": []}
    for d, n in N_ITEMS.items():
        for i in range(n):
            items["item"].append(item_id(d, i))
            items["domain"].append(d)
            items["title"].append(title(d, i))
            items["text"].append(prompt.item.format(title=title(d, i)))
    pq.write_table(pa.table(items), folder / "eval" / "items.parquet")

    train = {"user": [], "items": [], "domains": []}
    for u in range(n_train):
        seq = make_sequence(rng, rng.randint(4, 9))
        train["user"].append(f"t{u}")
        train["items"].append([item_id(d, i) for d, i in seq])
        train["domains"].append([d for d, _ in seq])
    pq.write_table(pa.table(train), folder / "eval" / "train_sequences.parquet")

    users = {"user": [], "split": [], "domain": [], "history": [], "target": []}
    for u in range(n_eval):
        seq = make_sequence(rng, rng.randint(4, 8))
        for split, cut in (("valid", len(seq) - 1), ("test", len(seq))):
            d, i = seq[cut - 1]
            users["user"].append(f"e{u}")
            users["split"].append(split)
            users["domain"].append(d)
            users["history"].append([item_id(dd, ii) for dd, ii in seq[: cut - 1]])
            users["target"].append(item_id(d, i))
    pq.write_table(pa.table(users), folder / "eval" / "users.parquet")

    corpus = list(items["text"]) + [f"[{d}] {t}" for d, t in zip(items["domain"], items["title"])]
    corpus += [prompt.mixed_seq.format(items="; ".join(corpus[:6])), "; "] * 3
    write_tokenizer(folder / "tokenizer", corpus, vocab_size, kind)
    return folder


def make_model_folder(folder: Path, vocab_size: int, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny random LlamaForCausalLM saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory) -> Path:
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_prepared):
    from cprec.eval.encode import load_tokenizer

    return load_tokenizer(tiny_prepared)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("model"), len(tiny_tokenizer))


@pytest.fixture
def tiny_model(tiny_model_dir):
    from cprec.eval.encode import load_model

    return load_model(tiny_model_dir, torch.device("cpu"))


@pytest.fixture(scope="session")
def eval_fixtures():
    """The builders of this file, for tests that need another prepared folder or model (tests
    cannot import ``conftest`` by name: several test folders have one)."""
    import types

    return types.SimpleNamespace(make_prepared=make_prepared, make_model_folder=make_model_folder)
