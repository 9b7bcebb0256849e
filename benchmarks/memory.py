"""Host memory of ZeRO-3 model start-up: sharded construction (zero.Init) against a full copy per rank.

For one model shape (default: Qwen2-0.5B, 494M parameters, tied 151,936-token embeddings) and
``--nproc`` CPU ranks (torchrun, gloo, ``DS_ACCELERATOR=cpu``) it measures the peak resident set
size (``ru_maxrss``) of every rank, each case in a fresh ``torchrun`` so the peaks do not mix:

- **build**: from scratch. *full* = what training did before: ``build_model`` builds the whole fp32
  model on every rank, then DeepSpeed partitions it (``zero.Init(module=...)``, the first thing
  ``deepspeed.initialize`` does with an unpartitioned module under ZeRO-3). *sharded* = ``build_model(...,
  zero3=<the engine's DeepSpeed config>)``: built inside ``zero.Init``, partitions in the engine's dtype.
- **load**: the same from a local HF folder (random weights of that shape, written once in bf16
  safetensors, split into several files + index, as published checkpoints are): *full* =
  ``from_pretrained`` in fp32 then partitioning, *sharded* = each rank reads its own slices.

Both end with the same partitioned model, ready for ``deepspeed.initialize`` (the optimizer state it
allocates next is the same for both and not part of this measurement). The JSON gives, per case,
every rank's peak and its RSS after imports and process-group start-up (``baseline``), and
``ratio`` = max sharded peak / max full peak per case (goal <= 0.6).

    taskset -c 0 nice -n 5 python benchmarks/memory.py --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.memory")

QWEN2_05B = {
    "arch": "qwen2",
    "hidden_size": 896,
    "num_layers": 24,
    "num_heads": 14,
    "num_kv_heads": 2,
    "intermediate_size": 4864,
    "vocab": 151936,
    "tie_word_embeddings": True,
}
GIB = 1024**3


def model_config(shape: dict):
    from cprec.config import ModelConfig

    fields = {k: v for k, v in shape.items() if k != "vocab"}
    fields.setdefault("max_position_embeddings", 4096)
    return ModelConfig(**fields)


def write_folder(shape: dict, folder: Path, shard_mb: int) -> Path:
    """A random-weight HF folder of ``shape`` (bf16 safetensors in files of ``shard_mb``), once."""
    import torch

    from cprec.model.build import build_model

    if (folder / "config.json").is_file():
        return folder
    model = build_model(model_config(shape), shape["vocab"], seed=0).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, max_shard_size=f"{shard_mb}MB")
    del model
    os.replace(tmp, folder)
    return folder


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------- worker
def worker(args) -> None:
    """One rank of one case (run under torchrun): build or load, partition, report the peak."""
    import gc

    import torch
    import torch.distributed as tdist

    from cprec.model.build import build_model
    from cprec.runtime import engine as eng

    shape = json.loads(args.shape)
    info = eng.start_distributed()
    spec = eng.EngineSpec(micro_batch_size=1, world_size=info.world_size, zero_stage=3, dtype=args.dtype)
    ds_cfg = eng.deepspeed_config(spec, gpu=False)
    cfg = model_config(shape)
    if args.source == "load":
        cfg = type(cfg)(name_or_path=args.folder)
    gc.collect()
    baseline, start = rss_bytes(), time.perf_counter()
    if args.how == "sharded":
        model = build_model(cfg, shape["vocab"], seed=0, zero3=ds_cfg)
    else:
        import deepspeed

        model = build_model(cfg, shape["vocab"], seed=0)
        if args.dtype == "bf16":
            model = model.to(torch.bfloat16)  # what the engine's bf16 mode does before partitioning
        deepspeed.zero.Init(module=model, config_dict_or_path=ds_cfg)
    gc.collect()
    seconds = time.perf_counter() - start
    params = [p for p in model.parameters()]
    row = {
        "rank": info.rank,
        "peak_rss_gib": peak_bytes() / GIB,
        "baseline_rss_gib": baseline / GIB,
        "rss_after_gib": rss_bytes() / GIB,
        "seconds": seconds,
        "partitioned": all(hasattr(p, "ds_tensor") for p in params),
        "local_partition_gib": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params) / GIB,
        "n_params": sum(p.ds_numel for p in params),
        "tied": model.get_output_embeddings().weight is model.get_input_embeddings().weight,
    }
    rows = [None] * info.world_size
    tdist.all_gather_object(rows, row)
    if info.is_main:
        Path(args.result).write_text(json.dumps(rows, indent=1))
    tdist.barrier()


# ------------------------------------------------------------------------------------ main
def run_case(
    how: str, source: str, shape: dict, folder: Path, nproc: int, dtype: str, work: Path, pin: str
) -> list[dict]:
    """Both ranks of one case in a fresh torchrun; returns their rows."""
    result = work / f"{source}-{how}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    cmd += [__file__, "--worker", f"--how={how}", f"--source={source}", f"--shape={json.dumps(shape)}"]
    cmd += [f"--folder={folder}", f"--dtype={dtype}", f"--result={result}"]
    if pin:
        cmd = ["taskset", "-c", pin, *cmd]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{source}/{how} failed (rc {proc.returncode}):\n{proc.stderr[-5000:]}")
    rows = json.loads(result.read_text())
    log.info(
        "%s/%s: peak %s GiB per rank (%.0f s)",
        source,
        how,
        ", ".join(f"{r['peak_rss_gib']:.2f}" for r in rows),
        time.perf_counter() - start,
    )
    return rows


def measure(
    shape: dict, nproc: int, dtype: str, work: Path, sources: list[str], pin: str = "", shard_mb: int = 300
) -> dict:
    """Every (source, full|sharded) case and the ratios; what the test and `main` share."""
    folder = work / "hf-folder"
    if "load" in sources:
        write_folder(shape, folder, shard_mb)
    out: dict = {"cases": {}, "ratio": {}}
    for source in sources:
        case = {
            how: run_case(how, source, shape, folder, nproc, dtype, work, pin) for how in ("full", "sharded")
        }
        full = max(r["peak_rss_gib"] for r in case["full"])
        sharded = max(r["peak_rss_gib"] for r in case["sharded"])
        case["ratio"] = sharded / full
        out["cases"][source] = case
        out["ratio"][source] = round(sharded / full, 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="the engine's (model.dtype)")
    p.add_argument("--shape", default=json.dumps(QWEN2_05B), help="model shape as JSON")
    p.add_argument("--only", choices=["build", "load"], help="one case only")
    p.add_argument("--work", default="", help="work folder (keeps the HF folder between runs)")
    p.add_argument("--pin", default="0", help="taskset CPU list for the ranks ('' = no pinning)")
    p.add_argument("--out", default="benchmarks/results/memory.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--how", choices=["full", "sharded"], help=argparse.SUPPRESS)
    p.add_argument("--source", choices=["build", "load"], help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.worker:
        logging.getLogger().setLevel(logging.WARNING)
        worker(args)
        return 0
    import torch

    shape = json.loads(args.shape)
    sources = [args.only] if args.only else ["build", "load"]
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="cprec-bench-memory-") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = measure(shape, args.nproc, args.dtype, work, sources, pin=args.pin)
    report = {
        "benchmark": "memory",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "pinned_to": args.pin or None,
            "load_avg_1min_at_start": round(load_before, 2),
            "load_avg_1min_at_end": round(os.getloadavg()[0], 2),
        },
        "shape": shape,
        "ranks": args.nproc,
        "dtype": args.dtype,
        "what": "peak RSS per rank (ru_maxrss) from process start to a partitioned model ready for "
        "deepspeed.initialize; full = whole fp32 model per rank then partitioned, sharded = zero.Init",
        **result,
        "goal": "ratio <= 0.6 (sharded / full, max over ranks)",
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
