"""`cprec train`: one phase of continual pre-training (stable or anneal) with DeepSpeed.

Where a run starts (`plan_start`):
- **resume** its own run: the output folder already holds a checkpoint -> continue from the newest
  one (weights, optimizer, step, tokens, RNG, loader position, MLflow run). Automatic.
- **init** from another run: ``train.init_from`` names a checkpoint (a step folder, a run folder, or a
  ``checkpoints/latest|phase_end`` pointer) -> weights + optimizer state, the global step continues from
  there; the loader starts fresh on this run's own mixture. Required for an anneal run.
- **fresh**: neither -> a new model (stable phase only).

The global step runs on across phases: an anneal initialised from ``step_0001000`` trains updates
1000, 1001, ... and its LR decays from there (`schedule.build_schedule`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from tqdm import tqdm

from cprec import lifetime
from cprec import manifest as prepared_manifest
from cprec.config import Config, config_hash, config_to_dict, save_config
from cprec.runtime import checkpoint as ckpt_io
from cprec.runtime import dist, faults
from cprec.runtime import engine as eng
from cprec.runtime.tracking import Tracker, make_tracker
from cprec.train import mfu as mfu_mod
from cprec.train import skips, steptime
from cprec.train.geometry import BatchGeometry, batch_geometry, engine_spec
from cprec.train.schedule import Schedule, build_schedule, phase_steps

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Model fields a checkpoint must agree on to be loadable (kernels and precision of compute may change).
_WEIGHT_FIELDS = (
    "name_or_path",
    "arch",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "tie_word_embeddings",
    "dtype",
)


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss is NaN or infinite."""


# ------------------------------------------------------------------------------- planning
@dataclass
class StartPlan:
    kind: str  # fresh | resume | init
    checkpoint: Path | None = None
    state: dict = field(default_factory=dict)  # the checkpoint's trainer_state.json


def plan_start(cfg: Config) -> StartPlan:
    """Resume own run > initialise from ``train.init_from`` > fresh (stable only)."""
    own = ckpt_io.latest_checkpoint(cfg.train.output_dir)
    if own is not None:
        if cfg.train.init_from:
            log.info("resuming own run from %s; train.init_from=%s is ignored", own, cfg.train.init_from)
        return StartPlan("resume", own, ckpt_io.read_state(own))
    if cfg.train.init_from:
        src = ckpt_io.resolve_checkpoint(cfg.train.init_from)
        return StartPlan("init", src, ckpt_io.read_state(src))
    if cfg.train.phase == "anneal":
        raise ValueError(
            "config field 'train.init_from': an anneal run starts from a stable checkpoint; set it to a "
            "checkpoint folder, a stable run folder or <run>/checkpoints/latest"
        )
    return StartPlan("fresh")


def read_manifest(cfg: Config) -> tuple[Path, dict]:
    """The prepared folder the shards come from and its manifest.json (the one the loader reads)."""
    from cprec.stream.loader import manifest_folder

    spec = cfg.train.loader.shards or cfg.data.output_dir
    folder = manifest_folder(spec) or Path(cfg.data.output_dir)  # remote shards: the local manifest
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `cprec prepare` first (or set train.loader.shards)")
    return folder, prepared_manifest.read_manifest(folder)


def check_tokenizer(cfg: Config, manifest: dict, plan: StartPlan, manifest_path: Path) -> None:
    """The shards, the model's own tokenizer and the checkpoint must all use the same tokenizer."""
    from cprec.prepare.tokenize import require_same_tokenizer, tokenizer_hash

    want, shards_what = manifest["tokenizer"]["hash"], f"the shards in {manifest_path}"
    if cfg.model.name_or_path:
        from cprec.model.build import folder_vocab_size

        rows, vocab = folder_vocab_size(cfg.model.name_or_path), int(manifest["tokenizer"]["vocab_size"])
        if vocab > rows:
            raise ValueError(
                f"vocabulary mismatch: the shards in {manifest_path} use a tokenizer of {vocab} tokens, "
                f"model.name_or_path {cfg.model.name_or_path} has {rows} embedding rows; prepare the data "
                f"with the model's own tokenizer (data.tokenizer.path={cfg.model.name_or_path})"
            )
        require_same_tokenizer(
            tokenizer_hash(cfg.model.name_or_path),
            f"model.name_or_path {cfg.model.name_or_path}",
            want,
            shards_what,
            hint="prepare the data with that tokenizer (data.tokenizer.path)",
        )
    if plan.checkpoint is not None and plan.state.get("tokenizer_hash") is not None:
        require_same_tokenizer(
            plan.state["tokenizer_hash"], f"checkpoint {plan.checkpoint}", want, shards_what
        )


def check_compatible(cfg: Config, plan: StartPlan, vocab_size: int) -> None:
    """Fail early, naming the field, when a checkpoint cannot be loaded into this model."""
    if plan.checkpoint is None:
        return
    saved = plan.state["config"]["model"]
    diffs = [f"model.{k}: {saved.get(k)!r} there, {getattr(cfg.model, k)!r} here" for k in _WEIGHT_FIELDS]
    diffs = [d for d, k in zip(diffs, _WEIGHT_FIELDS) if saved.get(k) != getattr(cfg.model, k)]
    if plan.state.get("vocab_size") != vocab_size:
        diffs.append(f"vocab size: {plan.state.get('vocab_size')} there, {vocab_size} here")
    saved_stage = plan.state["config"]["train"]["zero_stage"]
    if (saved_stage == 0) != (cfg.train.zero_stage == 0):
        diffs.append(f"train.zero_stage: {saved_stage} there, {cfg.train.zero_stage} here")
    if diffs:
        raise ValueError(f"incompatible checkpoint {plan.checkpoint}: " + "; ".join(diffs))


# ------------------------------------------------------------------------------- per-step meter
class StepMeter:
    """Token counts and throughput; sums over ranks (loss every step, per-stream counts at log time)."""

    def __init__(self, streams: list[str], tokens_seen: int, phase_tokens: int, stream_tokens: dict):
        self.streams = sorted(streams)
        self.tokens_seen, self.phase_tokens = tokens_seen, phase_tokens
        self.stream_tokens = {s: int(stream_tokens.get(s, 0)) for s in self.streams}
        self._local_streams = dict.fromkeys(self.streams, 0)
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def add_batch(self, batch: dict) -> int:
        for key, n in batch.get("stream_tokens", {}).items():
            if key not in self._local_streams:  # a stream the manifest did not list: still counted
                raise ValueError(f"batch has tokens of stream {key!r}, not listed in the manifest")
            self._local_streams[key] += int(n)
        return int(batch["n_tokens"])

    def end_step(
        self, loss_sum: float, micro_steps: int, local_tokens: int, stop: bool
    ) -> tuple[float, bool]:
        """Mean loss over micro-steps and ranks, global token count, and whether any rank was asked
        to stop (one all-reduce for all three)."""
        t = torch.tensor([loss_sum / micro_steps, float(local_tokens), float(stop)], dtype=torch.float64)
        world = 1
        if tdist.is_initialized():
            tdist.all_reduce(t)
            world = tdist.get_world_size()
        tokens = int(t[1].item())
        self.tokens_seen += tokens
        self.phase_tokens += tokens
        self._window_tokens += tokens
        return t[0].item() / world, t[2].item() > 0

    def sync_streams(self) -> None:
        """Fold every rank's per-stream counts since the last sync into the totals (collective)."""
        t = torch.tensor([self._local_streams[s] for s in self.streams], dtype=torch.float64)
        if tdist.is_initialized():
            tdist.all_reduce(t)
        for s, n in zip(self.streams, t.tolist()):
            self.stream_tokens[s] += int(n)
        self._local_streams = dict.fromkeys(self.streams, 0)

    def start_window(self) -> None:
        self._window_tokens, self._window_start = 0, time.perf_counter()

    def log_window(self) -> dict[str, float]:
        """Throughput since the last call and cumulative per-stream tokens (collective call)."""
        self.sync_streams()
        elapsed = time.perf_counter() - self._window_start
        out = {"tokens_per_s": self._window_tokens / max(elapsed, 1e-9)}
        out.update({f"tokens/{s}": float(n) for s, n in self.stream_tokens.items()})
        self.start_window()
        return out


class StopSignal:
    """Remembers a SIGTERM/SIGUSR1 instead of dying mid-step. Ranks agree on stopping through the
    per-step all-reduce, so with ZeRO-3 all of them save the same step before exiting."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        log.warning("received signal %d: will checkpoint at the end of this step", signum)
        self.received = True


# ------------------------------------------------------------------------------- the run
@dataclass
class Run:
    """Everything the loop touches."""

    cfg: Config
    engine: object
    loader: object
    tracker: Tracker
    schedule: Schedule
    meter: StepMeter
    geo: BatchGeometry
    step: int
    phase_start: int
    end_step: int
    base_state: dict  # trainer_state fields that do not change during the run
    tokenizer_dir: Path
    flops_per_token: float
    peak_flops: float
    last_checkpoint: Path | None = None


def model_inputs(batch: dict, device) -> dict:
    """The packed-batch fields the model's forward takes."""
    out = {k: batch[k].to(device) for k in ("input_ids", "labels", "position_ids", "cu_seqlens")}
    out["max_seqlen"] = int(batch["max_seqlen"])
    return out


def train_loop(r: Run) -> Path | None:
    """The loop: scheduled LR, accumulated micro-steps, one update, log, check, checkpoint."""
    batches = iter(r.loader)
    rank0 = dist.is_main()
    bar = tqdm(total=r.end_step, initial=r.step, desc=f"{r.cfg.train.phase}", disable=not rank0)
    stop_signal = StopSignal()  # a SLURM time limit / preemption: save at the step's end, then exit
    device = r.engine.device
    profiler = steptime.StepProfiler(
        r.cfg.train.profile_steps if rank0 else 0, r.cfg.train.output_dir, cuda=device.type == "cuda"
    )
    times = steptime.StepTimes(device, label_ranges=profiler.active)
    r.meter.start_window()
    while r.step < r.end_step:
        times.start_step()
        lr = r.schedule(r.step)
        eng.set_lr(r.engine, lr)
        loss_sum, local_tokens = 0.0, 0
        for _ in range(r.geo.grad_accum):
            with times.section("loader"):
                batch = next(batches)
                inputs = model_inputs(batch, device)
            with times.section("forward"):
                loss = r.engine(**inputs)
            with times.section("backward"):
                r.engine.backward(loss)
            with times.section("optimizer"):
                r.engine.step()  # DeepSpeed updates only at the accumulation boundary
            loss_sum = loss_sum + loss.detach().float()  # stays on the device: no sync per micro-step
            local_tokens += r.meter.add_batch(batch)
        r.step += 1
        with times.section("comm"):
            loss, stop = r.meter.end_step(
                float(loss_sum), r.geo.grad_accum, local_tokens, stop_signal.received
            )
        step_times = times.end_step()
        profiler.step()
        if not math.isfinite(loss):
            msg = f"loss is {loss} at step {r.step}; last good checkpoint: {r.last_checkpoint or 'none'}"
            log.error("%s", msg)
            raise NonFiniteLoss(f"{msg} (lower train.lr or raise train.schedule.warmup_steps, then rerun)")
        log_step(r, loss, lr, step_times)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        every = r.cfg.train.checkpoint.every_steps
        if r.step == r.end_step or (every and r.step % every == 0) or stop:
            save(r, permanent=r.step == r.end_step)
        faults.step_done("train", r.step)  # the tests' fault-injection seam (a no-op otherwise)
        if stop:
            log.warning("stop requested (SIGTERM/SIGUSR1): saved step %d, exiting; rerun to resume", r.step)
            break
    profiler.close()
    bar.close()
    skipped = skips.gather(r.loader, r.engine.device)  # collective: before rank 0 alone reports
    if rank0:
        skipped.log_summary(r.cfg.train.loader.on_corrupt)
    r.loader.close()  # stop loader worker processes
    return r.last_checkpoint


def log_step(r: Run, loss: float, lr: float, step_times: dict[str, float] | None = None) -> None:
    """metrics.jsonl every step (rank 0), with the step's time breakdown (`steptime`: rank 0's
    seconds per section); tracker metrics every ``log_every`` steps and at the end."""
    grad_norm = r.engine.get_global_grad_norm()
    row = {"step": r.step, "loss": loss, "lr": lr, "tokens": r.meter.tokens_seen, "time": time.time()}
    # CPU seconds of this process so far: throughput per CPU-second stays comparable when the
    # machine is shared (benchmarks/train.py), where wall time also counts other jobs' turns.
    row["cpu_time"] = time.process_time()
    row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
    row.update(step_times or {})
    if r.step % r.cfg.train.log_every == 0 or r.step == r.end_step:
        window = r.meter.log_window()  # collective: every rank calls it
        row.update(window)
        row.update(skips.gather(r.loader, r.engine.device).metrics())  # collective too
        row["mfu"] = mfu_mod.mfu(window["tokens_per_s"], r.flops_per_token, r.peak_flops, r.geo.world_size)
        skip = ("step", "time", "cpu_time")
        metrics = {k: v for k, v in row.items() if k not in skip and v is not None}
        metrics["phase_tokens"] = r.meter.phase_tokens
        r.tracker.log_metrics(metrics, r.step)
        log.info(
            "step %d loss %.4f lr %.3g tok/s %.0f mfu %.3f",
            r.step,
            loss,
            lr,
            window["tokens_per_s"],
            row["mfu"],
        )
    if dist.is_main():
        with open(Path(r.cfg.train.output_dir) / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def save(r: Run, permanent: bool) -> None:
    r.meter.sync_streams()
    state = dict(
        r.base_state,
        phase_start_step=r.phase_start,
        end_step=r.end_step,
        tokens_seen=r.meter.tokens_seen,
        phase_tokens=r.meter.phase_tokens,
        stream_tokens=r.meter.stream_tokens,
        run_id=r.tracker.run_id,
        loader_skipped=skips.gather(r.loader, r.engine.device).state(),
    )
    rank_state = {"rng": ckpt_io.rng_state(), "loader": r.loader.state_dict(), "step": r.step}
    result = ckpt_io.save(
        r.engine,
        r.cfg.train.output_dir,
        r.step,
        state,
        rank_state,
        permanent=permanent,
        keep_last=r.cfg.train.checkpoint.keep_last,
        tokenizer_dir=r.tokenizer_dir,
    )
    r.last_checkpoint = result.path


def truncate_metrics(output_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows after ``step`` (written by a run that died after its last checkpoint)."""
    path = output_dir / METRICS_FILE
    if dist.is_main() and path.is_file():
        rows = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        kept = [ln for ln in rows if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")


def build_module(
    cfg: Config, tok: dict, zero3: dict | None = None, load_weights: bool = True
) -> tuple[torch.nn.Module, float]:
    """The HF causal LM wrapped for packed batches, and its training FLOPs per token (for MFU).

    Seeded, so every rank builds the same initial weights. ``zero3`` (the engine's ZeRO-3 config)
    builds it partitioned under ``zero.Init``; then ``load_weights=False`` skips reading a base
    folder whose weights a checkpoint is about to replace.
    """
    from cprec.model.build import build_model
    from cprec.model.flops import count_params, flops_per_token
    from cprec.model.packed import PackedCausalLM

    hf = build_model(
        cfg.model,
        int(tok["vocab_size"]),
        bos_token_id=tok.get("bos_id"),
        eos_token_id=tok.get("eos_id"),
        pad_token_id=tok.get("pad_id"),
        seed=cfg.train.seed,
        zero3=zero3,
        load_weights=load_weights,
    )
    shape = hf.config if cfg.model.name_or_path else cfg.model
    flops = flops_per_token(shape, count_params(hf, exclude_input_embeddings=True), cfg.train.seq_len)
    return PackedCausalLM(hf, cfg.model), flops


def check_memory(cfg: Config, spec: eng.EngineSpec, vocab: int, sharded: bool) -> None:
    """Fail before building when the model states cannot fit (`cprec.runtime.memory`)."""
    from cprec.model.build import model_hf_config
    from cprec.model.flops import config_params
    from cprec.runtime import memory

    memory.check_fits(
        config_params(model_hf_config(cfg.model, vocab)),
        spec,
        sharded_build=sharded,
        budget_gb=cfg.train.memory_per_rank_gb,
        gpu=eng.on_gpu(),
        local_ranks=memory.local_world_size(),
        device_index=dist.dist_info().local_rank if eng.on_gpu() else 0,
    )


def setup(cfg: Config) -> Run | None:
    """Everything before the loop: plan, engine, checkpoint load, loader, tracker."""
    from cprec.stream.loader import build_loader
    from cprec.stream.settings import loader_settings

    info = dist.dist_info()
    out = Path(cfg.train.output_dir)
    prepared, manifest = read_manifest(cfg)
    vocab = int(manifest["tokenizer"]["vocab_size"])
    geo = batch_geometry(cfg.train, info.world_size)
    ckpt_io.clean_leftovers(out)
    plan = plan_start(cfg)
    check_tokenizer(cfg, manifest, plan, prepared / "manifest.json")
    check_compatible(cfg, plan, vocab)
    if plan.kind == "resume":
        step, phase_start = plan.state["step"], plan.state["phase_start_step"]
    else:
        step = phase_start = plan.state.get("step", 0)
    end_step = phase_start + phase_steps(cfg.train, geo.tokens_per_step)
    if step >= end_step:
        log.info("phase already complete at step %d (%s); nothing to do", step, plan.checkpoint)
        return None
    universal = plan.checkpoint is not None and plan.state["world_size"] != info.world_size
    universal = universal and cfg.train.zero_stage > 0
    spec = engine_spec(cfg, geo)
    zero3 = eng.zero3_build_config(spec)  # ZeRO-3: built partitioned, no rank holds the full model
    check_memory(cfg, spec, vocab, sharded=zero3 is not None)
    ckpt_io.seed_everything(cfg.train.seed)
    module, flops_per_token = build_module(
        cfg, manifest["tokenizer"], zero3=zero3, load_weights=plan.checkpoint is None
    )
    engine = eng.init_engine(module, spec, universal=universal)
    if plan.checkpoint is not None:
        if universal:
            log.warning(
                "checkpoint %s was written by %d ranks, this run has %d: loading weights and optimizer "
                "through a universal checkpoint; the loader restarts at epoch granularity, RNG reseeded",
                plan.checkpoint,
                plan.state["world_size"],
                info.world_size,
            )
            ckpt_io.ensure_universal(plan.checkpoint)
        ckpt_io.load(engine, plan.checkpoint, universal=universal)
    # An anneal branch reads its own mixture from the start; a seed of its own keeps it from
    # replaying the exact first batches the stable run saw.
    seed = cfg.train.seed + (step if plan.kind == "init" else 0)
    loader = build_loader(loader_settings(cfg, seed=seed), info.rank, info.world_size)
    if plan.kind == "resume":
        restore_rank_state(plan, loader, info.rank, universal)
        truncate_metrics(out, step)
    else:
        ckpt_io.seed_everything(seed + 7919 * info.rank)
    parent = plan.state if plan.kind == "init" else plan.state.get("parent")
    tracker = make_tracker(
        cfg, out, info.rank, run_id=plan.state.get("run_id") if plan.kind == "resume" else None, parent=parent
    )
    peak, source = mfu_mod.peak_flops()
    log.info("MFU peak %.3g FLOP/s per device (%s)", peak, source)
    tracker.set_tags({"cprec.mfu_peak_source": source, "cprec.start": plan.kind})
    lineage = plan.state.get("lineage", [])
    if plan.kind != "resume":
        lineage = lineage + [{"output_dir": str(out.resolve()), "phase": cfg.train.phase, "start_step": step}]
    base_state = {
        "phase": cfg.train.phase,
        "world_size": info.world_size,
        "geometry": dataclasses.asdict(geo),
        "tracking_uri": getattr(tracker, "uri", None),
        "config": config_to_dict(cfg),
        "config_hash": config_hash(cfg),
        "tokenizer_hash": manifest["tokenizer"]["hash"],
        "vocab_size": vocab,
        "tokenizer_ids": {k: manifest["tokenizer"].get(k) for k in ("bos_id", "eos_id", "pad_id")},
        "init_from": str(plan.checkpoint) if plan.kind == "init" else plan.state.get("init_from", ""),
        "parent": _parent_summary(parent),
        "lineage": lineage,
    }
    prev = plan.state if plan.kind == "resume" else {}
    meter = StepMeter(
        list(manifest["streams"]),
        tokens_seen=plan.state.get("tokens_seen", 0),
        phase_tokens=prev.get("phase_tokens", 0),
        stream_tokens=prev.get("stream_tokens", {}),
    )
    if dist.is_main():
        save_config(cfg, out / "config.yaml")
    return Run(
        cfg=cfg,
        engine=engine,
        loader=loader,
        tracker=tracker,
        schedule=build_schedule(cfg.train, geo.tokens_per_step, phase_start),
        meter=meter,
        geo=geo,
        step=step,
        phase_start=phase_start,
        end_step=end_step,
        base_state=base_state,
        tokenizer_dir=prepared / manifest["tokenizer"].get("path", "tokenizer"),
        flops_per_token=flops_per_token,
        peak_flops=peak,
        last_checkpoint=plan.checkpoint if plan.kind == "resume" else None,
    )


def restore_rank_state(plan: StartPlan, loader, rank: int, universal: bool) -> None:
    """Loader position and RNG streams of this rank, exactly; after a world-size change, the loader
    gets every saved rank's state (it restarts each stream at the epoch they had reached) and the
    RNG is reseeded."""
    if not universal:
        state = ckpt_io.read_rank_state(plan.checkpoint, rank)
        loader.load_state_dict(state["loader"])
        ckpt_io.set_rng_state(state["rng"])
        return
    saved = [ckpt_io.read_rank_state(plan.checkpoint, r)["loader"] for r in range(plan.state["world_size"])]
    loader.load_state_dict(saved)
    ckpt_io.seed_everything(plan.state["config"]["train"]["seed"] + plan.state["step"] + 7919 * rank)


def _parent_summary(parent: dict | None) -> dict | None:
    if not parent:
        return None
    keys = ("run_id", "tracking_uri", "phase", "step", "parent")
    return {k: parent.get(k) for k in keys if k in parent}


def run(cfg: Config) -> Path:
    """Run (or resume) one phase; returns the output folder. Launch under torchrun/deepspeed/srun.

    Rank 0 first locks ``train.output_dir`` (`cprec.lifetime`): a second job on the folder is
    refused before it starts DeepSpeed."""
    lock = lifetime.hold_folder(cfg.train.output_dir, "train.output_dir", dist.dist_info().rank)
    try:
        return _run_phase(cfg)
    finally:
        lock.release()


def _run_phase(cfg: Config) -> Path:
    from cprec.model.bases import resolve_config

    info = eng.start_distributed()
    if not info.is_main:  # one copy of the progress log, from rank 0
        logging.getLogger("cprec").setLevel(logging.WARNING)
    cfg = resolve_config(cfg)  # named bases -> their cached folders (every rank; converted once)
    out = Path(cfg.train.output_dir)
    r = None
    try:
        r = setup(cfg)
        final = ckpt_io.latest_checkpoint(out) if r is None else train_loop(r)
        if r is not None and r.step < r.end_step:  # stopped by a signal: resumable, not finished
            r.tracker.finish("KILLED")
            return out
        if r is not None and final is not None and cfg.train.zero_stage == 3:
            from cprec.runtime.export import export_engine

            # Every rank: one parameter gathered at a time, rank 0 writes (no full copy anywhere).
            export_engine(r.engine, final, out / "final")
        elif dist.is_main() and final is not None and (r is not None or not (out / "final").is_dir()):
            from cprec.runtime.export import export_checkpoint

            export_checkpoint(final, out / "final")
        dist.barrier()
        if r is None:
            return out
        r.tracker.finish("FINISHED")
        log.info("phase %s done at step %d: %s", cfg.train.phase, r.step, final)
        return out
    except BaseException:
        if r is not None:
            r.tracker.finish("FAILED")
        raise
    finally:
        dist.destroy_distributed()
