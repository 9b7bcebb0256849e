"""Evaluation reports: report.json (the contract), report.md, metrics.png, tracking, and compare.

report.json::

    {"protocol": {"name": "full"|"sampled", "n_negatives": N|null, "label": str, "masking": str,
                  "ties": "pessimistic"},
     "split": "test", "checkpoint": {"path": str, "id": str}, "timestamp": ISO-8601 UTC,
     "ks": [1, 5, ...], "n_users": {domain: n, ..., "overall": n},
     "results": {model: {domain: {"recall@10": x, "ndcg@10": y, "mrr@10": z, ...}, "overall": {...}}},
     "models": {model: {"head": str, ...details: training stats, scope, costs...}},
     "skipped": {...}, "seconds": {...},
     "cold": {domain: {"candidates": n, "cold_candidates": n, "targets": n, "cold_targets": n}},
     "item_cache": {"hits": n, "misses": n},
     "retrieval": {"mode": "exact"|"faiss", "approximate": bool, "label": str, "index": str},
     "users": {domain: [user id, ...]}, "ranks": {model: {domain: [target rank per user, ...]}}}

``users``/``ranks`` hold each user's 1-based target rank, in the same user order for every model,
so intervals and paired differences between models can be computed later (``cprec.eval.intervals``).

Cold items are those in no training sequence (e.g. items of the item file nobody interacted with).

``mlflow_run_id`` is there too when the job was tracked.

Tracking goes through the trainer's tracker (`cprec.runtime.tracking`, rank 0): the config as params,
every result as a metric named by `metric_key` (sanitised by the tracker), users per domain and
seconds per stage, tags linking the run to the evaluated checkpoint and its training run, and the
report files as artifacts. The fine-tuning loss of each step is logged into the same run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cprec import atomic
from cprec.eval.metrics import METRICS
from cprec.runtime.tracking import TRACKING_FILE, NullTracker, Tracker, default_uri, make_tracker, mlflow_key

log = logging.getLogger(__name__)

MASKING = "user's history items in the target's domain are excluded (the target never is)"
HEADS = {
    "llm-pretrained": "embedding zero-shot",
    "llm-finetuned": "embedding fine-tuned",
    "llm-generative": "generative",
    "llm-reranked": "re-ranked",
    "popularity": "baseline",
    "sasrec": "baseline",
}
"""Which head produced each model's rows (``models[model]["head"]`` in report.json)."""


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
    cold: dict[str, dict[str, int]] | None = None,
    retrieval: dict | None = None,
) -> dict:
    """Assemble the report dict (see the module docstring); every ranked model's entry in
    ``models`` names its head (`HEADS`). ``retrieval`` (`cprec.eval.faiss_index.describe`) says how
    the embedding rows ranked the full catalogue; an approximate index is named in the protocol's
    label, so that reports ranked otherwise are never read as comparable."""
    from cprec.eval.ranking import protocol_label

    models = {k: dict(v) for k, v in (models or {}).items()}
    for name in results:
        models[name] = {"head": HEADS.get(name, "unknown"), **models.get(name, {})}

    label = protocol_label(protocol, n_negatives)
    if retrieval and retrieval.get("approximate"):
        label += f", approximate retrieval (FAISS {retrieval['index']})"
    out = {
        "protocol": {
            "name": protocol,
            "n_negatives": n_negatives if protocol == "sampled" else None,
            "label": label,
            "masking": MASKING,
            "ties": "pessimistic",
        },
        "split": split,
        "checkpoint": checkpoint,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ks": list(ks),
        "n_users": dict(n_users),
        "results": results,
        "models": models,
        "skipped": skipped or {},
        "seconds": seconds or {},
        "cold": cold or {},
    }
    if retrieval:
        out["retrieval"] = dict(retrieval)
    return out


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
        *_cold_line(report.get("cold") or {}),
        *_heads_line(report),
        *([f"- embedding retrieval: {report['retrieval']['label']}"] if report.get("retrieval") else []),
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


def headline_k(ks: list[int]) -> int:
    """The cut-off a report leads with: 10 when computed, else the largest K."""
    return 10 if 10 in ks else max(ks)


def _summary_metrics(ks: list[int]) -> list[str]:
    """Recall and NDCG at the headline K, and recall at the largest K when that is another one."""
    k = headline_k(ks)
    return [f"recall@{k}", f"ndcg@{k}"] + ([f"recall@{max(ks)}"] if max(ks) != k else [])


def summary_lines(model: str, per_domain: dict[str, dict[str, float]], ks: list[int]) -> list[str]:
    """Log lines of one model's results per domain, each naming its metric and K, e.g.
    ``popularity recall@10: A 0.1391, B 0.0200, overall 0.0512`` (the `_summary_metrics`)."""
    return [
        f"{model} {name}: " + ", ".join(f"{d} {_fmt(v.get(name))}" for d, v in per_domain.items())
        for name in _summary_metrics(ks)
    ]


def headline_line(model: str, per_domain: dict[str, dict[str, float]], ks: list[int]) -> str:
    """One log line of one model's results over all domains (``overall``; the only domain when
    there is no such row), e.g. ``popularity overall: recall@10 0.1167, ndcg@10 0.0582``."""
    where = "overall" if "overall" in per_domain else next(iter(per_domain), "overall")
    values = per_domain.get(where, {})
    return f"{model} {where}: " + ", ".join(f"{m} {_fmt(values.get(m))}" for m in _summary_metrics(ks))


def _cold_line(cold: dict[str, dict[str, int]]) -> list[str]:
    if not cold:
        return []
    parts = [
        f"{d} {c['cold_targets']}/{c['targets']} targets, {c['cold_candidates']}/{c['candidates']} candidates"
        for d, c in cold.items()
    ]
    return ["- cold (in no training sequence): " + "; ".join(parts)]


def _heads_line(report: dict) -> list[str]:
    heads = [
        f"{m}: {report['models'][m]['head']}"
        for m in report["results"]
        if "head" in report["models"].get(m, {})
    ]
    return ["- heads: " + "; ".join(heads)] if heads else []


def plot(report: dict, path: str | Path, metrics: tuple[str, ...] = ("recall", "ndcg")) -> Path | None:
    """Per-domain bars of each model for ``metric@K`` (K = `headline_k`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: skipping the metrics plot")
        return None
    k = headline_k(report["ks"])
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
    atomic.write_json(paths["json"], report, indent=1, sort_keys=False)
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    png = plot(report, out / "metrics.png")
    if png is not None:
        paths["png"] = png
    return paths


def metric_key(model: str, domain: str, metric: str) -> str:
    """Metric name of one result (MLflow forbids '@'): ``llm-finetuned/A/recall_at_10``.

    Domain names come from user data; the tracker maps characters MLflow rejects to ``_``
    (`cprec.runtime.tracking.mlflow_key`: ``Children's`` -> ``Children_s``)."""
    return f"{model}/{domain}/{metric.replace('@', '_at_')}"


def report_metrics(report: dict) -> dict[str, float]:
    """Every number of a report as tracker metrics: results, users per domain, seconds per stage.

    NaN results (no users) are left out. Two names that the MLflow sanitising would merge are
    reported as a warning naming both (the later one would overwrite the earlier)."""
    metrics = {
        metric_key(model, domain, m): float(v)
        for model, per_domain in report["results"].items()
        for domain, vals in per_domain.items()
        for m, v in vals.items()
        if v is not None and not math.isnan(v)
    }
    metrics.update({f"n_users/{d}": float(n) for d, n in report.get("n_users", {}).items()})
    metrics.update({f"seconds/{k}": float(v) for k, v in report.get("seconds", {}).items()})
    metrics.update(
        {f"cold/{d}/{k}": float(n) for d, counts in report.get("cold", {}).items() for k, n in counts.items()}
    )
    seen: dict[str, str] = {}
    for k in metrics:
        other = seen.setdefault(mlflow_key(k), k)
        if other != k:
            log.warning("metric names %r and %r are the same once sanitised for MLflow", other, k)
    return metrics


def checkpoint_tags(checkpoint: dict) -> dict[str, str]:
    """Tags that link an eval run to what it evaluated: checkpoint path, id and kind, and the
    training run (id, tracking URI, step, phase) from the checkpoint's ``trainer_state.json`` or
    the ``cprec_export.json`` of an HF export made by the trainer."""
    tags = {
        "cprec.eval.checkpoint": str(checkpoint.get("path", "")),
        "cprec.eval.checkpoint_id": str(checkpoint.get("id", "")),
        "cprec.eval.checkpoint_kind": str(checkpoint.get("kind", "")),
    }
    folder = Path(checkpoint.get("path", "") or ".")
    for name in ("trainer_state.json", "cprec_export.json"):
        f = folder / name
        if not f.is_file():
            continue
        try:
            state = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("cannot read %s (%s): the eval run is not linked to its training run", f, e)
            continue
        for field, tag in (
            ("run_id", "cprec.train_run_id"),
            ("tracking_uri", "cprec.train_tracking_uri"),
            ("step", "cprec.train_step"),
            ("phase", "cprec.train_phase"),
        ):
            if state.get(field) not in (None, ""):
                tags[tag] = str(state[field])
        break
    return tags


def open_tracker(cfg, rank: int = 0) -> Tracker:
    """The eval job's tracker (`make_tracker` on ``eval.output_dir``; a no-op off rank 0 or when
    ``tracking.backend`` is none).

    Same settings as training: URI (empty = ``sqlite:///<eval.output_dir>/mlflow.db``, artifacts
    then in ``<eval.output_dir>/mlartifacts/``), experiment, tags; run name ``tracking.run_name``
    or ``eval-<output folder name>``; the whole config as params. A job that was interrupted
    continues its MLflow run (``tracking.json``); a job after a finished one starts a new run.
    """
    if rank != 0 or cfg.tracking.backend == "none":
        return NullTracker()
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = out / TRACKING_FILE
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")).get("completed"):
        marker.unlink()
    uri = cfg.tracking.uri or default_uri(out)
    if not cfg.tracking.uri:  # keep artifacts next to the store instead of ./mlruns of the cwd
        _ensure_experiment(uri, cfg.tracking.experiment, out / "mlartifacts")
    name = cfg.tracking.run_name or f"eval-{out.resolve().name}"
    named = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, run_name=name))
    tracker = make_tracker(named, out, rank)
    tracker.set_tags({"cprec.job": "eval"})
    return tracker


def _ensure_experiment(uri: str, name: str, artifacts: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(name) is None:
        client.create_experiment(name, artifact_location=artifacts.resolve().as_uri())


def close_tracker(tracker: Tracker, out_dir: str | Path, status: str = "FINISHED") -> None:
    """End the run; a finished job is marked in ``tracking.json`` so the next job starts a new run."""
    tracker.finish(status)
    marker = Path(out_dir) / TRACKING_FILE
    if status == "FINISHED" and tracker.run_id and marker.is_file():
        saved = json.loads(marker.read_text(encoding="utf-8"))
        marker.write_text(json.dumps({**saved, "completed": True}), encoding="utf-8")


def log_report(tracker: Tracker, report: dict, files: dict[str, Path] | None = None) -> int:
    """Log a report's metrics (step 0), protocol tags and files (artifacts); returns the metric count."""
    metrics = report_metrics(report)
    tracker.log_metrics(metrics, step=0)
    tracker.set_tags(
        {
            "cprec.protocol": report["protocol"]["label"],
            "cprec.split": report["split"],
            **checkpoint_tags(report.get("checkpoint") or {}),
        }
    )
    tracker.log_artifacts([str(p) for p in (files or {}).values()])
    if tracker.run_id:
        log.info("logged %d metrics and %d files to run %s", len(metrics), len(files or {}), tracker.run_id)
    return len(metrics)


def log_report_to_mlflow(report: dict, cfg, files: dict[str, Path] | None = None) -> str | None:
    """Log a finished report as its own run through the shared tracker; returns the run id (None if off)."""
    tracker = open_tracker(cfg)
    try:
        log_report(tracker, report, files)
    except BaseException:
        tracker.finish("FAILED")
        raise
    close_tracker(tracker, cfg.eval.output_dir)
    return tracker.run_id


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
