"""The evaluation job's config section (``eval``), apart from the others (``sections``) for its size.

Like every section: a default and a docstring per field (``describe_fields`` reads them), checked
in ``__post_init__`` with errors naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cprec.config.checks import _check, _one_of


@dataclass
class EvalConfig:
    """The evaluation job (`cprec eval`)."""

    checkpoint: str = ""
    """Checkpoint folder or HF export to evaluate (empty = <train.output_dir>/final)."""
    prepared_dir: str = ""
    """Prepared data folder with eval/ inputs (empty = data.output_dir)."""
    output_dir: str = "out/eval/default"
    """Where report.json / report.md / plots are written."""
    allow_tokenizer_mismatch: bool = False
    """Evaluate a checkpoint trained with another tokenizer than the prepared folder's (a deliberate
    transfer: prompts are encoded with the prepared folder's tokenizer). False = refuse, naming both
    tokenizer hashes, before any compute."""
    split: str = "test"
    """Which held-out targets to rank: valid or test."""
    protocol: str = "full"
    """Ranking protocol: full (whole domain catalogue) or sampled (N random in-domain negatives)."""
    n_negatives: int = 1000
    """Negatives per user for the sampled protocol."""
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    """Cut-offs for Recall/NDCG/MRR@K."""
    pooling: str = "last"
    """Embedding pooling: last (last non-pad token) or mean."""
    dtype: str = "auto"
    """Precision of the encoding passes and of fine-tuning's compute (master weights stay fp32):
    auto (bf16 on GPUs and on CPUs with native bf16 - AVX512-BF16/AMX - else fp32), bf16 or fp32."""
    max_history_items: int = 20
    """User prompt uses the last K history items."""
    batch_size: int = 64
    """Prompts encoded per batch."""
    max_users: int = 0
    """Evaluate at most this many users per domain (0 = all)."""
    item_chunk: int = 65536
    """Full ranking of embedding models: items scored per matmul while streaming over a domain's
    catalogue (cprec.eval.topk). Memory per user batch is batch_size x item_chunk scores, whatever
    the catalogue's size; under torchrun each rank holds and ranks a slice of the items."""
    retrieval: str = "exact"
    """How embedding models rank the full catalogue: exact (streaming over every item) or faiss
    (through a FAISS index of each domain's items, eval.faiss_index; needs faiss-cpu)."""
    faiss_index: str = "Flat"
    """FAISS index_factory string of the item indexes (inner product) of eval.retrieval=faiss and
    `cprec embed --faiss`: Flat is exact; others (HNSW32, IVF1024,Flat, ...) are approximate and
    the report says so."""
    rank_pretrained: bool = True
    """Also rank the checkpoint's embeddings as they are, without fine-tuning (the zero-shot
    llm-pretrained rows). Costs one more encoding of every catalogue; false skips it."""
    generative: bool = False
    """Also rank by generative retrieval (the llm-generative rows): beam search constrained to the
    domain's catalogue texts after the history prompt, items ranked by the model's log-probability
    of writing them next (the checkpoint as it is, no fine-tuning)."""
    beam_width: int = 20
    """Beams of the generative search: the items it can reach per user (the others rank after them)."""
    rerank_top_n: int = 0
    """Re-rank the top N items of the zero-shot embedding retrieval by the model's log-probability
    of writing them next (the llm-reranked rows); 0 = no re-ranked rows."""
    finetune: bool = True
    """Contrastive fine-tuning before ranking."""
    finetune_scope: str = "all"
    """Fine-tune one model for all domains (all) or one per domain (per_domain)."""
    finetune_objective: str = "all_positions"
    """all_positions: one packed forward over each user's training sequence scores the user state
    after every item against the next item (cprec.eval.all_positions); pairs: one padded (history ->
    next item) pair per example, eval.finetune_pairs_per_user per user (the old objective, kept as
    benchmarks/finetune.py's baseline)."""
    finetune_max_items: int = 50
    """all_positions: the user's most recent training items a sequence holds (targets = all but the first)."""
    finetune_seq_len: int = 2048
    """all_positions: tokens per packed row of user sequences and item prompts (a longer sequence
    gets a row of its own length)."""
    finetune_epochs: float = 1.0
    """Passes over the fine-tuning examples (users for all_positions, pairs for pairs)."""
    finetune_lr: float = 5e-5
    """Fine-tuning learning rate."""
    finetune_batch_size: int = 16
    """Examples per fine-tuning batch and rank (users for all_positions, pairs for pairs)."""
    finetune_negatives: int = 15
    """In-domain sampled negatives: per pair (pairs), per domain of the batch's targets shared by
    the whole batch (all_positions); 0 = in-batch negatives only."""
    finetune_pairs_per_user: int = 1
    """Training pairs per user: its last N training items, each with the items before it as history."""
    in_batch_negatives: bool = True
    """Also use the other users' positives in the batch as negatives."""
    temperature: float = 0.05
    """Softmax temperature of the contrastive loss."""
    lora_rank: int = 0
    """LoRA rank for fine-tuning (0 = full fine-tuning)."""
    finetune_checkpoint_every: int = 0
    """Save a resumable fine-tuning checkpoint every N steps under <output_dir>/finetuned/<scope>/checkpoints/
    (0 = only the final one); train.checkpoint.keep_last of them are kept. A rerun resumes from the latest."""
    finetune_deepspeed: bool = False
    """Fine-tune with training's train.zero_stage, train.offload_optimizer and model.dtype, for models too
    large for one device; false = ZeRO stage 0 in fp32 (every rank holds the model). Both run in a DeepSpeed
    engine (cprec.runtime.engine) and write DeepSpeed checkpoints."""
    zero3_inference: bool = False
    """Encode (item and user embeddings) and score generatively (eval.generative, eval.rerank_top_n)
    with the model ZeRO-3 partitioned over the ranks in eval.dtype (cprec.eval.zero3): each rank reads
    only its slices of the checkpoint's safetensors and holds 1/N of the weights (a 7B model in bf16 on
    8 ranks: 1.75 GB each, not 14), and every forward gathers each layer's weights for its own pass,
    all ranks in lockstep. For models too large for one device: the gathers cost time. Its own field,
    not eval.finetune_deepspeed: that one takes training's train.zero_stage (often 1 or 2, which
    replicate the weights) and an optimizer, and a small model may fine-tune unsharded and still
    encode sharded (or the reverse). false = every rank loads the whole model."""
    baselines: list[str] = field(default_factory=lambda: ["popularity", "sasrec"])
    """Baselines computed on the same split: popularity, sasrec."""
    sasrec_epochs: int = 200
    """SASRec maximum training epochs (it stops earlier once validation NDCG@10 stops improving)."""
    sasrec_patience: int = 5
    """SASRec early stopping: validation evaluations without improvement before stopping (0 = run
    all sasrec_epochs). Validation = the valid split's users, full ranking; the best epoch is tested."""
    sasrec_eval_every: int = 2
    """SASRec: epochs between two validation evaluations."""
    sasrec_hidden: int = 50
    """SASRec hidden size (item embedding dimension)."""
    sasrec_max_len: int = 200
    """SASRec maximum sequence length (the last N items of a history)."""
    sasrec_layers: int = 2
    """SASRec self-attention blocks."""
    sasrec_heads: int = 1
    """SASRec attention heads (must divide sasrec_hidden)."""
    sasrec_dropout: float = 0.2
    """SASRec dropout rate."""
    sasrec_lr: float = 1e-3
    """SASRec Adam learning rate."""
    sasrec_batch_size: int = 128
    """SASRec training sequences per batch."""
    sasrec_negatives: int = 256
    """SASRec sampled softmax: uniform negatives per training sequence, shared by its positions."""
    sasrec_similarity: str = "cosine"
    """SASRec user-item similarity: cosine (L2-normalised, as the published sampled-softmax SASRec) or dot."""
    sasrec_temperature: float = 0.05
    """SASRec softmax temperature (logits = similarity / temperature; use 1.0 with dot)."""
    seed: int = 0
    """Seed for negatives sampling and fine-tuning."""

    def __post_init__(self):
        _one_of(self.split, "eval.split", ("valid", "test"))
        _one_of(self.protocol, "eval.protocol", ("full", "sampled"))
        _check(self.n_negatives > 0, "eval.n_negatives", "must be > 0")
        _check(len(self.ks) > 0 and all(k > 0 for k in self.ks), "eval.ks", "positive cut-offs")
        _one_of(self.pooling, "eval.pooling", ("last", "mean"))
        _one_of(self.dtype, "eval.dtype", ("auto", "bf16", "fp32"))
        for name in (
            "max_history_items",
            "batch_size",
            "finetune_batch_size",
            "sasrec_epochs",
            "sasrec_eval_every",
            "sasrec_hidden",
            "sasrec_max_len",
            "sasrec_layers",
            "sasrec_heads",
            "sasrec_batch_size",
            "sasrec_negatives",
        ):
            _check(getattr(self, name) > 0, f"eval.{name}", "must be > 0")
        _check(self.max_users >= 0, "eval.max_users", "must be >= 0")
        _check(self.item_chunk > 0, "eval.item_chunk", "must be > 0")
        _one_of(self.retrieval, "eval.retrieval", ("exact", "faiss"))
        _check(bool(self.faiss_index.strip()), "eval.faiss_index", "must not be empty")
        _check(
            self.retrieval == "exact" or self.protocol == "full",
            "eval.retrieval",
            "faiss ranks the full catalogue: it needs eval.protocol=full",
        )
        _check(self.beam_width > 0, "eval.beam_width", "must be > 0")
        _check(self.rerank_top_n >= 0, "eval.rerank_top_n", "must be >= 0")
        _one_of(self.finetune_scope, "eval.finetune_scope", ("all", "per_domain"))
        _check(self.finetune_epochs >= 0, "eval.finetune_epochs", "must be >= 0")
        _check(self.finetune_negatives >= 0, "eval.finetune_negatives", "must be >= 0")
        _check(
            self.finetune_negatives > 0 or self.in_batch_negatives,
            "eval.finetune_negatives",
            "must be > 0 when eval.in_batch_negatives is false (no negatives at all)",
        )
        _check(self.finetune_pairs_per_user > 0, "eval.finetune_pairs_per_user", "must be > 0")
        _one_of(self.finetune_objective, "eval.finetune_objective", ("all_positions", "pairs"))
        _check(self.finetune_max_items >= 2, "eval.finetune_max_items", "must be >= 2 (history + target)")
        _check(self.finetune_seq_len > 0, "eval.finetune_seq_len", "must be > 0")
        _check(self.temperature > 0, "eval.temperature", "must be > 0")
        _check(self.lora_rank >= 0, "eval.lora_rank", "must be >= 0")
        _check(self.finetune_checkpoint_every >= 0, "eval.finetune_checkpoint_every", "must be >= 0")
        _check(isinstance(self.zero3_inference, bool), "eval.zero3_inference", "must be true or false")
        for b in self.baselines:
            _one_of(b, "eval.baselines", ("popularity", "sasrec"))
        _check(self.sasrec_patience >= 0, "eval.sasrec_patience", "must be >= 0")
        _check(
            self.sasrec_hidden % self.sasrec_heads == 0, "eval.sasrec_heads", "must divide eval.sasrec_hidden"
        )
        _check(0 <= self.sasrec_dropout < 1, "eval.sasrec_dropout", "must be in [0, 1)")
        _check(self.sasrec_lr >= 0, "eval.sasrec_lr", "must be >= 0")
        _one_of(self.sasrec_similarity, "eval.sasrec_similarity", ("cosine", "dot"))
        _check(self.sasrec_temperature > 0, "eval.sasrec_temperature", "must be > 0")
