"""Tiny raw datasets in every input format, written by the tests themselves.

One logical dataset (``EVENTS``: 4 users, 2 domains, timestamps deliberately out of file order)
is written in each format, so reader round-trip tests can compare against the same truth.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
from pathlib import Path

from cprec.config import load_config

# user, item, domain, timestamp (seconds), in *file* order (not time order)
EVENTS = [
    ("u1", "i1", "books", 100),
    ("u1", "i2", "books", 300),
    ("u1", "m1", "movies", 200),
    ("u1", "i3", "books", 400),
    ("u1", "m2", "movies", 500),
    ("u1", "m3", "movies", 600),
    ("u2", "i2", "books", 50),
    ("u2", "i4", "books", 60),
    ("u2", "i1", "books", 70),
    ("u2", "m1", "movies", 80),
    ("u3", "m2", "movies", 10),
    ("u3", "m3", "movies", 20),
    ("u3", "m1", "movies", 30),
    ("u3", "i3", "books", 40),
    ("u4", "i4", "books", 5),
    ("u4", "m3", "movies", 6),
]
TITLES = {
    "i1": ("The Hobbit", "Tolkien"),
    "i2": ("Dune", "Herbert"),
    "i3": ("Emma", "Austen"),
    "i4": ("Ulysses", "Joyce"),
    "m1": ("Heat", "Mann"),
    "m2": ("Alien", "Scott"),
    "m3": ("Brazil", "Gilliam"),
}


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def event_rows() -> list[dict]:
    return [{"user_id": u, "item_id": i, "domain": d, "timestamp": t} for u, i, d, t in EVENTS]


def item_rows() -> list[dict]:
    return [{"item_id": i, "title": t, "author": a} for i, (t, a) in TITLES.items()]


def write_generic(tmp: Path, fmt: str) -> tuple[Path, Path]:
    """Events + item texts in jsonl / csv / parquet; returns (events path, items path)."""
    ev, it = tmp / f"events.{fmt}", tmp / f"items.{fmt}"
    if fmt == "jsonl":
        write_jsonl(ev, event_rows())
        write_jsonl(it, item_rows())
    elif fmt == "csv":
        for path, rows in ((ev, event_rows()), (it, item_rows())):
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(event_rows()), ev)
        pq.write_table(pa.Table.from_pylist(item_rows()), it)
    return ev, it


def write_recbole(tmp: Path) -> Path:
    folder = tmp / "rb"
    folder.mkdir()
    lines = ["user_id:token\titem_id:token\tdomain:token\ttimestamp:float"]
    lines += [f"{u}\t{i}\t{d}\t{t}" for u, i, d, t in EVENTS]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    items = ["item_id:token\ttitle:token_seq\tauthor:token"] + [
        f"{i}\t{t}\t{a}" for i, (t, a) in TITLES.items()
    ]
    (folder / "toy.item").write_text("\n".join(items) + "\n", encoding="utf-8")
    return folder


def write_amazon(tmp: Path, version: str, gz: bool) -> tuple[dict, dict]:
    """Per-domain review + meta files in the 2018 or 2023 layout; returns (files, meta_files)."""
    files, metas = {}, {}
    suffix = ".jsonl.gz" if gz else ".jsonl"
    for domain in ("books", "movies"):
        reviews, meta = [], []
        for u, i, d, t in EVENTS:
            if d != domain:
                continue
            if version == "amazon2018":
                reviews.append({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0})
            else:
                reviews.append({"user_id": u, "parent_asin": i, "asin": i + "x", "timestamp": t * 1000})
        for i, (title, author) in TITLES.items():
            if (i[0] == "i") == (domain == "books"):
                key = "asin" if version == "amazon2018" else "parent_asin"
                meta.append({key: i, "title": title, "author": author})
        files[domain] = str(write_jsonl(tmp / f"{version}_{domain}{suffix}", reviews, gz))
        metas[domain] = str(write_jsonl(tmp / f"{version}_{domain}_meta{suffix}", meta, gz))
    return files, metas


def write_food_kitchen(tmp: Path, n_a: int = 6, n_b: int = 6) -> Path:
    """A miniature of the food-kitchen folder (same files, same conventions)."""
    root = tmp / "fk"
    root.mkdir()
    (root / "num.txt").write_text(f"{n_a}\n{n_b}\n")
    for dom, n in (("A", n_a), ("B", n_b)):
        index = {f"ASIN{dom}{k}": k for k in range(n)}
        titles = {f"ASIN{dom}{k}": f"{'Food' if dom == 'A' else 'Kitchen'} item {k} deluxe" for k in range(n)}
        with open(root / f"item_set_{dom}.pkl", "wb") as f:
            pickle.dump(index, f)
        with open(root / f"text_{dom}.pkl", "wb") as f:
            pickle.dump(titles, f)
    a = list(range(n_a))
    b = [n_a + k for k in range(n_b)]
    files = {
        "train_A.txt": [(1, a[:4]), (2, a[1:5])],
        "train_B.txt": [(1, b[:3]), (2, b[2:5])],
        "train_overlap.txt": [(1, [a[0], b[0], a[1], b[1]]), (2, [b[3], a[2], b[4], a[3], a[4]])],
        "valid.txt": [(1, [a[0], b[1], a[2], b[5]]), (2, [b[0], b[2], a[1], a[5]])],
        "test.txt": [(1, [a[3], b[3], b[4], a[4]]), (2, [a[0], a[1], b[0], b[2]])],
    }
    for name, rows in files.items():
        (root / name).write_text("".join(f"{u}\t{','.join(map(str, items))}\n" for u, items in rows))
    (root / "instance_num.txt").write_text("2\n2\n2\n")
    return root


def write_ml1m_cache(tmp: Path) -> Path:
    """A cache folder holding ml-1m/ml-1m.{inter,item} as the wheel would give (no download)."""
    cache = tmp / "cache"
    (cache / "ml-1m").mkdir(parents=True)
    movies = {
        "Heat (1995)": "Action Crime Thriller",
        "Toy Story (1995)": "Animation Children's Comedy",
        "Casino (1995)": "Drama Thriller",
        "Sense and Sensibility (1995)": "Drama Romance",
        "Nanook of the North (1922)": "Documentary",
    }
    items = ["item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"]
    items += [f"{m}\t{m[:-7]}\t{m[-5:-1]}\t{g}" for m, g in movies.items()]
    (cache / "ml-1m" / "ml-1m.item").write_text("\n".join(items) + "\n")
    inter = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 5):
        for k, m in enumerate(movies):
            inter.append(f"1m_{u}\t{m}\t{(u + k) % 5 + 1}\t{978300000 + 10 * k + u}")
    (cache / "ml-1m" / "ml-1m.inter").write_text("\n".join(inter) + "\n")
    return cache


def tiny_config(tmp: Path, data: dict, out: str = "prepared"):
    """A Config for ``cprec.prepare.pipeline.run`` on a tiny fixture (small vocab, small shards)."""
    overrides = [f"data.output_dir={tmp / out}", "data.tokenizer.vocab_size=300", "data.num_workers=0"]
    overrides += ["data.shard_max_bytes=16384", "data.max_doc_tokens=64", "data.prompt.item_token_budget=12"]
    for k, v in data.items():
        overrides.append(f"data.{k}={json.dumps(v) if not isinstance(v, str) else v}")
    return load_config(None, overrides)
