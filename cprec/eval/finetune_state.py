"""Where a contrastive fine-tune lives on disk: resumable checkpoints and the finished model.

Layout under ``<eval.output_dir>/finetuned/<scope>/``::

    config.json, model.safetensors, ...   the fine-tuned model (exported from the final checkpoint,
                                          LoRA merged)
    finetune_state.json                   written last: "completed", the settings key, stats
    checkpoints/step_0000040/             one resumable checkpoint (written atomically)
        trainer_state.json                step, settings key, losses so far, world size, run id
        rank_00000.pt ...                 per-rank RNG streams and data position
        mp_rank_*/zero_pp_rank_*          the DeepSpeed engine's files (weights, AdamW state)
    checkpoints/latest                    name of the newest complete checkpoint (written last)

The folder mechanics (temp folder then rename, the ``latest`` pointer, keep-last pruning, removal
of leftovers of a crashed save) and the engine save/load are `cprec.runtime.checkpoint`'s, shared
with training.

A checkpoint is resumed only when it was written with the same settings key (base checkpoint,
training pairs and every setting that decides the fine-tuned model), the same world size, the same
engine (the same ZeRO stage, offload and dtype) and the same step count;
otherwise the stale checkpoints are deleted and the fine-tune starts over (a fine-tune is short
next to pre-training, so no universal-checkpoint conversion is attempted).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cprec import atomic
from cprec.runtime import checkpoint as ckpt_io
from cprec.runtime import dist

log = logging.getLogger(__name__)

STATE_FILE = "finetune_state.json"
KIND = "finetune"
"""``trainer_state.json`` ``kind`` of a fine-tuning checkpoint (training checkpoints have none)."""


@dataclass
class CheckpointPolicy:
    """Where and how often a fine-tune saves resumable checkpoints."""

    folder: Path
    """The scope folder; checkpoints go to ``folder/checkpoints/``."""
    key: dict
    """The settings key (`settings_key`): checkpoints written with another are not resumed."""
    every: int = 0
    """Steps between checkpoints (0 = only the final one)."""
    keep_last: int = 3
    """Periodic checkpoints kept (the final one always stays)."""


# ------------------------------------------------------------------------------ checkpoints
def compatibility(key: dict, world_size: int, engine: dict, steps: int, pairs: int) -> dict:
    """What a checkpoint must match to be resumed (stored in its trainer_state.json)."""
    return {"key": key, "world_size": world_size, "engine": engine, "steps": steps, "pairs": pairs}


def find_resumable(folder: Path, compat: dict) -> tuple[Path | None, dict]:
    """The newest checkpoint under ``folder/checkpoints/`` this fine-tune can resume, and its state.

    Leftovers of a crashed save are removed; checkpoints written with other settings are deleted
    (rank 0; every rank must call this).
    """
    ckpt_io.clean_leftovers(folder)
    latest = ckpt_io.latest_checkpoint(folder)
    if latest is None:
        return None, {}
    state = ckpt_io.read_state(latest)
    theirs = {k: state.get(k) for k in compat}
    if state.get("kind") == KIND and theirs == compat:
        return latest, state
    changed = sorted(k for k in compat if theirs.get(k) != compat[k])
    log.warning(
        "fine-tuning checkpoints in %s were written with other %s: starting over", folder, ", ".join(changed)
    )
    if dist.is_main():
        shutil.rmtree(ckpt_io.checkpoints_dir(folder), ignore_errors=True)
    dist.barrier()
    return None, {}


def save_checkpoint(
    engine, folder: Path, step: int, state: dict, rank_state: dict, *, final: bool, keep_last: int
) -> Path:
    """One atomic checkpoint of a fine-tune (every rank calls this); returns its folder."""
    full = dict(state, kind=KIND)
    return ckpt_io.save(engine, folder, step, full, rank_state, permanent=final, keep_last=keep_last).path


def load_checkpoint(engine, ckpt: Path, rank: int) -> dict:
    """Weights + optimizer into the DeepSpeed ``engine``; returns this rank's saved state (RNG,
    data position)."""
    ckpt_io.load(engine, ckpt, universal=False)
    return ckpt_io.read_rank_state(ckpt, rank)


# ------------------------------------------------------------------------------ the finished model
def load_state(folder: Path) -> dict | None:
    """``finetune_state.json`` of a scope folder, or None."""
    p = Path(folder) / STATE_FILE
    return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None


def clear_state(folder: Path) -> None:
    """Unmark a folder as complete before its model is replaced (rank 0)."""
    if dist.is_main():
        (Path(folder) / STATE_FILE).unlink(missing_ok=True)


def mark_complete(folder: Path, key: dict, stats: dict, skipped: dict) -> None:
    state = {"completed": True, "key": key, "skipped": skipped, **stats}
    atomic.write_json(folder / STATE_FILE, state, indent=1)


def model_identity(folder: Path) -> str:
    """Identity of the model files of a scope folder (name, size, mtime of its top-level files).

    Unlike `cprec.eval.encode.checkpoint_identity` it ignores ``checkpoints/``, which changes while
    the model does not."""
    folder = Path(folder).resolve()
    h = hashlib.sha256(str(folder).encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def export_finetuned(ckpt: Path, base_dir: Path, lora_rank: int, out: Path):
    """The HF model of a fine-tuning checkpoint: base model (+ the same LoRA layout), the
    checkpoint's fp32 weights loaded over it, adapters merged; saved into ``out`` (rank 0)."""
    from cprec.eval.encode import load_model
    from cprec.eval.lora import apply_lora, merge_lora
    from cprec.runtime.export import consolidated_state_dict, hf_state_dict

    weights = hf_state_dict(consolidated_state_dict(ckpt))
    model = load_model(base_dir, torch.device("cpu"), dtype=torch.float32)
    if lora_rank > 0:
        apply_lora(model, lora_rank)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    # Frozen weights equal the base model's, which is what they were loaded from.
    missing = sorted(set(missing) - tied - frozen - _buffers(model))
    if missing or unexpected:
        raise ValueError(
            f"fine-tuning checkpoint {ckpt} does not fit the model in {base_dir}: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if lora_rank > 0:
        merge_lora(model)
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))  # beside checkpoints/: the folder is not replaced as a whole
    return model


def export_partitioned(model: nn.Module, out: Path) -> None:
    """The HF folder of a ZeRO-3 fine-tuned model (no LoRA) from its live engine, into ``out``:
    every rank calls this, one parameter's full fp32 weight is gathered at a time and rank 0 writes
    it (`cprec.runtime.export.stream_weights`, as training's export does), so no rank ever holds
    the whole model, which `export_finetuned` (LoRA, ZeRO 0-2) loads on rank 0. The same weights:
    the engine's fp32 masters are what its last checkpoint saved."""
    from cprec.runtime import dist
    from cprec.runtime.export import WeightWriter, stream_weights, write_model_config

    writer = WeightWriter(Path(out)) if dist.is_main() else None
    stream_weights(model, writer)
    if writer is not None:
        writer.close()
        write_model_config(model, Path(out))


def _buffers(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_buffers()}
