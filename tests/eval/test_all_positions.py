"""All-position contrastive fine-tuning: sequences, the loss against one-by-one pairs, packed ==
padded, exact resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cprec.config import EvalConfig, PromptConfig, load_config
from cprec.eval.all_positions import (
    AllPositionModel,
    build_sequences,
    contrastive_loss,
    make_batch,
    sample_negatives,
)
from cprec.eval.encode import PromptBuilder, embed, load_model, pad_batch
from cprec.eval.finetune import CheckpointPolicy, FineTuner
from cprec.eval.inputs import load_inputs

CFG = EvalConfig(finetune_negatives=4, temperature=0.1, finetune_seq_len=128, max_history_items=50)


@pytest.fixture(scope="module")
def data(tiny_prepared, tiny_tokenizer):
    inputs = load_inputs(tiny_prepared, "test")
    builder = PromptBuilder(tiny_tokenizer, PromptConfig(), 50)
    seqs, skipped = build_sequences(inputs.train_sequences, inputs.catalogue, builder, max_items=8)
    return inputs, builder, seqs, skipped


def _model(model_dir):
    return load_model(model_dir, torch.device("cpu"), dtype=torch.float32)


def test_all_position_sequences_tokenize_like_the_whole_text(data, tiny_tokenizer):
    from cprec.prepare.tokenize import text_codec

    inputs, builder, seqs, _ = data
    encode, _ = text_codec(tiny_tokenizer.name_or_path, tiny_tokenizer)
    cat = inputs.catalogue
    for _, items, _ in inputs.train_sequences[:10]:
        rows = [cat.index[i] for i in items][-8:]
        ids, ends = builder.sequence_ids(cat, rows)
        text = builder.user_texts(cat, [[cat.items[r] for r in rows]])[0]
        assert ids == builder.bos + list(encode([text])[0])  # the pre-training tokenization
        assert len(ends) == len(rows) and ends[-1] == len(ids) - 1


def test_all_position_states_end_each_item_and_never_see_the_next(data, tiny_tokenizer):
    inputs, builder, seqs, _ = data
    cat = inputs.catalogue
    s = seqs[0]
    assert len(s.targets) == len(s.positions) >= 2
    for p, t in zip(s.positions, s.targets):
        seen = tiny_tokenizer.decode(s.ids[1 : p + 1])
        nxt = builder._mixed_items(cat, [t])[0]
        assert seen.rstrip().endswith(";")  # the item before the target, and its separator
        assert not seen.rstrip().endswith(nxt)


def test_all_position_sequences_count_what_they_skip(data):
    inputs, builder, _, _ = data
    train = [
        ("u1", ["nope", inputs.catalogue.items[0]], ["A", "A"]),
        ("u2", [inputs.catalogue.items[1]], ["A"]),
    ]
    seqs, skipped = build_sequences(train, inputs.catalogue, builder)
    assert seqs == [] and skipped == {"item_not_in_items": 1, "fewer_than_2_items": 2}


def _batch(data, packed=True, n_users=5, seed=0):
    inputs, builder, seqs, _ = data
    negs = sample_negatives(
        inputs.catalogue, seqs[:n_users], CFG.finetune_negatives, np.random.default_rng(seed)
    )
    return seqs[:n_users], negs, make_batch(builder, inputs.catalogue, seqs[:n_users], negs, CFG, 0, packed)


def test_all_position_loss_equals_mean_of_one_by_one_pair_losses(data, tiny_model_dir):
    inputs, builder, _, _ = data
    model = _model(tiny_model_dir)
    seqs, negs, batch = _batch(data)
    assert batch["user_ids"].shape[0] < len(seqs)  # several users share a packed row
    with torch.no_grad():
        packed_loss = float(AllPositionModel(model, CFG)(**batch))
        cands = sorted({t for s in seqs for t in s.targets} | {r for ns in negs.values() for r in ns})
        ids, mask = pad_batch(builder.item_ids([inputs.catalogue.texts[r] for r in cands]), 0)
        items = embed(model, ids, mask, "last")
        losses, k = [], 0
        for s in seqs:
            for p in s.positions:  # each pair on its own: the user prompt cut after the item
                ids, mask = pad_batch([s.ids[: p + 1]], 0)
                u = embed(model, ids, mask, "last")
                row = batch["mask"][k : k + 1]
                losses.append(
                    float(contrastive_loss(u, items, batch["labels"][k : k + 1], row, CFG.temperature))
                )
                k += 1
    assert k == len(batch["labels"]) > len(seqs)
    assert packed_loss == pytest.approx(float(np.mean(losses)), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_all_position_packed_equals_padded_loss_and_gradients(data, tiny_model_dir, pooling):
    cfg = EvalConfig(**{**vars(CFG), "pooling": pooling})
    results = []
    for packed in (True, False):
        model = _model(tiny_model_dir)
        _, _, batch = _batch(data, packed)
        loss = AllPositionModel(model, cfg)(**batch)
        loss.backward()
        results.append(
            (float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        )
    (lp, gp), (lq, gq) = results
    assert lp == pytest.approx(lq, rel=1e-5)
    assert gp.keys() == gq.keys() and len(gp) > 0
    for n in gp:
        torch.testing.assert_close(gp[n], gq[n], rtol=1e-4, atol=1e-6, msg=n)


def test_all_position_masks_other_domains_own_items_and_keeps_the_target(data):
    inputs, _, _, _ = data
    seqs, _, batch = _batch(data)
    cat = inputs.catalogue
    cands = sorted({t for s in seqs for t in s.targets} | {r for ns in _batch(data)[1].values() for r in ns})
    k = 0
    for s in seqs:
        for t in s.targets:
            m = batch["mask"][k]
            assert not m[batch["labels"][k]] and cands[int(batch["labels"][k])] == t
            for j, r in enumerate(cands):
                if cat.domains[r] != cat.domains[t] or (r in s.rows and r != t):
                    assert m[j]
            k += 1


def _tune(model_dir, data, ecfg, policy, stop_after=None):
    inputs, builder, seqs, _ = data
    model = _model(model_dir)
    cfg = load_config(None, ["model.dtype=fp32"])
    tuner = FineTuner(
        model, builder, inputs.catalogue, seqs, type(cfg)(**{**vars(cfg), "eval": ecfg}), pad_id=0
    )
    try:
        return model, tuner.train(policy, stop_after)
    finally:
        tuner.close()


def test_all_position_resume_mid_finetune_reproduces_the_losses(
    tiny_model_dir, data, tmp_path, one_process_group
):
    ecfg = EvalConfig(
        finetune_epochs=1.0, finetune_batch_size=8, finetune_negatives=3, finetune_lr=1e-3,
        finetune_seq_len=128, dtype="fp32",
    )  # fmt: skip
    key = {"base": "x"}
    full, ref = _tune(tiny_model_dir, data, ecfg, CheckpointPolicy(tmp_path / "a", key, every=2))
    assert ref["objective"] == "all_positions" and ref["completed"] and ref["steps"] >= 4
    assert ref["signals_this_run"] > ref["steps"] * ecfg.finetune_batch_size  # many targets per user
    policy = CheckpointPolicy(tmp_path / "b", key, every=2)
    _, first = _tune(tiny_model_dir, data, ecfg, policy, stop_after=3)
    assert not first["completed"]
    resumed, again = _tune(tiny_model_dir, data, ecfg, policy)
    assert again["resumed_from_step"] == 2 and again["losses"] == ref["losses"]
    got, want = resumed.state_dict(), full.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
