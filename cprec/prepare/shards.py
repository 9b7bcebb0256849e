"""WebDataset shard writer: deterministic bytes, target size, atomic files (format: ``cprec.manifest``).

Tars are written directly in WebDataset layout rather than with webdataset's ``TarWriter``, which
stamps members with the current time: here every member has mtime 0, uid/gid 0 and empty owner
names, so the same samples always give the same bytes (those ``tarfile`` would write). A sample is
two members, ``<key>.ids.npy`` (int32 token ids: BOS + text + EOS) and ``<key>.json`` (user, domain, kind,
n_tokens, window). Each shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cprec.manifest import TAR_BLOCK as _BLOCK
from cprec.manifest import TAR_RECORD as _RECORD

_NPY_HEADERS: dict[int, bytes] = {}


def npy_bytes(ids: np.ndarray) -> bytes:
    """``np.save`` bytes of a 1-D int32 array (headers cached per length: this runs per sample)."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    header = _NPY_HEADERS.get(len(ids))
    if header is None:
        buf = io.BytesIO()
        np.save(buf, np.zeros(len(ids), dtype=np.int32), allow_pickle=False)
        header = _NPY_HEADERS[len(ids)] = buf.getvalue()[: -4 * len(ids) or None]
    return header + ids.astype("<i4", copy=False).tobytes()


def json_bytes(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header ``tarfile`` writes for a regular file with mode 0644, mtime 0,
    uid/gid 0 and no owner names (built directly: ``TarInfo.tobuf`` is the bottleneck otherwise).
    """
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise ValueError(f"tar member name too long for ustar: {name!r}")
    head = (
        raw.ljust(100, b"\0")
        + b"0000644\0"
        + b"0000000\0"
        + b"0000000\0"
        + b"%011o\0" % size
        + b"00000000000\0"
        + b"        "  # checksum placeholder (8 spaces while summing)
        + b"0"  # regular file
        + b"\0" * 100
        + b"ustar\x0000"
        + b"\0" * (32 + 32)  # owner names
        + b"\0" * 16  # devmajor/devminor: empty for regular files
        + b"\0" * 155
    ).ljust(_BLOCK, b"\0")
    chksum = b"%06o\0 " % sum(head)
    return head[:148] + chksum + head[156:]


def _padded(data: bytes) -> bytes:
    rem = len(data) % _BLOCK
    return data + b"\0" * (_BLOCK - rem) if rem else data


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


@dataclass
class ShardInfo:
    path: str
    samples: int = 0
    tokens: int = 0
    bytes: int = 0
    sha256: str = ""

    def manifest_entry(self) -> dict:
        return {
            "path": self.path,
            "samples": self.samples,
            "tokens": self.tokens,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }


class ShardWriter:
    """Writes samples into ``shards/<prefix>NNNNNN.tar`` files of about ``max_bytes`` each
    (``prefix`` ``shard-``; the distributed path gives each bucket its own, so names never clash).

    The bytes are those of ``tarfile`` in ustar format with fixed member metadata (checked by the
    tests), hashed while written; a shard appears under its final name only when complete.
    """

    def __init__(self, root: str | Path, max_bytes: int, prefix: str = "shard-"):
        if "/" in prefix:
            raise ValueError(f"shard name prefix {prefix!r} must not contain '/'")
        self.root = Path(root)
        self.prefix = prefix
        (self.root / "shards").mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.shards: list[ShardInfo] = []
        self._file = None
        self._hash = None
        self._tmp: Path | None = None
        self._size = 0

    def _open(self) -> None:
        rel = f"shards/{self.prefix}{len(self.shards):06d}.tar"
        self.shards.append(ShardInfo(rel))
        self._tmp = self.root / (rel + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._size = 0

    def _emit(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def _close(self) -> None:
        if self._file is None:
            return
        end = b"\0" * (2 * _BLOCK)  # end-of-archive marker, then pad to a whole record
        total = self._size + len(end)
        end += b"\0" * ((-total) % _RECORD)
        self._emit(end)
        self._file.close()
        info = self.shards[-1]
        final = self.root / info.path
        self._tmp.replace(final)
        info.bytes = self._size
        info.sha256 = self._hash.hexdigest()
        self._file = None

    def write(self, key: str, ids: np.ndarray, meta: dict) -> None:
        """Add one sample; starts a new shard when this one would pass ``max_bytes``."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        ids_b, meta_b = npy_bytes(ids), json_bytes(meta)
        size = 2 * _BLOCK + len(_padded(ids_b)) + len(_padded(meta_b))
        if self._file is not None and self._size > 0 and self._size + size + _RECORD > self.max_bytes:
            self._close()
        if self._file is None:
            self._open()
        self._emit(ustar_header(f"{key}.ids.npy", len(ids_b)) + _padded(ids_b))
        self._emit(ustar_header(f"{key}.json", len(meta_b)) + _padded(meta_b))
        info = self.shards[-1]
        info.samples += 1
        info.tokens += int(len(ids))

    def close(self) -> list[ShardInfo]:
        self._close()
        return self.shards
