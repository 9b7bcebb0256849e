"""Shard writer: the bytes tarfile would write (fixed metadata), WebDataset-readable, size-bounded."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from cprec.manifest import read_manifest
from cprec.prepare.shards import ShardWriter, json_bytes, npy_bytes, ustar_header


def samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        ids = rng.integers(0, 5000, size=int(rng.integers(0, 300)), dtype=np.int32)
        meta = {
            "user": f"u{i % 7}",
            "domain": "AB"[i % 2],
            "kind": "domain",
            "n_tokens": len(ids),
            "window": 0,
        }
        yield f"{i:09d}", ids, meta


def reference_tar(items) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ids, meta in items:
            for name, data in ((f"{key}.ids.npy", npy_bytes(ids)), (f"{key}.json", json_bytes(meta))):
                ti = tarfile.TarInfo(name)
                ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
                    len(data),
                    0,
                    0o644,
                    0,
                    0,
                    "",
                    "",
                )
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_header_and_npy_match_the_standard_library():
    for name, size in (("a.json", 0), ("000000001.ids.npy", 1234), ("x" * 100, 10**9)):
        ti = tarfile.TarInfo(name)
        ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
        assert ustar_header(name, size) == ti.tobuf(format=tarfile.USTAR_FORMAT)
    for n in (0, 1, 7, 1000):
        buf = io.BytesIO()
        np.save(buf, np.arange(n, dtype=np.int32))
        assert npy_bytes(np.arange(n)) == buf.getvalue()


def test_shard_bytes_equal_tarfile_and_read_back(tmp_path):
    items = list(samples(40))
    w = ShardWriter(tmp_path, 1 << 30)
    for key, ids, meta in items:
        w.write(key, ids, meta)
    (info,) = w.close()
    data = (tmp_path / info.path).read_bytes()
    assert data == reference_tar(items) and info.bytes == len(data) and info.samples == 40
    got = list(wds.WebDataset(str(tmp_path / info.path), shardshuffle=False).decode())
    assert [g["__key__"] for g in got] == [k for k, _, _ in items]
    for g, (_, ids, meta) in zip(got, items):
        assert np.array_equal(g["ids.npy"], ids) and g["ids.npy"].dtype == np.int32 and g["json"] == meta


def test_rollover_at_target_size(tmp_path):
    w = ShardWriter(tmp_path, 64 * 1024)
    items = list(samples(200, seed=1))
    for key, ids, meta in items:
        w.write(key, ids, meta)
    shards = w.close()
    assert len(shards) > 3 and sum(s.samples for s in shards) == 200
    for s in shards:
        assert (tmp_path / s.path).stat().st_size == s.bytes <= 64 * 1024
    assert not list(tmp_path.rglob("*.tmp"))
    assert [s.path for s in shards] == [f"shards/shard-{i:06d}.tar" for i in range(len(shards))]


def test_bad_key_rejected(tmp_path):
    w = ShardWriter(tmp_path, 1 << 20)
    with pytest.raises(ValueError, match="must not contain"):
        w.write("a.b", np.zeros(2, np.int32), {"domain": "A", "kind": "domain"})


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `cprec prepare` first"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format_version": 99}')
    with pytest.raises(ValueError, match="format_version"):
        read_manifest(tmp_path)
