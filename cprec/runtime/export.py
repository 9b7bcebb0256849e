"""`cprec export CKPT OUT`: a (ZeRO-sharded) DeepSpeed checkpoint -> a Hugging Face model folder.

Two ways in, one way out:

- **From the checkpoint files** (`export_checkpoint`, the CLI; no GPU and no process group): the
  fp32 master weights are gathered from every rank's ZeRO shard (DeepSpeed's ``zero_to_fp32``
  reader), the wrapper's ``hf_model.`` prefix is stripped, and the names are checked against the
  model the checkpoint's config describes (built on the meta device: no second copy of the weights).
- **From a live ZeRO-3 engine** (`export_engine`, what training does at the end of a phase): every
  rank gathers one parameter's fp32 master at a time (``safe_get_full_fp32_param``, a collective)
  and rank 0 streams it to disk, so no rank ever holds more than one full parameter plus one
  output file's worth of tensors.

Both write with `WeightWriter`: ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` + the
index when larger than ``max_shard_bytes``), tied weights once (as ``save_pretrained`` does),
``config.json`` + ``generation_config.json``, the tokenizer the shards were made with and
``cprec_export.json`` (provenance). The folder loads with ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from cprec import atomic, quiet
from cprec.config import config_from_dict
from cprec.runtime.checkpoint import EXPORT_FILE, read_state, resolve_checkpoint

log = logging.getLogger(__name__)

WRAPPER_PREFIX = "hf_model."
MAX_SHARD_BYTES = 5 * 1024**3
"""Largest output file; bigger models are split into several files plus an index."""


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
    """The transformers model a checkpoint's config describes, on the meta device (names, shapes,
    config; no weights)."""
    from cprec.model.build import meta_model

    cfg = config_from_dict(trainer_state["config"])
    tok = trainer_state.get("tokenizer_ids", {})
    return meta_model(
        cfg.model,
        int(trainer_state["vocab_size"]),
        bos_token_id=tok.get("bos_id"),
        eos_token_id=tok.get("eos_id"),
        pad_token_id=tok.get("pad_id"),
    )


# ------------------------------------------------------------------------------ the writer
class WeightWriter:
    """Streams named tensors into safetensors files of at most ``max_shard_bytes`` (rank 0 only)."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[str, list[str]]] = []  # (temporary file name, its tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        part = f".part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(self.folder / part), metadata={"format": "pt"})
        self._parts.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last file, name the files as transformers does, and the index when several."""
        if self._pending or not self._parts:
            self._flush()
        n = len(self._parts)
        if n == 1:
            os.replace(self.folder / self._parts[0][0], self.folder / "model.safetensors")
            return ["model.safetensors"]
        weight_map, names = {}, []
        for i, (part, keys) in enumerate(self._parts, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / part, self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
            names.append(name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2), encoding="utf-8"
        )
        return names


def export_entries(model: nn.Module) -> list[tuple[str, list[str], object]]:
    """What an HF folder of ``model`` holds, in order: (saved name, every name of that tensor,
    the parameter or buffer). A tied weight is one entry under its first name, as
    ``save_pretrained`` saves it; non-persistent buffers (rotary tables) are not saved."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    entries = [(name, aliases[id(p)], p) for name, p in model.named_parameters()]
    persistent = set(model.state_dict(keep_vars=True))
    entries += [(n, [n], b) for n, b in model.named_buffers() if n in persistent]
    return entries


def write_model_config(model: nn.Module, folder: Path) -> None:
    """``config.json`` and, where the model has one, ``generation_config.json`` into ``folder``."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)


def _write_metadata(tmp: Path, model: nn.Module, ckpt: Path, trainer_state: dict) -> None:
    write_model_config(model, tmp)
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


def export_checkpoint(ckpt: Path, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``out`` (replaced atomically) as an HF folder from checkpoint folder ``ckpt``."""
    ckpt, out = Path(ckpt), Path(out)
    trainer_state = read_state(ckpt)
    weights = hf_state_dict(consolidated_state_dict(ckpt))
    model = build_hf_model(trainer_state)
    entries = export_entries(model)
    known = {a for _, names, _ in entries for a in names}
    missing = [name for name, names, _ in entries if not any(a in weights for a in names)]
    unexpected = sorted(set(weights) - known)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt} does not fit the model in its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    with atomic.atomic_path(out) as tmp:
        writer = WeightWriter(tmp, max_shard_bytes)
        for name, names, ref in entries:
            value = next(weights[a] for a in names if a in weights)
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(
                    f"checkpoint {ckpt}: {name} has shape {tuple(value.shape)}, the model {tuple(ref.shape)}"
                )
            writer.add(name, value.to(ref.dtype) if ref.dtype.is_floating_point else value)
        writer.close()
        _write_metadata(tmp, model, ckpt, trainer_state)
    log.info("exported %s (step %s) to %s", ckpt, trainer_state.get("step"), out)
    return out


def _full_fp32(param) -> torch.Tensor:
    """The full fp32 master weight of a ZeRO-3 parameter (collective: every rank calls it)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param) if param.requires_grad else None
    if full is None:  # frozen: no optimizer master, the module's own (gathered) weight is the value
        with deepspeed.zero.GatheredParameters([param]):
            full = param.data.float().clone()
    return full.reshape(param.ds_shape)


def stream_weights(model: nn.Module, writer: WeightWriter | None) -> None:
    """Every rank: each tensor of ``model``'s HF folder as its full fp32 value, one at a time (a
    ZeRO-3 parameter gathered collectively from the live engine's fp32 masters), handed to
    ``writer`` where there is one (rank 0) and dropped before the next."""
    for name, _, ref in export_entries(model):
        value = _full_fp32(ref) if hasattr(ref, "ds_tensor") else ref.detach().float()
        if writer is not None:
            writer.add(name, value)
        del value


def export_engine(engine, ckpt: Path, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Write ``out`` from a live ZeRO-3 engine whose weights are those of checkpoint ``ckpt``.

    Every rank must call this (each parameter is gathered collectively); rank 0 writes, and holds
    at most one output file's tensors at a time."""
    import torch.distributed as tdist

    from cprec.runtime import dist

    ckpt, out = Path(ckpt), Path(out)
    model = engine.module.hf_model
    rank0 = dist.is_main()
    trainer_state = read_state(ckpt) if rank0 else {}
    ctx = atomic.atomic_path(out) if rank0 else contextlib.nullcontext()
    with ctx as tmp:
        writer = WeightWriter(tmp, max_shard_bytes) if rank0 else None
        stream_weights(model, writer)
        if writer is not None:
            writer.close()
            from cprec.model.packed import ATTN_IMPLEMENTATION

            config = model.config
            attn = getattr(config, "_attn_implementation", None)
            if attn == ATTN_IMPLEMENTATION:  # the export is an ordinary model: plain SDPA attention
                config._attn_implementation = "sdpa"
            try:
                _write_metadata(tmp, model, ckpt, trainer_state)
            finally:
                config._attn_implementation = attn
    if tdist.is_initialized():
        tdist.barrier()
    if rank0:
        log.info("exported the engine's weights (checkpoint %s) to %s", ckpt.name, out)
    return out


def run(checkpoint: str, out: str) -> Path:
    """`cprec export`: ``checkpoint`` is a step folder, a run folder or a latest/phase_end pointer."""
    return export_checkpoint(resolve_checkpoint(checkpoint), Path(out))
