"""Experiment tracking: a small `Tracker` protocol with MLflow and no-op implementations.

Only rank 0 tracks (other ranks get a `NullTracker`). One MLflow run per job: its id is written to
``<output_dir>/tracking.json`` as soon as the run is created (and into every checkpoint), so a job
that resumes - even one killed before its first checkpoint - logs into the same run. A metric keeps
one value per step: a resumed job does not log again the steps it replays (those between its
checkpoint and the kill), so the run's history has no duplicates. The default
store is a sqlite file under the output folder; any tracking URI works.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any, Protocol

from cprec.config import Config, config_to_dict, flatten

log = logging.getLogger(__name__)

TRACKING_FILE = "tracking.json"
PARENT_TAG = "cprec.parent_run_id"


class Tracker(Protocol):
    """What the trainer needs from an experiment tracker."""

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifacts(self, paths: list[str | Path]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class NullTracker:
    """Tracking turned off (or a rank other than 0)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifacts(self, paths: list[str | Path]) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def default_uri(output_dir: str | Path) -> str:
    """``sqlite:///<absolute output_dir>/mlflow.db``."""
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


_MLFLOW_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


def mlflow_key(key: str) -> str:
    """MLflow names allow alphanumerics, ``_-. :/`` only; config keys come from user data
    (e.g. the genre "Children's" in data.domain_map), so other characters become ``_``."""
    return _MLFLOW_KEY_BAD.sub("_", key)


def _param_value(value: Any, limit: int) -> str:
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class MLflowTracker:
    """Logs into one MLflow run through `MlflowClient` (no global mlflow state)."""

    def __init__(self, uri: str, experiment: str, run_name: str, run_id: str | None, tags: dict[str, str]):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        self.resumed = False
        self.last_step = -1
        # Per metric: the highest step the run already holds. A resumed job replays the steps
        # between its checkpoint and the kill; those are not logged again (one value per step).
        self._logged_upto: dict[str, int] = {}
        if run_id is not None:
            try:
                self.client.get_run(run_id)
                self.resumed = True
            except Exception as e:  # run deleted or store moved: start a new run, say so
                log.warning("MLflow run %s not found in %s (%s); starting a new run", run_id, uri, e)
                run_id = None
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
            run_id = self.client.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
            log.info("new MLflow run %s in %s", run_id, uri)
        self.run_id: str | None = run_id
        if self.resumed:
            self.client.update_run(run_id, status="RUNNING")
            self.set_tags(tags)
            log.info("resumed MLflow run %s in %s", run_id, uri)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        items = [
            Param(mlflow_key(k), _param_value(v, MAX_PARAM_VAL_LENGTH)) for k, v in sorted(params.items())
        ]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + MAX_PARAMS_TAGS_PER_BATCH])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(mlflow_key(k), float(v), now, step)
            for k, v in metrics.items()
            if v is not None and math.isfinite(v)
        ]
        items = [m for m in items if step > self._logged_up_to(m.key)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)
            self._logged_upto.update((m.key, step) for m in items)
        self.last_step = step

    def _logged_up_to(self, key: str) -> int:
        """Highest step of ``key`` in the run (-1 if none); asked of the store once per key, and
        only for a resumed run (a new run holds nothing yet)."""
        if key not in self._logged_upto:
            history = self.client.get_metric_history(self.run_id, key) if self.resumed else []
            self._logged_upto[key] = max((m.step for m in history), default=-1)
        return self._logged_upto[key]

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, paths: list[str | Path]) -> None:
        """Upload files (e.g. a report) to the run's artifact store."""
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def state_dict(self) -> dict:
        return {"backend": "mlflow", "uri": self.uri, "run_id": self.run_id, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = state.get("last_step", -1)


def saved_run_id(output_dir: str | Path, uri: str) -> str | None:
    """The run id this output folder logged to before (same tracking URI), if any."""
    path = Path(output_dir) / TRACKING_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved.get("run_id") if saved.get("uri") == uri else None


def make_tracker(
    cfg: Config,
    output_dir: str | Path,
    rank: int,
    *,
    run_id: str | None = None,
    parent: dict | None = None,
) -> Tracker:
    """The tracker for this process: MLflow on rank 0 when enabled, else a no-op.

    ``run_id`` (e.g. from the checkpoint being resumed) is reused; otherwise the id recorded in
    ``<output_dir>/tracking.json``. A fresh run gets the flattened config as params. ``parent`` is
    the trainer state of the checkpoint an anneal run starts from: its run id becomes the tag
    ``cprec.parent_run_id`` (and MLflow's parent link when both runs share a tracking URI).
    """
    if rank != 0 or cfg.tracking.backend == "none":
        return NullTracker()
    output_dir = Path(output_dir)
    uri = cfg.tracking.uri or default_uri(output_dir)
    run_id = run_id or saved_run_id(output_dir, uri)
    tags = {"cprec.phase": cfg.train.phase, "cprec.output_dir": str(output_dir.resolve())}
    tags.update(cfg.tracking.tags)
    if parent and parent.get("run_id"):
        tags[PARENT_TAG] = parent["run_id"]
        tags["cprec.parent_tracking_uri"] = parent.get("tracking_uri", "")
        if parent.get("tracking_uri") == uri:
            tags["mlflow.parentRunId"] = parent["run_id"]
    name = cfg.tracking.run_name or output_dir.resolve().name
    tracker = MLflowTracker(uri, cfg.tracking.experiment, name, run_id, tags)
    if not tracker.resumed:
        tracker.log_params(flatten(config_to_dict(cfg)))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / TRACKING_FILE).write_text(
        json.dumps({"uri": uri, "run_id": tracker.run_id}), encoding="utf-8"
    )
    return tracker
