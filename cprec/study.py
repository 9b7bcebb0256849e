"""The CPT study: what continual pre-training is worth, in one table (`cprec study`).

One dataset, one base model, the same eval split, protocol, users and candidates for every row:

- ``base``        the base model without CPT (``model.name_or_path``; a from-scratch model has none):
                  zero-shot and fine-tuned;
- ``stable``      after the stable phase, zero-shot and fine-tuned;
- ``anneal``      after stable + an annealing phase branched from it, zero-shot and fine-tuned;
- ``domain_only`` / ``mixed_only``  the ablation of what CPT reads (``data.kinds``): a stable phase of
                  the same length on domain-specific sequences only, or all-domain mixed only
                  ("both" is the ``stable`` row);
- ``pairwise``    the last CPT checkpoint (anneal, else stable) fine-tuned with the old pair-wise
                  objective (``eval.finetune_objective=pairs``) instead of all-position: what the
                  fine-tuning objective itself is worth, on the same checkpoint;
- baselines (popularity, SASRec trained to early stopping), computed once in the first eval.

Every stage is an ordinary job — ``cprec prepare``, ``cprec train`` (in its own process, as on a
cluster), ``cprec eval`` — writing into ``<out>/prepared*``, ``<out>/runs/<row>``,
``<out>/eval/<row>``, so a rerun skips what is complete (prepare's cache, a finished phase, a
finished fine-tune, an eval row already run with the same config on the same checkpoint). The eval
of every row reads the eval inputs of ``<out>/prepared`` (made with both kinds), which is what makes
the rows comparable. ``study.json`` / ``study.md`` hold per row: the checkpoint, the tokens it was
pre-trained on, metrics per domain with 95% bootstrap intervals, and paired differences (same users)
against the base fine-tuned row and SASRec, marked *within noise* where their interval contains 0.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cprec.atomic import write_json
from cprec.config import load_config

log = logging.getLogger(__name__)

ROWS = ("base", "stable", "anneal", "domain_only", "mixed_only", "pairwise")
HEADS = {
    "llm-pretrained": "zero-shot",
    "llm-finetuned": "fine-tuned",
    "llm-generative": "generative",
    "llm-reranked": "re-ranked",
}
BASELINES = {"popularity": "popularity", "sasrec": "SASRec"}
KEY_METRICS = ("recall@10", "ndcg@10")


@dataclass
class StudyPlan:
    """What one study runs. Paths are resolved against the working directory."""

    stable_config: Path
    """YAML of the dataset + model + stable phase + eval settings."""
    out: Path
    """Output root of every stage."""
    anneal_config: Path | None = None
    """YAML of the annealing phase (including the stable file); None skips the anneal row."""
    rows: tuple[str, ...] = ROWS
    """Which rows to run (subset of ROWS, in that order)."""
    overrides: list[str] = field(default_factory=list)
    """Dotted overrides for every stage."""
    anneal_overrides: list[str] = field(default_factory=list)
    """Extra overrides for the annealing phase only."""
    eval_overrides: list[str] = field(default_factory=list)
    """Extra overrides for the eval jobs only."""
    row_overrides: dict[str, list[str]] = field(default_factory=dict)
    """Extra eval overrides of single rows (e.g. the generative head on the anneal row only)."""

    def __post_init__(self):
        self.stable_config, self.out = Path(self.stable_config), Path(self.out).resolve()
        bad = [r for r in self.rows if r not in ROWS]
        if bad:
            raise ValueError(f"study rows: unknown {bad}; choose from {', '.join(ROWS)}")
        if "anneal" in self.rows and self.anneal_config is None:
            raise ValueError("study rows: 'anneal' needs an anneal config")
        if "pairwise" in self.rows and not {"stable", "anneal"} & set(self.rows):
            raise ValueError("study rows: 'pairwise' needs the stable or anneal row (its checkpoint)")
        bad = sorted(set(self.row_overrides) - set(ROWS))
        if bad:
            raise ValueError(f"study row_overrides: unknown rows {bad}; choose from {', '.join(ROWS)}")
        self.rows = tuple(r for r in ROWS if r in self.rows)


def train_phase(config: Path, overrides: list[str]) -> None:
    """One phase in its own process, like `cprec train` on a cluster (single CPU rank here)."""
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    cmd = [sys.executable, "-m", "cprec.cli", "train", str(config), *overrides]
    log.debug("running: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def _stage(name: str) -> float:
    log.info("==== %s ====", name)
    return time.perf_counter()


def run_study(plan: StudyPlan) -> dict:
    """Run every stage of ``plan`` (skipping what is complete); returns the study dict."""
    from cprec.eval.run import run as evaluate
    from cprec.prepare.pipeline import run as prepare

    out = plan.out
    prepared = out / "prepared"
    common = [
        f"data.output_dir={prepared}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",  # one store: anneal runs link to stable
        *plan.overrides,
    ]
    cfg = load_config(plan.stable_config, common)
    seconds: dict[str, float] = {}
    reports: dict[str, dict] = {}
    baselines_done = False

    def eval_row(row: str, checkpoint: str, extra: list[str] = ()) -> None:
        nonlocal baselines_done
        t = _stage(f"study: eval {row}")
        over = [
            *common,
            *extra,
            f"eval.checkpoint={checkpoint}",
            f"eval.prepared_dir={prepared}",
            f"eval.output_dir={out / 'eval' / row}",
            *plan.eval_overrides,
            *plan.row_overrides.get(row, []),
        ]
        if baselines_done:
            over.append("eval.baselines=[]")
        row_cfg = load_config(plan.stable_config, over)
        reports[row] = finished_report(row_cfg)
        if reports[row] is None:
            reports[row] = evaluate(row_cfg)
        else:
            log.info("study: eval %s already done with this config and checkpoint; reusing its report", row)
        baselines_done = True
        seconds[f"eval/{row}"] = time.perf_counter() - t

    t = _stage("study: prepare")
    prepare(cfg)
    seconds["prepare"] = time.perf_counter() - t
    if "base" in plan.rows:
        if cfg.model.name_or_path:
            eval_row("base", cfg.model.name_or_path)
        else:
            log.info("study: no base row (a from-scratch model has no pretrained base)")
    runs = out / "runs"
    if {"stable", "anneal"} & set(plan.rows):
        t = _stage("study: stable phase")
        train_phase(plan.stable_config, [*common, f"train.output_dir={runs / 'stable'}"])
        seconds["train/stable"] = time.perf_counter() - t
        if "stable" in plan.rows:
            eval_row("stable", str(runs / "stable"))
    if "anneal" in plan.rows:
        t = _stage("study: anneal phase (branched from the stable checkpoint)")
        anneal = [f"train.output_dir={runs / 'anneal'}", f"train.init_from={runs / 'stable'}"]
        train_phase(plan.anneal_config, [*common, *anneal, *plan.anneal_overrides])
        seconds["train/anneal"] = time.perf_counter() - t
        eval_row("anneal", str(runs / "anneal"))
    for row, kind in (("domain_only", "domain"), ("mixed_only", "mixed")):
        if row not in plan.rows:
            continue
        folder = out / f"prepared_{kind}"
        kinds = [f"data.kinds=[{kind}]", f"data.output_dir={folder}"]
        t = _stage(f"study: ablation {row} (CPT reads {kind} sequences only)")
        prepare(load_config(plan.stable_config, [*common, *kinds]))
        train_phase(plan.stable_config, [*common, *kinds, f"train.output_dir={runs / row}"])
        seconds[f"train/{row}"] = time.perf_counter() - t
        eval_row(row, str(runs / row), kinds)
    if "pairwise" in plan.rows:
        last = "anneal" if "anneal" in plan.rows else "stable"
        pairs = ["eval.finetune_objective=pairs", "eval.rank_pretrained=false"]
        eval_row("pairwise", str(runs / last), pairs)
    study = summarize(reports, seconds)
    write_study(study, out)
    return study


def finished_report(cfg) -> dict | None:
    """The report of an eval that already ran with exactly this config on exactly this checkpoint
    (``config.yaml`` beside ``report.json`` equal, checkpoint identity equal), else None."""
    import yaml

    from cprec.config.loading import config_to_dict
    from cprec.eval.encode import checkpoint_identity
    from cprec.eval.run import find_checkpoint
    from cprec.model.bases import resolve_config

    out = Path(cfg.eval.output_dir)
    report_file, config_file = out / "report.json", out / "config.yaml"
    if not (report_file.is_file() and config_file.is_file()):
        return None
    resolved = resolve_config(cfg)
    now = yaml.safe_load(yaml.safe_dump(config_to_dict(resolved), sort_keys=False))
    if _report_relevant(yaml.safe_load(config_file.read_text(encoding="utf-8"))) != _report_relevant(now):
        return None
    report = json.loads(report_file.read_text(encoding="utf-8"))
    try:
        same = report.get("checkpoint", {}).get("id") == checkpoint_identity(find_checkpoint(resolved))
    except FileNotFoundError:
        return None
    return report if same else None


def _report_relevant(values: dict) -> dict:
    """A config as far as it can change an eval report: SASRec settings only matter where SASRec
    runs (the study trains the baselines in its first eval row only)."""
    ev = dict(values.get("eval", {}))
    if "sasrec" not in ev.get("baselines", []):
        ev = {k: v for k, v in ev.items() if not k.startswith("sasrec_")}
    return {**values, "eval": ev}


def main(config: str, anneal: str | None, out: str, rows: list[str], overrides: list[str]) -> dict:
    """`cprec study CONFIG [--anneal A.yaml] --out DIR [--rows ...] [overrides]`: run and print."""
    plan = StudyPlan(
        stable_config=Path(config),
        anneal_config=Path(anneal) if anneal else None,
        out=Path(out),
        rows=tuple(r.strip() for r in rows if r.strip()),
        overrides=list(overrides),
    )
    load_config(plan.stable_config, plan.overrides)  # config errors before any work
    study = run_study(plan)
    sys.stdout.write("\n" + study_markdown(study) + "\n")
    return study


# ------------------------------------------------------------------------------------ summary
def _pretrain_tokens(report: dict) -> int:
    """Tokens the evaluated checkpoint was continually pre-trained on (0 for a base model)."""
    folder = Path((report.get("checkpoint") or {}).get("path", "") or ".")
    for name in ("cprec_export.json", "trainer_state.json"):
        f = folder / name
        if f.is_file():
            return int(json.loads(f.read_text(encoding="utf-8")).get("tokens_seen", 0))
    return 0


def summarize(reports: dict[str, dict], seconds: dict[str, float] | None = None) -> dict:
    """Rows (one per row × head, plus baselines), intervals and paired differences."""
    from cprec.eval.intervals import interval, paired_difference

    if not reports:
        raise ValueError("study: no eval report to summarise")
    first = next(iter(reports.values()))
    users = first.get("users", {})
    for row, rep in reports.items():
        if rep.get("users", {}) != users or rep["protocol"] != first["protocol"]:
            raise ValueError(f"study row {row!r} was ranked on other users or another protocol")
    rows: list[dict] = []
    ranks: dict[str, dict] = {}
    for row, rep in reports.items():
        tokens = _pretrain_tokens(rep) if row != "base" else 0
        for model, head in HEADS.items():
            if model in rep["results"]:
                name = f"{row} · {head}"
                ranks[name] = rep["ranks"][model]
                details = rep["models"].get(model, {})
                rows.append({"name": name, "row": row, "head": head, "model": model,
                             "checkpoint": rep["checkpoint"].get("path"),
                             "pretrain_tokens": tokens, "details": details})  # fmt: skip
        for model, label in BASELINES.items():
            if model in rep["results"]:
                ranks[label] = rep["ranks"][model]
                rows.append({"name": label, "row": "baseline", "head": "baseline", "model": model,
                             "checkpoint": None, "pretrain_tokens": None,
                             "details": _baseline_details(rep["models"].get(model, {}))})  # fmt: skip
    domains = list(users)
    references = [r for r in ("base · fine-tuned", "SASRec", "popularity") if r in ranks]
    for r in rows:
        r["metrics"] = {}
        for d in domains:
            per = {}
            for m in KEY_METRICS:
                metric, k = m.split("@")
                per[m] = interval(ranks[r["name"]][d], metric, int(k))
            r["metrics"][d] = per
        r["vs"] = {
            ref: {d: paired_difference(ranks[r["name"]][d], ranks[ref][d], "recall", 10) for d in domains}
            for ref in references
            if ref != r["name"]
        }
    return {
        "protocol": first["protocol"],
        "split": first["split"],
        "n_users": first["n_users"],
        "domains": domains,
        "rows": rows,
        "references": references,
        "seconds": dict(seconds or {}),
    }


def _baseline_details(stats: dict) -> dict:
    keep = ("epochs_run", "best_epoch", "seconds", "source", "stopped_early")
    return {k: v for k, v in stats.items() if k in keep}


def _cell(iv: dict) -> str:
    return f"{iv['mean']:.4f} [{iv['low']:.3f}, {iv['high']:.3f}]"


def _diff(d: dict) -> str:
    rel = f" ({d['relative']:+.0%})" if d.get("relative") is not None else ""
    mark = "" if d["significant"] else " ~"
    return f"{d['diff']:+.4f}{rel}{mark}"


def study_markdown(study: dict) -> str:
    """recall@10 / ndcg@10 per domain with intervals, and recall@10 differences vs the references."""
    domains = study["domains"]
    refs = study["references"]
    head = ["row", "CPT tokens"] + [f"{d} {m}" for d in domains for m in KEY_METRICS]
    head += [f"{d} Δrecall@10 vs {ref}" for ref in refs for d in domains]
    lines = [
        f"Protocol: {study['protocol']['label']}, split `{study['split']}`; users "
        + ", ".join(f"{d} {study['n_users'].get(d)}" for d in domains)
        + ". Cells: mean [95% bootstrap interval over users]; Δ: paired difference on the same "
        "users, `~` = within noise (its 95% interval contains 0).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for r in study["rows"]:
        tokens = "—" if r["pretrain_tokens"] is None else f"{r['pretrain_tokens']:,}"
        cells = [r["name"], tokens]
        cells += [_cell(r["metrics"][d][m]) for d in domains for m in KEY_METRICS]
        cells += [_diff(r["vs"][ref][d]) if ref in r["vs"] else "" for ref in refs for d in domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_study(study: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "study.json", study, indent=1)
    (out / "study.md").write_text(study_markdown(study), encoding="utf-8")
    log.info("study written to %s", out / "study.md")
