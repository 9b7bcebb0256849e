"""The whole eval job on a tiny prepared folder with an HF model folder as checkpoint."""

from __future__ import annotations

import json
import os

import pytest

from cprec.config import load_config
from cprec.eval.inputs import load_inputs
from cprec.eval.run import find_checkpoint, run, validation_tasks
from cprec.study import finished_report


def _cfg(prepared, model_dir, out, *extra):
    return load_config(
        None,
        [
            f"data.output_dir={prepared}",
            f"eval.checkpoint={model_dir}",
            f"eval.output_dir={out}",
            "eval.ks=[1,5,10]",
            "eval.batch_size=8",
            "eval.finetune_epochs=0.5",
            "eval.finetune_batch_size=8",
            "eval.finetune_negatives=3",
            "eval.sasrec_epochs=3",
            "eval.sasrec_hidden=16",
            "eval.sasrec_max_len=10",
            "tracking.experiment=test-eval",
            *extra,
        ],
    )


def test_eval_job_end_to_end(tiny_prepared, tiny_model_dir, tmp_path):
    out = tmp_path / "eval"
    report = run(_cfg(tiny_prepared, tiny_model_dir, out))
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"] == json.loads(json.dumps(report["results"]))
    assert load_config(out / "config.yaml").eval.output_dir == str(out)  # effective config beside it
    assert saved["protocol"]["name"] == "full" and saved["protocol"]["label"] == "full ranking"
    assert saved["split"] == "test" and saved["checkpoint"]["path"] == str(tiny_model_dir)
    assert saved["n_users"]["A"] + saved["n_users"]["B"] == saved["n_users"]["overall"] == 16
    assert set(saved["results"]) == {"llm-pretrained", "llm-finetuned", "popularity", "sasrec"}
    for per_domain in saved["results"].values():
        assert set(per_domain) == {"A", "B", "overall"}
        for vals in per_domain.values():
            assert set(vals) == {f"{m}@{k}" for m in ("recall", "ndcg", "mrr") for k in (1, 5, 10)}
            assert all(0.0 <= v <= 1.0 for v in vals.values())
    assert (out / "report.md").read_text().startswith("# Evaluation: full ranking, split `test`")
    assert (out / "metrics.png").is_file() and (out / "mlflow.db").is_file()
    assert (out / "finetuned" / "all" / "config.json").is_file()
    assert saved["item_cache"] == {"hits": 0, "misses": 4}  # 2 domains x 2 models

    # Second run: same checkpoint, same settings -> item cache hits, fine-tuned model reused.
    state_before = (out / "finetuned" / "all" / "finetune_state.json").read_text()
    sasrec = saved["models"]["sasrec"]
    assert sasrec["cached"] is False and sasrec["valid_users"] == 16  # the valid split's 16 users
    assert sasrec["epochs_run"] == 3 and 1 <= sasrec["best_epoch"] <= 3
    assert [h["epoch"] for h in sasrec["valid_history"]] == [2, 3]  # every 2 epochs + the last
    again = run(_cfg(tiny_prepared, tiny_model_dir, out))
    assert again["item_cache"] == {"hits": 4, "misses": 0}
    assert (out / "finetuned" / "all" / "finetune_state.json").read_text() == state_before
    assert again["models"]["sasrec"]["cached"] is True
    for name in ("llm-pretrained", "llm-finetuned", "popularity", "sasrec"):
        for domain, vals in report["results"][name].items():
            assert again["results"][name][domain] == pytest.approx(vals)


def test_sampled_protocol_per_domain_finetune_valid_split(tiny_prepared, tiny_model_dir, tmp_path):
    cfg = _cfg(
        tiny_prepared,
        tiny_model_dir,
        tmp_path,
        "eval.protocol=sampled",
        "eval.n_negatives=5",
        "eval.split=valid",
        "eval.finetune_scope=per_domain",
        "eval.pooling=mean",
        "eval.baselines=[]",
        "eval.max_users=5",
        "tracking.backend=none",
    )
    report = run(cfg)
    assert report["protocol"] == {**report["protocol"], "name": "sampled", "n_negatives": 5}
    assert report["n_users"] == {"A": 5, "B": 5, "overall": 10}
    assert set(report["results"]) == {"llm-pretrained", "llm-finetuned"}
    assert set(report["models"]["llm-finetuned"]["runs"]) == {"A", "B"}
    # 6 candidates: the worst rank is 6, so recall@10 is 1 for everyone
    assert report["results"]["llm-pretrained"]["overall"]["recall@10"] == 1.0
    assert "sampled (N=5 negatives)" in (tmp_path / "report.md").read_text()
    assert not (tmp_path / "mlflow.db").exists()


def _complete(step_dir):
    step_dir.mkdir(parents=True)
    (step_dir / "trainer_state.json").write_text('{"format_version": 1}')
    return step_dir


def test_find_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    _complete(run_dir / "checkpoints" / "step_0000010")
    (run_dir / "checkpoints" / "latest").write_text("step_0000010\n")
    cfg = load_config(None, [f"train.output_dir={run_dir}"])
    assert find_checkpoint(cfg) == run_dir / "checkpoints" / "step_0000010"
    # The pointer lags after a crash between the rename and its update: the newest complete folder
    # wins, as in training (one resolver for both jobs); an unfinished save is not picked.
    _complete(run_dir / "checkpoints" / "step_0000012")
    (run_dir / "checkpoints" / "step_0000014").mkdir()
    assert find_checkpoint(cfg) == run_dir / "checkpoints" / "step_0000012"
    (run_dir / "final").mkdir()
    (run_dir / "final" / "config.json").write_text("{}")
    assert find_checkpoint(cfg) == run_dir / "final"
    explicit = load_config(None, [f"eval.checkpoint={run_dir / 'checkpoints'}"])
    assert find_checkpoint(explicit) == run_dir / "checkpoints" / "step_0000012"
    pointer = load_config(None, [f"eval.checkpoint={run_dir / 'checkpoints' / 'latest'}"])
    assert find_checkpoint(pointer) == run_dir / "checkpoints" / "step_0000010"
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        find_checkpoint(load_config(None, [f"train.output_dir={tmp_path / 'nothing'}"]))
    with pytest.raises(FileNotFoundError, match="eval.checkpoint"):
        find_checkpoint(load_config(None, [f"eval.checkpoint={tmp_path / 'nope'}"]))


def test_zero_shot_rows_are_optional_and_skip_their_encoding(tiny_prepared, tiny_model_dir, tmp_path, caplog):
    """eval.rank_pretrained=false: no llm-pretrained rows, and the catalogue is encoded once (by the
    fine-tuned model) instead of twice. Every summary line of the log names its metric and K."""
    cfg = _cfg(
        tiny_prepared,
        tiny_model_dir,
        tmp_path,
        "eval.rank_pretrained=false",
        "eval.baselines=[popularity]",
        "tracking.backend=none",
    )
    with caplog.at_level("DEBUG", logger="cprec.eval.run"):
        report = run(cfg)
    assert set(report["results"]) == {"llm-finetuned", "popularity"}
    assert "llm-pretrained" not in report["models"]
    assert report["item_cache"] == {"hits": 0, "misses": 2}  # 2 domains x 1 model

    def summary(level: str) -> set[str]:
        lines = [r.getMessage() for r in caplog.records if r.levelname == level]
        return {line.split(":")[0] for line in lines if line.startswith(("llm-", "popularity"))}

    # One INFO line per ranked model (overall); the per-domain lines per metric at DEBUG.
    assert summary("INFO") == {"llm-finetuned overall", "popularity overall"}
    assert summary("DEBUG") == {
        f"{m} {metric}@10" for m in ("llm-finetuned", "popularity") for metric in ("recall", "ndcg")
    }


def _model_with_tokenizer(prepared, folder, make_model_folder):
    """An HF model folder as the trainer's export makes it: weights plus the tokenizer it used."""
    from cprec.eval.encode import load_tokenizer

    tok = load_tokenizer(prepared)
    make_model_folder(folder, len(tok))
    tok.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize(
    "other",
    [{"vocab_size": 100, "kind": "bpe"}, {"vocab_size": 300, "kind": "unigram"}],
    ids=["bpe-100", "unigram"],
)
def test_eval_refuses_a_folder_prepared_with_another_tokenizer(tiny_prepared, tmp_path, other, eval_fixtures):
    """A checkpoint trained with one tokenizer, evaluated on a folder prepared with another: refused
    before any compute (nothing written), naming both hashes; the override evaluates anyway."""
    from cprec.eval.encode import load_tokenizer
    from cprec.prepare.tokenize import TokenizerMismatch, tokenizer_hash

    model_dir = _model_with_tokenizer(tiny_prepared, tmp_path / "model", eval_fixtures.make_model_folder)
    foreign = eval_fixtures.make_prepared(tmp_path / "foreign", **other)
    have, want = tokenizer_hash(load_tokenizer(tiny_prepared)), tokenizer_hash(load_tokenizer(foreign))
    assert have != want
    out = tmp_path / "eval"
    cfg = _cfg(foreign, model_dir, out, "eval.finetune=false", "eval.baselines=[]", "tracking.backend=none")
    with pytest.raises(
        TokenizerMismatch, match=f"tokenizer hash {have}.*uses {want}.*allow_tokenizer_mismatch"
    ):
        run(cfg)
    assert not out.exists()  # refused before anything was computed or written

    allowed = _cfg(
        foreign,
        model_dir,
        out,
        "eval.finetune=false",
        "eval.baselines=[]",
        "tracking.backend=none",
        "eval.allow_tokenizer_mismatch=true",
    )
    assert set(run(allowed)["results"]) == {"llm-pretrained"}


def test_eval_accepts_the_folder_of_the_checkpoints_tokenizer(tiny_prepared, tmp_path, eval_fixtures):
    model_dir = _model_with_tokenizer(tiny_prepared, tmp_path / "model", eval_fixtures.make_model_folder)
    cfg = _cfg(
        tiny_prepared,
        model_dir,
        tmp_path / "eval",
        "eval.finetune=false",
        "eval.baselines=[]",
        "tracking.backend=none",
    )
    assert set(run(cfg)["results"]) == {"llm-pretrained"}


def test_report_counts_cold_targets_and_candidates_per_domain(tiny_prepared, tiny_model_dir, tmp_path):
    """An item nobody trained on (text only) is a candidate and can be a target; the report says
    how many of each domain's candidates and targets are cold."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    prepared = tmp_path / "prepared"
    shutil.copytree(tiny_prepared, prepared)
    items = pq.read_table(prepared / "eval" / "items.parquet").to_pydict()
    for col, value in {"item": "a99", "domain": "A", "title": "cold tea", "text": "cold tea"}.items():
        items[col].append(value)
    pq.write_table(pa.table(items), prepared / "eval" / "items.parquet")
    users = pq.read_table(prepared / "eval" / "users.parquet").to_pydict()
    first_a = next(
        i for i, (s, d) in enumerate(zip(users["split"], users["domain"])) if s == "test" and d == "A"
    )
    users["target"][first_a] = "a99"
    pq.write_table(pa.table(users), prepared / "eval" / "users.parquet")

    cfg = _cfg(
        prepared,
        tiny_model_dir,
        tmp_path / "eval",
        "eval.finetune=false",
        "eval.baselines=[popularity]",
        "tracking.backend=none",
    )
    report = run(cfg)
    trained = {
        i
        for seq in pq.read_table(prepared / "eval" / "train_sequences.parquet")["items"].to_pylist()
        for i in seq
    }
    for d in ("A", "B"):
        cands = [i for i, dom in zip(items["item"], items["domain"]) if dom == d]
        targets = [
            t
            for t, s, dom in zip(users["target"], users["split"], users["domain"])
            if s == "test" and dom == d
        ]
        assert report["cold"][d] == {
            "candidates": len(cands),
            "cold_candidates": sum(i not in trained for i in cands),
            "targets": len(targets),
            "cold_targets": sum(t not in trained for t in targets),
        }
    assert report["cold"]["A"]["candidates"] == 13 and report["cold"]["A"]["cold_targets"] >= 1
    assert "cold (in no training sequence): A " in (tmp_path / "eval" / "report.md").read_text()


def test_sasrec_validation_tasks_come_from_the_valid_split(tiny_prepared):
    test_inputs = load_inputs(tiny_prepared, "test")
    tasks = validation_tasks(tiny_prepared, test_inputs, 0, 0)
    want = {(u.user, u.target, tuple(u.history)) for u in load_inputs(tiny_prepared, "valid").users}
    got = {(u.user, u.target, tuple(u.history)) for t in tasks.values() for u in t.users}
    assert got == want
    test_rows = {(u.user, u.target) for u in test_inputs.users}
    assert not test_rows & {(user, target) for user, target, _ in got}  # no test target leaks in
    capped = validation_tasks(tiny_prepared, test_inputs, 3, 0)
    assert {d: len(t.users) for d, t in capped.items()} == {"A": 3, "B": 3}


NO_FT = ["eval.finetune=false", "eval.baselines=[]"]
"""An eval without fine-tuning or baselines (the study-reuse tests)."""


def test_study_reuses_a_finished_eval_row_only_with_the_same_config_and_checkpoint(
    tiny_prepared, tiny_model_dir, tmp_path
):
    out = tmp_path / "eval"
    cfg = _cfg(tiny_prepared, tiny_model_dir, out, *NO_FT)
    assert finished_report(cfg) is None  # nothing ran yet
    report = run(cfg)
    again = finished_report(cfg)
    assert again is not None and again["timestamp"] == report["timestamp"]
    assert finished_report(_cfg(tiny_prepared, tiny_model_dir, out, *NO_FT, "eval.max_users=3")) is None
    weights = next(p for p in tiny_model_dir.iterdir() if p.suffix == ".safetensors")
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a re-saved checkpoint
    try:
        assert finished_report(cfg) is None
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_study_reuse_ignores_sasrec_settings_where_sasrec_does_not_run(
    tiny_prepared, tiny_model_dir, tmp_path
):
    out = tmp_path / "eval"
    run(_cfg(tiny_prepared, tiny_model_dir, out, *NO_FT))
    assert (
        finished_report(_cfg(tiny_prepared, tiny_model_dir, out, *NO_FT, "eval.sasrec_negatives=7"))
        is not None
    )
    with_sasrec = [*NO_FT[:1], "eval.baselines=[sasrec]", "eval.sasrec_negatives=7"]
    assert finished_report(_cfg(tiny_prepared, tiny_model_dir, out, *with_sasrec)) is None
