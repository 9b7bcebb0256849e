"""Tokenizers: train a sentencepiece model on the corpus, load any local HF tokenizer, hash them.

A trained tokenizer is saved as a Hugging Face folder (``tokenizer.model`` from sentencepiece plus
the ``tokenizer.json``/``tokenizer_config.json`` that transformers converts it to), so
``AutoTokenizer.from_pretrained(folder)`` is all any other part needs. Sentencepiece is trained
for an exact round trip (identity normalization, no dummy prefix, whitespace kept, byte fallback
for unseen characters); ``train_sentencepiece`` checks on a sample that the HF tokenizer gives the
same ids as sentencepiece itself and the text back unchanged.

Bulk encoding (``text_codec``) uses sentencepiece directly for such a BPE model: same ids, faster.

Special tokens: ``<pad>``=0, ``<unk>``=1, ``<s>``=2 (BOS), ``</s>``=3 (EOS). The HF tokenizer adds
no special tokens by itself: documents are ``[bos] + encode(text) + [eos]`` (ids in the manifest).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cprec.config import TokenizerConfig

# Rust tokenizers must not spin up their thread pool before we fork tokenization workers.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

log = logging.getLogger(__name__)

SPECIALS = {"pad": ("<pad>", 0), "unk": ("<unk>", 1), "bos": ("<s>", 2), "eos": ("</s>", 3)}
MARKER = "cprec_tokenizer.json"  # written next to a tokenizer trained here
_CHECK_LINES = 2000

# Fixed probe strings: their encodings enter the tokenizer hash, so two tokenizers with the same
# vocabulary but different merges/normalization hash differently.
_PROBES = (
    "A user's history: Toy Story (1995); Heat (1995)",
    "  two  spaces\tand a tab\nnew line",
    "Ünïcödé – émoji 🎉 中文 ½ 3.14159 #42 <tag> x@y.com",
    "MixedCASE words_with_underscores and-hyphens, 'quotes' \"double\"",
)


def train_sentencepiece(
    texts: Iterable[str], out_folder: str | Path, cfg: TokenizerConfig, seed: int = 0
) -> Path:
    """Train sentencepiece on (a sample of) ``texts`` and save an HF tokenizer folder.

    At most ``cfg.train_sentences`` lines are used (a seeded sample). Returns the folder.
    """
    import sentencepiece as spm

    lines = [t for t in texts if t]
    if not lines:
        raise ValueError("no text to train the tokenizer on (empty corpus)")
    if len(lines) > cfg.train_sentences:
        lines = random.Random(seed).sample(lines, cfg.train_sentences)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=cfg.vocab_size,
            model_type=cfg.model_type,
            # Exact round trip: no normalization, spaces kept as they are, bytes for the rest.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            byte_fallback=True,
            character_coverage=0.9995,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,  # tiny corpora: fewer pieces than asked is fine
            max_sentence_length=1 << 16,
            shuffle_input_sentence=False,  # we sampled already; keeps training deterministic
            num_threads=1,
            pad_id=SPECIALS["pad"][1],
            unk_id=SPECIALS["unk"][1],
            bos_id=SPECIALS["bos"][1],
            eos_id=SPECIALS["eos"][1],
            pad_piece=SPECIALS["pad"][0],
            unk_piece=SPECIALS["unk"][0],
            bos_piece=SPECIALS["bos"][0],
            eos_piece=SPECIALS["eos"][0],
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"sentencepiece training failed (data.tokenizer.vocab_size={cfg.vocab_size}?): {e}"
        ) from e
    (out / "tokenizer.model").write_bytes(model.getvalue())
    for stale in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / stale).unlink(missing_ok=True)
    # transformers converts tokenizer.model into a fast tokenizer; save that conversion so every
    # later load reads tokenizer.json (no conversion, no dependency on sentencepiece).
    tok = _auto_tokenizer(out)
    tok.pad_token, tok.unk_token = SPECIALS["pad"][0], SPECIALS["unk"][0]
    tok.bos_token, tok.eos_token = SPECIALS["bos"][0], SPECIALS["eos"][0]
    tok.save_pretrained(str(out))
    sample = random.Random(seed + 1).sample(lines, min(len(lines), _CHECK_LINES))
    mismatches = check_sentencepiece_match(out, sample, strict=cfg.model_type == "bpe")
    marker = {
        "trainer": "sentencepiece",
        "model_type": cfg.model_type,
        "ids_match_sentencepiece": mismatches == 0,
    }
    (out / MARKER).write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    return out


def check_sentencepiece_match(folder: str | Path, texts: list[str], strict: bool = True) -> int:
    """Compare the HF tokenizer of ``folder`` with sentencepiece on ``texts``.

    The text must always come back unchanged. Ids must be identical for BPE (``strict``); unigram
    may differ where two segmentations score exactly the same (a tie sentencepiece and the HF
    Viterbi break differently), which is logged. Returns the number of id mismatches.
    """
    import sentencepiece as spm

    folder = Path(folder)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    tok = load_tokenizer(folder)
    encode = batch_encoder(tok)
    hf_ids = encode(texts)
    sp_ids = sp.encode(texts)
    mismatches = 0
    for text, a, b in zip(texts, hf_ids, sp_ids):
        if tok.decode(a) != text:
            raise ValueError(f"tokenizer in {folder} does not round-trip {text[:80]!r}")
        if a != b:
            mismatches += 1
            if strict:
                raise ValueError(f"HF tokenizer in {folder} disagrees with sentencepiece on {text[:80]!r}")
    if mismatches:
        log.warning(
            "HF and sentencepiece ids differ on %d/%d lines (equal-score ties)", mismatches, len(texts)
        )
    return mismatches


def _auto_tokenizer(folder: str | Path):
    import transformers  # its warnings: off at start-up (cprec.quiet)

    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_tokenizer(folder: str | Path):
    """``AutoTokenizer.from_pretrained`` on a local folder, with a clear error when it is not one."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    try:
        return _auto_tokenizer(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: not a loadable Hugging Face tokenizer folder ({e})") from e


def special_ids(tok: Any) -> dict[str, int]:
    """bos/eos/pad ids; a tokenizer without BOS uses EOS as the document start, without PAD unk/EOS."""
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tok.name_or_path!r} has no eos token; documents need one")
    bos = tok.bos_token_id if tok.bos_token_id is not None else eos
    pad = tok.pad_token_id
    if pad is None:
        pad = tok.unk_token_id if tok.unk_token_id is not None else eos
    return {"bos_id": int(bos), "eos_id": int(eos), "pad_id": int(pad)}


def batch_encoder(tok: Any) -> Callable[[list[str]], list[list[int]]]:
    """Texts -> id lists without special tokens, through the Rust tokenizer when there is one."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return lambda texts: [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
    return lambda texts: [tok.encode(t, add_special_tokens=False) for t in texts]


def text_codec(folder: str | Path, tok: Any = None, threads: int = -1) -> tuple[Callable, Callable]:
    """(encode_batch, decode) for bulk work on the tokenizer in ``folder``.

    For a BPE model trained here whose HF ids were checked equal to sentencepiece's, this is
    sentencepiece itself (about twice as fast as the HF wrapper); otherwise the HF tokenizer.
    One difference: the HF tokenizer turns special-token strings inside the text (``</s>``) into
    special ids, sentencepiece keeps them as text — which is what pre-training text wants.
    ``threads``: how many threads encoding may use (-1: every core, the tokenizers' default).
    """
    folder = Path(folder)
    marker = folder / MARKER
    if marker.is_file() and (folder / "tokenizer.model").is_file():
        info = json.loads(marker.read_text(encoding="utf-8"))
        if info.get("model_type") == "bpe" and info.get("ids_match_sentencepiece"):
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"), num_threads=threads)
            return (lambda texts: sp.encode(list(texts))), sp.decode
    if threads == 1:  # the Rust tokenizer's pool has no per-call size, but can be switched off
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tok = tok if tok is not None else load_tokenizer(folder)
    return batch_encoder(tok), tok.decode


def tokenizer_hash(folder_or_tokenizer: Any) -> str:
    """Stable identity of a tokenizer: vocabulary, special ids and the encodings of probe strings.

    Computed from behaviour, not file bytes, so a tokenizer re-saved by ``save_pretrained`` (e.g.
    into an exported model) hashes the same as the one the shards were made with.
    """
    tok = folder_or_tokenizer
    if isinstance(tok, (str, os.PathLike)):
        tok = load_tokenizer(tok)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    probes = batch_encoder(tok)(list(_PROBES))
    blob = json.dumps({"vocab": vocab, "specials": specials, "probes": probes}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


class TokenizerMismatch(ValueError):
    """Two things that must share a tokenizer (shards, checkpoint, model folder) do not."""

    same_on_every_rank = True  # every rank checks the same files: the CLI prints it once (rank 0)


def require_same_tokenizer(have: str, have_what: str, want: str, want_what: str, hint: str = "") -> None:
    """The one tokenizer-identity check (training and eval): hashes from `tokenizer_hash`, the
    error naming both sides and both hashes."""
    if have != want:
        msg = f"tokenizer mismatch: {have_what} has tokenizer hash {have}, {want_what} uses {want}"
        raise TokenizerMismatch(msg + (f"; {hint}" if hint else ""))


def install_tokenizer(src: str | Path, out_folder: str | Path) -> Any:
    """Copy a local HF tokenizer into the prepared folder (``save_pretrained``); same hash checked."""
    tok = load_tokenizer(src)
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    copy = load_tokenizer(out)
    if tokenizer_hash(copy) != tokenizer_hash(tok):
        raise ValueError(f"tokenizer from {src} changed when saved to {out}; cannot record a stable hash")
    return copy
