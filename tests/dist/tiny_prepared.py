"""A tiny prepared folder for the training tests, made by the real `cprec prepare` from a JSONL log.

Two domains (``A``, ``B``) of kitchen-word items, 60 users; per-domain and mixed sequences give three
streams (``A/domain``, ``B/domain``, ``all/mixed``). Small shards so that two ranks get several each.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = "apple bread cheese dates eggs flour grapes honey knife ladle mixer oven pan spoon tray whisk".split()


def write_jsonl_logs(folder: Path, n_users: int = 60, seed: int = 0) -> tuple[Path, Path]:
    """(interactions.jsonl, items.jsonl) with user_id / item_id / domain / timestamp and titles."""
    rng = random.Random(seed)
    items = {f"{d}{i}": (d, f"{rng.choice(WORDS)} {rng.choice(WORDS)} {i}") for d in "AB" for i in range(40)}
    folder.mkdir(parents=True, exist_ok=True)
    events, catalogue = folder / "interactions.jsonl", folder / "items.jsonl"
    with open(events, "w", encoding="utf-8") as f:
        for u in range(n_users):
            t = 0
            for _ in range(rng.randint(6, 20)):
                item = rng.choice(list(items))
                t += rng.randint(1, 100)
                row = {"user_id": f"u{u}", "item_id": item, "domain": items[item][0], "timestamp": t}
                f.write(json.dumps(row) + "\n")
    with open(catalogue, "w", encoding="utf-8") as f:
        for item, (_, title) in items.items():
            f.write(json.dumps({"item_id": item, "title": title}) + "\n")
    return events, catalogue


def write_tiny_prepared(root: Path) -> Path:
    """Run `cprec prepare` on the JSONL fixture into ``root/prepared``; returns that folder."""
    from cprec.config import load_config
    from cprec.prepare.pipeline import run as prepare

    events, catalogue = write_jsonl_logs(root / "raw")
    cfg = load_config(
        None,
        [
            "data.source=jsonl",
            f"data.path={events}",
            f"data.item_path={catalogue}",
            f"data.output_dir={root / 'prepared'}",
            "data.tokenizer.vocab_size=320",
            "data.max_doc_tokens=64",
            "data.prompt.item_token_budget=12",
            "data.shard_max_bytes=200000",
            "data.num_workers=0",
        ],
    )
    return Path(prepare(cfg))
