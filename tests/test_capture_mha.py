"""record() on torch.nn.MultiheadAttention (fast path included) and nn.TransformerEncoder.

References: the per-head weights MultiheadAttention returns with need_weights=True,
average_attn_weights=False; outputs compared bit for bit with and without record.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnstats


def _weights(mha, q, k, v, **kw):
    with torch.no_grad():
        return mha(q, k, v, need_weights=True, average_attn_weights=False, **kw)[1]


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("grad", [False, True])  # no_grad + eval: the fast path; with grad: the slow path
def test_mha_key_padding(batch_first, grad):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    x = torch.randn(3, 7, 16)
    if not batch_first:
        x = x.transpose(0, 1)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, 5:] = True
    kpm[2, 3:] = True
    with torch.set_grad_enabled(grad):
        reference = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        with attnstats.record(mha) as rec:
            out = mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
    assert torch.equal(out, reference)
    assert _hooks(mha) == 0 and torch._C._len_torch_function_stack() == 0
    (r,) = rec.records
    assert r.backend == "mha" and r.name == "" and r.q.shape == (3, 4, 7, 4)
    assert torch.equal(r.mask[:, 0, 0], ~kpm)
    w = _weights(mha, x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(r.probs(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mask_kind", ["bool_causal", "float"])
def test_mha_attn_mask_cross_attention_and_extra_keys(mask_kind):
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(16, 2, batch_first=True, kdim=8, vdim=8, add_bias_kv=True, add_zero_attn=True).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 5, 8)
    if mask_kind == "bool_causal":
        am = torch.ones(5, 5, dtype=torch.bool).triu(1)  # True = not allowed
    else:
        am = torch.randn(5, 5)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    with torch.no_grad(), attnstats.record(mha) as rec:
        mha(q, kv, kv, attn_mask=am, key_padding_mask=kpm)
    (r,) = rec.records
    assert r.k.shape == (2, 2, 7, 8)  # 5 keys + bias_k + zero key
    torch.testing.assert_close(r.probs(), _weights(mha, q, kv, kv, attn_mask=am, key_padding_mask=kpm), rtol=0, atol=1e-6)


def test_mha_inside_a_model_with_names_and_causal_hint():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.ModuleList([nn.MultiheadAttention(8, 2, batch_first=True) for _ in range(2)])

        def forward(self, x):
            n = x.shape[1]
            causal = nn.Transformer.generate_square_subsequent_mask(n)
            for a in self.attn:
                x = x + a(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
            return x

    torch.manual_seed(2)
    model = Decoder().eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        reference = model(x)
        with attnstats.record(model) as rec:
            out = model(x)
    assert torch.equal(out, reference)
    assert [r.name for r in rec.records] == ["attn.0", "attn.1"]
    assert all(r.is_causal and r.mask is None for r in rec.records)
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    torch.testing.assert_close(rec.records[0].probs(), _weights(model.attn[0], x, x, x, attn_mask=causal), rtol=0, atol=1e-6)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_fast_path(nested, norm_first):
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=nested).eval()
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    with torch.no_grad():
        reference = enc(x, src_key_padding_mask=kpm)
        with attnstats.record(enc) as rec:
            out = enc(x, src_key_padding_mask=kpm)
    same = torch.equal(out, reference) if not out.is_nested else torch.equal(
        out.to_padded_tensor(0.0), reference.to_padded_tensor(0.0)
    )
    assert same
    assert all("forward" not in m.__dict__ for m in enc.modules())
    assert _hooks(enc) == 0
    assert [r.name for r in rec.records] == ["layers.0.self_attn", "layers.1.self_attn"]
    # reference: the first layer's attention weights on its (normalised) input
    l0 = enc.layers[0]
    with torch.no_grad():
        h = l0.norm1(x) if norm_first else x
    w = _weights(l0.self_attn, h, h, h, key_padding_mask=kpm)
    valid = ~kpm[:, None, :, None]
    torch.testing.assert_close(rec.records[0].probs() * valid, w * valid, rtol=0, atol=1e-5)


def test_sdpa_backend_alone_keeps_mha_fast_path():
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        reference = mha(x, x, x, need_weights=False)[0]
        with pytest.warns(attnstats.NothingCapturedWarning, match="sdpa"):
            with attnstats.record(mha, backend="sdpa"):
                out = mha(x, x, x, need_weights=False)[0]
    assert torch.equal(out, reference)
