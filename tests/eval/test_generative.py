"""Generative retrieval on the tiny prepared folder and a tiny random Llama: real transformers
``generate`` with the catalogue trie, against exact likelihood scoring."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cprec.config import PromptConfig, load_config
from cprec.eval.encode import PromptBuilder, load_model
from cprec.eval.generative import DEAD, GenerativeScorer, beam_score_fn, rerank_score_fn
from cprec.eval.inputs import Catalogue, EvalUser, load_inputs
from cprec.eval.metrics import target_ranks
from cprec.eval.ranking import build_tasks, evaluate
from cprec.eval.run import run
from cprec.eval.trie import CatalogueTrie
from cprec.prepare.tokenize import special_ids


@pytest.fixture(scope="module")
def inputs(tiny_prepared):
    return load_inputs(tiny_prepared, "test")


def _scorer(model_dir, tokenizer, catalogue: Catalogue, batch_size: int = 8) -> GenerativeScorer:
    ids = special_ids(tokenizer)
    model = load_model(model_dir, torch.device("cpu"), torch.float32).eval()
    builder = PromptBuilder(tokenizer, PromptConfig(), 20, 512)
    return GenerativeScorer(model, builder, catalogue, ids["eos_id"], ids["pad_id"], batch_size)


def _search(scorer, task, width):
    res = scorer.search(task, list(range(len(task.users))), width)
    return [res[u].hits for u in range(len(task.users))]


def test_trie_only_emits_catalogue_items(tiny_model_dir, tiny_tokenizer, inputs):
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    task = build_tasks(inputs)["B"]
    seqs, trie = scorer.items(task)
    prompts = [scorer.prompt(task, u) for u in range(4)]
    width = 6  # fewer beams than the 16 items: the search has to choose
    out, scores, _ = scorer.beams(trie, prompts, [set()] * 4, width)
    pad = special_ids(tiny_tokenizer)["pad_id"]
    emitted = 0
    for gen, score in zip(out, scores):
        if score > DEAD:
            node = trie.match(gen)
            assert trie.items_at(node), f"not a catalogue item: {tiny_tokenizer.decode(gen)!r}"
            n = len(seqs[trie.items_at(node)[0]])
            assert gen[:n] == seqs[trie.items_at(node)[0]] and set(gen[n:]) <= {pad}
            emitted += 1
    assert emitted == 4 * width  # every beam found an item

    # The same random model unconstrained writes text that is no catalogue item: the trie is what
    # keeps the beams on the catalogue.
    ids = torch.tensor([prompts[0]])
    free = scorer.model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=width, num_return_sequences=width,
        do_sample=False, max_new_tokens=trie.depth, pad_token_id=pad,
    )  # fmt: skip
    assert any(not trie.items_at(trie.match(g)) for g in free[:, ids.shape[1] :].tolist())


def test_generative_beam_as_wide_as_catalogue_ranks_like_exhaustive_scoring(
    tiny_model_dir, tiny_tokenizer, inputs
):
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    tasks = build_tasks(inputs)
    width = max(t.n_items for t in tasks.values())  # 16 beams >= 12 and 16 items
    hits = {d: _search(scorer, t, width) for d, t in tasks.items()}
    exhaustive = scorer.exhaustive_score_fn()
    for d, task in tasks.items():
        reference = exhaustive(task, np.arange(len(task.users)))
        for u, found in enumerate(hits[d]):
            wanted = sorted(set(range(task.n_items)) - set(task.history_cols[u].tolist()))
            assert sorted(found) == wanted  # every candidate reached
            cols = torch.tensor(wanted)
            got = torch.tensor([found[c] for c in wanted])
            assert torch.allclose(got, reference[u, cols], atol=1e-4, rtol=0)
            assert torch.equal(
                torch.argsort(got, descending=True), torch.argsort(reference[u, cols], descending=True)
            )
    ranks_beam, ranks_exhaustive = {}, {}
    evaluate(tasks, beam_score_fn(hits), [1, 5, 10], ranks_out=ranks_beam)
    evaluate(tasks, exhaustive, [1, 5, 10], ranks_out=ranks_exhaustive)
    for d in tasks:
        assert ranks_beam[d].tolist() == ranks_exhaustive[d].tolist()


def test_generative_history_items_are_excluded(tiny_model_dir, tiny_tokenizer, inputs):
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    task = build_tasks(inputs)["A"]
    users = [u for u in range(len(task.users)) if len(task.history_cols[u]) >= 2]
    assert users
    for u in users:
        hist = set(task.history_cols[u].tolist())
        # Exactly as many beams as candidates: a beam spent on a history item would leave one
        # candidate unreached, so this checks the constraint itself, not only a post-filter.
        width = task.n_items - len(hist)
        found = scorer.search(task, [u], width)[u].hits
        assert not set(found) & hist
        assert sorted(found) == sorted(set(range(task.n_items)) - hist)
        scores = beam_score_fn({"A": {u: found}})(task, [u])
        assert torch.isinf(scores[0, sorted(hist)]).all()


def test_generative_unreached_items_rank_after_every_reached_one(tiny_model_dir, tiny_tokenizer, inputs):
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    task = build_tasks(inputs)["B"]
    result = scorer.search(task, [0], 3)[0]
    found = result.hits
    assert 0 < len(found) <= 3
    # Cost: generate prefills the prompt once per beam, then feeds one token per beam per step.
    prompt, (seqs, _) = scorer.prompt(task, 0), scorer.items(task)
    assert result.forward_tokens == 3 * (len(prompt) + result.steps - 1) and 1 < result.steps <= 8
    hist = set(task.history_cols[0].tolist())
    want = len(prompt) + sum(len(s) - 1 for c, s in enumerate(seqs) if c not in hist)
    assert scorer.exhaustive_tokens(task, 0) == want
    scores = beam_score_fn({"B": {0: found}})(task, [0])
    unreached = [c for c in range(task.n_items) if c not in found]
    ranks = target_ranks(scores.expand(len(unreached), -1), torch.tensor(unreached))
    assert (ranks == task.n_items).all()  # pessimistic: tied with every other unreached item


def test_trie_duplicate_texts_are_counted_and_tied(tiny_model_dir, tiny_tokenizer, inputs):
    cat = inputs.catalogue
    a0, a1 = cat.index["a0"], cat.index["a1"]
    titles = list(cat.titles)
    titles[a1] = titles[a0]  # two items the model cannot tell apart
    twin = Catalogue(cat.items, cat.domains, titles, cat.texts)
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, twin)
    task = build_tasks(replace(inputs, catalogue=twin))["A"]
    seqs, trie = scorer.items(task)
    c0, c1 = int(np.flatnonzero(task.rows == a0)[0]), int(np.flatnonzero(task.rows == a1)[0])
    assert seqs[c0] == seqs[c1]
    assert trie.duplicates() == [[c0, c1]]
    assert trie.duplicate_counts() == {"groups": 1, "items": 2}
    user = next(u for u in range(len(task.users)) if not {c0, c1} & set(task.history_cols[u].tolist()))
    found = scorer.search(task, [user], task.n_items)[user].hits
    assert found[c0] == found[c1]
    scores = beam_score_fn({"A": {user: found}})(task, [user])
    r0, r1 = target_ranks(scores.expand(2, -1), torch.tensor([c0, c1])).tolist()
    assert r0 == r1 == 1 + sum(1 for c, s in found.items() if c != c0 and s >= found[c0])


def test_trie_refuses_a_sequence_that_is_a_prefix_of_another():
    with pytest.raises(ValueError, match="prefix of another"):
        CatalogueTrie([[5, 6], [5, 6, 7]])
    trie = CatalogueTrie([[5, 6, 2], [5, 6, 7, 2]])
    assert trie.depth == 4 and trie.items_at(trie.match([5, 6, 2, 0, 0])) == [0]
    assert trie.match([5, 9]) is None and trie.walk([5, 6]) is not None
    assert sorted(trie.allowed(trie.walk([5, 6]))) == [2, 7]
    assert trie.allowed(trie.walk([5, 6]), trie.blocked({0})) == [7]


@pytest.mark.parametrize("history", [[], ["not-an-item"]])
def test_generative_empty_history_names_the_user(tiny_model_dir, tiny_tokenizer, inputs, history):
    lonely = EvalUser("lonely-user", "A", history, "a3")
    task = build_tasks(replace(inputs, users=[*inputs.users, lonely]))["A"]
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    with pytest.raises(ValueError, match="user 'lonely-user'.*empty history"):
        scorer.search(task, list(range(len(task.users))), 4)


def test_reranked_top_n_by_likelihood_the_rest_below_by_embedding(tiny_model_dir, tiny_tokenizer, inputs):
    scorer = _scorer(tiny_model_dir, tiny_tokenizer, inputs.catalogue)
    task = build_tasks(inputs)["B"]
    emb = torch.linspace(1, -1, task.n_items).expand(len(task.users), -1)  # column order = embedding order

    def embedding(t, batch):
        return emb[torch.as_tensor(np.asarray(batch))]

    top = [
        [c for c in range(task.n_items) if c not in set(task.history_cols[u].tolist())][:5] for u in (0, 1)
    ]
    lik = scorer.likelihoods(task, [0, 1], top)
    scores = rerank_score_fn(embedding, {"B": {0: (top[0], lik[0]), 1: (top[1], lik[1])}})(task, [0, 1])
    for b in (0, 1):
        order = [c for c in torch.argsort(scores[b], descending=True, stable=True).tolist()]
        assert order[:5] == [top[b][i] for i in np.argsort(-np.asarray(lik[b]), kind="stable")]
        rest = [c for c in order[5:]]
        assert rest == sorted(rest)  # embedding order below the re-ranked five
        assert scores[b, rest].max() < min(lik[b])


def _job_cfg(prepared, model_dir, out, *extra):
    return load_config(
        None,
        [
            f"data.output_dir={prepared}",
            f"eval.checkpoint={model_dir}",
            f"eval.output_dir={out}",
            "eval.ks=[1,5,10]",
            "eval.batch_size=8",
            "eval.finetune=false",
            "eval.baselines=[popularity]",
            "tracking.backend=none",
            *extra,
        ],
    )


def test_eval_job_reports_generative_and_reranked_rows_with_heads_and_costs(
    tiny_prepared, tiny_model_dir, tmp_path
):
    out = tmp_path / "eval"
    cfg = _job_cfg(
        tiny_prepared, tiny_model_dir, out, "eval.generative=true", "eval.beam_width=4", "eval.rerank_top_n=5"
    )
    run(cfg)
    saved = json.loads((out / "report.json").read_text())
    assert set(saved["results"]) == {"llm-pretrained", "llm-generative", "llm-reranked", "popularity"}
    heads = {m: saved["models"][m]["head"] for m in saved["results"]}
    assert heads == {
        "llm-pretrained": "embedding zero-shot",
        "llm-generative": "generative",
        "llm-reranked": "re-ranked",
        "popularity": "baseline",
    }
    for name in ("llm-generative", "llm-reranked"):  # same users as every other row
        assert {d: len(r) for d, r in saved["ranks"][name].items()} == {"A": 10, "B": 6}
    gen = saved["models"]["llm-generative"]
    assert gen["beam_width"] == 4 and gen["duplicate_texts"] == {d: {"groups": 0, "items": 0} for d in "AB"}
    for d in ("A", "B", "overall"):
        cost = gen["cost"][d]
        assert cost["beam_forward_tokens_per_user"] > 0 and cost["exhaustive_forward_tokens_per_user"] > 0
        assert 0 < cost["items_reached_per_user"] <= 4 and 0 <= cost["targets_reached"] <= 1
        ratio = cost["exhaustive_forward_tokens_per_user"] / cost["beam_forward_tokens_per_user"]
        assert cost["exhaustive_over_beam"] == pytest.approx(ratio)
    assert gen["cost"]["overall"]["users"] == 16
    rer = saved["models"]["llm-reranked"]
    assert rer["top_n"] == 5 and rer["cost"]["overall"]["likelihood_forward_tokens_per_user"] > 0
    # A target the beam reached ranks within the 4 it reached, one it did not reach after them all.
    for d, ranks in saved["ranks"]["llm-generative"].items():
        assert gen["cost"][d]["targets_reached"] == pytest.approx(np.mean([r <= 4 for r in ranks]))
    assert (
        "- heads: llm-pretrained: embedding zero-shot; llm-generative: generative"
        in (out / "report.md").read_text()
    )


def test_eval_job_reranks_without_the_zero_shot_row(tiny_prepared, tiny_model_dir, tmp_path):
    cfg = _job_cfg(
        tiny_prepared, tiny_model_dir, tmp_path, "eval.rank_pretrained=false", "eval.rerank_top_n=3"
    )
    report = run(cfg)
    assert set(report["results"]) == {"llm-reranked", "popularity"}
    for per_domain in report["results"]["llm-reranked"].values():
        assert all(0.0 <= v <= 1.0 for v in per_domain.values() if not math.isnan(v))


@pytest.mark.parametrize(("field", "value"), [("beam_width", 0), ("rerank_top_n", -1)])
def test_generative_settings_are_validated(field, value):
    with pytest.raises(ValueError, match=f"eval.{field}"):
        load_config(None, [f"eval.{field}={value}"])
