"""A packed row gives the same logits, loss and gradients as its documents run one by one."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cprec.model.build import build_model
from cprec.model.packed import MODEL_INPUT_KEYS, PackedCausalLM, PackedLMHead, unwrap

VOCAB = 101
LENGTHS = [9, 17, 3, 12, 1, 20, 6, 14]
SEQ_LEN = 32
CPU_BACKENDS = ["reference", "sdpa", "loop"]


def eager_copy(model):
    """An independent ground truth: the same weights with transformers' own eager attention."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def per_document(ref, docs):
    """Logits of each document run alone, and the summed next-token loss and label count."""
    logits, total, count = [], 0.0, 0
    for d in docs:
        out = ref(input_ids=d[None], use_cache=False).logits[0]
        logits.append(out)
        total = total + F.cross_entropy(out[:-1].float(), d[1:], reduction="sum")
        count += len(d) - 1
    return logits, total / count


def packed_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "position_ids", "cu_seqlens", "max_seqlen")}


def assert_packed_equals_one_by_one(wrapper, ref, docs, batch, spans):
    """The packed model's logits per document and its mean loss (fp32) equal ``ref`` run on each
    document alone."""
    with torch.no_grad():
        logits = wrapper.logits(**packed_inputs(batch))
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        want_logits, want_loss = per_document(ref, docs)
    for (i, row, start), want in zip(spans, want_logits):
        torch.testing.assert_close(logits[row, start : start + len(docs[i])], want, atol=1e-5, rtol=1e-5)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_equals_one_by_one_fp32(arch, backend, pack, make_docs, tiny_cfg):
    cfg = tiny_cfg(arch=arch, attn_backend=backend)
    model = build_model(cfg, VOCAB, seed=1)
    ref = eager_copy(model)
    wrapper = PackedCausalLM(model, cfg).eval()
    docs = make_docs(LENGTHS, seed=2)
    batch, spans = pack(docs, SEQ_LEN)
    assert batch["input_ids"].shape[0] > 1  # several rows, several documents per row
    assert_packed_equals_one_by_one(wrapper, ref, docs, batch, spans)


def test_comparison_is_sensitive_to_cross_document_attention(pack, make_docs, tiny_cfg):
    # The same packed row run as one ordinary sequence differs: the equality above is not vacuous.
    cfg = tiny_cfg()
    model = build_model(cfg, VOCAB, seed=1)
    ref = eager_copy(model)
    docs = make_docs(LENGTHS, seed=2)
    batch, spans = pack(docs, SEQ_LEN)
    with torch.no_grad():
        naive = ref(input_ids=batch["input_ids"], use_cache=False).logits
        want_logits, _ = per_document(ref, docs)
    i, row, start = next(s for s in spans if s[2] > 0)
    assert (naive[row, start : start + len(docs[i])] - want_logits[i]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_gradients_equal_one_by_one(backend, pack, make_docs, tiny_cfg):
    cfg = tiny_cfg(attn_backend=backend)
    model = build_model(cfg, VOCAB, seed=3)
    ref = eager_copy(model).train()
    wrapper = PackedCausalLM(model, cfg).train()
    docs = make_docs(LENGTHS, seed=4)
    batch, _ = pack(docs, SEQ_LEN)
    wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS}).backward()
    per_document(ref, docs)[1].backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_bf16_weights_packed_close_to_one_by_one(pack, make_docs, tiny_cfg):
    # DeepSpeed's bf16 mode casts the module: packed and one-by-one agree to bf16 precision.
    cfg = tiny_cfg(dtype="bf16")
    model = build_model(cfg, VOCAB, seed=5).to(torch.bfloat16)
    ref = eager_copy(model)
    wrapper = PackedCausalLM(model, cfg).eval()
    docs = make_docs(LENGTHS, seed=6)
    batch, spans = pack(docs, SEQ_LEN)
    for backend in CPU_BACKENDS:
        wrapper.attn_backend = backend
        with torch.no_grad():
            logits = wrapper.logits(**packed_inputs(batch))
            loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
            want_logits, want_loss = per_document(ref, docs)
        assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
        for (i, row, start), want in zip(spans, want_logits):
            got = logits[row, start : start + len(docs[i])].float()
            torch.testing.assert_close(got, want.float(), atol=0.06, rtol=0.05)
        torch.testing.assert_close(loss, want_loss.float(), atol=0.02, rtol=0.01)


def test_bf16_autocast_with_fp32_weights_close_to_fp32(pack, make_docs, tiny_cfg):
    cfg = tiny_cfg(dtype="bf16")
    model = build_model(cfg, VOCAB, seed=7)
    ref = eager_copy(model)
    wrapper = PackedCausalLM(model, cfg).eval()
    docs = make_docs(LENGTHS, seed=8)
    batch, _ = pack(docs, SEQ_LEN)
    with torch.no_grad():
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        want = per_document(ref, docs)[1]
    assert model.lm_head.weight.dtype == torch.float32
    torch.testing.assert_close(loss, want, atol=0.02, rtol=0.01)


def test_chunked_loss_in_model_equals_reference_loss(pack, make_docs, tiny_cfg):
    docs = make_docs(LENGTHS, seed=9)
    batch, _ = pack(docs, SEQ_LEN)
    results = []
    for ce in ("reference", "chunked"):
        cfg = tiny_cfg(ce_backend=ce, ce_chunk_size=7)
        model = build_model(cfg, VOCAB, seed=10)
        wrapper = PackedCausalLM(model, cfg).train()
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, atol=1e-6, rtol=1e-5)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-4, msg=name)


def test_tied_embeddings_and_gradient_checkpointing(pack, make_docs, tiny_cfg):
    docs = make_docs(LENGTHS, seed=11)
    batch, _ = pack(docs, SEQ_LEN)
    results = []
    for ckpt in (False, True):
        cfg = tiny_cfg(tie_word_embeddings=True, gradient_checkpointing=ckpt, ce_backend="chunked")
        model = build_model(cfg, VOCAB, seed=12)
        assert model.lm_head.weight is model.get_input_embeddings().weight
        wrapper = PackedCausalLM(model, cfg).train()
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_large_vocab_tied_embeddings_packed_chunked_equals_one_by_one(backend, pack, make_docs, tiny_cfg):
    """SmolLM2's shape of head: 49,152 tokens, tied to the input embeddings, chunked loss."""
    vocab = 49_152
    docs = make_docs(LENGTHS, seed=21, vocab=vocab)
    assert max(int(d.max()) for d in docs) > 32_767  # ids beyond int16 really occur
    batch, _ = pack(docs, SEQ_LEN)
    cfg = tiny_cfg(tie_word_embeddings=True, ce_backend="chunked", ce_chunk_size=50, attn_backend=backend)
    model = build_model(cfg, vocab, seed=22)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ref = eager_copy(model).train()
    wrapper = PackedCausalLM(model, cfg).train()
    loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
    loss.backward()
    _, want = per_document(ref, docs)
    want.backward()
    torch.testing.assert_close(loss.detach(), want.detach(), atol=1e-5, rtol=1e-5)
    emb, ref_emb = model.get_input_embeddings().weight.grad, ref.get_input_embeddings().weight.grad
    torch.testing.assert_close(emb, ref_emb, atol=1e-6, rtol=1e-4)  # head + input grads, summed once


def test_plain_padded_batches_still_work_after_wrapping(make_docs, tiny_cfg):
    # Evaluation calls the HF model on ordinary left-/right-padded batches with an attention mask.
    cfg = tiny_cfg()
    model = build_model(cfg, VOCAB, seed=13)
    ref = eager_copy(model)
    PackedCausalLM(model, cfg)
    model.eval()
    a, b = make_docs([5, 9], seed=14)
    for side in ("left", "right"):
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        sl = slice(4, 9) if side == "left" else slice(0, 5)
        ids[0, sl], mask[0, sl] = a, 1
        ids[1], mask[1] = b, 1
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            alone = ref(input_ids=a[None]).logits[0]
        torch.testing.assert_close(out.logits[0, sl], alone, atol=1e-5, rtol=1e-5)
        assert out.hidden_states[-1].shape == (2, 9, cfg.hidden_size)


def test_unwrap_restores_plain_model(make_docs, tiny_cfg):
    cfg = tiny_cfg()
    model = build_model(cfg, VOCAB, seed=15)
    wrapper = PackedCausalLM(model, cfg)
    assert isinstance(model.lm_head, PackedLMHead)
    plain = unwrap(wrapper)
    assert plain is model and type(plain.lm_head) is nn.Linear
    assert plain.config._attn_implementation == "sdpa"
    assert set(plain.state_dict()) == set(build_model(cfg, VOCAB).state_dict())


def test_bad_inputs_are_rejected(pack, make_docs, tiny_cfg):
    cfg = tiny_cfg()
    wrapper = PackedCausalLM(build_model(cfg, VOCAB, seed=16), cfg)
    batch, _ = pack(make_docs([10, 10, 10], seed=17), 16)
    args = {k: batch[k] for k in MODEL_INPUT_KEYS}
    crossing = dict(args, cu_seqlens=torch.tensor([0, 10, 20, 32, 48], dtype=torch.int32))
    with pytest.raises(ValueError, match="crosses a row"):
        wrapper(**crossing)
    with pytest.raises(ValueError, match="labels"):
        wrapper(**dict(args, labels=args["labels"][:, :-1]))
    with pytest.raises(ValueError, match="position_ids"):
        wrapper(**dict(args, position_ids=args["position_ids"][:1]))


def test_sliding_window_longer_than_document_is_refused(tmp_path, pack, make_docs, tiny_cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(
        "mistral", vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, sliding_window=8,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path)
    cfg = tiny_cfg(name_or_path=str(tmp_path))
    wrapper = PackedCausalLM(build_model(cfg, VOCAB), cfg)
    short, _ = pack(make_docs([8, 8], seed=18), 16)
    wrapper(**{k: short[k] for k in MODEL_INPUT_KEYS})
    long, _ = pack(make_docs([12, 4], seed=18), 16)
    with pytest.raises(NotImplementedError, match="sliding_window=8"):
        wrapper(**{k: long[k] for k in MODEL_INPUT_KEYS})


def test_opt_folder_model_packed_equals_one_by_one(tmp_path, pack, make_docs, tiny_cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.for_model(
        "opt", vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=32, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(19)
    AutoModelForCausalLM.from_config(conf).save_pretrained(tmp_path)
    cfg = tiny_cfg(name_or_path=str(tmp_path), attn_backend="loop")
    model = build_model(cfg, VOCAB)
    ref = eager_copy(model)
    wrapper = PackedCausalLM(model, cfg).eval()
    docs = make_docs(LENGTHS, seed=20)
    batch, spans = pack(docs, SEQ_LEN)
    assert_packed_equals_one_by_one(wrapper, ref, docs, batch, spans)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("attn,ce", [("flash", "chunked"), ("flash", "liger"), ("flex", "reference")])
def test_packed_model_close_to_one_by_one_on_gpu(pack, make_docs, tiny_cfg, attn, ce):
    """Flash varlen (transformers' flash_attention_2 path) or compiled flex attention, with the
    chunked or Liger loss: a packed batch gives each document's one-by-one logits and loss."""
    from cprec_kernels import flash_available, flex_available, liger_available

    if attn == "flash" and not flash_available():
        pytest.skip("needs flash-attn")
    if attn == "flex" and not flex_available():
        pytest.skip("needs flex_attention")
    if ce == "liger" and not liger_available():
        pytest.skip("needs liger-kernel")
    cfg = tiny_cfg(dtype="bf16", attn_backend=attn, ce_backend=ce)
    model = build_model(cfg, VOCAB, seed=21).to("cuda", torch.bfloat16)
    ref = eager_copy(model)
    wrapper = PackedCausalLM(model, cfg).eval()
    docs = [d.cuda() for d in make_docs(LENGTHS, seed=22)]
    batch, spans = pack([d.cpu() for d in docs], SEQ_LEN)
    batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.no_grad():
        logits = wrapper.logits(**packed_inputs(batch))
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        want_logits, want_loss = per_document(ref, docs)
    for (i, row, start), want in zip(spans, want_logits):
        got = logits[row, start : start + len(docs[i])].float()
        torch.testing.assert_close(got, want.float(), atol=0.06, rtol=0.05)
    torch.testing.assert_close(loss, want_loss.float(), atol=0.02, rtol=0.01)


@pytest.mark.parametrize("field", ["norm_backend", "mlp_backend"])
def test_compiled_norms_and_mlps_in_packed_training_equal_eager(pack, make_docs, tiny_cfg, field):
    # model.norm_backend=compiled routes every RMSNorm (2 per layer + the final one), and
    # model.mlp_backend=compiled every SiLU-gated MLP (one per layer), through the compiled kernel
    # in packed calls; loss and gradients equal the eager model's, and unwrap gives back
    # transformers' own modules.
    docs = make_docs(LENGTHS, seed=21)
    batch, _ = pack(docs, SEQ_LEN)
    grads, losses = [], []
    for backend in ("eager", "compiled"):
        cfg = tiny_cfg(**{field: backend})
        model = build_model(cfg, VOCAB, seed=22)
        wrapper = PackedCausalLM(model, cfg).train()
        routed = [m for m in model.modules() if "forward" in m.__dict__]
        per_model = 2 * cfg.num_layers + 1 if field == "norm_backend" else cfg.num_layers
        assert len(routed) == (per_model if backend == "compiled" else 0)
        loss = wrapper(**{k: batch[k] for k in MODEL_INPUT_KEYS})
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
        unwrap(wrapper)
        assert not [m for m in model.modules() if "forward" in m.__dict__]
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for name, want in grads[0].items():
        torch.testing.assert_close(grads[1][name], want, atol=1e-5, rtol=1e-4, msg=name)
