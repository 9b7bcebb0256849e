"""`cprec embed CONFIG [--users FILE] --out DIR [--faiss]`: the model's embeddings for serving.

Loads the checkpoint as `cprec eval` does (``eval.checkpoint``, the prepared folder, the same
tokenizer check, prompts, pooling and item cache) and writes, for retrieval outside CPRec:

    DIR/manifest.json                 what is where (written last: a DIR with it is complete)
    DIR/items/<domain>.parquet        item (string), embedding (fixed-size list of float32)
    DIR/items/<domain>.npy            float32 [items, dim], row i = ids[i]
    DIR/items/<domain>.ids.json       the item ids, in row order (the catalogue's order)
    DIR/users.parquet                 user, domain (the eval user's target domain; null for a user
                                      file), embedding
    DIR/users.npy, DIR/users.ids.json
    DIR/faiss/<domain>.faiss          with --faiss: an inner-product index of the domain's items
                                      (``eval.faiss_index``; Flat = exact), row i = ids[i]

Users are the eval users of ``eval.split`` (``eval.max_users`` per domain, as the eval job ranks
them) or, with ``--users``, the rows of a Parquet or JSON Lines file with a ``user`` (string) and a
``history`` (list of item ids, oldest first) column. History items missing from the catalogue are
left out of the prompt and counted in the manifest. Embeddings are L2-normalised, so an inner
product is the cosine similarity the eval job ranks by.

DIR is written in a temporary folder beside it and moved into place at the end; an existing DIR
is replaced only when it is an earlier `cprec embed` output (it holds a manifest saying so).
Under torchrun the encoding is spread over the ranks and rank 0 writes; with ``eval.zero3_inference``
the model is ZeRO-3 partitioned over them too (`cprec.eval.zero3`).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from cprec.atomic import atomic_path
from cprec.config import Config

log = logging.getLogger(__name__)

FORMAT = "cprec-embeddings/1"


# ----------------------------------------------------------------------------------- inputs
def read_user_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """(user ids, histories) of a Parquet or JSON Lines file of (user, history) rows."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--users file not found: {path}")
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        missing = {"user", "history"} - set(table.column_names)
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)} (need user, history)")
        rows = zip(table.column("user").to_pylist(), table.column("history").to_pylist())
        where = lambda i: f"{path} row {i}"  # noqa: E731
    elif path.suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not JSON ({e})") from None
            if not isinstance(row, dict) or "user" not in row or "history" not in row:
                raise ValueError(f"{path} line {n}: need an object with user and history")
            rows.append((row["user"], row["history"]))
        where = lambda i: f"{path} row {i}"  # noqa: E731
    else:
        raise ValueError(f"--users {path}: a .parquet or .jsonl file of (user, history) rows")
    users, histories, seen = [], [], set()
    for i, (user, history) in enumerate(rows):
        if not isinstance(user, str) or not user:
            raise ValueError(f"{where(i)}: user must be a non-empty string, got {user!r}")
        if not isinstance(history, list) or not all(isinstance(x, str) for x in history):
            raise ValueError(f"{where(i)}: history must be a list of item ids (strings)")
        if user in seen:
            raise ValueError(f"{where(i)}: user {user!r} appears twice")
        seen.add(user)
        users.append(user)
        histories.append(history)
    return users, histories


def _file_stem(domain: str, taken: set[str]) -> str:
    """A file name for a domain (other characters as _; a clash gets a number)."""
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", domain) or "domain"
    base, n = stem, 1
    while stem.lower() in taken:
        n += 1
        stem = f"{base}-{n}"
    taken.add(stem.lower())
    return stem


def _check_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        manifest = out / "manifest.json"
        try:
            ours = json.loads(manifest.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise ValueError(f"--out {out} exists and is not a `cprec embed` output: refusing to replace it")


# ----------------------------------------------------------------------------------- writing
def _embedding_column(emb: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), emb.shape[1])


def _write(folder: Path, rel: str, ids: list[str], emb: np.ndarray, extra: dict | None = None) -> dict:
    """``rel``.parquet / .npy / .ids.json under ``folder``; returns their names for the manifest."""
    base = folder / rel
    base.parent.mkdir(parents=True, exist_ok=True)
    cols = {"id": pa.array(ids, type=pa.string()), **(extra or {}), "embedding": _embedding_column(emb)}
    pq.write_table(pa.table(cols), base.with_name(base.name + ".parquet"))
    np.save(base.with_name(base.name + ".npy"), emb)
    base.with_name(base.name + ".ids.json").write_text(json.dumps(ids), encoding="utf-8")
    return {"count": len(ids), "parquet": f"{rel}.parquet", "npy": f"{rel}.npy", "ids": f"{rel}.ids.json"}


def load_embeddings(folder: str | Path, entry: dict) -> tuple[list[str], np.ndarray]:
    """(ids, float32 [n, dim]) of one manifest entry (``manifest["items"][domain]`` or ``["users"]``)."""
    folder = Path(folder)
    ids = json.loads((folder / entry["ids"]).read_text(encoding="utf-8"))
    emb = np.load(folder / entry["npy"])
    if len(ids) != len(emb):
        raise ValueError(f"{folder / entry['npy']}: {len(emb)} rows but {len(ids)} ids")
    return ids, emb


# ----------------------------------------------------------------------------------------- job
def run(cfg: Config, users_file: str | None = None, out: str = "out/embed", faiss: bool = False) -> dict:
    """Write the embeddings (see the module docstring); returns the manifest (empty dict on ranks
    other than 0)."""
    from cprec.eval.run import check_tokenizer, find_checkpoint, prepared_dir
    from cprec.model.bases import resolve_config
    from cprec.runtime.dist import destroy_distributed, dist_info, init_distributed

    cfg = resolve_config(cfg)
    out_dir = Path(out)
    _check_out(out_dir)
    if faiss:
        from cprec.eval.faiss_index import import_faiss

        import_faiss()  # a missing optional dependency fails before any compute
    users_in = read_user_file(users_file) if users_file else None
    check_tokenizer(cfg, find_checkpoint(cfg), prepared_dir(cfg))
    started = not torch.distributed.is_initialized() and (
        dist_info().world_size > 1 or cfg.eval.zero3_inference  # a ZeRO-3 engine needs a group
    )
    info = init_distributed()
    try:
        return _run(cfg, users_in, users_file, out_dir, faiss, info.is_main)
    finally:
        if started:
            destroy_distributed()


def _run(cfg: Config, users_in, users_file, out_dir: Path, faiss: bool, is_main: bool) -> dict:
    from cprec.eval.encode import Encoder, encode_items, encode_users
    from cprec.eval.inputs import load_inputs
    from cprec.eval.ranking import build_tasks
    from cprec.eval.run import LLMSide, prepared_dir, resolve_hf_folder
    from cprec.runtime.dist import barrier

    ecfg = cfg.eval
    prepared = prepared_dir(cfg)
    hf_dir, ckpt = resolve_hf_folder(cfg)
    inputs = load_inputs(prepared, ecfg.split)
    side = LLMSide(cfg, prepared, inputs)
    model = side.load_model(hf_dir)  # eval.zero3_inference: partitioned over the ranks
    builder = side.builder(model.config)
    enc = Encoder(model, side.pad_id, ecfg.pooling, ecfg.batch_size)
    cat = inputs.catalogue
    model_id = f"{ckpt['id']}:{side.dtype}"

    items = {}
    for d in inputs.domains:
        rows = cat.domain_rows(d)
        emb = encode_items(enc, builder, cat, rows, side.cache, model_id, desc=f"items ({d})")
        items[d] = ([cat.items[r] for r in rows], emb.numpy().astype(np.float32, copy=False))
    if users_in is None:
        tasks = build_tasks(inputs, ecfg.max_users, ecfg.seed)
        evals = [u for t in tasks.values() for u in t.users]
        user_ids, histories = [u.user for u in evals], [u.history for u in evals]
        user_domains = [u.domain for u in evals]
        source = f"eval users of {prepared} (split {ecfg.split})"
    else:
        (user_ids, histories), user_domains, source = users_in, None, str(users_file)
    before = builder.unknown_history_items
    known = [len(builder.history_rows(cat, h)) for h in histories]
    unknown = builder.unknown_history_items - before
    uemb = encode_users(enc, builder, cat, histories).numpy().astype(np.float32, copy=False)
    hidden_size = int(model.config.hidden_size)
    side.release(model)
    if not is_main:
        barrier()
        return {}

    dim = int(uemb.shape[1]) if len(uemb) else hidden_size
    manifest = {
        "format": FORMAT,
        "model": {"id": model_id, "checkpoint": ckpt, "folder": str(hf_dir)},
        "pooling": ecfg.pooling,
        "dim": dim,
        "normalised": True,
        "metric": "inner product (= cosine: the embeddings are L2-normalised)",
        "dtype": str(side.dtype).replace("torch.", ""),
        "prepared": str(prepared),
        "prompt": {"max_history_items": ecfg.max_history_items},
        "items": {},
        "users": {},
        "faiss": None,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        taken: set[str] = set()
        stems = {d: _file_stem(d, taken) for d in items}
        for d, (ids, emb) in items.items():
            manifest["items"][d] = _write(tmp, f"items/{stems[d]}", ids, emb)
        extra = {"domain": pa.array(user_domains, type=pa.string())} if user_domains else None
        manifest["users"] = _write(tmp, "users", user_ids, uemb, extra) | {
            "source": source,
            "unknown_history_items": unknown,
            "without_known_history": sum(1 for n in known if n == 0),
        }
        if faiss:
            from cprec.eval.faiss_index import build_index, is_exact, write_index

            factory = ecfg.faiss_index
            manifest["faiss"] = {}
            for d, (_, emb) in items.items():
                rel = f"faiss/{stems[d]}.faiss"
                write_index(build_index(emb, factory), tmp / rel)
                manifest["faiss"][d] = {"path": rel, "index": factory, "exact": is_exact(factory)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    log.info(
        "embeddings written to %s: %s items, %d users (dim %d)",
        out_dir, {d: v["count"] for d, v in manifest["items"].items()}, len(user_ids), dim,
    )  # fmt: skip
    barrier()
    return manifest
