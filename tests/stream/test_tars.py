"""The streaming tar reader: webdataset grouping, damaged headers, truncation, the shard buffer."""

from __future__ import annotations

import hashlib
import io
import tarfile

import pytest
import webdataset as wds
from shard_factory import write_prepared

from cprec.stream.tars import ShardBuffer, ShardError, iter_tar_samples


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_reader_groups_samples_like_webdataset(tmp_path, fmt):
    path = tmp_path / "x.tar"
    long_dir = "d" * 120 if fmt != tarfile.USTAR_FORMAT else "sub"
    members = [
        ("a1.ids.npy", b"x" * 700),
        ("a1.json", b"{}"),
        ("__meta__.json", b"skip me"),
        (f"{long_dir}/b2.ids.npy", b"y" * 512),
        (f"{long_dir}/b2.json", b"[1]"),
        ("c3.ids.npy", b""),
        ("c3.JSON", b"{}"),
    ]
    with tarfile.open(path, "w", format=fmt) as tar:
        tar.addfile(_dir("somedir"))
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1.5  # a float mtime makes PAX write extended headers
            tar.addfile(ti, io.BytesIO(data))
    ours = {k: v for k, v in iter_tar_samples(str(path))}
    theirs = {
        s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
        for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)
    }
    assert ours == theirs
    assert set(ours) == {"a1", "__meta__", f"{long_dir}/b2", "c3"} and ours["c3"] == {
        "ids.npy": b"",
        "json": b"{}",
    }


def _dir(name: str) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = tarfile.DIRTYPE
    return ti


def test_tar_reader_rejects_damaged_headers_and_truncation(tmp_path):
    info = write_prepared(tmp_path, n_shards=1)
    path = tmp_path / "shards" / "shard-000000.tar"
    data = bytearray(path.read_bytes())
    assert len(list(iter_tar_samples(str(path)))) == len(info["docs"])
    damaged = tmp_path / "damaged.tar"
    bad = bytearray(data)
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    header = members[3].offset_data - 512
    after_last = members[-1].offset_data + -(-members[-1].size // 512) * 512
    bad[header + 130] ^= 0x01  # a size digit of a later member's header
    damaged.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="damaged.tar"):
        list(iter_tar_samples(str(damaged)))
    for cut in (after_last, 700, 100, 0):  # no end marker / inside a member / inside a header
        damaged.write_bytes(bytes(data[:cut]))
        with pytest.raises(ShardError, match="truncated"):
            list(iter_tar_samples(str(damaged)))


def test_shard_buffer_is_reused_and_grows(tmp_path):
    small, big = tmp_path / "small.tar", tmp_path / "big.tar"
    small.write_bytes(b"a" * 1000)
    big.write_bytes(b"b" * 3_000_000)
    sha = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (small, big)}
    buf = ShardBuffer()
    view = buf.fill(str(small), sha[small])  # still alive while the next shard is read
    assert bytes(view) == small.read_bytes()
    assert bytes(buf.fill(str(big), sha[big])) == big.read_bytes()
    assert bytes(buf.fill(str(small), sha[small])) == small.read_bytes()
