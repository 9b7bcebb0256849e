"""The online job's input: prepared shards -> packed batches for one rank, resumable exactly.

``tars`` (tar reading, sha256) -> ``docstream`` (rank x worker shard split, per-stream mixing,
shuffle) -> ``loader`` (worker processes, resume) -> ``packing`` (rows, collation), configured by
one ``settings.LoaderSettings``. What it reads is described by ``cprec.manifest``.
"""
