"""The evaluation job (`cprec eval CONFIG`): checkpoint -> (fine-tune) -> rank -> baselines -> report.

1. Resolve the checkpoint (``eval.checkpoint``; empty = ``train.output_dir``) with the runtime's one
   resolver (`cprec.runtime.checkpoint.resolve_checkpoint`): an HF folder (``config.json``) is used
   as is; a run folder gives its exported ``final/``, else its phase-end checkpoint, else its newest
   complete one; a DeepSpeed checkpoint is exported once into ``<eval.output_dir>/hf_export/``.
2. Read the eval inputs of the prepared folder (``eval.prepared_dir`` or ``data.output_dir``) and
   build one ranking task per domain (``eval.max_users`` caps users per domain, seeded).
3. ``llm-pretrained`` (``eval.rank_pretrained``): item and user embeddings (item cache under
   ``<eval.output_dir>/cache/``), scored by dot product, ranked under ``eval.protocol``; the full
   protocol streams over item chunks (`cprec.eval.topk`; under torchrun each rank encodes and
   ranks a slice of every catalogue), or goes through a FAISS index (``eval.retrieval=faiss``).
   ``llm-generative`` (``eval.generative``) and ``llm-reranked`` (``eval.rerank_top_n``): the same
   checkpoint ranking items by its likelihood of writing them after the history
   (`cprec.eval.generative`).
4. ``llm-finetuned`` (``eval.finetune``): contrastive fine-tuning, one model for all domains or one
   per domain (``eval.finetune_scope``), in a DeepSpeed engine (ZeRO-0, or with
   ``eval.finetune_deepspeed`` training's ZeRO stage),
   checkpointed every ``eval.finetune_checkpoint_every`` steps and resumed by a rerun, saved under
   ``<eval.output_dir>/finetuned/<scope>/``, ranked the same way.
5. Baselines (``eval.baselines``): popularity and SASRec, same users, same candidates, same masks.
   SASRec trains until NDCG@10 of the *valid* split's users stops improving (``eval.sasrec_patience``)
   and is ranked from its best epoch (kept in ``<eval.output_dir>/cache/`` keyed by its data,
   validation users and settings; per-evaluation metrics go to the tracker as ``sasrec/valid/*``).
6. report.json / report.md / metrics.png in ``eval.output_dir``, logged through the training
   tracker (``tracking``; rank 0): config as params, every metric, per-step fine-tuning loss
   (``finetune/loss``), the report files, tags naming the checkpoint and its training run.

Under torchrun, encoding and fine-tuning are spread over the ranks, and so is the full ranking of
embedding rows (`item_sharding`); rank 0 trains the baselines and writes the report (other ranks
return an empty dict). Encoding and generative scoring load the model whole on every rank in
``eval.dtype``, or with ``eval.zero3_inference`` ZeRO-3 partitioned over them (`LLMSide.load_model`,
`cprec.eval.zero3`).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig

from cprec.config import Config, save_config
from cprec.eval import baselines, finetune
from cprec.eval.all_positions import build_sequences, sequences_identity
from cprec.eval.encode import (
    Encoder,
    ItemEmbeddingCache,
    PromptBuilder,
    checkpoint_identity,
    encode_item_shard,
    encode_items,
    encode_users,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from cprec.eval.faiss_index import FaissRanker, describe
from cprec.eval.finetune_state import model_identity
from cprec.eval.generative import generative_rows
from cprec.eval.inputs import Catalogue, EvalInputs, load_inputs, load_split_users
from cprec.eval.ranking import DomainTask, ScoreFn, build_tasks, cold_counts, evaluate, rank_task
from cprec.eval.report import (
    build_report,
    checkpoint_tags,
    close_tracker,
    headline_line,
    log_report,
    open_tracker,
    summary_lines,
    write_report,
)
from cprec.eval.topk import EmbeddingScorer, ItemShard
from cprec.lifetime import hold_folder
from cprec.prepare.tokenize import special_ids
from cprec.runtime.checkpoint import resolve_checkpoint, tokenizer_identity
from cprec.runtime.dist import barrier, destroy_distributed, dist_info, init_distributed
from cprec.runtime.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- checkpoint
def prepared_dir(cfg: Config) -> Path:
    """The prepared folder whose eval inputs and tokenizer are used."""
    return Path(cfg.eval.prepared_dir or cfg.data.output_dir)


def find_checkpoint(cfg: Config) -> Path:
    """The folder to evaluate: ``eval.checkpoint`` or the training run's final export / newest
    complete checkpoint, as `cprec.runtime.checkpoint.resolve_checkpoint` (with HF folders) says."""
    if cfg.eval.checkpoint:
        p = Path(cfg.eval.checkpoint)
        if not p.exists():
            raise FileNotFoundError(f"eval.checkpoint not found: {p}")
        return resolve_checkpoint(p, hf_ok=True)
    run_dir = Path(cfg.train.output_dir)
    try:
        return resolve_checkpoint(run_dir, hf_ok=True)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(
            f"no checkpoint to evaluate: set eval.checkpoint, or train first (looked for "
            f"{run_dir / 'final'} and {run_dir / 'checkpoints'}: {e})"
        ) from e


def resolve_hf_folder(cfg: Config) -> tuple[Path, dict]:
    """(HF model folder, {"path", "id", "kind"}); DeepSpeed checkpoints are exported once."""
    src = find_checkpoint(cfg)
    if (src / "config.json").is_file():
        return src, {"path": str(src), "id": checkpoint_identity(src), "kind": "hf"}
    src_id = checkpoint_identity(src)
    out = Path(cfg.eval.output_dir) / "hf_export"
    marker = Path(cfg.eval.output_dir) / "hf_export.json"
    done = json.loads(marker.read_text(encoding="utf-8")) if marker.is_file() else {}
    if dist_info().is_main and (done.get("source_id") != src_id or not (out / "config.json").is_file()):
        from cprec.runtime.export import export_checkpoint

        log.info("exporting DeepSpeed checkpoint %s -> %s", src, out)
        export_checkpoint(src, out)
        marker.write_text(json.dumps({"source": str(src), "source_id": src_id}), encoding="utf-8")
    barrier()  # every rank, always: the others wait for rank 0's export
    return out, {"path": str(src), "id": src_id, "kind": "deepspeed", "export": str(out)}


def check_tokenizer(cfg: Config, checkpoint: Path, prepared: Path) -> None:
    """The checkpoint must have been trained with the prepared folder's tokenizer (the one the
    prompts are encoded with): the same check as training's, before any compute, unless
    ``eval.allow_tokenizer_mismatch`` (a deliberate transfer, then a warning naming both)."""
    from cprec.manifest import read_manifest
    from cprec.prepare.tokenize import TokenizerMismatch, require_same_tokenizer, tokenizer_hash

    have, source = tokenizer_identity(checkpoint)
    if have is None:
        log.warning("cannot check the checkpoint's tokenizer against %s: %s", prepared, source)
        return
    if (prepared / "manifest.json").is_file():
        want, want_what = read_manifest(prepared)["tokenizer"]["hash"], f"the prepared folder {prepared}"
    else:
        want, want_what = tokenizer_hash(load_tokenizer(prepared)), f"{prepared / 'tokenizer'}"
    try:
        require_same_tokenizer(have, f"checkpoint {checkpoint} ({source})", want, want_what)
    except TokenizerMismatch as e:
        if not cfg.eval.allow_tokenizer_mismatch:
            raise TokenizerMismatch(
                f"{e}; evaluate on a folder prepared with the checkpoint's tokenizer, or set "
                "eval.allow_tokenizer_mismatch=true for a deliberate transfer"
            ) from None
        log.warning("%s; evaluating anyway (eval.allow_tokenizer_mismatch=true)", e)


# ------------------------------------------------------------------------------------ the LLM
class LLMSide:
    """What every LLM evaluation shares: tokenizer, prompt builder, item cache."""

    def __init__(self, cfg: Config, prepared: Path, inputs: EvalInputs):
        self.cfg = cfg
        self.inputs = inputs
        self.tokenizer = load_tokenizer(prepared)
        self.cache = ItemEmbeddingCache(Path(cfg.eval.output_dir) / "cache")
        self.pad_id = special_ids(self.tokenizer)["pad_id"]
        self.dtype = resolve_dtype(cfg.eval.dtype)  # of the encoding passes (fine-tuning keeps fp32)

    def load_model(self, folder: Path):
        """The model to encode and score with, in ``eval.dtype``: whole on every rank, or with
        ``eval.zero3_inference`` ZeRO-3 partitioned over the ranks (`cprec.eval.zero3`). Hand it
        back to `release` when done."""
        if self.cfg.eval.zero3_inference:
            from cprec.eval import zero3

            return zero3.load(folder, self.dtype)
        return load_model(folder, dtype=self.dtype)

    @staticmethod
    def release(model) -> None:
        """Free a model of `load_model` (a partitioned one's engine hooks too)."""
        from cprec.eval.zero3 import release

        release(model)
        gc.collect()

    def builder(self, model_config) -> PromptBuilder:
        """Prompts for a model of ``model_config`` (its vocabulary checked, its positions the cut)."""
        vocab = int(model_config.vocab_size)
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"tokenizer has {len(self.tokenizer)} tokens but the model's vocab_size is {vocab}: "
                "the checkpoint was not trained on this prepared folder"
            )
        max_len = int(getattr(model_config, "max_position_embeddings", 0) or 0)
        return PromptBuilder(self.tokenizer, self.cfg.data.prompt, self.cfg.eval.max_history_items, max_len)

    def score_fn(
        self, model, model_id: str, tasks: dict[str, DomainTask], segmented: bool = False, shard: bool = False
    ) -> ScoreFn:
        """Encode the tasks' items (cached) and users now: an `EmbeddingScorer` (dense scores = one
        matmul per batch; the full protocol streams over item chunks), or with ``eval.retrieval=faiss``
        a `FaissRanker` over it. ``segmented``: user prompts as all-position fine-tuning reads them
        (`PromptBuilder.user_ids`). ``shard``: each rank encodes and keeps a slice of the items."""
        builder = self.builder(model.config)
        enc = Encoder(model, self.pad_id, self.cfg.eval.pooling, self.cfg.eval.batch_size)
        cat = self.inputs.catalogue
        items, users = {}, {}
        for d, task in tasks.items():
            rows, desc = task.rows.tolist(), f"items ({d})"
            if shard:
                items[d] = encode_item_shard(enc, builder, cat, rows, self.cache, model_id, desc)
            else:
                items[d] = ItemShard.of(encode_items(enc, builder, cat, rows, self.cache, model_id, desc))
            hist = [u.history for u in task.users]
            users[d] = encode_users(enc, builder, cat, hist, desc=f"users ({d})", segmented=segmented)
        if builder.unknown_history_items:
            log.warning(
                "%d history items are not in items.parquet (left out of prompts)",
                builder.unknown_history_items,
            )

        scorer = EmbeddingScorer(users, items, self.cfg.eval.item_chunk)
        if self.cfg.eval.retrieval == "faiss":
            return FaissRanker(scorer, self.cfg.eval.faiss_index, max(self.cfg.eval.ks))
        return scorer


def item_sharding(ecfg) -> bool:
    """Whether each rank holds only a slice of the items of the embedding rows: under torchrun,
    when nothing needs a domain's whole item embeddings on one rank (the sampled protocol's dense
    scores, the re-ranker's candidates and a FAISS index do)."""
    return (
        dist_info().world_size > 1
        and ecfg.protocol == "full"
        and ecfg.retrieval == "exact"
        and not ecfg.rerank_top_n
    )


class _ByDomain:
    """One score function per domain as one: dense scores and full ranking go to the domain's."""

    def __init__(self, fns: dict[str, ScoreFn]):
        self.fns = fns

    @property
    def sharded(self) -> bool:
        return any(getattr(f, "sharded", False) for f in self.fns.values())

    def __call__(self, task: DomainTask, batch) -> torch.Tensor:
        return self.fns[task.domain](task, batch)

    def rank_full(self, task: DomainTask, batch_size: int):
        return rank_task(task, self.fns[task.domain], "full", batch_size=batch_size)


def _by_domain(fns: dict[str, ScoreFn]) -> ScoreFn:
    return _ByDomain(fns)


def finetune_metric(scope: str) -> str:
    """Tracker metric of a scope's per-step loss: ``finetune/loss``, or ``finetune/<domain>/loss``."""
    return "finetune/loss" if scope == "all" else f"finetune/{scope}/loss"


def finetuned_score_fn(
    cfg: Config,
    side: LLMSide,
    base_dir: Path,
    base_id: str,
    tasks: dict[str, DomainTask],
    tracker: Tracker | None = None,
) -> tuple[ScoreFn, dict]:
    """Fine-tune per ``eval.finetune_scope`` (resuming an interrupted run, or reusing a completed
    one) and encode with the result."""
    ecfg = cfg.eval
    cat: Catalogue = side.inputs.catalogue
    scopes = {"all": None} if ecfg.finetune_scope == "all" else {d: {d} for d in tasks}
    fns, details = {}, {}
    all_positions = ecfg.finetune_objective == "all_positions"
    builder = side.builder(AutoConfig.from_pretrained(str(base_dir)))
    for scope, domains in scopes.items():
        folder = Path(ecfg.output_dir) / "finetuned" / scope
        if all_positions:
            examples, skipped = build_sequences(
                side.inputs.train_sequences, cat, builder, domains, ecfg.finetune_max_items, builder.max_len
            )
            data_id = sequences_identity(examples)
        else:
            examples, skipped = finetune.build_pairs(
                side.inputs.train_sequences, cat, domains, ecfg.finetune_pairs_per_user
            )
            data_id = finetune.pairs_identity(examples, cat)
        key = finetune.settings_key(ecfg, base_id, scope, data_id)
        state = finetune.load_state(folder)
        if state and state.get("completed") and state.get("key") == key:
            log.info("fine-tuned model for scope %r found in %s: reusing it", scope, folder)
        else:
            model = finetune.base_model(cfg, base_dir)
            what = "user sequences" if all_positions else "pairs"
            log.info("fine-tuning scope %r on %d %s (skipped %s)", scope, len(examples), what, skipped)
            state = finetune.finetune_to_folder(
                model,
                builder,
                cat,
                examples,
                cfg,
                side.pad_id,
                base_dir=base_dir,
                folder=folder,
                key=key,
                skipped=skipped,
                tracker=tracker,
                metric=finetune_metric(scope),
                desc=f"finetune {scope}",
            )
            del model
            gc.collect()
        details[scope] = {k: v for k, v in state.items() if k != "losses"} | {"folder": str(folder)}
        model = side.load_model(folder)
        scope_tasks = tasks if domains is None else {d: tasks[d] for d in domains}
        fn = side.score_fn(
            model, f"{model_identity(folder)}:{side.dtype}", scope_tasks, all_positions, item_sharding(ecfg)
        )
        for d in scope_tasks:
            fns[d] = fn
        side.release(model)
        del model
    return _by_domain(fns), details


def validation_tasks(prepared: Path, inputs: EvalInputs, max_users: int, seed: int) -> dict[str, DomainTask]:
    """Ranking tasks of the *valid* split (same catalogue, same per-domain cap as the report's
    tasks): what SASRec's early stopping watches. Never the test split, whatever eval.split is."""
    users, skipped = load_split_users(prepared, "valid", inputs.catalogue)
    if skipped:
        log.warning("validation users: skipped rows %s", skipped)
    return build_tasks(replace(inputs, users=users), max_users, seed)


# ---------------------------------------------------------------------------------------- job
def run(cfg: Config) -> dict:
    """Run the evaluation job; returns the report dict (empty on ranks other than 0).

    Named bases in the config resolve to their folders (``eval.checkpoint=smollm2-135m`` is the
    model without CPT); the checkpoint's tokenizer is checked against the prepared folder's first;
    rank 0 holds the lock on ``eval.output_dir`` (`cprec.lifetime`) for the whole job."""
    from cprec.model.bases import resolve_config

    cfg = resolve_config(cfg)
    check_tokenizer(cfg, find_checkpoint(cfg), prepared_dir(cfg))  # before any compute
    lock = hold_folder(cfg.eval.output_dir, "eval.output_dir", dist_info().rank)
    try:
        return _run_job(cfg)
    finally:
        lock.release()


def _run_job(cfg: Config) -> dict:
    # Fine-tuning and ZeRO-3 inference run in DeepSpeed engines: a process group even for one rank.
    engine = cfg.eval.finetune or cfg.eval.zero3_inference
    started_dist = not torch.distributed.is_initialized() and (engine or dist_info().world_size > 1)
    if engine:
        from cprec.runtime.engine import start_distributed

        info = start_distributed()
    else:
        info = init_distributed()
    try:
        tracker = _open_tracker(cfg, info.rank)
        try:
            report = _run(cfg, info.is_main, tracker)
        except BaseException:
            tracker.finish("FAILED")  # tracking.json stays unfinished: the rerun continues this run
            raise
        close_tracker(tracker, cfg.eval.output_dir)
        return report
    finally:
        if started_dist:
            destroy_distributed()


def _open_tracker(cfg: Config, rank: int) -> Tracker:
    try:
        return open_tracker(cfg, rank)
    except Exception as e:  # a tracking outage must not stop the evaluation
        log.error("MLflow tracking unavailable (%s): evaluating without it", e)
        return NullTracker()


def _run(cfg: Config, is_main: bool, tracker: Tracker | None = None) -> dict:
    ecfg = cfg.eval
    tracker = tracker or NullTracker()
    out = Path(ecfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        save_config(cfg, out / "config.yaml")  # the effective config beside the report
    prepared = prepared_dir(cfg)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    inputs = load_inputs(prepared, ecfg.split)
    tasks = build_tasks(inputs, ecfg.max_users, ecfg.seed)
    n_users = {d: len(tk.users) for d, tk in tasks.items()}
    n_users["overall"] = sum(n_users.values())
    log.info("eval %s split, %s protocol, users per domain %s", ecfg.split, ecfg.protocol, n_users)
    cold = cold_counts(inputs, tasks)
    for d, c in cold.items():
        log.info(
            "%s: %d candidates (%d cold), %d targets (%d cold)",
            d, c["candidates"], c["cold_candidates"], c["targets"], c["cold_targets"],
        )  # fmt: skip
    seconds["inputs"] = time.perf_counter() - t

    def rank(name: str, fn: ScoreFn) -> None:
        t0 = time.perf_counter()
        per_domain: dict = {}
        results[name] = evaluate(
            tasks,
            fn,
            ecfg.ks,
            ecfg.protocol,
            ecfg.n_negatives,
            ecfg.seed,
            batch_size=ecfg.batch_size,
            ranks_out=per_domain,
        )
        ranks[name] = {d: r.astype(int).tolist() for d, r in per_domain.items()}
        seconds[f"rank/{name}"] = time.perf_counter() - t0
        if is_main:
            log.info("%s", headline_line(name, results[name], ecfg.ks))  # per domain: report.md, DEBUG
            for line in summary_lines(name, results[name], ecfg.ks):
                log.debug("%s", line)

    results: dict[str, dict] = {}
    ranks: dict[str, dict[str, list[int]]] = {}  # per-user target ranks: intervals, paired tests
    models: dict[str, dict] = {}
    hf_dir, ckpt = resolve_hf_folder(cfg)
    tracker.set_tags(checkpoint_tags(ckpt))
    side = LLMSide(cfg, prepared, inputs)
    retrieval = describe(ecfg.retrieval, ecfg.faiss_index)

    if ecfg.rank_pretrained:
        t = time.perf_counter()
        model = side.load_model(hf_dir)
        fn = side.score_fn(model, f"{ckpt['id']}:{side.dtype}", tasks, shard=item_sharding(ecfg))
        side.release(model)
        del model
        seconds["encode/llm-pretrained"] = time.perf_counter() - t
        if is_main or fn.sharded:  # sharded items: every rank ranks its slice
            rank("llm-pretrained", fn)
        models["llm-pretrained"] = {"folder": str(hf_dir), "pooling": ecfg.pooling, "retrieval": retrieval}

    if ecfg.generative or ecfg.rerank_top_n:  # llm-generative / llm-reranked: cprec.eval.generative
        t = time.perf_counter()
        zero_shot = fn if ecfg.rank_pretrained else None
        gen_fns, gen_models = generative_rows(
            cfg, side, hf_dir, f"{ckpt['id']}:{side.dtype}", tasks, zero_shot
        )
        seconds["search/llm-generative"] = time.perf_counter() - t
        for name, gen_fn in gen_fns.items() if is_main else ():
            rank(name, gen_fn)
        models.update(gen_models)

    if ecfg.finetune:
        t = time.perf_counter()
        fn, details = finetuned_score_fn(cfg, side, hf_dir, ckpt["id"], tasks, tracker)
        seconds["finetune+encode/llm-finetuned"] = time.perf_counter() - t
        if is_main or fn.sharded:
            rank("llm-finetuned", fn)
        models["llm-finetuned"] = {"scope": ecfg.finetune_scope, "runs": details, "retrieval": retrieval}

    if not is_main:
        barrier()
        return {}
    if "popularity" in ecfg.baselines:
        counts = baselines.popularity_counts(inputs.train_sequences, inputs.catalogue)
        rank(
            "popularity", baselines.popularity_score_fn(baselines.popularity_scores(counts, inputs.catalogue))
        )
        models["popularity"] = {"source": "train_sequences.parquet item counts, ties by item id"}
    if "sasrec" in ecfg.baselines:
        t = time.perf_counter()
        valid = validation_tasks(prepared, inputs, ecfg.max_users, ecfg.seed)
        if ecfg.split == "valid":
            log.warning("eval.split=valid: SASRec's best epoch is picked on the users it is reported on")

        def log_valid(epoch: int, metrics: dict, _model) -> None:
            tracker.log_metrics({f"sasrec/valid/{k}": v for k, v in metrics.items()}, step=epoch)

        sasrec, stats = baselines.train_sasrec_cached(
            inputs.train_sequences,
            inputs.catalogue,
            baselines.sasrec_config(ecfg),
            out / "cache",
            valid=valid,
            on_eval=log_valid,
        )
        seconds["train/sasrec"] = time.perf_counter() - t
        rank("sasrec", baselines.sasrec_score_fn(sasrec, inputs.catalogue))
        models["sasrec"] = stats

    report = build_report(
        protocol=ecfg.protocol,
        n_negatives=ecfg.n_negatives,
        split=ecfg.split,
        checkpoint=ckpt,
        ks=ecfg.ks,
        n_users=n_users,
        results=results,
        models=models,
        skipped=inputs.skipped,
        seconds=seconds,
        cold=cold,
        retrieval=retrieval if (ecfg.rank_pretrained or ecfg.finetune) else None,
    )
    report["item_cache"] = {"hits": side.cache.hits, "misses": side.cache.misses}
    report["users"] = {d: [u.user for u in tk.users] for d, tk in tasks.items()}  # order of "ranks"
    report["ranks"] = ranks
    if tracker.run_id:
        report["mlflow_run_id"] = tracker.run_id
    files = write_report(report, out)
    log.info("report written to %s", files["md"])
    try:
        log_report(tracker, report, files)
    except Exception as e:  # the report files are written; a tracking outage must not lose them
        log.error("MLflow logging failed (%s); the report files are in %s", e, out)
    barrier()
    return report
