"""Checkpoints: atomic step folders, keep-last-k, resume-own-run vs initialise-from-another-run.

Layout under ``<train.output_dir>/checkpoints/``::

    step_0000120/              one complete checkpoint (DeepSpeed tag = folder name)
        mp_rank_*/zero_pp_rank_*  DeepSpeed model + optimizer shards (one per rank under ZeRO)
        trainer_state.json     global step, phase, tokens, run id, config, lineage (rank 0)
        rank_00000.pt ...      per-rank state: RNG streams and loader position
        tokenizer/             copy of the prepared tokenizer (checkpoints are self-contained)
        universal/             DeepSpeed universal checkpoint, made on demand for a world-size change
    latest                     text: name of the newest complete checkpoint (written last)
    phase_end                  text: name of the phase-end checkpoint (never pruned)

``final`` is the run's exported HF folder (``<train.output_dir>/final/``, `cprec.runtime.export`) and
nothing else: the phase-end pointer was called ``checkpoints/final`` before, and run folders written
then (``LEGACY_PHASE_END``) still resolve.

Atomicity: every rank writes into ``.tmp-step_0000120/step_0000120/``; after a barrier rank 0
renames the inner folder to ``step_0000120`` (one ``rename`` on one file system), then rewrites
``latest`` through a temp file. A crash leaves either a complete folder or a ``.tmp-*`` leftover,
which the next start deletes. Checkpoints must live on a file system shared by all ranks.

Resuming on a different world size: ZeRO shards are laid out per rank, so the checkpoint is first
converted once into DeepSpeed's *universal* format (``universal/`` inside the checkpoint folder,
written atomically by rank 0) and loaded with ``checkpoint.load_universal``; weights, fp32 master
weights and Adam moments (with the step count) carry over exactly. The per-rank loader position and
RNG streams cannot be mapped onto other ranks: those restart (see `trainer`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cprec import atomic
from cprec.runtime import dist

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
LATEST = "latest"  # pointer file: the newest complete checkpoint
PHASE_END = "phase_end"  # pointer file: the phase-end (permanent) checkpoint
LEGACY_PHASE_END = "final"  # its name in run folders written before; read, never written
POINTERS = (LATEST, PHASE_END, LEGACY_PHASE_END)
EXPORT_FILE = "cprec_export.json"  # provenance written into an HF export (`cprec.runtime.export`)
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{7,})$")


def step_name(step: int) -> str:
    """Folder name (and DeepSpeed tag) of the checkpoint taken after ``step`` optimizer steps."""
    return f"step_{step:07d}"


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------- finding things
def is_complete(ckpt: Path) -> bool:
    """A checkpoint is complete when its folder holds trainer_state.json (written before the rename)."""
    return ckpt.is_dir() and (ckpt / STATE_FILE).is_file() and _STEP_RE.match(ckpt.name) is not None


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete step folders, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The run's newest complete checkpoint.

    The highest complete step folder wins over the ``latest`` pointer: a crash between the rename
    and the pointer update leaves a complete folder the pointer does not name yet.
    """
    found = list_checkpoints(checkpoints_dir(output_dir))
    return found[-1] if found else None


def is_hf_folder(folder: Path) -> bool:
    """A Hugging Face model folder (an export, a fine-tuned model, a base model)."""
    return (folder / "config.json").is_file()


def resolve_checkpoint(path: str | Path, *, hf_ok: bool = False) -> Path:
    """The one answer to "which checkpoint does this path mean" (training's init_from, `cprec
    export`, the eval job):

    - a pointer file ``checkpoints/latest|phase_end`` (or an older run's ``checkpoints/final``) ->
      the step folder it names;
    - a checkpoint folder (``step_XXXXXXX`` or any folder with trainer_state.json) -> itself;
    - a run folder, or its ``checkpoints/`` folder -> its phase-end checkpoint (``phase_end``
      pointer, else an older run's ``final`` pointer), else its newest complete one. The highest
      complete step folder, not the ``latest`` pointer: a crash between the rename and the pointer
      update leaves a folder the pointer lags behind;
    - with ``hf_ok`` (readers that take HF weights, i.e. the eval job): an HF model folder is itself,
      and a run folder's exported ``final/`` is preferred over its DeepSpeed checkpoints (which
      its ``checkpoints/`` folder still names).

    Raises FileNotFoundError/ValueError that name the path when nothing usable is there.
    """
    p = Path(path).expanduser()
    if p.is_file():  # pointer file: checkpoints/latest, phase_end or (older runs) final
        target = p.parent / p.read_text(encoding="utf-8").strip()
        if not is_complete(target):
            raise FileNotFoundError(f"checkpoint pointer {p} names {target}, which is missing or incomplete")
        return target
    if not p.exists():
        if p.name in POINTERS and p.parent.name == "checkpoints":
            raise FileNotFoundError(
                f"checkpoint pointer {p} does not exist: has the run in {p.parent.parent} saved a checkpoint?"
            )
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if hf_ok and is_hf_folder(p):
        return p
    if (p / STATE_FILE).is_file():
        return p
    run_dir = p.parent if p.name == "checkpoints" and not (p / "checkpoints").is_dir() else p
    if hf_ok and run_dir == p and is_hf_folder(p / "final"):
        return run_dir / "final"
    if checkpoints_dir(run_dir).is_dir():
        for name in (PHASE_END, LEGACY_PHASE_END):
            pointer = checkpoints_dir(run_dir) / name
            if pointer.is_file():
                return resolve_checkpoint(pointer)
        latest = latest_checkpoint(run_dir)
        if latest is not None:
            return latest
        raise FileNotFoundError(f"run folder {run_dir} holds no complete checkpoint")
    if _STEP_RE.match(p.name):
        raise ValueError(f"{p} is an incomplete checkpoint (no {STATE_FILE}); was the save interrupted?")
    raise ValueError(f"{p} is neither a checkpoint folder (step_XXXXXXX) nor a run folder with checkpoints/")


def read_state(ckpt: Path) -> dict:
    """The checkpoint's trainer_state.json, checked for format version."""
    path = ckpt / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {ckpt} is not a complete CPRec checkpoint")
    state = json.loads(path.read_text(encoding="utf-8"))
    if state.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format_version {state.get('format_version')!r}, this CPRec reads "
            f"{FORMAT_VERSION}"
        )
    return state


def tokenizer_identity(folder: str | Path) -> tuple[str | None, str]:
    """(tokenizer hash, where it came from) of what a model folder was trained with:
    ``trainer_state.json`` of a checkpoint, ``cprec_export.json`` of an export made here, else the
    tokenizer files in the folder (or its ``tokenizer/``) hashed by behaviour; (None, reason) when
    the folder carries no tokenizer at all (e.g. a bare HF model folder)."""
    from cprec.prepare.tokenize import tokenizer_hash

    folder = Path(folder)
    for name in (STATE_FILE, EXPORT_FILE):
        f = folder / name
        if f.is_file():
            saved = json.loads(f.read_text(encoding="utf-8")).get("tokenizer_hash")
            if saved:
                return saved, str(f)
    for tok_dir in (folder, folder / "tokenizer"):
        if (tok_dir / "tokenizer_config.json").is_file() or (tok_dir / "tokenizer.json").is_file():
            return tokenizer_hash(tok_dir), str(tok_dir)
    return None, f"{folder} has no {STATE_FILE}, {EXPORT_FILE} or tokenizer files"


def clean_leftovers(output_dir: str | Path) -> list[Path]:
    """Delete ``.tmp-*`` folders left by a save that crashed (rank 0 only)."""
    ckpt_dir = checkpoints_dir(output_dir)
    removed = []
    if dist.is_main() and ckpt_dir.is_dir():
        for p in ckpt_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
            log.warning("removed incomplete checkpoint leftover %s", p)
    dist.barrier()
    return removed


# ----------------------------------------------------------------------------- RNG and rank state
def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def read_rank_state(ckpt: Path, rank: int) -> dict:
    path = ckpt / rank_file(rank)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: checkpoint {ckpt} has no state for rank {rank}")
    # Our own file (RNG tuples, numpy arrays, loader state): not a plain-tensor payload.
    return torch.load(path, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- saving
@dataclass
class SaveResult:
    path: Path
    pruned: list[Path]


def save(
    engine,
    output_dir: str | Path,
    step: int,
    state: dict,
    rank_state: dict,
    *,
    permanent: bool,
    keep_last: int,
    tokenizer_dir: Path | None = None,
) -> SaveResult:
    """Write one checkpoint atomically (all ranks call this); prune old periodic ones.

    ``state`` goes to trainer_state.json (rank 0), ``rank_state`` to this rank's own file.
    """
    ckpt_dir = checkpoints_dir(output_dir)
    name = step_name(step)
    tmp_parent = ckpt_dir / f".tmp-{name}"
    final_path = ckpt_dir / name
    rank = dist.dist_info().rank
    if dist.is_main():
        if final_path.exists():  # re-saving the same step (e.g. a resumed run's phase end)
            shutil.rmtree(final_path)
        shutil.rmtree(tmp_parent, ignore_errors=True)
        tmp_parent.mkdir(parents=True)
    dist.barrier()
    # DeepSpeed writes <save_dir>/<tag>/; its own 'latest' file is not used (we load by tag).
    engine.save_checkpoint(str(tmp_parent), tag=name, save_latest=False)
    inner = tmp_parent / name
    torch.save(rank_state, inner / rank_file(rank))
    if dist.is_main():
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            shutil.copytree(tokenizer_dir, inner / "tokenizer")
        full = dict(
            state, format_version=FORMAT_VERSION, step=step, permanent=permanent, saved_at=time.time()
        )
        (inner / STATE_FILE).write_text(json.dumps(full, indent=1, sort_keys=True), encoding="utf-8")
    dist.barrier()  # every rank's shards and rank file are on disk
    pruned: list[Path] = []
    if dist.is_main():
        os.replace(inner, final_path)
        shutil.rmtree(tmp_parent, ignore_errors=True)
        atomic.write_text(ckpt_dir / LATEST, name)
        if permanent:
            atomic.write_text(ckpt_dir / PHASE_END, name)
            (ckpt_dir / LEGACY_PHASE_END).unlink(missing_ok=True)  # an older run's: one name left
        pruned = prune(ckpt_dir, keep_last)
        log.info("saved checkpoint %s%s", final_path, " (permanent)" if permanent else "")
    dist.barrier()
    return SaveResult(final_path, pruned)


def prune(ckpt_dir: Path, keep_last: int) -> list[Path]:
    """Delete periodic checkpoints beyond the newest ``keep_last``; permanent ones always stay."""
    periodic = [p for p in list_checkpoints(ckpt_dir) if not read_state(p).get("permanent")]
    doomed = periodic[:-keep_last] if keep_last > 0 else periodic
    for p in doomed:
        shutil.rmtree(p)
        log.info("pruned checkpoint %s (keep_last=%d)", p, keep_last)
    return doomed


# ----------------------------------------------------------------------------- loading
def universal_dir(ckpt: Path) -> Path:
    return ckpt / "universal"


def ensure_universal(ckpt: Path) -> Path:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format once (rank 0; others wait)."""
    out = universal_dir(ckpt)
    if dist.is_main() and not out.is_dir():
        import argparse

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        log.info("converting %s to a universal checkpoint for a different world size", ckpt)
        with atomic.atomic_path(out) as tmp:
            ds_to_universal(
                argparse.Namespace(
                    input_folder=str(ckpt),
                    output_folder=str(tmp),
                    num_extract_workers=1,
                    num_merge_workers=1,
                    keep_temp_folder=False,
                    strict=True,
                    inject_missing_state=True,
                )
            )
        # The converter also leaves a 'latest_universal' pointer naming its temp folder; we load by tag.
        (ckpt / "latest_universal").unlink(missing_ok=True)
    dist.barrier()
    return out


def load(engine, ckpt: Path, *, universal: bool) -> None:
    """Load weights and optimizer state (Adam moments, step count, fp32 masters) into ``engine``."""
    if universal:
        load_dir, tag = ckpt, universal_dir(ckpt).name
    else:
        load_dir, tag = ckpt.parent, ckpt.name
    path, _ = engine.load_checkpoint(
        str(load_dir),
        tag=tag,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
        load_module_only=False,
    )
    if path is None:
        raise ValueError(f"DeepSpeed could not load checkpoint {ckpt} (tag {tag}); see the log above")
    if universal:
        _unshare_adam_steps(engine)


def _unshare_adam_steps(engine) -> None:
    """DeepSpeed's ZeRO-3 universal load puts *one* step tensor into every param group's Adam state;
    torch's Adam increments it in place once per group, so the count would run ahead (x groups).
    Give each group its own copy."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
