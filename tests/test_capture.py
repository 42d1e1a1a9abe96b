"""record() on the real all-MiniLM-L6-v2 and on plain SDPA code: dense probs() against independent references.

References: the attentions transformers returns with attn_implementation="eager" and
output_attentions=True; the output of F.scaled_dot_product_attention itself (probs() @ v must give it);
a float64 softmax written out here.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnstats
from attnstats.capture import NothingCapturedWarning, record

SENTENCES = [
    "A cat.",
    "Attention maps of a small sentence encoder, captured without switching it to eager mode.",
    "The quick brown fox jumps over the lazy dog.",
]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    from attnstats.app.models import load_model

    return load_model(attn_implementation="sdpa")


@pytest.fixture(scope="module")
def minilm_eager_attentions(minilm):
    from attnstats.app.models import load_model

    model, tok = minilm
    inputs = tok(SENTENCES, padding=True, return_tensors="pt")
    eager, _ = load_model(attn_implementation="eager")
    with torch.no_grad():
        att = eager(**inputs, output_attentions=True).attentions
    return inputs, att


@pytest.fixture(scope="module")
def minilm_eager_records(minilm_eager_attentions):
    """The eager model's own records, on the same inputs."""
    from attnstats.app.models import load_model

    inputs, _ = minilm_eager_attentions
    eager, _ = load_model(attn_implementation="eager")
    with torch.no_grad(), attnstats.record(eager) as rec:
        eager(**inputs)
    return rec.records


def test_minilm_probs_equal_eager_attentions(minilm, minilm_eager_attentions, minilm_eager_records):
    model, _ = minilm
    inputs, att = minilm_eager_attentions
    assert model.config._attn_implementation == "sdpa"
    lengths = inputs["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 3  # a padded batch of different lengths
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        with attnstats.record(model) as rec:
            out = model(**inputs).last_hidden_state
    assert torch.equal(out, reference)  # bit-identical
    assert len(rec.records) == 6 == len(att)
    for i, r in enumerate(rec.records):
        assert r.name == f"encoder.layer.{i}.attention.self"
        assert r.layer == i and r.call == i
        assert r.q.shape == (3, 12, inputs["input_ids"].shape[1], 32) and r.k.shape == r.q.shape
        assert r.scale == pytest.approx(32**-0.5)
        assert not r.is_causal
        assert r.mask.shape == (3, 1, 1, r.q.shape[2])
        torch.testing.assert_close(r.mask[:, 0, 0], inputs["attention_mask"].bool(), rtol=0, atol=0)
        p = r.probs()
        assert p.dtype == torch.float32 and p.shape == att[i].shape
        # every row, pad-token queries included (BERT lets them attend to the real tokens).
        # The eager model's own record gives its attentions up to the float32 rounding of eager's
        # softmax (a few ulps of 1, 2**-23 = 1.2e-7 each).
        e = minilm_eager_records[i]
        pe = e.probs(dtype=torch.float64)
        assert (pe - att[i].double()).abs().max().item() < 1e-6
        # The sdpa model's q, k differ from the eager model's only by rounding carried through the
        # earlier layers (none in layer 0). Scores moved by at most delta in a row move each probability
        # p of that row by at most p·(exp(2·delta) − 1); 1e-12 covers the float64 arithmetic.
        s, se = r.scores(torch.float64), e.scores(torch.float64)
        delta = torch.where(torch.isfinite(se), (s - se).abs(), 0.0).amax(-1, keepdim=True)
        if i == 0:
            assert delta.max().item() == 0.0
        p64 = r.probs(dtype=torch.float64)
        assert ((p64 - pe).abs() <= pe * torch.expm1(2 * delta) + 1e-12).all()


def test_minilm_layers_selection_and_eager_backend(minilm, minilm_eager_attentions):
    from attnstats.app.models import load_model

    model, _ = minilm
    inputs, att = minilm_eager_attentions
    with torch.no_grad(), attnstats.record(model, layers=[1, "encoder.layer.4.*"]) as rec:
        model(**inputs)
    assert [r.layer for r in rec.records] == [1, 4]
    assert rec.records[1].name == "encoder.layer.4.attention.self"
    assert (rec.records[0].probs() - att[1]).abs().max().item() < 1e-5


def test_minilm_frame_entropy_against_eager(minilm, minilm_eager_attentions):
    model, _ = minilm
    inputs, att = minilm_eager_attentions
    with torch.no_grad(), attnstats.record(model, layers=[0, 5]) as rec:
        model(**inputs)
    df = rec.frame(metrics=("entropy",), batch="each")
    valid = inputs["attention_mask"].bool()
    for r in rec.records:
        p = att[r.layer].double()
        for b in range(3):
            n = int(valid[b].sum())
            pb = p[b][:, :n, :n]  # pad queries and pad keys are absent
            expected = (-(pb * pb.log()).sum(-1)).mean(-1)
            got = df[(df.layer == r.layer) & (df.batch == b)].sort_values("head").value.to_numpy()
            assert got == pytest.approx(expected.numpy(), abs=1e-5)


# ------------------------------------------------------------------------------------------------
# plain SDPA code


class SDPAModule(nn.Module):
    """A user module that calls F.scaled_dot_product_attention with whatever options it is given."""

    def __init__(self, **options):
        super().__init__()
        self.options = options

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.options)


class TwoBlocks(nn.Module):
    def __init__(self, **options):
        super().__init__()
        self.blocks = nn.ModuleList([SDPAModule(**options), SDPAModule(**options)])

    def forward(self, q, k, v):
        x = self.blocks[0](q, k, v)
        return self.blocks[1](x, k, v)


def reference_probs(q, k, attn_mask=None, is_causal=False, scale=None):
    """float64 softmax(scale q kᵀ + mask), written out; rows with no valid key are 0."""
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    nq, nk = s.shape[-2:]
    if is_causal:
        s = s.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(), -math.inf)
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, -math.inf) if attn_mask.dtype == torch.bool else s + attn_mask.double()
    p = torch.softmax(s, -1)
    return torch.nan_to_num(p, nan=0.0)


@pytest.mark.parametrize(
    "case",
    ["plain", "causal", "bool_mask", "additive_bias", "scale", "gqa", "cross"],
)
def test_sdpa_backend_against_sdpa_output(case):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 2, 4, 9, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    options = {}
    if case == "causal":
        options["is_causal"] = True
    elif case == "bool_mask":
        m = torch.rand(b, 1, n, n, generator=g) > 0.3
        m[..., 0] = True
        options["attn_mask"] = m
    elif case == "additive_bias":
        bias = torch.randn(1, h, n, n, generator=g)  # ALiBi-like: finite, kept as bias
        bias[..., -2:] = -math.inf  # and two masked keys
        options["attn_mask"] = bias
    elif case == "scale":
        options["scale"] = 0.37
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        options["enable_gqa"] = True
    elif case == "cross":
        k, v = (torch.randn(b, h, 5, d, generator=g) for _ in range(2))
    model = SDPAModule(**options)
    with attnstats.record(model) as rec:
        out = model(q, k, v)
    (r,) = rec.records
    assert r.backend == "sdpa" and r.name == ""
    assert r.k.shape == (b, h, k.shape[2], d)
    p = r.probs()
    expected = reference_probs(q, k, options.get("attn_mask"), options.get("is_causal", False), options.get("scale"))
    torch.testing.assert_close(p.double(), expected, rtol=0, atol=1e-6)
    # the output the layer produced is exactly the captured attention applied to v
    vv = v.repeat_interleave(h // v.shape[1], dim=1)
    torch.testing.assert_close(p @ vv, out, rtol=0, atol=1e-5)
    if case == "additive_bias":
        assert r.bias is not None and r.mask.shape == (1, 1, 1, n)
    if case == "causal":
        assert r.is_causal and r.mask is None


def test_causal_and_padding_masks_are_normalised():
    b, h, n, d = 2, 2, 6, 4
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    pad = torch.ones(b, n, dtype=torch.bool)
    pad[1, :2] = False  # left padding
    full = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & pad[:, None, None, :]
    additive = torch.zeros(b, 1, n, n).masked_fill(~full, torch.finfo(torch.float32).min)
    for mask in (full, additive):
        model = SDPAModule(attn_mask=mask)
        with attnstats.record(model) as rec:
            out = model(q, k, v)
        (r,) = rec.records
        assert r.is_causal and r.bias is None
        assert r.mask.shape == (b, 1, 1, n) and torch.equal(r.mask[:, 0, 0], pad)
        p = r.probs()
        valid_rows = full.any(-1)  # left-padding rows have no valid key: all 0 in probs()
        assert torch.equal(p.sum(-1) > 0, valid_rows.expand(b, h, n))
        torch.testing.assert_close((p @ v)[valid_rows.expand(b, h, n)], out[valid_rows.expand(b, h, n)], atol=1e-5, rtol=0)


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_cleanup_nested_and_repeated_use():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    model = TwoBlocks()
    for _ in range(2):  # repeated use
        with attnstats.record(model) as outer:
            with attnstats.record(model, layers="blocks.1") as inner:
                model(q, k, v)
            model(q, k, v)
        assert [r.name for r in inner.records] == ["blocks.1"]
        assert [r.name for r in outer.records] == ["blocks.0", "blocks.1"] * 2
        assert [r.layer for r in outer.records] == [0, 1, 0, 1]  # same module, same layer index
        assert torch._C._len_torch_function_stack() == 0
        assert _hooks_left(model) == 0
    torch.testing.assert_close(outer.records[0].probs(), outer.records[2].probs(), rtol=0, atol=0)


class Boom(RuntimeError):
    pass


class Raises(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = SDPAModule()

    def forward(self, q, k, v):
        self.inner(q, k, v)
        raise Boom("forward failed")


def test_cleanup_when_forward_raises():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    model = Raises()
    rec = attnstats.record(model)
    with pytest.raises(Boom):
        with rec:
            model(q, k, v)
    assert len(rec.records) == 1  # what was captured before the error stays
    assert torch._C._len_torch_function_stack() == 0
    assert _hooks_left(model) == 0
    # and the model is usable and recordable again
    with attnstats.record(model.inner) as again:
        model.inner(q, k, v)
    assert len(again.records) == 1 and again.records[0].name == ""


class HandMade(nn.Module):
    """Attention by matmul + softmax: invisible to the sdpa backend."""

    def __init__(self, d=8, heads=2):
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)
        self.heads = heads

    def forward(self, x):
        b, n, d = x.shape
        q, k = self.qk(x).view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1)
        self.last_q, self.last_k = q, k
        return p


def test_nothing_captured_warns_and_module_backend_captures():
    model = HandMade()
    x = torch.randn(2, 5, 8)
    with pytest.warns(NothingCapturedWarning, match="sdpa"):
        with attnstats.record(model, backend="sdpa") as rec:  # backend="auto" records it with "softmax"
            model(x)
    with pytest.raises(ValueError, match="no attention was captured"):
        rec.frame()

    def capture(module, args, kwargs, output):
        if isinstance(module, HandMade):
            return module.last_q, module.last_k, None, False, None
        return None

    with warnings.catch_warnings():
        warnings.simplefilter("error", NothingCapturedWarning)
        with attnstats.record(model, capture=capture) as rec:
            p = model(x)
    (r,) = rec.records
    assert r.backend == "module"
    torch.testing.assert_close(r.probs(), p.detach(), rtol=0, atol=1e-6)


def test_probs_respects_memory_budget():
    q, k, v = (torch.randn(2, 2, 64, 4) for _ in range(3))
    model = SDPAModule()
    with attnstats.record(model) as rec:
        model(q, k, v)
    with attnstats.memory_budget(1024):
        with pytest.raises(attnstats.DenseTooLargeError, match="streaming_stats"):
            rec.records[0].probs()
    # the float32 output fits 64 KiB, but its float64 scores (the largest tensor built) do not
    with attnstats.memory_budget(2 * 2 * 64 * 64 * 4):
        with pytest.raises(attnstats.DenseTooLargeError, match="needs 0.00 GiB"):
            rec.records[0].probs()
    with attnstats.memory_budget(2 * 2 * 64 * 64 * 8):
        assert rec.records[0].probs().shape == (2, 2, 64, 64)


def test_bad_arguments():
    model = SDPAModule()
    with pytest.raises(TypeError, match="model"):
        attnstats.record("not a model")
    with pytest.raises(ValueError, match="backend"):
        attnstats.record(model, backend="flash")
    with pytest.raises(ValueError, match="capture"):
        attnstats.record(model, backend="module")
    with pytest.raises(ValueError, match="store"):
        attnstats.record(model, store="everything")
    with pytest.raises(TypeError, match=r"layers\[1\]"):
        attnstats.record(model, layers=[0, 1.5])
    with pytest.raises(ValueError, match="alongside"):
        attnstats.record(model, store="stats", alongside=["lln"])
