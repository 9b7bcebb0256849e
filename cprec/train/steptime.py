"""Where a training step's time goes: a cheap per-step breakdown, and an optional torch.profiler.

`StepTimes` adds up wall-clock seconds per section of one optimizer step (all its micro-steps):

- ``loader``: waiting for the next packed batch (``next()`` on the loader) and copying it to the device;
- ``forward``: ``engine(**batch)`` (under ZeRO-3 this includes gathering the partitioned weights);
- ``backward``: ``engine.backward(loss)`` (includes DeepSpeed's gradient reduction / partitioning);
- ``optimizer``: ``engine.step()`` (gradient clipping with its global norm, the AdamW update, the
  bf16 copy of the master weights);
- ``comm``: the step-end all-reduce of loss, tokens and the stop flag (on several ranks this is
  where a slower rank makes the others wait);
- ``other``: the rest of the step (LR, bookkeeping), so the sections add up to ``step``.

On CPU every op is synchronous, so ``time.perf_counter`` around each call is exact and costs a few
hundred nanoseconds. On CUDA the host returns before the kernels finish, so device sections are
timed with CUDA events recorded on the current stream (no synchronisation inside the step) and read
once at the step's end, after the loss has been copied to the host anyway.

`StepProfiler` (``train.profile_steps``) runs torch.profiler over a few steps after a warm-up step
and writes ``<output_dir>/profile/ops.txt`` (operators by self time, and the sections above as
``cprec/<section>`` ranges) and ``trace.json`` (chrome://tracing). It is off by default: the
profiler itself slows the steps it records.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SECTIONS = ("loader", "forward", "backward", "optimizer", "comm")
"""Timed sections of a step, in the order they run."""
DEVICE_SECTIONS = ("forward", "backward", "optimizer")
"""Sections whose work runs on the device (timed with CUDA events on a GPU)."""


def metric_name(section: str) -> str:
    """The metrics.jsonl / MLflow key of a section's seconds per step."""
    return f"time/{section}_s"


class StepTimes:
    """Seconds per section of the current step; `end_step` returns them and starts the next."""

    def __init__(self, device: torch.device | str = "cpu", label_ranges: bool = False):
        self.cuda = torch.device(device).type == "cuda"
        self.label_ranges = label_ranges  # record_function ranges for the profiler
        self._events: list[tuple[str, object, object]] = []
        self.start_step()

    def start_step(self) -> None:
        self._seconds = dict.fromkeys(SECTIONS, 0.0)
        self._events = []
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def section(self, name: str):
        if name not in self._seconds:
            raise ValueError(f"unknown step section {name!r}; one of {SECTIONS}")
        ranged = torch.profiler.record_function(f"cprec/{name}") if self.label_ranges else None
        if ranged is not None:
            ranged.__enter__()
        if self.cuda and name in DEVICE_SECTIONS:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            try:
                yield
            finally:
                end.record()
                self._events.append((name, begin, end))
                if ranged is not None:
                    ranged.__exit__(None, None, None)
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self._seconds[name] += time.perf_counter() - t
            if ranged is not None:
                ranged.__exit__(None, None, None)

    def end_step(self) -> dict[str, float]:
        """``{time/<section>_s: seconds}`` for every section, ``other`` and the whole ``step``."""
        for name, begin, end in self._events:
            end.synchronize()
            self._seconds[name] += begin.elapsed_time(end) / 1000.0
        total = time.perf_counter() - self._start
        out = {metric_name(k): v for k, v in self._seconds.items()}
        out[metric_name("other")] = max(total - sum(self._seconds.values()), 0.0)
        out[metric_name("step")] = total
        self.start_step()
        return out


class StepProfiler:
    """torch.profiler over ``steps`` optimizer steps after one warm-up step; a no-op when 0."""

    def __init__(self, steps: int, output_dir: Path | str, cuda: bool = False):
        self.steps = steps
        self.folder = Path(output_dir) / "profile"
        self._prof = None
        if steps <= 0:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
        )
        self._prof.__enter__()

    @property
    def active(self) -> bool:
        return self._prof is not None

    def step(self) -> None:
        if self._prof is not None:
            self._prof.step()

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None

    def _write(self, prof) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        averages = prof.key_averages()
        sort = "self_cuda_time_total" if any(e.device_time_total for e in averages) else "self_cpu_time_total"
        text = averages.table(sort_by=sort, row_limit=60)
        (self.folder / "ops.txt").write_text(
            f"torch.profiler over {self.steps} training step(s) after one warm-up step\n\n{text}\n",
            encoding="utf-8",
        )
        prof.export_chrome_trace(str(self.folder / "trace.json"))
        log.info("profile of %d step(s) written to %s", self.steps, self.folder)
