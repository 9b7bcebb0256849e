"""The WSA schedule at every boundary, for every decay shape."""

from __future__ import annotations

import math

import pytest

from cprec.config import load_config
from cprec.train.geometry import BatchGeometry
from cprec.train.schedule import (
    SHAPES,
    build_schedule,
    decay_factor,
    phase_steps,
    steps_for_tokens,
    wsa_lr,
)

PEAK, WARMUP, START, DECAY, MIN = 1e-3, 10, 100, 20, 0.1


def lr(step: int, shape: str) -> float:
    return wsa_lr(
        step,
        peak_lr=PEAK,
        warmup_steps=WARMUP,
        decay_start=START,
        decay_steps=DECAY,
        shape=shape,
        min_lr_ratio=MIN,
    )


def expected_factor(p: float, shape: str) -> float:
    return {
        "linear": 1 - (1 - MIN) * p,
        "cosine": MIN + (1 - MIN) * 0.5 * (1 + math.cos(math.pi * p)),
        "1-sqrt": 1 - (1 - MIN) * math.sqrt(p),
        "exponential": MIN**p,
    }[shape]


def test_stable_phase_boundaries():
    stable = dict(peak_lr=PEAK, warmup_steps=WARMUP)
    assert wsa_lr(0, **stable) == pytest.approx(PEAK / WARMUP)  # first update already moves
    assert wsa_lr(WARMUP - 2, **stable) == pytest.approx(PEAK * (WARMUP - 1) / WARMUP)
    assert wsa_lr(WARMUP - 1, **stable) == PEAK  # warmup end: at the peak
    assert wsa_lr(WARMUP, **stable) == PEAK
    assert wsa_lr(10**7, **stable) == PEAK  # a stable run never decays
    assert wsa_lr(0, peak_lr=PEAK, warmup_steps=0) == PEAK  # no warmup


@pytest.mark.parametrize("shape", SHAPES)
def test_anneal_boundaries(shape):
    assert lr(0, shape) == pytest.approx(PEAK / WARMUP)
    assert lr(WARMUP - 1, shape) == pytest.approx(PEAK)
    assert lr(START - 1, shape) == pytest.approx(PEAK)  # last stable step
    first = lr(START, shape)  # first decay step: one step of progress
    assert first == pytest.approx(PEAK * expected_factor(1 / DECAY, shape))
    assert first < PEAK
    mid = START + DECAY // 2 - 1
    assert lr(mid, shape) == pytest.approx(PEAK * expected_factor(0.5, shape))
    assert lr(START + DECAY - 2, shape) > PEAK * MIN  # not there yet one step before the end
    assert lr(START + DECAY - 1, shape) == pytest.approx(PEAK * MIN)  # last decay step: the floor
    assert lr(START + DECAY, shape) == pytest.approx(PEAK * MIN)  # after: stays at the floor
    assert lr(START + 10 * DECAY, shape) == pytest.approx(PEAK * MIN)


@pytest.mark.parametrize("shape", SHAPES)
def test_decay_is_monotone(shape):
    values = [lr(s, shape) for s in range(START - 1, START + DECAY + 2)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_shapes_differ_mid_decay():
    mids = {shape: decay_factor(0.25, shape, MIN) for shape in SHAPES}
    assert len(set(round(v, 9) for v in mids.values())) == len(SHAPES)
    # 1-sqrt drops fastest at the start, cosine slowest.
    assert mids["1-sqrt"] < mids["linear"] < mids["cosine"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="decay_steps"):
        wsa_lr(5, peak_lr=1.0, warmup_steps=0, decay_start=0, decay_steps=0)
    with pytest.raises(ValueError, match="shape"):
        decay_factor(0.5, "quadratic", 0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        decay_factor(0.5, "exponential", 0.0)
    with pytest.raises(ValueError, match="step"):
        wsa_lr(-1, peak_lr=1.0, warmup_steps=0)


def test_tokens_to_steps():
    assert BatchGeometry(2, 4, 3, 128).tokens_per_step == 2 * 4 * 3 * 128
    assert steps_for_tokens(1000, 100) == 10
    assert steps_for_tokens(1001, 100) == 11  # rounded up: never fewer tokens than asked
    assert steps_for_tokens(0, 100) == 0


def test_build_schedule_from_config():
    cfg = load_config(None, ["train.seq_len=64", "train.micro_batch_size=2", "train.max_tokens=1280"])
    per_step = BatchGeometry(1, 2, 1, 64).tokens_per_step
    assert phase_steps(cfg.train, per_step) == 10
    stable = build_schedule(cfg.train, per_step, phase_start=0)
    assert stable.decay_start is None and stable(500) == cfg.train.lr

    ann = load_config(
        None,
        [
            "train.phase=anneal",
            "train.max_steps=40",
            "train.schedule.decay_shape=linear",
            "train.schedule.min_lr_ratio=0.0",
        ],
    )
    sched = build_schedule(ann.train, per_step, phase_start=300)
    assert (sched.decay_start, sched.decay_steps) == (300, 40)  # decays over the whole phase by default
    assert sched(299) == ann.train.lr  # the stable LR right up to the hand-off
    assert sched(300) == pytest.approx(ann.train.lr * (1 - 1 / 40))
    assert sched(339) == pytest.approx(0.0)

    by_tokens = load_config(
        None, ["train.phase=anneal", "train.seq_len=64", "train.schedule.decay_tokens=640"]
    )
    assert build_schedule(by_tokens.train, 64, phase_start=0).decay_steps == 10
    warm = load_config(None, ["train.schedule.warmup_tokens=6400"])
    assert build_schedule(warm.train, 640, phase_start=0).warmup_steps == 10
