"""Contrastive fine-tuning: pairs, negatives, the loss going down, LoRA."""

from __future__ import annotations

import torch

from cprec.config import EvalConfig, PromptConfig, load_config
from cprec.eval.encode import PromptBuilder, load_model
from cprec.eval.finetune import (
    ContrastiveModel,
    NegativeSampler,
    build_pairs,
    finetune_to_folder,
    load_state,
    make_batch,
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
    batch = make_batch(builder, cat, pairs, negs, pad_id=0)
    with torch.no_grad():
        return float(ContrastiveModel(model, cfg)(**batch))


def _tune(model_dir, folder, builder, cat, pairs, *overrides):
    """The real fine-tuning entry (a ZeRO-0 engine on one process), exported into ``folder``."""
    cfg = load_config(None, ["model.dtype=fp32", *overrides])
    model = load_model(model_dir, torch.device("cpu"))
    key = {"test": folder.name}
    return finetune_to_folder(
        model, builder, cat, pairs, cfg, 0, base_dir=model_dir, folder=folder, key=key, skipped={}
    )


def test_finetuning_lowers_the_contrastive_loss(
    tiny_model_dir, tiny_tokenizer, tiny_prepared, tmp_path, one_process_group
):
    inputs = load_inputs(tiny_prepared, "test")
    cat = inputs.catalogue
    pairs, _ = build_pairs(inputs.train_sequences, cat)
    cfg = EvalConfig(finetune_negatives=4, temperature=0.1)
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), cfg.max_history_items)
    probe = pairs[:16]
    negs = [NegativeSampler(cat, 123).sample(p, 4) for p in probe]
    before = _probe_loss(load_model(tiny_model_dir, torch.device("cpu")), builder, cat, probe, negs, cfg)
    settings = ["eval.finetune_epochs=4", "eval.finetune_lr=2e-3", "eval.finetune_batch_size=8"]
    state = _tune(
        tiny_model_dir,
        tmp_path / "ft",
        builder,
        cat,
        pairs,
        *settings,
        "eval.finetune_negatives=4",
        "eval.temperature=0.1",
    )
    assert state["steps"] == 30 and state["pairs"] == 60
    assert state["completed"] and state["key"] == {"test": "ft"} and load_state(tmp_path / "ft") == state
    after = _probe_loss(load_model(tmp_path / "ft", torch.device("cpu")), builder, cat, probe, negs, cfg)
    assert after < 0.8 * before, (before, after)


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


def test_lora_finetune_saves_plain_model(
    tiny_model_dir, tiny_tokenizer, tiny_prepared, tmp_path, one_process_group
):
    inputs = load_inputs(tiny_prepared, "test")
    pairs, _ = build_pairs(inputs.train_sequences, inputs.catalogue)
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 5)
    settings = ["eval.finetune_epochs=0.2", "eval.finetune_batch_size=4", "eval.finetune_negatives=2"]
    _tune(tiny_model_dir, tmp_path / "ft", builder, inputs.catalogue, pairs, *settings, "eval.lora_rank=2")
    reloaded = load_model(tmp_path / "ft", torch.device("cpu"))
    base = load_model(tiny_model_dir, torch.device("cpu"))
    assert {k for k, _ in reloaded.named_parameters()} == {k for k, _ in base.named_parameters()}
    changed = [k for k, v in base.state_dict().items() if not torch.equal(reloaded.state_dict()[k], v)]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)  # adapters merged, q/v only
