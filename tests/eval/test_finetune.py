"""Contrastive fine-tuning: pairs, negatives, the loss going down, LoRA."""

from __future__ import annotations

import torch

from cprec.config import EvalConfig, PromptConfig
from cprec.eval.encode import PromptBuilder, load_model
from cprec.eval.finetune import (
    NegativeSampler,
    build_pairs,
    contrastive_loss,
    finetune,
    load_state,
    save_finetuned,
    settings_key,
)
from cprec.eval.inputs import Catalogue, load_inputs
from cprec.eval.lora import LoRALinear, apply_lora, merge_lora


def test_build_pairs_takes_last_items_with_their_prefix():
    items = ["a0", "a1", "b0", "b1"]
    cat = Catalogue(items, ["A", "A", "B", "B"], items, items)
    train = [
        ("u1", ["a0", "b0", "a1"], ["A", "B", "A"]),
        ("u2", ["b1"], ["B"]),
        ("u3", ["a0", "x"], ["A", "A"]),
    ]
    pairs, skipped = build_pairs(train, cat, per_user=2)
    got = [(p.history, items[p.positive], p.domain) for p in pairs]
    assert got == [(["a0", "b0"], "a1", "A"), (["a0"], "b0", "B")]
    assert skipped == {"no_history": 2, "positive_not_in_items": 1}
    only_b, _ = build_pairs(train, cat, domains={"B"}, per_user=2)
    assert [items[p.positive] for p in only_b] == ["b0"]


def test_negatives_stay_in_domain_and_avoid_history(tiny_prepared):
    cat = load_inputs(tiny_prepared, "test").catalogue
    pairs, _ = build_pairs(load_inputs(tiny_prepared, "test").train_sequences, cat)
    s = NegativeSampler(cat, seed=0)
    for p in pairs[:20]:
        neg = s.sample(p, 5)
        assert len(neg) == 5
        assert all(cat.domains[r] == p.domain for r in neg)
        assert p.positive not in neg
        assert not {cat.items[r] for r in neg} & set(p.history)


def _probe_loss(model, builder, cat, pairs, negs, cfg):
    with torch.no_grad():
        return float(contrastive_loss(model, builder, cat, pairs, negs, cfg, pad_id=0))


def test_finetuning_lowers_the_contrastive_loss(tiny_model_dir, tiny_tokenizer, tiny_prepared, tmp_path):
    inputs = load_inputs(tiny_prepared, "test")
    cat = inputs.catalogue
    pairs, _ = build_pairs(inputs.train_sequences, cat)
    cfg = EvalConfig(
        finetune_epochs=4, finetune_lr=2e-3, finetune_batch_size=8, finetune_negatives=4, temperature=0.1
    )
    model = load_model(tiny_model_dir, torch.device("cpu"))
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), cfg.max_history_items)
    probe = pairs[:16]
    negs = [NegativeSampler(cat, 123).sample(p, 4) for p in probe]
    before = _probe_loss(model, builder, cat, probe, negs, cfg)
    stats = finetune(model, builder, cat, pairs, cfg, pad_id=0)
    after = _probe_loss(model, builder, cat, probe, negs, cfg)
    assert stats["steps"] == 30 and stats["pairs"] == 60
    assert after < 0.8 * before, (before, after)

    key = settings_key(cfg, "base-id", "all")
    save_finetuned(model, tmp_path / "ft", key, {k: v for k, v in stats.items()}, {})
    state = load_state(tmp_path / "ft")
    assert state["completed"] and state["key"] == key and (tmp_path / "ft" / "config.json").is_file()
    reloaded = load_model(tmp_path / "ft", torch.device("cpu"))
    assert abs(_probe_loss(reloaded, builder, cat, probe, negs, cfg) - after) < 1e-4


def test_in_batch_only_loss_masks_duplicate_positives(tiny_model, tiny_tokenizer, tiny_prepared):
    cat = load_inputs(tiny_prepared, "test").catalogue
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 5)
    pairs, _ = build_pairs(load_inputs(tiny_prepared, "test").train_sequences, cat)
    batch = [pairs[0], pairs[0]]  # same positive twice: neither may serve as the other's negative
    cfg = EvalConfig(finetune_negatives=0, in_batch_negatives=True)
    assert _probe_loss(tiny_model, builder, cat, batch, [[], []], cfg) == 0.0
    cfg_off = EvalConfig(finetune_negatives=2, in_batch_negatives=False)
    negs = [[cat.index["a1"], cat.index["a2"]]] * 2
    assert _probe_loss(tiny_model, builder, cat, batch, negs, cfg_off) > 0.0


def test_lora_trains_adapters_only_and_merges_exactly(tiny_model):
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        base_out = tiny_model(ids).logits
    n = apply_lora(tiny_model, rank=4)
    assert n == 4  # q and v in 2 layers
    trainable = [name for name, p in tiny_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, base_out)  # B = 0 at init
        for m in tiny_model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_()
        adapted = tiny_model(ids).logits
    assert not torch.allclose(adapted, base_out)
    assert merge_lora(tiny_model) == 4
    assert not any(isinstance(m, LoRALinear) for m in tiny_model.modules())
    with torch.no_grad():
        torch.testing.assert_close(tiny_model(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_lora_finetune_saves_plain_model(tiny_model, tiny_tokenizer, tiny_prepared, tmp_path):
    inputs = load_inputs(tiny_prepared, "test")
    pairs, _ = build_pairs(inputs.train_sequences, inputs.catalogue)
    cfg = EvalConfig(finetune_epochs=0.2, finetune_batch_size=4, finetune_negatives=2, lora_rank=2)
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 5)
    finetune(tiny_model, builder, inputs.catalogue, pairs, cfg, pad_id=0)
    tiny_model.save_pretrained(str(tmp_path))
    reloaded = load_model(tmp_path, torch.device("cpu"))
    assert {k for k, _ in reloaded.named_parameters()} == {k for k, _ in tiny_model.named_parameters()}
