"""patch(model) on Hugging Face transformers models built from tiny configs (no weights): BERT,
GPT-2 and Llama (grouped key / value heads). Patched vs unpatched: the same outputs in eval
(with padding), the same losses and parameters over several optimizer steps in fp32 (tight),
bf16 within twice transformers' own error against an fp64 copy; unpatch restores bit-identical
outputs; state_dicts load both ways; the report; the attention implementation registered for
from_pretrained; the loss hook with num_items_in_batch; torch.compile and autocast."""

import copy

import pytest
import torch

import lmkernels
from lmkernels.testing import assert_accurate

transformers = pytest.importorskip("transformers", reason="transformers is not installed")
from transformers import (  # noqa: E402
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

transformers.logging.set_verbosity_error()
V = 64


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2))  # fmt: skip


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, attn_pdrop=0.0,
        resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=1, eos_token_id=2))  # fmt: skip


def _bert_config():
    return BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip


def _bert_mlm():
    return BertForMaskedLM(_bert_config())


def _bert_cls():
    return BertForSequenceClassification(_bert_config())


MODELS = {"llama": _llama, "gpt2": _gpt2, "bert_mlm": _bert_mlm, "bert_cls": _bert_cls}


def _batch(name, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0  # right padding in one row
    if name == "bert_cls":
        labels = torch.tensor([0, 1, 1])
    else:
        labels = ids.clone()
        labels[mask == 0] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def _make(name, dtype=torch.float32):
    torch.manual_seed(0)
    return MODELS[name]().to(dtype)


def _out(model, batch):
    out = model(**batch)
    return out.logits, out.loss


# ------------------------------------------------------------------------------- eval / train


@pytest.mark.parametrize("name", list(MODELS))
def test_eval_outputs_agree_and_unpatch_is_bitwise(name):
    model = _make(name).eval()
    batch = _batch(name)
    with torch.no_grad():
        before = _out(model, batch)
        report = lmkernels.patch(model)
        assert any("attn_implementation" in d for _, _, d in report.replaced), str(report)
        patched = _out(model, batch)
        # padded positions may hold any value; a classifier has one row per sequence
        keep = batch["attention_mask"].bool() if name != "bert_cls" else slice(None)
        torch.testing.assert_close(patched[0][keep], before[0][keep], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(patched[1], before[1], rtol=1e-5, atol=1e-6)
        assert lmkernels.unpatch(model) >= 1
        after = _out(model, batch)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert model.config._attn_implementation == "sdpa"
    assert "_loss_function" not in model.__dict__


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_model_trains_like_the_original_fp32(name):
    ref = _make(name).train()
    model = copy.deepcopy(ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # made before the patch
    lmkernels.patch(model)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        batch = _batch(name, seed=step)
        losses = []
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            o.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert_mlm"])
def test_bf16_training_within_twice_transformers_error(name):
    """Two SGD steps in bf16, patched and not, against the same steps in fp64: the losses and
    the updated parameters of the patched model are within twice the unpatched model's error
    (the suite's 2x rule)."""
    oracle = _make(name, torch.float64).train()
    base = copy.deepcopy(oracle).to(torch.bfloat16)
    ours = copy.deepcopy(base)
    lmkernels.patch(ours)
    models = (ours, base, oracle)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in models]
    for step in range(2):
        batch = _batch(name, seed=step)
        losses = []
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            loss = m(**batch).loss
            loss.backward()
            o.step()
            losses.append(loss.detach().double())
        assert_accurate(losses[0], losses[1], losses[2], torch.bfloat16, f"{name} loss {step}")
    for (n, p), q, r in zip(ours.named_parameters(), base.parameters(), oracle.parameters(),
                            strict=True):  # fmt: skip
        assert_accurate(p.detach(), q.detach(), r.detach(), torch.bfloat16, f"{name} {n}")


# ------------------------------------------------------------------------- report and state


def test_report_lists_what_was_replaced_and_left():
    model = _llama()
    report = lmkernels.patch(model)
    replaced = {d for _, _, d in report.replaced}
    kinds = [c for _, c, _ in report.replaced]
    assert kinds.count("LlamaRMSNorm") == 2 * 2 + 1, str(report)  # 2 per layer, final norm
    assert kinds.count("Embedding") == 1
    assert "attn_implementation 'sdpa' -> 'lmkernels'" in replaced
    assert "loss_function -> lmkernels.hf.causal_lm_loss" in replaced
    again = lmkernels.patch(model)
    assert not again.replaced and any("already" in d for _, _, d in again.left)
    lmkernels.unpatch(model)
    assert type(model.model.norm).__name__ == "LlamaRMSNorm"
    assert type(model.model.norm) is transformers.models.llama.modeling_llama.LlamaRMSNorm

    only = lmkernels.patch(_llama(), ops=["rms_norm"])
    assert {c for _, c, _ in only.replaced} == {"LlamaRMSNorm"}
    assert any("'embedding' is not in ops" in d for _, _, d in only.left)


def test_gemma_rms_norm_is_left_with_the_reason():
    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=1, head_dim=8))  # fmt: skip
    report = lmkernels.patch(model)
    left = [(c, d) for _, c, d in report.left if c == "GemmaRMSNorm"]
    assert len(left) == 3 and all("Gemma's 1 + weight" in d for _, d in left), str(report)
    assert not any(c == "GemmaRMSNorm" for _, c, _ in report.replaced)
    batch = _batch("llama")
    ref = copy.deepcopy(model)
    lmkernels.unpatch(ref)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).loss, ref(**batch).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "bert_cls"])
def test_state_dict_round_trips_both_ways(name):
    a, b = _make(name), _make(name)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.5)
    lmkernels.patch(a)
    sd = a.state_dict()
    assert sd.keys() == b.state_dict().keys()
    b.load_state_dict(sd)  # patched -> unpatched
    a.load_state_dict(_make(name).state_dict())  # unpatched -> patched
    for x, y in zip(a.state_dict().values(), _make(name).state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_backend_is_honoured_by_attention_norms_and_loss(monkeypatch):
    from lmkernels import backends

    seen = set()
    real = backends.selected_backend

    def spy():
        b = real()
        seen.add(b)
        return b

    monkeypatch.setattr(backends, "selected_backend", spy)
    model = _llama()
    lmkernels.patch(model, backend="reference")
    seen.clear()
    model(**_batch("llama")).loss.backward()
    assert seen == {"reference"}, seen


# ------------------------------------------------------- transformers' own entry points


def test_from_pretrained_with_attn_implementation_lmkernels(tmp_path):
    import lmkernels.hf

    lmkernels.hf.register()
    _llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="lmkernels").eval()
    assert model.config._attn_implementation == "lmkernels"
    ref = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    batch = _batch("llama")
    calls = []
    real = lmkernels.functional.scaled_dot_product_attention
    lmkernels.hf.LF.scaled_dot_product_attention = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        with torch.no_grad():
            got = model(**batch).logits
    finally:
        lmkernels.hf.LF.scaled_dot_product_attention = real
    assert len(calls) == 2  # one per layer
    with torch.no_grad():
        keep = batch["attention_mask"].bool()
        torch.testing.assert_close(got[keep], ref(**batch).logits[keep], rtol=1e-5, atol=1e-5)


def test_generate_with_a_cache_matches_sdpa():
    """Prefill with a padding mask, then one-token decoding steps through the cache."""
    model = _llama().eval()
    ref = copy.deepcopy(model)
    lmkernels.patch(model)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as for generation
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_loss_hook_respects_num_items_in_batch():
    """Gradient accumulation: the loss is the sum over the micro-batch / num_items_in_batch,
    as transformers' own loss."""
    model, ref = _make("llama"), _make("llama")
    lmkernels.patch(model, ops=["cross_entropy"])
    batch = _batch("llama")
    for n in (None, torch.tensor(40), 17):
        got = model(**batch, num_items_in_batch=n).loss
        want = ref(**batch, num_items_in_batch=n).loss
        assert got.dtype == want.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_causal_lm_loss_keeps_16_bit_logits_and_returns_fp32():
    import lmkernels.hf

    logits = torch.randn(2, 5, V).bfloat16().requires_grad_()
    labels = torch.randint(0, V, (2, 5))
    ours = lmkernels.hf.causal_lm_loss(logits, labels, V)
    (g,) = torch.autograd.grad(ours, logits)
    from transformers.loss.loss_utils import ForCausalLMLoss

    want = ForCausalLMLoss(logits, labels, V)
    (wg,) = torch.autograd.grad(want, logits)
    assert ours.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g, wg)


# ------------------------------------------------------------------ compile and autocast


def test_patched_model_under_torch_compile():
    model = _llama().train()
    ref = copy.deepcopy(model)
    lmkernels.patch(model)
    compiled = torch.compile(model)  # inductor
    batch = _batch("llama")
    loss = compiled(**batch).loss
    loss.backward()
    ref_loss = ref(**batch).loss
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=n: f"{n}: {m}")  # fmt: skip


def test_patched_model_under_autocast():
    """bf16 autocast on the CPU: the patched model's loss and gradients are within twice the
    unpatched autocast model's error against the fp32 model."""
    oracle = _llama().train()
    base, ours = copy.deepcopy(oracle), copy.deepcopy(oracle)
    lmkernels.patch(ours)
    batch = _batch("llama")
    results = []
    for m, amp in ((ours, True), (base, True), (oracle, False)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = m(**batch).loss
        loss.backward()
        results.append((loss.detach().double(), [p.grad.double() for p in m.parameters()]))
    assert_accurate(results[0][0], results[1][0], results[2][0], torch.bfloat16, "loss")
    for i, (n, _) in enumerate(ours.named_parameters()):
        assert_accurate(results[0][1][i], results[1][1][i], results[2][1][i], torch.bfloat16,
                        f"grad {n}")  # fmt: skip
