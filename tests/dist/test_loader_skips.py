"""Skipped shards and samples (train.loader.on_corrupt=skip) reach every output of a 2-rank run."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest
from train_launch import metrics, train

from cprec.stream.docstream import epoch_units
from cprec.runtime import checkpoint as ck

pytestmark = pytest.mark.dist


def _flip_ids(shard: Path, n: int) -> None:
    """Overwrite 8 payload bytes of the first ``n`` ids.npy members (the ids become -3968)."""
    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".ids.npy")][:n]
    data = bytearray(shard.read_bytes())
    for m in members:
        data[m.offset_data + 132 : m.offset_data + 140] = b"\x80\xf0\xff\xff" * 2
    shard.write_bytes(bytes(data))


def test_skips_are_in_metrics_mlflow_state_and_the_log(train_yaml, tiny_prepared, tmp_path):
    prepared = shutil.copytree(tiny_prepared, tmp_path / "prepared")
    manifest = json.loads((prepared / "manifest.json").read_text())
    # The first shard each rank reads (one worker per rank, seed 1234 = train.seed): rank 0's fails
    # its sha256 (1 shard skipped); rank 1's has no sha256 in the manifest, so its 2 damaged
    # documents fail the vocabulary check one by one (2 samples skipped).
    units = epoch_units(len(manifest["shards"]), 2, 1234, 0)
    first = [manifest["shards"][units[r][0][0]] for r in range(2)]
    _flip_ids(prepared / first[0]["path"], 3)
    _flip_ids(prepared / first[1]["path"], 2)
    first[1]["sha256"] = ""
    (prepared / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    proc = train(
        train_yaml,
        [
            f"train.output_dir={out}",
            f"data.output_dir={prepared}",
            "train.loader.on_corrupt=skip",
            "train.max_steps=4",
        ],
    )
    # Counts are skip events: a worker reads ahead whole chunks, into later epochs, where the same
    # damaged shards are met again, so each count is a multiple of its damage and at least one.
    last = metrics(out)[-1]
    assert last["step"] == 4
    total_shards, total_samples = int(last["loader/skipped_shards"]), int(last["loader/skipped_samples"])
    assert total_shards >= 1 and total_samples >= 2 and total_samples % 2 == 0
    per_rank = {
        r: (
            int(last.get(f"loader/skipped_shards/rank_{r}", 0)),
            int(last.get(f"loader/skipped_samples/rank_{r}", 0)),
        )
        for r in range(2)
    }
    assert per_rank[0][0] >= 1 and per_rank[1][1] >= 2  # each rank's own first shard
    assert sum(s for s, _ in per_rank.values()) == total_shards
    assert sum(m for _, m in per_rank.values()) == total_samples
    logged = [r["step"] for r in metrics(out) if "loader/skipped_shards" in r]
    assert logged == [2, 4]  # every log step (train.log_every=2)

    state = ck.read_state(out / "checkpoints" / "step_0000004")
    assert state["loader_skipped"] == {
        "shards": total_shards,
        "samples": total_samples,
        "per_rank": {str(r): {"shards": s, "samples": m} for r, (s, m) in per_rank.items()},
    }

    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}").get_run(state["run_id"])
    skip_keys = [k for k in last if k.startswith("loader/skipped")]
    assert len(skip_keys) >= 4 and {k: run.data.metrics[k] for k in skip_keys} == {
        k: last[k] for k in skip_keys
    }

    ranks = ", ".join(f"rank {r}: {s} + {m}" for r, (s, m) in per_rank.items() if s or m)
    assert f"loader skipped {total_shards} shard(s) and {total_samples} sample(s) in this run" in proc.stdout
    assert ranks in proc.stdout
