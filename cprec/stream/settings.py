"""The loader's settings: one frozen object, read from the config once and passed down as it is.

``loader_settings(cfg)`` is the only place that knows which config fields feed the stream
(``train.loader.*`` plus the batch shape of ``train``); everything below it - ``build_loader``,
``PackedLoader``, and through ``ReadPlan`` the worker processes and their readers - takes its
values from the ``LoaderSettings`` it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cprec.config import Config


@dataclass(frozen=True)
class LoaderSettings:
    shards: str = ""
    """Prepared folder, its manifest.json, or a shard spec (``train.loader.shards`` or
    ``data.output_dir``); read by ``build_loader``."""
    seq_len: int = 512
    """Tokens per packed row (``train.seq_len``)."""
    batch_size: int = 4
    """Rows per batch (``train.micro_batch_size``)."""
    seed: int = 0
    """Seed of the shard permutation and the shuffle buffers (``train.seed``)."""
    mixing: dict[str, float] = field(default_factory=dict)
    """Token weight per stream ``"<domain>/<kind>"``; empty = the natural mix."""
    shuffle_buffer: int = 1000
    """Documents per reader's shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes per rank (0 = read in the main process)."""
    packing: str = "greedy"
    """Packer: greedy or bestfit."""
    bestfit_buffer: int = 64
    """Open rows the best-fit packer chooses from."""
    on_corrupt: str = "fail"
    """A bad shard or sample: fail (raise) or skip (count it)."""
    verify: bool = True
    """Check shards against the manifest's sha256 and token ids against its vocabulary."""
    pad_id: int | None = None
    """Padding id; None = the manifest's tokenizer pad_id (0 without one)."""
    chunk_docs: int = 256
    """Documents per worker state snapshot (the granularity of exact resume)."""
    log_every: int = 1000
    """Log the realised mix every this many batches (0 = never)."""

    def __post_init__(self):
        if self.on_corrupt not in ("fail", "skip"):
            raise ValueError(f"config field 'train.loader.on_corrupt': fail or skip, got {self.on_corrupt!r}")
        for name in ("seq_len", "batch_size", "shuffle_buffer", "chunk_docs"):
            if getattr(self, name) <= 0:
                raise ValueError(f"loader setting {name} must be > 0, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"config field 'train.loader.num_workers': must be >= 0, got {self.num_workers}")


def loader_settings(cfg: Config, seed: int | None = None) -> LoaderSettings:
    """The loader settings of ``cfg`` (``seed`` overrides ``train.seed``, as an anneal branch does)."""
    lc, tc = cfg.train.loader, cfg.train
    return LoaderSettings(
        shards=lc.shards or cfg.data.output_dir,
        seq_len=tc.seq_len,
        batch_size=tc.micro_batch_size,
        seed=tc.seed if seed is None else seed,
        mixing=dict(lc.mixing),
        shuffle_buffer=lc.shuffle_buffer,
        num_workers=lc.num_workers,
        packing=lc.packing,
        bestfit_buffer=lc.bestfit_buffer,
        on_corrupt=lc.on_corrupt,
        verify=lc.verify,
        log_every=max(1, 100 * tc.log_every),
    )
