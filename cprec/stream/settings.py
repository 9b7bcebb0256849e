"""The loader's settings: one frozen object, read from the config once and passed down as it is.

``loader_settings(cfg)`` is the only place that knows which config fields feed the stream
(``train.loader.*`` plus the batch shape of ``train``); everything below it - ``build_loader``,
``PackedLoader``, and through ``ReadPlan`` the worker processes and their readers - takes its
values from the ``LoaderSettings`` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from cprec.config import Config
from cprec.config.sections import LoaderConfig


@dataclass(frozen=True)
class LoaderSettings(LoaderConfig):
    """``train.loader.*`` (the fields of ``LoaderConfig``, documented and validated there; ``shards``
    resolved to ``train.loader.shards`` or ``data.output_dir``), plus the batch shape of ``train`` and
    the loader's own knobs below."""

    seq_len: int = 512
    """Tokens per packed row (``train.seq_len``)."""
    batch_size: int = 4
    """Rows per batch (``train.micro_batch_size``)."""
    seed: int = 0
    """Seed of the shard permutation and the shuffle buffers (``train.seed``)."""
    pad_id: int | None = None
    """Padding id; None = the manifest's tokenizer pad_id (0 without one)."""
    chunk_docs: int = 256
    """Documents per worker state snapshot (the granularity of exact resume)."""
    log_every: int = 1000
    """Log the realised mix every this many batches (0 = never)."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("seq_len", "batch_size", "chunk_docs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"loader setting {name} must be > 0, got {getattr(self, name)}")


def loader_settings(cfg: Config, seed: int | None = None) -> LoaderSettings:
    """The loader settings of ``cfg`` (``seed`` overrides ``train.seed``, as an anneal branch does)."""
    lc, tc = cfg.train.loader, cfg.train
    loader = {f.name: getattr(lc, f.name) for f in fields(LoaderConfig)}
    return LoaderSettings(
        **{**loader, "shards": lc.shards or cfg.data.output_dir, "mixing": dict(lc.mixing)},
        seq_len=tc.seq_len,
        batch_size=tc.micro_batch_size,
        seed=tc.seed if seed is None else seed,
        log_every=max(1, 100 * tc.log_every),
    )
