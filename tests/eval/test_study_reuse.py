"""The study reuses a finished eval row only when its config and checkpoint are exactly the same."""

from __future__ import annotations

import os

from cprec.config import load_config
from cprec.eval.run import run
from cprec.study import finished_report


def _cfg(prepared, model_dir, out, *extra):
    return load_config(
        None,
        [
            f"data.output_dir={prepared}",
            f"eval.checkpoint={model_dir}",
            f"eval.output_dir={out}",
            "eval.ks=[1,10]",
            "eval.finetune=false",
            "eval.baselines=[]",
            "tracking.experiment=test-study-reuse",
            *extra,
        ],
    )


def test_study_reuses_a_finished_eval_row_only_with_the_same_config_and_checkpoint(
    tiny_prepared, tiny_model_dir, tmp_path
):
    out = tmp_path / "eval"
    cfg = _cfg(tiny_prepared, tiny_model_dir, out)
    assert finished_report(cfg) is None  # nothing ran yet
    report = run(cfg)
    again = finished_report(cfg)
    assert again is not None and again["timestamp"] == report["timestamp"]
    assert finished_report(_cfg(tiny_prepared, tiny_model_dir, out, "eval.max_users=3")) is None
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
    run(_cfg(tiny_prepared, tiny_model_dir, out))
    assert finished_report(_cfg(tiny_prepared, tiny_model_dir, out, "eval.sasrec_negatives=7")) is not None
    with_sasrec = ["eval.baselines=[sasrec]", "eval.sasrec_negatives=7"]
    assert finished_report(_cfg(tiny_prepared, tiny_model_dir, out, *with_sasrec)) is None
