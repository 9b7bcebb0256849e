"""Pre-training on 2 CPU ranks (DeepSpeed ZeRO-3, gloo): resume, anneal hand-off, export, MLflow."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import KILL_AT, copy_run
from train_launch import cprec_args, losses, metrics, torchrun, train

from cprec.runtime import checkpoint as ck
from cprec.train.schedule import wsa_lr

pytestmark = pytest.mark.dist

HERE = Path(__file__).resolve().parent


def adam_steps(ckpt: Path) -> set[int]:
    """Adam's step counter in every ZeRO optimizer shard of a checkpoint."""
    steps = set()
    for f in ckpt.glob("*zero_pp_rank_*_optim_states.pt"):
        inner = torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        steps |= {int(s["step"]) for s in inner["optimizer_state_dict"]["state"].values()}
    return steps


def mlflow_client(run: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")


def test_stable_run_layout(stable_run):
    ckpts = [p.name for p in ck.list_checkpoints(ck.checkpoints_dir(stable_run))]
    assert ckpts == ["step_0000002", "step_0000004", "step_0000006"]  # keep_last=2 periodic + phase end
    assert (stable_run / "checkpoints" / "latest").read_text() == "step_0000006"
    assert (stable_run / "checkpoints" / "phase_end").read_text() == "step_0000006"
    assert not (stable_run / "checkpoints" / "final").exists()  # "final" is the HF export alone
    state = ck.read_state(stable_run / "checkpoints" / "step_0000006")
    assert state["permanent"] and state["phase"] == "stable" and state["world_size"] == 2
    assert state["tokens_seen"] == sum(state["stream_tokens"].values()) > 0
    assert {"A/domain", "B/domain", "all/mixed"} == set(state["stream_tokens"])
    assert (stable_run / "config.yaml").is_file() and (stable_run / "final" / "config.json").is_file()
    assert adam_steps(stable_run / "checkpoints" / "step_0000006") == {6}
    rows = metrics(stable_run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["lr"] == pytest.approx(5e-4) and rows[1]["lr"] == pytest.approx(1e-3)  # warmup of 2
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    # Every row has the step's time breakdown; the sections and "other" add up to the whole step.
    sections = [f"time/{k}_s" for k in ("loader", "forward", "backward", "optimizer", "comm", "other")]
    for r in rows:
        assert all(r[k] >= 0 for k in sections) and r["time/forward_s"] > 0 and r["time/backward_s"] > 0
        assert sum(r[k] for k in sections) == pytest.approx(r["time/step_s"], rel=1e-6)
        assert r["cpu_time"] > 0
    assert not (stable_run / "profile").exists()  # the profiler is off unless asked for


def test_mlflow_run_has_metrics(stable_run):
    state = ck.read_state(stable_run / "checkpoints" / "step_0000006")
    client = mlflow_client(stable_run)
    run = client.get_run(state["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["cprec.phase"] == "stable"
    assert run.data.params["train.max_steps"] == "6"
    for key in ("loss", "lr", "tokens_per_s", "grad_norm", "mfu", "tokens/A/domain", "tokens/all/mixed"):
        assert key in run.data.metrics, key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4, 6]


def test_killed_run_resumes_with_identical_losses(train_yaml, stable_run, killed_run, runs_root):
    run = copy_run(killed_run, runs_root / "resumed")
    assert ck.latest_checkpoint(run).name == "step_0000004"
    assert max(losses(run)) == KILL_AT  # the killed run logged step 5 before dying
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    # A save that crashed half-way leaves a .tmp folder: it must be ignored and removed.
    leftover = run / "checkpoints" / ".tmp-step_0000006" / "step_0000006"
    leftover.mkdir(parents=True)
    (leftover / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"partial")

    train(train_yaml, [f"train.output_dir={run}", "train.log_every=1"])

    assert not leftover.parent.exists()
    assert losses(run) == losses(stable_run)  # bit-exact on CPU, all six steps
    assert ck.latest_checkpoint(run).name == "step_0000006"
    assert json.loads((run / "tracking.json").read_text())["run_id"] == run_id
    client = mlflow_client(run)
    runs = client.search_runs([client.get_run(run_id).info.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # the job's one run, reused
    # Step 5 was logged before the kill and replayed by the resume: still one loss value per step.
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert {m.step: m.value for m in history} == pytest.approx(losses(stable_run))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_anneal_branches_from_stable_checkpoint(train_yaml, stable_run, runs_root):
    out = runs_root / "anneal"
    train(
        train_yaml,
        [
            f"train.output_dir={out}",
            "train.phase=anneal",
            f"train.init_from={stable_run}/checkpoints/latest",
            "train.max_steps=4",
            "train.schedule.decay_shape=1-sqrt",
            "train.schedule.min_lr_ratio=0.1",
            "train.loader.mixing={A/domain: 3.0, B/domain: 1.0}",
            "train.profile_steps=2",
        ],
    )
    # torch.profiler over steps 2-3 of the run (rank 0), with the step sections as labelled ranges.
    ops = (out / "profile" / "ops.txt").read_text()
    assert "cprec/forward" in ops and "cprec/backward" in ops and "cprec/optimizer" in ops
    assert (out / "profile" / "trace.json").stat().st_size > 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [7, 8, 9, 10]  # the global step continues from step 6
    for r in rows:  # LR of update (step - 1), decaying from the stable value at the hand-off
        want = wsa_lr(
            r["step"] - 1, peak_lr=1e-3, warmup_steps=2, decay_start=6, decay_steps=4, shape="1-sqrt"
        )
        assert r["lr"] == pytest.approx(want)
    assert rows[0]["lr"] == pytest.approx(1e-3 * (1 - 0.9 * math.sqrt(1 / 4)))
    assert rows[-1]["lr"] == pytest.approx(1e-4)
    stable_last = losses(stable_run)[6]
    assert abs(rows[0]["loss"] - stable_last) < 0.1  # trained weights, not a fresh model (~ln 320)
    end = out / "checkpoints" / "step_0000010"
    assert adam_steps(end) == {10}  # optimizer state carried over: 6 stable + 4 anneal updates
    state = ck.read_state(end)
    assert state["phase"] == "anneal" and state["phase_start_step"] == 6 and state["permanent"]
    assert state["init_from"].endswith("step_0000006")
    assert [x["phase"] for x in state["lineage"]] == ["stable", "anneal"]
    assert state["stream_tokens"]["A/domain"] > state["stream_tokens"]["B/domain"]  # its own mixture
    stable_state = ck.read_state(stable_run / "checkpoints" / "step_0000006")
    tags = mlflow_client(out).get_run(state["run_id"]).data.tags
    assert tags["cprec.phase"] == "anneal" and tags["cprec.parent_run_id"] == stable_state["run_id"]


def test_export_matches_engine_logits(stable_run, runs_root):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cprec.runtime.export import run as export

    out = export(str(stable_run), str(runs_root / "export"))  # a run folder resolves to its final
    worker = torchrun(
        [
            str(HERE / "engine_logits.py"),
            str(stable_run / "checkpoints" / "step_0000006"),
            str(runs_root / "e.pt"),
        ]
    )
    assert worker.returncode == 0, worker.stdout[-4000:]
    ref = torch.load(runs_root / "e.pt", weights_only=False)
    fp32 = AutoModelForCausalLM.from_pretrained(out)
    for name, p in fp32.named_parameters():  # the export holds the engine's fp32 master weights
        assert torch.equal(p, ref["fp32"][name]), name
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)  # the engine computes in bf16
    ids = ref["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).expand_as(ids)).logits
    torch.testing.assert_close(logits.float(), ref["logits"], rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size
    assert json.loads((out / "cprec_export.json").read_text())["step"] == 6


@pytest.mark.slow
def test_resume_on_one_rank_via_universal_checkpoint(train_yaml, killed_run, stable_run, runs_root):
    run = copy_run(killed_run, runs_root / "one_rank")
    train(train_yaml, [f"train.output_dir={run}"], nproc=1)
    assert (run / "checkpoints" / "step_0000004" / "universal").is_dir()
    assert adam_steps(run / "checkpoints" / "step_0000006") == {6}  # Adam moments and step carried over
    rows = {r["step"]: r for r in metrics(run)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    # Other data (the loader restarts at epoch granularity) but the same weights: close to the 2-rank
    # run, far from a fresh model.
    assert abs(rows[5]["loss"] - losses(stable_run)[5]) < 0.05


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_last_good_checkpoint(train_yaml, killed_run, runs_root):
    run = copy_run(killed_run, runs_root / "nan")
    ckpt = run / "checkpoints" / "step_0000004"
    for f in ckpt.glob("*zero_pp_rank_*_optim_states.pt"):  # poison the fp32 master weights
        sd = torch.load(f, map_location="cpu", weights_only=False)
        for t in sd["optimizer_state_dict"]["fp32_flat_groups"]:
            t.data.fill_(float("nan"))
        torch.save(sd, f)
    proc = train(train_yaml, [f"train.output_dir={run}"], expect_ok=False)
    assert proc.returncode != 0
    assert f"loss is nan at step {KILL_AT}" in proc.stdout
    assert "last good checkpoint" in proc.stdout and str(ckpt) in proc.stdout
    assert ck.latest_checkpoint(run) == ckpt  # nothing was saved after the divergence


@pytest.mark.gpu
def test_short_run_on_one_gpu(train_yaml, runs_root):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    out = runs_root / "gpu"
    train(train_yaml, [f"train.output_dir={out}", "train.max_steps=4"], nproc=1, gpu=True)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert ck.read_state(out / "checkpoints" / "step_0000004")["permanent"]
    assert (out / "final" / "model.safetensors").is_file()


def test_sigterm_checkpoints_the_current_step_and_resumes(train_yaml, stable_run, runs_root):
    """A SLURM time limit / preemption: SIGTERM -> every rank saves the same step and exits cleanly;
    rerunning continues with the uninterrupted loss curve."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = runs_root / "sigterm"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    args = ["train", str(train_yaml), f"train.output_dir={out}", "tracking.backend=none"]
    cmd += cprec_args(args, faults=["--sleep-each", "train:0.5"])  # steps slow enough for the signal
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file() and losses(out)):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    log_text = proc.communicate(timeout=120)[0]
    steps = losses(out)
    assert steps, log_text[-3000:]
    stopped = max(steps)
    assert stopped < 6, "the run finished before the signal; make steps slower"
    assert "stop requested" in log_text, log_text[-3000:]
    assert ck.latest_checkpoint(out).name == f"step_{stopped:07d}"
    assert not (out / "final").exists()

    train(train_yaml, [f"train.output_dir={out}", "tracking.backend=none"])
    assert losses(out) == losses(stable_run)
