"""Distributed preparation at scale: peak memory flat in the number of events, events/s by worker.

Synthetic logs (Parquet, ``data.source=parquet``) of 1M and 10M events (``--with-100m`` adds 100M,
not run by default): 50k users per million events (20 events each on average, at least 3), a fixed
catalogue of 20,000 items in two domains with short titles, a small sentencepiece tokenizer (1,000
pieces), one document per user (``data.kinds=[mixed]``: the runs measure how the job scales with
events, not text volume). Each run is ``cprec.prepare.pipeline.run`` with ``data.engine=ray`` in a
fresh Python process (so the driver's peak RSS is that run's), with ``data.buckets`` = events /
250k, so a bucket's size - what one task holds - is the same at every scale. The single-process
path (``data.engine=local``) is the baseline in the same run (on the 1M log; ``--local-large`` also
on the large one).

Memory: the driver's peak RSS (``ru_maxrss``) and the peak RSS of every process Ray names
``ray::...`` (``VmHWM`` from ``/proc``, sampled every 0.2 s while the job runs): the task workers
(``ray::cprec-split``, ``ray::cprec-shards``, ``ray::IDLE``) and Ray's two per-node agents
(``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``, about 50 MB each, so the largest is always a
task worker). The sum is over every such process the run had, which Ray replaces over a long run,
so it is not memory held at one time. Ray's other daemons (GCS, raylet) are reported apart, under
``ray_system_peak_rss_sum_mb``, which for a single-process run holds its tokenization process.
``memory_ratio`` = (driver peak + the largest worker peak) at 10M over the same at 1M: the memory
one driver and one worker need (goal <= 1.5).

Speed: events/s = events read / wall time of ``pipeline.run`` (Ray's start included), with 1 and
2 Ray workers on the 1M log, or on the large one with ``--workers-at large`` (the driver's serial
parts - reading and partitioning the log, training the tokenizer, Ray's start - are a fixed ~10 s
that dominates a 1M run on a free machine). ``--cpus`` is the cores every process is pinned to
(default 0): with one core two workers share it and the 2-vs-1 ratio is not parallel scaling (see
``cores_note`` in the JSON); pass ``--cpus 0,1`` on two free cores. ``--pair-repeats N`` runs the
1-vs-2 worker pair N times, interleaved (2w, 1w, 2w, ...), and takes the ratio of the median wall
times (each run's time in ``repeats_wall_s``). ``--reuse`` keeps the runs already in ``--out`` and
runs only the missing ones.

    python benchmarks/prepare_scale.py --out benchmarks/results/prepare_scale.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
log = logging.getLogger("benchmarks.prepare_scale")
WORDS = "red blue green small large coffee tea mug pan knife bowl lamp chair desk oak steel".split()
N_ITEMS = 20_000
EVENTS_PER_BUCKET = 250_000
PART_EVENTS = 1_000_000


# ----------------------------------------------------------------------------- synthetic log
def make_log(folder: Path, n_events: int, seed: int = 0) -> Path:
    """Events in Parquet parts of <= 1M rows (users whole within a part, rows shuffled), plus
    ``items.parquet``; made once per size and reused (the folder is the cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = folder / "DONE"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "events").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    titles = [" ".join(rng.choice(WORDS, 2)) + f" {k}" for k in range(N_ITEMS)]
    pq.write_table(
        pa.table(
            {
                "item_id": [f"i{k}" for k in range(N_ITEMS)],
                "title": titles,
                "domain": ["A" if k < N_ITEMS // 2 else "B" for k in range(N_ITEMS)],
            }
        ),
        folder / "items.parquet",
    )
    written, user0, part = 0, 0, 0
    while written < n_events:
        want = min(PART_EVENTS, n_events - written)
        sizes = rng.geometric(1 / 18, size=want // 5) + 2  # >= 3 events per user, mean 20
        sizes = sizes[np.cumsum(sizes) <= want]
        rest = want - int(sizes.sum())  # so the part has exactly `want` events
        if rest >= 3:
            sizes = np.append(sizes, rest)
        elif rest:
            sizes[-1] += rest
        n = int(sizes.sum())
        users = np.repeat(np.arange(user0, user0 + len(sizes)), sizes)
        pos = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        items = np.minimum((rng.random(n) ** 2 * N_ITEMS).astype(np.int64), N_ITEMS - 1)  # skewed
        order = rng.permutation(n)
        table = pa.table(
            {
                "user_id": pa.array(np.char.add("u", users[order].astype(str)).tolist(), pa.string()),
                "item_id": pa.array(np.char.add("i", items[order].astype(str)).tolist(), pa.string()),
                "domain": pa.array(np.where(items[order] < N_ITEMS // 2, "A", "B").tolist(), pa.string()),
                "timestamp": pa.array(1_600_000_000 + 60 * pos[order] + users[order] % 60, pa.int64()),
            }
        )
        pq.write_table(table, folder / "events" / f"part-{part:04d}.parquet", row_group_size=1 << 16)
        written += n
        user0 += len(sizes)
        part += 1
    done.write_text(json.dumps({"events": written, "users": user0}))
    return folder


# ----------------------------------------------------------------------------- one run (child)
class _WorkerPeaks:
    """Peak RSS (VmHWM) of every process under this one, sampled until stopped."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        while not self._stop.is_set():
            for p in self.me.children(recursive=True):
                try:
                    with open(f"/proc/{p.pid}/status") as f:
                        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
                    name = " ".join(p.cmdline()[:3])
                except (OSError, StopIteration, Exception):  # noqa: BLE001 - a process that just ended
                    continue
                old = self.peaks.get(p.pid, ("", 0))[1]
                self.peaks[p.pid] = (name, max(old, hwm * 1024))
            self._stop.wait(0.2)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        # Ray renames its worker processes (``ray::IDLE``, ``ray::cprec-split``); the rest are its daemons.
        is_worker = lambda name: name.startswith("ray::") or "default_worker.py" in name  # noqa: E731
        workers = [v for n, v in self.peaks.values() if is_worker(n)]
        system = [v for n, v in self.peaks.values() if not is_worker(n)]
        return {
            "worker_processes": len(workers),
            "worker_peak_rss_max_mb": round(max(workers, default=0) / 2**20, 1),
            "worker_peak_rss_sum_mb": round(sum(workers) / 2**20, 1),
            "ray_system_peak_rss_sum_mb": round(sum(system) / 2**20, 1),
        }


def one_run(args) -> dict:
    from cprec.config import load_config
    from cprec.prepare import pipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stages: dict[str, float] = {}

    class _Stages(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            if msg.startswith("stage times:"):
                stages.update({k.strip(): float(v) for k, v in re.findall(r"([\w+ ]+?) ([\d.]+)s", msg[12:])})

    logging.getLogger("cprec").addHandler(_Stages())
    data = Path(args.data)
    overrides = [
        "data.source=parquet",
        f"data.path={data / 'events'}",
        f"data.item_path={data / 'items.parquet'}",
        "data.columns.text=[title]",
        f"data.output_dir={args.work}/out",
        f"data.engine={args.engine}",
        f"data.buckets={args.buckets}",
        f"data.num_workers={args.workers}",
        "data.tokenizer.vocab_size=1000",
        "data.tokenizer.train_sentences=20000",
        "data.max_doc_tokens=512",
        "data.prompt.item_token_budget=16",
        # One document per user (the all-domain sequence): the runs measure scale, not text volume.
        "data.kinds=[mixed]",
        "data.mixed_min_domains=1",
        "tracking.backend=none",
    ]
    cfg = load_config(REPO / "configs" / "food_kitchen.yaml", overrides)
    peaks = _WorkerPeaks()
    t0 = time.perf_counter()
    out = pipeline.run(cfg)
    wall = time.perf_counter() - t0
    procs = peaks.stop()
    m = json.loads((out / "manifest.json").read_text())
    n = m["counts"]["interactions_in"]
    driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "engine": args.engine,
        "events": n,
        "buckets": args.buckets if args.engine == "ray" else None,
        "workers": args.workers,
        "wall_s": round(wall, 1),
        "events_per_s": round(n / wall, 1),
        "driver_peak_rss_mb": round(driver / 2**20, 1),
        **procs,
        "driver_plus_max_worker_mb": round(driver / 2**20 + procs["worker_peak_rss_max_mb"], 1),
        "sequences": sum(s["sequences"] for s in m["streams"].values()),
        "tokens": sum(s["tokens"] for s in m["streams"].values()),
        "shards": len(m["shards"]),
        "stages_s": stages,
    }


# ----------------------------------------------------------------------------------- driver
def _child(args, data: Path, engine: str, workers: int, events: int, work: Path) -> dict:
    buckets = max(1, round(events / EVENTS_PER_BUCKET))
    cmd = [sys.executable, __file__, "--one-run", "--data", str(data), "--work", str(work)]
    cmd += ["--engine", engine, "--workers", str(workers), "--buckets", str(buckets)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log.info(
        "run: %s, %d events, %d worker(s), %d buckets, cores %s", engine, events, workers, buckets, args.cpus
    )
    proc = subprocess.run(
        ["taskset", "-c", args.cpus, *cmd], env=env, capture_output=True, text=True, cwd=REPO
    )
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({engine}, {events}, {workers}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "cprec_prepare_scale"))
    ap.add_argument("--cpus", default="0", help="cores every run is pinned to (taskset -c)")
    ap.add_argument("--with-100m", action="store_true", help="also the 100M-event log (hours)")
    ap.add_argument("--sizes", default="1,10", help="log sizes in millions of events (smoke test: 0.02,0.05)")
    ap.add_argument(
        "--local-large", action="store_true", help="also the single-process path on the large log (its RSS)"
    )
    ap.add_argument(
        "--workers-at",
        choices=["small", "large"],
        default="small",
        help="the log the 1-vs-2 worker comparison runs on (large: fixed start-up costs matter less)",
    )
    ap.add_argument(
        "--reuse", action="store_true", help="keep the runs already in --out (same names), run the rest"
    )
    ap.add_argument(
        "--pair-repeats", type=int, default=1, help="runs of the 1-vs-2 worker pair (median of each side)"
    )
    ap.add_argument("--one-run", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="ray", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--buckets", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_run:
        print(json.dumps(one_run(args)))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cache = Path(args.cache)
    sizes = [int(float(x) * 1_000_000) for x in args.sizes.split(",")] + (
        [100_000_000] if args.with_100m else []
    )
    small, large = sizes[0], sizes[1]
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    logs = {n: make_log(cache / f"events_{_name(n)}", n) for n in sizes}
    log.info("synthetic logs ready in %.0fs", time.perf_counter() - t0)
    work = cache / "work"
    at = large if args.workers_at == "large" else small  # the log the 1-vs-2 worker pair runs on
    plan = [(small, "ray", 1)] + [(n, "ray", 1) for n in sizes[1:]] + [(at, "ray", 2), (small, "local", 1)]
    plan += [(large, "local", 1)] if args.local_large else []
    runs, machine = {}, {}
    if args.reuse and args.out and Path(args.out).is_file():
        previous = json.loads(Path(args.out).read_text())
        runs, machine = previous["runs"], previous.get("machine", {})
        load_start = machine.get("load_avg_start", load_start)
    for n, engine, workers in plan:  # the memory pair first; partial results saved after each run
        name = f"{_name(n)}_{engine}" + (f"_{workers}w" if engine == "ray" else "")
        if name in runs:
            log.info("reusing %s from %s", name, args.out)
            continue
        runs[name] = _child(args, logs[n], engine, workers, n, work)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(
                json.dumps({"benchmark": "prepare_scale", "partial": True, "runs": runs}, indent=2)
            )
    pair = {w: runs[f"{_name(at)}_ray_{w}w"] for w in (1, 2)}
    for r in pair.values():
        r.setdefault("repeats_wall_s", [r["wall_s"]])
    for i in range(len(pair[1]["repeats_wall_s"]), args.pair_repeats):  # 2w first: alternate the order
        for w in (2, 1) if i % 2 else (1, 2):
            again = _child(args, logs[at], "ray", w, at, work)
            pair[w]["repeats_wall_s"].append(again["wall_s"])
            pair[w].setdefault("repeats_stages_s", []).append(again["stages_s"])
    ten, one = runs[f"{_name(large)}_ray_1w"], runs[f"{_name(small)}_ray_1w"]
    cores = sorted({int(c) for part in args.cpus.split(",") for c in _expand(part)})
    result = {
        "benchmark": "prepare_scale",
        "log": {
            "users_per_million_events": 50_000,
            "items": N_ITEMS,
            "domains": 2,
            "events_per_bucket": EVENTS_PER_BUCKET,
            "tokenizer_vocab": 1000,
        },
        "runs": runs,
        "memory_ratio": round(ten["driver_plus_max_worker_mb"] / one["driver_plus_max_worker_mb"], 3),
        "memory_ratio_of": "(driver peak RSS + largest worker peak RSS) at 10M / the same at 1M, 1 worker",
        "memory_ratio_goal": "<= 1.5",
        "memory_ratio_worker_sum": round(
            (ten["driver_peak_rss_mb"] + ten["worker_peak_rss_sum_mb"])
            / (one["driver_peak_rss_mb"] + one["worker_peak_rss_sum_mb"]),
            3,
        ),
        "memory_ratio_sizes": [small, large],
        "local_driver_peak_rss_mb": {
            name.split("_")[0]: r["driver_peak_rss_mb"] for name, r in runs.items() if r["engine"] == "local"
        },
        "workers_speedup_2_over_1": round(
            float(np.median(pair[1]["repeats_wall_s"])) / float(np.median(pair[2]["repeats_wall_s"])), 3
        ),
        "workers_speedup_of": "median wall time of the 1-worker runs / that of the 2-worker runs (same log)",
        "workers_speedup_per_repeat": [
            round(a / b, 3) for a, b in zip(pair[1]["repeats_wall_s"], pair[2]["repeats_wall_s"])
        ],
        "workers_speedup_events": at,
        "workers_speedup_goal": ">= 1.6 with 2 free cores",
        "cores_used": cores,
        "cores_note": (
            "every process pinned to these cores (taskset); with one core the two workers share it, "
            "so the 2-vs-1 ratio is not parallel scaling: on a core shared with other jobs two worker "
            "processes get two scheduler shares, and the load changed between the runs"
            if len(cores) < 2
            else "workers had a core each"
        ),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_start": [round(x, 2) for x in load_start],
            "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


def _name(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


def _expand(part: str) -> list[int]:
    if "-" in part:
        lo, hi = part.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(part)]


if __name__ == "__main__":
    sys.exit(main())
