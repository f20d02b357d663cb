"""patch(model) / unpatch(model) on plain torch models: identity of parameters and buffers,
outputs and training agree with the unpatched model, unpatch restores it bit for bit, the
report is accurate."""

import copy

import pytest
import torch

import lmkernels
import lmkernels.nn as LN
from lmkernels.testing import assert_accurate


class TinyLM(torch.nn.Module):
    """Embedding -> TransformerEncoder (MHA + LayerNorm, pre-norm) -> RMSNorm -> head, with a
    CrossEntropyLoss module: every kind patch() knows except Softmax / LogSoftmax."""

    def __init__(self, vocab=50, d=32, heads=4, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d, padding_idx=0)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True,
                                                 norm_first=True)  # fmt: skip
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.RMSNorm(d)
        self.head = torch.nn.Linear(d, vocab)
        self.loss = torch.nn.CrossEntropyLoss(ignore_index=-100)

    def forward(self, ids, targets, pad):
        mask = torch.nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        h = self.encoder(self.emb(ids), mask=mask, src_key_padding_mask=pad, is_causal=True)
        logits = self.head(self.norm(h))
        return self.loss(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class MySoftmax(torch.nn.Softmax):
    def forward(self, x):
        return super().forward(x) * 2


def _batch(gen):
    ids = torch.randint(1, 50, (3, 11), generator=gen)
    targets = torch.randint(0, 50, (3, 11), generator=gen)
    pad = torch.zeros(3, 11, dtype=torch.bool)
    pad[1, 8:] = True
    targets[pad] = -100
    return ids, targets, pad


def test_patched_model_trains_like_the_original():
    torch.manual_seed(0)
    ref = TinyLM()
    model = copy.deepcopy(ref)
    params = {n: p for n, p in model.named_parameters()}
    # SGD: Adam would turn the rounding noise of gradients that are 0 in exact arithmetic (the
    # key bias: softmax ignores a per-row constant) into whole steps of lr
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # made before the patch
    report = lmkernels.patch(model)
    assert {n: p for n, p in model.named_parameters()}.items() == params.items()  # same objects
    assert len(report.replaced) == 1 + 2 * 3 + 1 + 1  # emb, 2 x (attn + 2 norms), norm, loss
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        batch = _batch(gen)
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = m(*batch)
            loss.backward()
            o.step()
            m.last_loss = loss.detach()
        torch.testing.assert_close(model.last_loss, ref.last_loss, rtol=1e-5, atol=1e-6)
    for (n, p), (_, rp) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, rp, rtol=1e-4, atol=1e-5, msg=n)
    model.eval(), ref.eval()
    with torch.no_grad():
        batch = _batch(gen)
        torch.testing.assert_close(model(*batch), ref(*batch), rtol=1e-5, atol=1e-6)


def _train(models, steps, lr=0.05, amp=None):
    """SGD steps of each model on the same batches; per model the losses and its parameters."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in models]
    gen = torch.Generator().manual_seed(5)
    losses = [[] for _ in models]
    for _ in range(steps):
        batch = _batch(gen)
        for i, (m, o) in enumerate(zip(models, opts, strict=True)):
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp is not None and amp[i]):
                loss = m(*batch)
            loss.backward()
            o.step()
            losses[i].append(loss.detach().double())
    return [torch.stack(v) for v in losses]


def test_bf16_training_within_twice_torchs_error():
    """Three SGD steps in bf16, patched and not, against the same steps in fp64: losses and
    parameters of the patched model within twice the unpatched model's error."""
    torch.manual_seed(0)
    oracle = TinyLM().double()
    base = copy.deepcopy(oracle).to(torch.bfloat16)
    ours = copy.deepcopy(base)
    lmkernels.patch(ours)
    ours_l, base_l, oracle_l = _train((ours, base, oracle), 3)
    assert_accurate(ours_l, base_l, oracle_l, torch.bfloat16, "losses")
    for (n, p), q, r in zip(ours.named_parameters(), base.parameters(), oracle.parameters(),
                            strict=True):  # fmt: skip
        assert_accurate(p.detach(), q.detach(), r.detach(), torch.bfloat16, n)


def test_patched_model_under_autocast():
    """CPU bf16 autocast: losses within twice the unpatched autocast model's error against
    the fp32 model."""
    torch.manual_seed(0)
    oracle = TinyLM()
    base, ours = copy.deepcopy(oracle), copy.deepcopy(oracle)
    lmkernels.patch(ours)
    ours_l, base_l, oracle_l = _train((ours, base, oracle), 2, amp=(True, True, False))
    assert_accurate(ours_l, base_l, oracle_l, torch.bfloat16, "autocast losses")


def test_patched_model_under_torch_compile():
    torch.manual_seed(0)
    ref = TinyLM()
    model = copy.deepcopy(ref)
    lmkernels.patch(model)
    compiled = torch.compile(model, backend="aot_eager")  # inductor: test_patch_hf
    ours_l, ref_l = _train((compiled, ref), 2)
    torch.testing.assert_close(ours_l, ref_l, rtol=1e-5, atol=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=n)


def test_unpatch_restores_bitwise_behaviour_and_state_dicts_round_trip():
    torch.manual_seed(0)
    model = TinyLM().eval()
    batch = _batch(torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(*batch)
    keys = list(model.state_dict())
    lmkernels.patch(model)
    assert isinstance(model.encoder.layers[0].self_attn, LN.MultiheadAttention)
    assert list(model.state_dict()) == keys
    other = TinyLM()
    lmkernels.patch(other)
    other.load_state_dict(model.state_dict())  # patched <- patched
    plain = TinyLM()
    plain.load_state_dict(other.state_dict())  # unpatched <- patched
    assert lmkernels.unpatch(model) == 9
    assert type(model.encoder.layers[0].norm1) is torch.nn.LayerNorm
    assert not any(k.startswith("_lmk") for m in model.modules() for k in vars(m))
    with torch.no_grad():
        assert torch.equal(model(*batch), before)
        assert torch.equal(plain.eval()(*batch), before)


def test_report_names_what_was_left_and_why():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), MySoftmax(-1), torch.nn.Softmax(-1),
                                torch.nn.Linear(8, 8))  # fmt: skip
    report = lmkernels.patch(model, ops=["softmax"])
    assert [r[0] for r in report.replaced] == ["2"]
    left = {r[0]: r[2] for r in report.left}
    assert "not in ops" in left["0"]
    assert "subclass of torch.nn.Softmax" in left["1"]
    assert "3" not in left  # Linear: nothing to patch, not listed
    again = lmkernels.patch(model)
    assert [r[0] for r in again.replaced] == ["0"]
    assert {r[0]: r[2] for r in again.left}["2"] == "already patched"
    assert "replaced 0" in str(again)
    x = torch.randn(2, 8)
    F = torch.nn.functional
    want = F.softmax(MySoftmax(-1)(F.layer_norm(x, (8,))), -1)
    torch.testing.assert_close(model(x), F.linear(want, model[3].weight, model[3].bias))


def test_backend_argument_runs_the_patched_modules_there(monkeypatch):
    seen = []
    real = LN.F.layer_norm

    def spy(*args, **kwargs):
        seen.append(lmkernels.selected_backend())
        return real(*args, **kwargs)

    monkeypatch.setattr(LN.F, "layer_norm", spy)
    norm = torch.nn.LayerNorm(6)
    lmkernels.patch(norm, backend="reference")
    with lmkernels.use_backend("cpu"):
        y = norm(torch.randn(4, 6))
    assert seen == ["reference"]
    assert y.shape == (4, 6)
    lmkernels.unpatch(norm)
    assert type(norm) is torch.nn.LayerNorm and not hasattr(norm, "_lmk_backend")


@pytest.mark.parametrize(
    "call,exc,words",
    [
        (lambda: lmkernels.patch("model"), TypeError, "model"),
        (lambda: lmkernels.patch(torch.nn.LayerNorm(3), ops=["layernorm"]), ValueError, "ops"),
        (lambda: lmkernels.patch(torch.nn.LayerNorm(3), backend="gpu"), ValueError, "backend"),
    ],
)
def test_bad_arguments(call, exc, words):
    with pytest.raises(exc, match=words):
        call()
