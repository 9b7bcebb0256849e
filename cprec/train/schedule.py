"""Warmup-Stable-Annealing (WSA) learning rate: a pure function of the global optimizer step.

The LR used by the optimizer update number ``step`` (0-based, counted over the whole lineage of
runs: an anneal run continues the step count of the stable checkpoint it starts from) is

    lr(step) = peak_lr * warmup_factor(step) * decay_factor(step)

- warmup: ``min(1, (step + 1) / warmup_steps)`` - the first update already moves (no wasted
  zero-LR step) and update ``warmup_steps - 1`` is the first one at the peak;
- stable: factor 1 (a stable run has no decay: ``decay_start=None``);
- anneal: from ``decay_start`` (the step the anneal run starts at) the progress
  ``p = min(1, (step - decay_start + 1) / decay_steps)`` drives one of the shapes below, so the
  last anneal update (``decay_start + decay_steps - 1``) is exactly at ``min_lr_ratio * peak_lr``
  and every later step stays there.

Shapes (``r = min_lr_ratio``): linear ``1 - (1-r) p``; cosine ``r + (1-r) (1 + cos(pi p)) / 2``;
1-sqrt ``1 - (1-r) sqrt(p)``; exponential ``r ** p``.

Because the LR is a function of the step alone, the schedule has no state: the "scheduler
position" in a checkpoint is just the global step. The trainer writes the value into the
optimizer's param groups before every update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cprec.config import TrainConfig

SHAPES = ("linear", "cosine", "1-sqrt", "exponential")


def decay_factor(progress: float, shape: str, min_lr_ratio: float) -> float:
    """Multiplier in [min_lr_ratio, 1] for an anneal ``progress`` in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    r = min_lr_ratio
    if shape == "linear":
        return 1.0 - (1.0 - r) * p
    if shape == "cosine":
        return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
    if shape == "1-sqrt":
        return 1.0 - (1.0 - r) * math.sqrt(p)
    if shape == "exponential":
        if r <= 0:
            raise ValueError("exponential decay needs min_lr_ratio > 0")
        return r**p
    raise ValueError(f"unknown decay shape {shape!r}; expected one of {list(SHAPES)}")


def wsa_lr(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    decay_start: int | None = None,
    decay_steps: int = 0,
    shape: str = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """LR of optimizer update ``step`` (0-based global step) under a WSA schedule.

    ``decay_start=None`` means a stable phase (warmup then constant). With ``decay_start`` set,
    ``decay_steps`` must be > 0.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    factor = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    if decay_start is not None and step >= decay_start:
        if decay_steps <= 0:
            raise ValueError("an anneal schedule needs decay_steps > 0")
        factor *= decay_factor((step - decay_start + 1) / decay_steps, shape, min_lr_ratio)
    return peak_lr * factor


def steps_for_tokens(tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps needed to see ``tokens`` (rounded up; every step holds the same capacity)."""
    if tokens_per_step <= 0:
        raise ValueError(f"tokens_per_step must be > 0, got {tokens_per_step}")
    return -(-tokens // tokens_per_step)


@dataclass(frozen=True)
class Schedule:
    """A resolved WSA schedule for one run (all lengths in optimizer steps)."""

    peak_lr: float
    warmup_steps: int
    decay_start: int | None
    decay_steps: int
    shape: str
    min_lr_ratio: float

    def __call__(self, step: int) -> float:
        return wsa_lr(
            step,
            peak_lr=self.peak_lr,
            warmup_steps=self.warmup_steps,
            decay_start=self.decay_start,
            decay_steps=self.decay_steps,
            shape=self.shape,
            min_lr_ratio=self.min_lr_ratio,
        )


def phase_steps(train: TrainConfig, per_step: int) -> int:
    """Optimizer steps of this phase: ``max_tokens`` converted when given, else ``max_steps``."""
    if train.max_tokens > 0:
        return steps_for_tokens(train.max_tokens, per_step)
    return train.max_steps


def build_schedule(train: TrainConfig, per_step: int, phase_start: int) -> Schedule:
    """Resolve the config into step counts.

    A stable run never decays. An anneal run decays from ``phase_start`` (the global step of the
    checkpoint it was initialised from) over ``decay_steps``/``decay_tokens``, or over the whole
    phase when neither is given. ``per_step`` is the token capacity of one optimizer step.
    """
    sc = train.schedule
    warmup = steps_for_tokens(sc.warmup_tokens, per_step) if sc.warmup_tokens > 0 else sc.warmup_steps
    if train.phase == "stable":
        return Schedule(train.lr, warmup, None, 0, sc.decay_shape, sc.min_lr_ratio)
    if sc.decay_tokens > 0:
        decay = steps_for_tokens(sc.decay_tokens, per_step)
    else:
        decay = sc.decay_steps or phase_steps(train, per_step)
    return Schedule(train.lr, warmup, phase_start, decay, sc.decay_shape, sc.min_lr_ratio)
