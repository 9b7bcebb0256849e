"""Prompt building, pooling, batched encoding and the item-embedding cache on a tiny random Llama."""

from __future__ import annotations

import pytest
import torch

from cprec.config import PromptConfig
from cprec.eval.encode import (
    EncodeProgress,
    Encoder,
    ItemEmbeddingCache,
    PromptBuilder,
    checkpoint_identity,
    embed,
    encode_items,
    pad_batch,
    pool,
)
from cprec.eval.inputs import load_inputs


def test_pool_last_and_mean_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool(hidden, mask, "last").tolist() == [[2.0, 3.0], [10.0, 11.0]]
    assert pool(hidden, mask, "mean").tolist() == [[1.0, 2.0], [8.0, 9.0]]
    with pytest.raises(ValueError, match="pooling"):
        pool(hidden, mask, "max")


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padded_batch_equals_single_encoding(tiny_model, pooling):
    seqs = [[1, 5, 6, 7, 8, 9, 10], [1, 11, 12], [1, 13, 14, 15, 16]]
    ids, mask = pad_batch(seqs, pad_id=0)
    assert ids.shape == (3, 7) and mask.sum().item() == 15
    with torch.no_grad():
        batched = embed(tiny_model, ids, mask, pooling)
        for b, s in enumerate(seqs):
            single = embed(tiny_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), pooling)
            torch.testing.assert_close(batched[b], single[0], atol=1e-5, rtol=1e-4)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(3))  # L2-normalised


def test_last_and_mean_pooling_differ_and_encoder_keeps_order(tiny_model):
    seqs = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    last = Encoder(tiny_model, 0, "last", batch_size=2).encode(seqs)
    mean = Encoder(tiny_model, 0, "mean", batch_size=2).encode(seqs)
    assert last.shape == mean.shape == (3, 32)
    assert not torch.allclose(last, mean)
    with torch.no_grad():
        for b, s in enumerate(seqs):
            one = embed(tiny_model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), "last")
            torch.testing.assert_close(last[b], one[0], atol=1e-5, rtol=1e-4)


def test_prompt_builder_item_budget_and_history(tiny_tokenizer, tiny_prepared):
    cat = load_inputs(tiny_prepared, "test").catalogue
    prompt = PromptConfig(item_token_budget=2)
    b = PromptBuilder(tiny_tokenizer, prompt, max_history_items=2)
    ids = b.item_ids([cat.texts[0], cat.texts[1]])
    assert all(i[0] == tiny_tokenizer.bos_token_id and len(i) == 3 for i in ids)
    text = b.user_texts(cat, [["a1", "b3", "a2", "nope"]])[0]
    assert b.unknown_history_items == 1
    assert text.startswith("A user's history across all domains: ")
    # last 2 known items (b3, a2), each cut to 2 tokens of "[B] <title>"
    assert text.count("; ") == 1 and "[B" in text and "[A" in text
    full = PromptBuilder(tiny_tokenizer, PromptConfig(), max_history_items=20)
    t2 = full.user_texts(cat, [["a1", "b3"]])[0]
    assert (
        t2 == f"A user's history across all domains: [A] {cat.titles[1]}; [B] {cat.titles[cat.index['b3']]}"
    )
    capped = PromptBuilder(tiny_tokenizer, PromptConfig(), max_history_items=20, max_len=6)
    u = capped.user_ids(cat, [["a1", "b3", "a2"]])[0]
    assert len(u) == 6 and u[0] == tiny_tokenizer.bos_token_id


def test_item_cache_hit_and_miss(tiny_model, tiny_model_dir, tiny_tokenizer, tiny_prepared, tmp_path):
    cat = load_inputs(tiny_prepared, "test").catalogue
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 20)
    enc = Encoder(tiny_model, 0, "last", 8)
    cache = ItemEmbeddingCache(tmp_path / "cache")
    rows = cat.domain_rows("A")
    model_id = checkpoint_identity(tiny_model_dir)
    first = encode_items(enc, builder, cat, rows, cache, model_id)
    assert (cache.hits, cache.misses) == (0, 1) and len(list((tmp_path / "cache").glob("*.pt"))) == 1

    class Boom(Encoder):  # a hit must not encode anything
        def encode(self, seqs, desc=""):
            raise AssertionError("encoded despite a cache hit")

    again = encode_items(Boom(tiny_model, 0, "last", 8), builder, cat, rows, cache, model_id)
    assert cache.hits == 1 and torch.equal(first, again)
    encode_items(enc, builder, cat, rows, cache, "another-checkpoint")
    encode_items(Encoder(tiny_model, 0, "mean", 8), builder, cat, rows, cache, model_id)
    encode_items(enc, builder, cat, cat.domain_rows("B"), cache, model_id)
    assert (cache.hits, cache.misses) == (1, 4)


def test_checkpoint_identity_changes_with_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"abc")
    a = checkpoint_identity(tmp_path)
    assert checkpoint_identity(tmp_path) == a
    (tmp_path / "model.safetensors").write_bytes(b"abcd")
    assert checkpoint_identity(tmp_path) != a


def test_encoding_logs_progress_for_non_terminal_logs(tiny_model, caplog, monkeypatch):
    """A catalogue's encoding reports how far it is in the job log (not only in a tqdm bar, which
    a log file never shows): a start line and one line per tenth (when the pass is slow enough for
    them to be MIN_INTERVAL_S apart), ending at N/N."""
    seqs = [[1, 5 + i % 7, 6] for i in range(30)]

    def lines_with(interval: float) -> list[str]:
        monkeypatch.setattr(EncodeProgress, "MIN_INTERVAL_S", interval)
        caplog.clear()
        with caplog.at_level("INFO", logger="cprec.eval.encode"):
            Encoder(tiny_model, 0, "last", batch_size=4).encode(seqs, desc="items (A)")
        return [r.getMessage() for r in caplog.records if r.name == "cprec.eval.encode"]

    lines = lines_with(0.0)  # a slow pass: every tenth is logged
    assert lines[0] == "items (A): encoding 30 prompts"
    assert lines[-1] == "items (A): 30/30 prompts (100%)"
    assert len(lines) == 1 + 8  # 8 batches of 4 (the last of 2): every batch crosses a tenth here
    assert all(line.startswith("items (A): ") for line in lines)
    # A quick pass (the demo's catalogues): its start and its end only.
    assert lines_with(1e9) == ["items (A): encoding 30 prompts", "items (A): 30/30 prompts (100%)"]
