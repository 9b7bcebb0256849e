"""Evaluation reports: report.json (the contract), report.md, metrics.png, MLflow, and compare.

report.json::

    {"protocol": {"name": "full"|"sampled", "n_negatives": N|null, "label": str, "masking": str,
                  "ties": "pessimistic"},
     "split": "test", "checkpoint": {"path": str, "id": str}, "timestamp": ISO-8601 UTC,
     "ks": [1, 5, ...], "n_users": {domain: n, ..., "overall": n},
     "results": {model: {domain: {"recall@10": x, "ndcg@10": y, "mrr@10": z, ...}, "overall": {...}}},
     "models": {model: {...details: training stats, scope...}}, "skipped": {...}, "seconds": {...},
     "item_cache": {"hits": n, "misses": n}}

The dict `cprec.eval.run.run` returns also carries ``mlflow_run_id`` when MLflow logged it.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cprec.eval.metrics import METRICS

log = logging.getLogger(__name__)

MASKING = "user's history items in the target's domain are excluded (the target never is)"


def build_report(
    *,
    protocol: str,
    n_negatives: int,
    split: str,
    checkpoint: dict,
    ks: list[int],
    n_users: dict[str, int],
    results: dict[str, dict[str, dict[str, float]]],
    models: dict[str, dict] | None = None,
    skipped: dict[str, int] | None = None,
    seconds: dict[str, float] | None = None,
) -> dict:
    """Assemble the report dict (see the module docstring)."""
    from cprec.eval.ranking import protocol_label

    return {
        "protocol": {
            "name": protocol,
            "n_negatives": n_negatives if protocol == "sampled" else None,
            "label": protocol_label(protocol, n_negatives),
            "masking": MASKING,
            "ties": "pessimistic",
        },
        "split": split,
        "checkpoint": checkpoint,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ks": list(ks),
        "n_users": dict(n_users),
        "results": results,
        "models": models or {},
        "skipped": skipped or {},
        "seconds": seconds or {},
    }


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def _columns(report: dict, ks: list[int] | None = None) -> list[str]:
    ks = ks or report["ks"]
    return [f"{m}@{k}" for m in METRICS for k in ks]


def to_markdown(report: dict) -> str:
    """A title stating protocol and split, then one table row per model × domain."""
    p = report["protocol"]
    ck = report.get("checkpoint") or {}
    cols = _columns(report)
    lines = [
        f"# Evaluation: {p['label']}, split `{report['split']}`",
        "",
        f"- checkpoint: `{ck.get('path', '')}` (id `{ck.get('id', '')}`)",
        f"- protocol: {p['label']}; masking: {p.get('masking', MASKING)}; "
        f"ties: {p.get('ties', 'pessimistic')}",
        f"- users: {', '.join(f'{d} {n}' for d, n in report['n_users'].items())}",
        f"- written: {report['timestamp']}",
        "",
        "| model | domain | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for model, per_domain in report["results"].items():
        for domain, vals in per_domain.items():
            lines.append(f"| {model} | {domain} | " + " | ".join(_fmt(vals.get(c)) for c in cols) + " |")
    if report.get("skipped"):
        lines += ["", f"Skipped inputs: {json.dumps(report['skipped'], sort_keys=True)}"]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: str | Path, metrics: tuple[str, ...] = ("recall", "ndcg")) -> Path | None:
    """Per-domain bars of each model for ``metric@K`` (K = 10 if reported, else the largest K)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the metrics plot")
        return None
    ks = report["ks"]
    k = 10 if 10 in ks else max(ks)
    models = list(report["results"])
    domains = list(next(iter(report["results"].values()), {}).keys())
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    width = 0.8 / max(1, len(models))
    for ax, m in zip(axes[0], metrics):
        for j, model in enumerate(models):
            vals = [report["results"][model].get(d, {}).get(f"{m}@{k}", float("nan")) for d in domains]
            ax.bar([i + j * width for i in range(len(domains))], vals, width, label=model)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(domains))], domains)
        ax.set_title(f"{m}@{k}")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report['protocol']['label']}, split {report['split']}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and metrics.png (when matplotlib is there) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md"}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1, sort_keys=False), encoding="utf-8")
    tmp.replace(paths["json"])
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    png = plot(report, out / "metrics.png")
    if png is not None:
        paths["png"] = png
    return paths


def metric_key(model: str, domain: str, metric: str) -> str:
    """MLflow metric name (MLflow forbids '@'): ``llm-finetuned/A/recall_at_10``."""
    return f"{model}/{domain}/{metric.replace('@', '_at_')}"


def log_report_to_mlflow(report: dict, cfg, files: dict[str, Path] | None = None) -> str | None:
    """Log params, every metric and the report files to MLflow; returns the run id (None if off).

    Uses ``cfg.tracking`` like training: URI (empty = ``sqlite:///<eval.output_dir>/mlflow.db``),
    experiment, run name (empty = ``eval-<output folder name>``), tags.
    """
    if cfg.tracking.backend != "mlflow":
        return None
    import mlflow

    from cprec.config import config_to_dict, flatten

    out = Path(cfg.eval.output_dir).resolve()
    uri = cfg.tracking.uri or f"sqlite:///{out / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(cfg.tracking.experiment)
    name = cfg.tracking.run_name or f"eval-{out.name}"
    tags = {"cprec.job": "eval", "cprec.protocol": report["protocol"]["label"], **cfg.tracking.tags}
    with mlflow.start_run(run_name=name, tags=tags) as run:
        params = flatten({"eval": config_to_dict(cfg.eval)})
        params["checkpoint"] = report["checkpoint"].get("path", "")
        mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
        metrics = {
            metric_key(model, domain, m): v
            for model, per_domain in report["results"].items()
            for domain, vals in per_domain.items()
            for m, v in vals.items()
            if v is not None and not math.isnan(v)
        }
        mlflow.log_metrics(metrics)
        for p in (files or {}).values():
            mlflow.log_artifact(str(p))
        log.info("logged %d metrics to MLflow run %s (%s)", len(metrics), run.info.run_id, uri)
        return run.info.run_id


def compare_table(reports: list[dict], names: list[str], metrics: list[str] | None = None) -> str:
    """Markdown table: one row per model × domain, one column per (report, metric)."""
    metrics = metrics or [f"{m}@{k}" for m in ("recall", "ndcg") for k in (10,)]
    header = ["model", "domain"] + [f"{n}: {m}" for n in names for m in metrics]
    rows: dict[tuple[str, str], list[str]] = {}
    for i, rep in enumerate(reports):
        for model, per_domain in rep["results"].items():
            for domain, vals in per_domain.items():
                row = rows.setdefault((model, domain), ["n/a"] * (len(reports) * len(metrics)))
                for j, m in enumerate(metrics):
                    row[i * len(metrics) + j] = _fmt(vals.get(m))
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for (model, domain), vals in rows.items():
        lines.append(f"| {model} | {domain} | " + " | ".join(vals) + " |")
    protos = [f"{n}: {r['protocol']['label']}, split {r['split']}" for n, r in zip(names, reports)]
    return "\n".join(["Protocols: " + "; ".join(protos), ""] + lines) + "\n"


def compare(paths: list[str]) -> int:
    """Print several report.json files side by side (``cprec eval --compare a.json b.json``)."""
    reports, names = [], []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            path = path / "report.json"
        if not path.is_file():
            raise FileNotFoundError(f"report not found: {path}")
        rep = json.loads(path.read_text(encoding="utf-8"))
        for key in ("protocol", "split", "ks", "results"):
            if key not in rep:
                raise ValueError(f"{path}: not a cprec report (missing '{key}')")
        reports.append(rep)
        names.append(path.parent.name or str(path))
    if len(set(names)) < len(names):  # same folder name twice: number them to tell them apart
        names = [f"{i + 1}:{n}" for i, n in enumerate(names)]
    if len({(r["protocol"]["name"], r["protocol"].get("n_negatives"), r["split"]) for r in reports}) > 1:
        log.warning("these reports use different protocols or splits: their numbers are not comparable")
    common = sorted(set.intersection(*(set(r["ks"]) for r in reports)))
    k = 10 if 10 in common else (max(common) if common else None)
    metrics = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr")] if k else None
    print(compare_table(reports, names, metrics))
    return 0
