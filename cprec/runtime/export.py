"""`cprec export CKPT OUT`: a (ZeRO-sharded) DeepSpeed checkpoint -> a Hugging Face model folder.

The fp32 master weights are gathered from every rank's ZeRO shard (DeepSpeed's ``zero_to_fp32``
reader, no GPU and no process group needed), the wrapper's ``hf_model.`` prefix is stripped, and
the weights are loaded into the transformers model described by the checkpoint's own config. The
result - ``model.safetensors`` + ``config.json`` + the tokenizer the shards were made with - loads
with ``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``.

The trainer also calls `export_checkpoint` at the end of each phase to write ``<output_dir>/final``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from cprec import atomic, quiet
from cprec.config import config_from_dict
from cprec.runtime.checkpoint import EXPORT_FILE, read_state, resolve_checkpoint

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "hf_model."


def consolidated_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a checkpoint folder, keys as in the wrapped training module."""
    if list(ckpt.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with quiet.library_prints(log, "zero_to_fp32"):  # its print() lines and bars, per export
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    # ZeRO stage 0: the whole module sits in the model-states file.
    files = sorted(ckpt.glob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no DeepSpeed model or ZeRO optimizer states")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the packed wrapper's ``hf_model.`` prefix (keys that lack it are a wrong checkpoint)."""
    bad = [k for k in state if not k.startswith(WRAPPER_PREFIX)]
    if bad:
        raise ValueError(f"checkpoint keys without the '{WRAPPER_PREFIX}' prefix, e.g. {bad[:3]}")
    return {k[len(WRAPPER_PREFIX) :]: v for k, v in state.items()}


def build_hf_model(trainer_state: dict):
    """The (randomly initialised) transformers model a checkpoint's config describes."""
    from cprec.model.build import build_model

    cfg = config_from_dict(trainer_state["config"])
    tok = trainer_state.get("tokenizer_ids", {})
    return build_model(
        cfg.model,
        int(trainer_state["vocab_size"]),
        bos_token_id=tok.get("bos_id"),
        eos_token_id=tok.get("eos_id"),
        pad_token_id=tok.get("pad_id"),
    )


def export_checkpoint(ckpt: Path, out: Path) -> Path:
    """Write ``out`` (replaced atomically) as an HF folder from checkpoint folder ``ckpt``."""
    ckpt, out = Path(ckpt), Path(out)
    trainer_state = read_state(ckpt)
    weights = hf_state_dict(consolidated_state_dict(ckpt))
    model = build_hf_model(trainer_state)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied output heads are stored once; anything else missing or extra means a different model.
    tied = {k for k in missing if k.endswith("lm_head.weight") and model.config.tie_word_embeddings}
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model in its config: missing {missing[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    with atomic.atomic_path(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok_dir = ckpt / "tokenizer"
        if tok_dir.is_dir():
            for f in tok_dir.iterdir():
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
        else:
            log.warning("%s has no tokenizer/ folder; the export has no tokenizer", ckpt)
        keys = ("step", "phase", "tokens_seen", "run_id", "config_hash", "tokenizer_hash")
        provenance = {k: trainer_state.get(k) for k in keys}
        provenance["checkpoint"] = str(ckpt.resolve())
        (tmp / EXPORT_FILE).write_text(json.dumps(provenance, indent=1), encoding="utf-8")
    log.info("exported %s (step %s) to %s", ckpt, trainer_state.get("step"), out)
    return out


def run(checkpoint: str, out: str) -> Path:
    """`cprec export`: ``checkpoint`` is a step folder, a run folder or a latest/phase_end pointer."""
    return export_checkpoint(resolve_checkpoint(checkpoint), Path(out))
