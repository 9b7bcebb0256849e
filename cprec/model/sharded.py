"""ZeRO-3 construction and loading in which no rank ever holds the full weights.

Under ``train.zero_stage=3`` the model is built inside DeepSpeed's ``zero.Init`` with the *engine's
own* DeepSpeed config (so partitioning and dtype match what ``deepspeed.initialize`` expects later):
every parameter is partitioned as soon as its module is constructed, and a rank keeps only its
``1/N`` slice (``param.ds_tensor``, in the engine's dtype: bf16 for a bf16 run).

- **From scratch**: transformers' own DeepSpeed integration. While a
  ``transformers.integrations.deepspeed.HfDeepSpeedConfig`` is alive, ``from_config`` constructs
  under ``zero.Init`` and initialises each module with its parameters gathered, rank 0 drawing the
  values (``initialize_weights_zero3``). The weights are reproducible for a seed but are another
  draw than the unsharded build's (transformers initialises the modules in another order).
- **From a local HF folder**: the same construction, then every rank reads *only its own slice* of
  each tensor from the safetensors files (``safe_open(...).get_slice``: the rows that cover the
  slice, no more) and writes it into its partition. There is no gather and no broadcast, and no
  rank, rank 0 included, reads a whole tensor. (transformers' ``from_pretrained`` under ZeRO-3 would
  load every shard file on rank 0 and scatter from there.)

A checkpoint that misses a model parameter is an error (the unsharded path would silently keep a
random initialisation); an incomplete ``model.safetensors.index.json`` names the missing shard file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"


# ------------------------------------------------------------------------------ weight files
def weight_files(folder: str | Path, *, need_safetensors: bool = False) -> list[Path]:
    """The weight files of a local HF folder, checked to exist.

    A sharded folder's index must name only files that are there: a missing shard is reported by
    name (with how many tensors it holds) before anything is loaded. ``need_safetensors`` refuses a
    folder that has only ``pytorch_model.bin`` weights (sharded loading reads slices of tensors,
    which only safetensors allows)."""
    folder = Path(folder).expanduser()
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = folder / index_name
        if not index.is_file():
            continue
        if index_name == BIN_INDEX and need_safetensors:
            break
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index}: not a weight index (no 'weight_map'): {exc}") from exc
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            counts = {n: sum(1 for v in weight_map.values() if v == n) for n in missing}
            listed = ", ".join(f"{n} ({counts[n]} tensors)" for n in missing)
            raise FileNotFoundError(
                f"model.name_or_path: {index} names {len(missing)} shard file(s) that are missing "
                f"from {folder}: {listed}; copy the complete model folder"
            )
        return [folder / n for n in names]
    if (folder / SAFE_SINGLE).is_file():
        return [folder / SAFE_SINGLE]
    if (folder / BIN_SINGLE).is_file() or (folder / BIN_INDEX).is_file():
        if need_safetensors:
            raise ValueError(
                f"model.name_or_path: {folder} holds pytorch_model.bin weights; ZeRO-3 sharded loading "
                "reads slices of safetensors files: re-save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        return [folder / BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else []
    raise FileNotFoundError(
        f"model.name_or_path: {folder} holds no model weights ({SAFE_SINGLE} or {SAFE_INDEX})"
    )


# ------------------------------------------------------------------------------ construction
@contextlib.contextmanager
def zero3_scope(ds_config: dict) -> Iterator[None]:
    """transformers' ZeRO-3 integration on for the models built (and resized) inside, off after.

    transformers keeps only a weak reference to the ``HfDeepSpeedConfig``, so it is held here; it is
    unset on exit so that later ``from_pretrained`` calls in this process (evaluation, export) build
    ordinary models again."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    stage = ds_config.get("zero_optimization", {}).get("stage")
    if stage != 3:
        raise ValueError(f"sharded construction needs a ZeRO-3 DeepSpeed config, got stage {stage}")
    keep = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep
        unset_hf_deepspeed_config()


def partition_dtype(ds_config: dict) -> torch.dtype:
    """The dtype ``zero.Init`` gives the partitions under this DeepSpeed config (bf16 or fp32)."""
    return torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") else torch.float32


@contextlib.contextmanager
def _without_random_init() -> Iterator[None]:
    """Skip transformers' ZeRO-3 weight initialisation (every module gathered, rank 0 drawing its
    values) for a model whose every weight is about to be read from a checkpoint: it would cost the
    time of a random init and a full gather of the largest module, for values overwritten at once.
    ``from_config`` imports ``initialize_weights_zero3`` when it runs, so replacing the module
    attribute for the duration is enough; where transformers has no such function this does nothing."""
    import transformers.integrations.deepspeed as hf_ds

    original = getattr(hf_ds, "initialize_weights_zero3", None)
    if original is None:
        yield
        return
    hf_ds.initialize_weights_zero3 = lambda model: None
    try:
        yield
    finally:
        hf_ds.initialize_weights_zero3 = original


# glibc's mallopt parameters and what they are set to after the build: the values its own dynamic
# rule reaches in a long-running process (the mmap threshold's 64-bit ceiling, DEFAULT_MMAP_THRESHOLD_MAX,
# and twice that as the trim threshold), since setting one by hand switches that rule off.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_BUILD_MMAP_THRESHOLD = 64 * 1024
_AFTER_MMAP_THRESHOLD = 32 * 1024 * 1024
_AFTER_TRIM_THRESHOLD = 2 * _AFTER_MMAP_THRESHOLD
_returning_depth = 0


@contextlib.contextmanager
def freed_memory_returned() -> Iterator[None]:
    """While the model is built, give every allocation of 64 KiB or more its own mapping, so that
    freeing it returns the memory to the OS at once.

    Building under ``zero.Init`` creates each module's full tensors and frees them after
    partitioning, gathers them again for initialisation, and receives rank 0's broadcasts. With
    glibc's default *dynamic* mmap threshold (raised to the size of every freed mapping, up to 32
    MiB) those tensors come from the heap after the first few, and freed heap memory stays in the
    process: on the Qwen2-0.5B shape the ranks ended 0.5 GiB apart and peaked 0.35 GiB higher
    (`benchmarks/memory.py`, ``ratio``). Afterwards the thresholds are fixed where glibc's dynamic
    rule takes them in a long run (mmap 32 MiB, trim 64 MiB), so training allocates as before.
    Nothing happens where ``mallopt`` is not available (not glibc)."""
    global _returning_depth
    mallopt = _mallopt() if _returning_depth == 0 else None  # the outermost build sets and resets it
    _returning_depth += 1
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _BUILD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        _returning_depth -= 1
        if mallopt is not None:
            mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
            mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)


def _mallopt():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


@contextlib.contextmanager
def _without_init_broadcast() -> Iterator[None]:
    """Partition each new parameter without ``zero.Init``'s broadcast from rank 0.

    ``zero.Init`` broadcasts every freshly constructed tensor from rank 0 before partitioning it, so
    that all ranks agree on random values. For a model whose every weight is read from a checkpoint
    next, that is a full-model transfer of values about to be overwritten, and the receiving ranks'
    transport buffers raised their peak memory above rank 0's (`benchmarks/memory.py`). DeepSpeed
    has no switch for it, so its ``_zero_init_param`` is replaced for the duration by the same two
    steps without the broadcast; where DeepSpeed has no such method this does nothing."""
    from deepspeed.runtime.zero import partition_parameters as pp

    original = getattr(pp.Init, "_zero_init_param", None)
    if original is None or not hasattr(pp.Init, "_convert_to_deepspeed_param"):
        yield
        return

    def partition_only(self, param):
        self._convert_to_deepspeed_param(param)
        param.partition()

    pp.Init._zero_init_param = partition_only
    try:
        yield
    finally:
        pp.Init._zero_init_param = original


def construct(hf_config, ds_config: dict, random_init: bool = True) -> nn.Module:
    """A partitioned causal LM from a transformers config (random weights drawn on rank 0, or none
    at all with ``random_init=False``, for a caller that loads every weight next).

    Modules are constructed directly in the partitions' dtype: ``zero.Init`` would otherwise create
    each tensor in fp32 and then cast it, holding both copies of the largest one (the embedding) at
    once. The config keeps saying fp32, as the unsharded build's does: the optimizer's master
    weights and every export are fp32."""
    from transformers import AutoModelForCausalLM

    scopes = contextlib.ExitStack()
    scopes.enter_context(freed_memory_returned())
    if not random_init:  # values come from the checkpoint: neither drawn nor broadcast
        scopes.enter_context(_without_random_init())
        scopes.enter_context(_without_init_broadcast())
    with zero3_scope(ds_config), scopes:
        model = AutoModelForCausalLM.from_config(hf_config, dtype=partition_dtype(ds_config))
    model.config.dtype = torch.float32
    return model


def is_partitioned(model: nn.Module) -> bool:
    """True when the model's parameters are ZeRO-3 partitions (built under ``zero.Init``)."""
    return any(hasattr(p, "ds_tensor") for p in model.parameters())


# ------------------------------------------------------------------------------ loading
def _partition_span(param) -> tuple[int, int]:
    """[start, end) of this rank's partition in the flattened full tensor (end clipped to numel)."""
    import torch.distributed as tdist

    group = getattr(param, "ds_process_group", None)
    rank = tdist.get_rank(group=group) if tdist.is_initialized() else 0
    size = param.ds_tensor.ds_numel
    start = rank * size
    return start, min(start + size, param.ds_numel)


def _read_span(handle, key: str, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of tensor ``key`` flattened, reading only the rows that cover them."""
    piece = handle.get_slice(key)
    shape = list(piece.get_shape())
    if not shape:  # a 0-dim tensor
        return handle.get_tensor(key).reshape(-1)[start:end]
    row = math.prod(shape[1:]) or 1
    first, last = start // row, -(-end // row)
    rows = piece[first:last]
    return rows.reshape(-1)[start - first * row : end - first * row]


def write_partition(param, handle, key: str) -> None:
    """Fill this rank's partition of ZeRO-3 parameter ``param`` from tensor ``key`` of an open file."""
    part = param.ds_tensor
    start, end = _partition_span(param)
    with torch.no_grad():
        if end <= start:  # this rank's slice lies wholly in the alignment padding
            part.zero_()
            return
        values = _read_span(handle, key, start, end)
        part[: end - start].copy_(values.to(dtype=part.dtype))
        part[end - start :].zero_()


def _key_resolver(model: nn.Module) -> tuple[dict[str, nn.Parameter], dict[str, torch.Tensor], callable]:
    params = dict(model.named_parameters(remove_duplicate=False))  # tied aliases map to one parameter
    buffers = dict(model.named_buffers())
    prefix = getattr(model, "base_model_prefix", "") or ""

    def resolve(key: str) -> str | None:
        # Checkpoints of the bare decoder lack the causal-LM prefix ("layers.0..." vs "model.layers.0...").
        for name in (key, f"{prefix}.{key}" if prefix else key):
            if name in params or name in buffers:
                return name
        return None

    return params, buffers, resolve


def load_partitions(model: nn.Module, files: list[Path]) -> dict[str, int]:
    """Write every rank's slice of each checkpoint tensor into the partitioned ``model``.

    Raises when a parameter has no tensor in the files (naming them) or a tensor has another shape
    than its parameter; tensors the model does not have are skipped with a warning (counted in the
    returned ``{"loaded", "skipped"}``)."""
    from safetensors import safe_open

    params, buffers, resolve = _key_resolver(model)
    done: set[int] = set()
    skipped: list[str] = []
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                name = resolve(key)
                if name is None:
                    skipped.append(key)
                    continue
                if name in buffers:
                    with torch.no_grad():
                        buffers[name].copy_(handle.get_tensor(key))
                    continue
                param = params[name]
                if id(param) in done:  # the second name of a tied tensor
                    continue
                shape = tuple(handle.get_slice(key).get_shape())
                want = tuple(getattr(param, "ds_shape", param.shape))
                if shape != want:
                    raise ValueError(f"{path}: tensor {key} has shape {shape}, the model's {name} is {want}")
                write_partition(param, handle, key)
                done.add(id(param))
    missing = sorted({n for n, p in params.items() if id(p) not in done})
    if missing:
        raise ValueError(
            f"{files[0].parent}: no weights for {len(missing)} parameter(s) of the model, e.g. {missing[:4]}"
        )
    if skipped:
        log.warning(
            "%d checkpoint tensor(s) the model does not have were skipped, e.g. %s", len(skipped), skipped[:3]
        )
    return {"loaded": len(done), "skipped": len(skipped)}


def fit_embeddings(model: nn.Module, vocab_size: int, rows: int) -> None:
    """Grow the ``rows``-row embeddings of a loaded base to a larger tokenizer (a smaller one just
    leaves rows unused; 0 = no tokenizer to fit, the checkpoint's rows as they are); the unsharded
    and the partitioned load share it."""
    if vocab_size > rows:
        log.info("resizing token embeddings %d -> %d to fit the tokenizer", rows, vocab_size)
        model.resize_token_embeddings(vocab_size)
    elif 0 < vocab_size < rows:
        log.info("tokenizer uses %d of the model's %d embedding rows", vocab_size, rows)


def load(folder: str | Path, ds_config: dict, vocab_size: int, weights: bool = True) -> nn.Module:
    """A partitioned causal LM with the weights of local HF ``folder``; the embeddings grow (gathered
    once, by transformers) when the tokenizer has more ids than the model has rows.

    ``weights=False`` builds the architecture only (weights uninitialised), for a caller that loads
    a checkpoint over it."""
    with freed_memory_returned():
        return _load(Path(folder).expanduser(), ds_config, vocab_size, weights)


def _load(folder: Path, ds_config: dict, vocab_size: int, weights: bool) -> nn.Module:
    from transformers import AutoConfig

    files = weight_files(folder, need_safetensors=True) if weights else []
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model = construct(config, ds_config, random_init=False)  # the file or a checkpoint fills every weight
    with zero3_scope(ds_config):  # transformers gathers the embeddings to grow them
        counts = load_partitions(model, files) if weights else {"loaded": 0, "skipped": 0}
        fit_embeddings(model, vocab_size, rows=model.get_input_embeddings().weight.ds_shape[0])
    if (folder / "generation_config.json").is_file():  # what from_pretrained would have read
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    log.info(
        "loaded %d tensors of %s into ZeRO-3 partitions (%d files)", counts["loaded"], folder, len(files)
    )
    return model
