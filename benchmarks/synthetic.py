"""A synthetic prepared folder of any vocabulary size, for throughput runs on a machine without data.

The real ``cprec prepare`` runs on a generated two-domain JSONL log whose item titles are random
words of a word-level tokenizer with exactly ``vocab`` entries (``<pad>``, ``<unk>``, ``<s>``,
``</s>``, then ``w4`` ... ``w{vocab-1}``), saved as an HF tokenizer folder and named in
``data.tokenizer.path``. So the shards' ids cover the whole vocabulary of the model shape being
timed (49,152 for SmolLM2, 151,936 for Qwen2) and the documents have the lengths real behaviour
logs give (users of many items, split into windows of ``max_doc_tokens``); the prompt template's
own words are ``<unk>``, which does not matter for speed.

    python benchmarks/synthetic.py OUT_FOLDER --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_tokenizer(folder: Path, vocab: int) -> Path:
    """A word-level HF tokenizer of exactly ``vocab`` ids (whitespace-split words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    words = {t: i for i, t in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab)})
    core = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.save_pretrained(folder)
    return folder


def write_logs(folder: Path, vocab: int, users: int, items: int, seed: int) -> tuple[Path, Path]:
    """(events.jsonl, items.jsonl): two domains, ``items`` items of 4-12 random words, users of
    20-200 interactions."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    catalogue = {f"i{i}": ("A" if i % 2 else "B") for i in range(items)}
    events, titles = folder / "events.jsonl", folder / "items.jsonl"
    with open(titles, "w", encoding="utf-8") as f:
        for item in catalogue:
            words = " ".join(f"w{rng.randrange(4, vocab)}" for _ in range(rng.randint(4, 12)))
            f.write(json.dumps({"item_id": item, "title": words}) + "\n")
    names = list(catalogue)
    with open(events, "w", encoding="utf-8") as f:
        for u in range(users):
            t = 0
            for _ in range(rng.randint(20, 200)):
                item = rng.choice(names)
                t += rng.randint(1, 1000)
                row = {"user_id": f"u{u}", "item_id": item, "domain": catalogue[item], "timestamp": t}
                f.write(json.dumps(row) + "\n")
    return events, titles


def write_synthetic_prepared(
    root: Path, vocab: int, users: int = 3000, items: int = 20000, max_doc_tokens: int = 2048, seed: int = 0
) -> Path:
    """Prepare the synthetic corpus into ``root/prepared`` (a cache hit when it is already there)."""
    from cprec.config import load_config
    from cprec.prepare.pipeline import run as prepare

    root = Path(root)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        write_tokenizer(tok_dir, vocab)
    events, titles = write_logs(root / "raw", vocab, users, items, seed)
    cfg = load_config(
        None,
        [
            "data.source=jsonl",
            f"data.path={events}",
            f"data.item_path={titles}",
            f"data.output_dir={root / 'prepared'}",
            f"data.tokenizer.path={tok_dir}",
            f"data.max_doc_tokens={max_doc_tokens}",
            "data.prompt.item_token_budget=16",
        ],
    )
    return Path(prepare(cfg))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="work folder (tokenizer/, raw/, prepared/)")
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--max-doc-tokens", type=int, default=2048)
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    print(write_synthetic_prepared(Path(args.out), args.vocab, args.users, args.items, args.max_doc_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
