"""The ``softmax`` backend: attention a module computes by hand, recorded from its softmax as P only.

References are independent of attnstats: the model's own eager ``output_attentions`` (a second forward
of the same model), the validity of each entry read from the input's ``attention_mask`` and from where
that eager P is non-zero, and float64 numpy statistics of the eager P.
"""
import math
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnstats
from attnstats.capture import NothingCapturedWarning

transformers = pytest.importorskip("transformers")

B, N, PAD = 2, 8, 3  # the second row of every batch has PAD padding tokens

# Tiny configs (transformers 5.23), one per architecture whose modeling file computes softmax(scores)
# itself: name -> (config kwargs, decoder?, attention module path of layer i). From transformers 5.24
# GPT-J and CodeGen go through the attention interface instead (`computes_by_hand`), and are then
# recorded by the `hf` backend, with q and k.
MODELS = {
    "gpt_neo": (  # layer 0 global, layer 1 local: a window of 4 keys (a mask that is not causal + padding)
        dict(vocab_size=99, hidden_size=32, intermediate_size=64, max_position_embeddings=64, num_layers=2, num_heads=4,
             pad_token_id=1, bos_token_id=0, eos_token_id=2, attention_types=[[["global", "local"], 1]], window_size=4),
        True, "h.{}.attn.attention"),
    "gptj": (
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=64, pad_token_id=1, bos_token_id=0,
             eos_token_id=2, rotary_dim=4),
        True, "h.{}.attn"),
    "bloom": (  # ALiBi through baddbmm's input, softmax in float32
        dict(vocab_size=99, hidden_size=32, n_layer=2, n_head=4, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        True, "h.{}.self_attention"),
    "codegen": (  # the mask is added before the scaling: masked scores are finfo.min/sqrt(d), not finfo.min
        dict(vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_ctx=64, n_inner=64, bos_token_id=0,
             eos_token_id=2, rotary_dim=4),
        True, "h.{}.attn"),
    "falcon": (  # eager: q@kᵀ/√d + mask in the module's forward
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             pad_token_id=1, bos_token_id=0, eos_token_id=2),
        True, "h.{}.self_attention"),
    "xlnet": (  # bidirectional, -1e30 masks, and pad tokens attend themselves
        dict(vocab_size=99, d_model=32, n_layer=2, n_head=4, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        False, "layer.{}.rel_attn"),
    "deberta-v2": (  # bmm on [B·H, N, d], disentangled position terms, masked_fill(finfo.min)
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2, relative_attention=True,
             pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16),
        False, "encoder.layer.{}.attention.self"),
    "roformer": (
        dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=64, embedding_size=32, pad_token_id=1, bos_token_id=0, eos_token_id=2),
        False, "encoder.layer.{}.attention.self"),
}
MIXTRAL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
               pad_token_id=1, bos_token_id=0, eos_token_id=2)
CASES = [(name, side) for name, (_, decoder, _) in MODELS.items() for side in (("left", "right") if decoder else ("right",))]


def build(model_type: str, config: dict, side: str):
    """(model in eval mode, eager attention, seeded; inputs: input_ids [2, 8] + attention_mask, row 1 padded)."""
    cfg = transformers.CONFIG_MAPPING[model_type](**config)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(cfg, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    if side == "left":
        mask[1, :PAD] = 0
    else:
        mask[1, N - PAD:] = 0
    return model, {"input_ids": ids.masked_fill(mask == 0, 1), "attention_mask": mask}


def computes_by_hand(model) -> bool:
    """Whether the installed transformers' modeling file of ``model`` computes softmax(scores) itself (it
    defines no ``eager_attention_forward`` for the attention interface)."""
    return not hasattr(sys.modules[type(model).__module__], "eager_attention_forward")


def tensors(out) -> list:
    return [v for v in out.to_tuple() if isinstance(v, torch.Tensor)]


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture(scope="module")
def runs():
    """Per case: the model's eager attentions and outputs, and the records and outputs of a recorded forward."""
    out = {}
    for name, side in CASES:
        config, decoder, path = MODELS[name]
        model, inputs = build(name, config, side)
        with torch.no_grad():
            plain = tensors(model(**inputs))
            attentions = model(**inputs, output_attentions=True).attentions
            # transformers (5.24) keeps hooks of its own for output_attentions once asked: not attnstats'
            hooks = hooks_left(model)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # no warning at all: every layer's layout is read
                with attnstats.record(model) as rec:
                    recorded = tensors(model(**inputs))
        out[name, side] = dict(model=model, inputs=inputs, plain=plain, recorded=recorded, rec=rec,
                               attentions=attentions, decoder=decoder, path=path, hooks=hooks)
    return out


@pytest.mark.parametrize("name, side", CASES)
def test_every_layer_is_recorded_and_outputs_are_bit_identical(runs, name, side):
    run = runs[name, side]
    rec = run["rec"]
    assert [r.name for r in rec.records] == [run["path"].format(i) for i in range(2)]
    if computes_by_hand(run["model"]):
        assert all(r.backend == "softmax" and r.q is None and r.k is None and not r.has_qk for r in rec.records)
    else:  # through the attention interface: q and k are recorded
        assert all(r.backend == "hf" and r.has_qk for r in rec.records)
    assert len(run["plain"]) == len(run["recorded"])
    assert all(torch.equal(a, b) for a, b in zip(run["plain"], run["recorded"]))
    assert hooks_left(run["model"]) == run["hooks"] and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("name, side", CASES)
def test_probs_and_mask_equal_the_eager_attention(runs, name, side):
    run = runs[name, side]
    real = run["inputs"]["attention_mask"].bool()  # [B, N], True = token
    for r, eager in zip(run["rec"].records, run["attentions"]):
        assert r.shape == tuple(eager.shape) == (B, 4, N, N)
        # valid entries, independently of attnstats: a real query, and a key the model gave weight to
        # (no genuine score of these tiny models is ~100 below its row's largest, so P > 0 exactly there)
        valid = real[:, None, :, None] & (eager > 0)
        assert torch.equal(r.stats_mask().expand(B, 4, N, N), valid)
        local = name == "gpt_neo" and r.layer == 1  # a window of 4 keys: not causal + padding
        assert r.is_causal == (run["decoder"] and not local)
        rows = real[:, None, :, None].expand(B, 4, N, N)
        # probs() is a float32 copy of the softmax output of the module, and output_attentions returns
        # the same softmax of a second, identical forward: equal up to one float32 rounding of a
        # probability ≤ 1 (2**-24), were the two forwards to round once differently (measured: 0)
        torch.testing.assert_close(r.probs()[rows], eager[rows], rtol=0, atol=2**-24)
        assert bool((r.probs()[~r.full_mask()] == 0).all())  # masked entries, and rows of no valid key, are 0


@pytest.mark.parametrize("name", ["xlnet", "deberta-v2"])
def test_attention_mask_passed_by_position_masks_the_pad_queries_too(runs, name):
    # XLNet lets pad tokens attend themselves: only the model call's attention_mask says they are pads,
    # and forward(input_ids, attention_mask) may get it by position
    run = runs[name, "right"]
    inputs = run["inputs"]
    with torch.no_grad(), attnstats.record(run["model"]) as rec:
        run["model"](inputs["input_ids"], inputs["attention_mask"])
    assert len(rec.records) == len(run["rec"].records) == 2
    for by_position, by_keyword in zip(rec.records, run["rec"].records):
        assert torch.equal(by_position.stats_mask().expand(B, 4, N, N), by_keyword.stats_mask().expand(B, 4, N, N))
        assert not bool(by_position.stats_mask().expand(B, 4, N, N)[1, :, N - PAD:].any())  # the pad rows


@pytest.mark.parametrize("name, side", [("bloom", "left"), ("deberta-v2", "right"), ("gpt_neo", "right"), ("xlnet", "right")])
def test_statistics_from_p_equal_numpy_on_the_eager_attention(runs, name, side):
    """frame() of a P-only record: entropy, moments and spectral gap from P; no temperature rows."""
    run = runs[name, side]
    df = run["rec"].frame(batch="each")
    assert set(df.metric) == {"entropy", "spectral_gap", "p_mean", "p_var", "logp_mean", "logp_var", "lognormal_mu",
                              "lognormal_sigma", "lognormal_ks", "lognormal_ks_pvalue", "lognormal_ad",
                              "lognormal_skew", "lognormal_excess_kurtosis"}  # no temperature: it needs q, k
    real = run["inputs"]["attention_mask"].bool().numpy()
    for call, eager in enumerate(run["attentions"]):
        p = eager.double().numpy()
        for b in range(B):
            tok = np.flatnonzero(real[b])
            for h in range(4):
                block = p[b, h][np.ix_(tok, tok)]  # the real tokens: the model gives pad keys no weight
                block = block / block.sum(-1, keepdims=True)  # attnstats renormalises each valid row
                nz = block > 0
                entropy = -(block[nz] * np.log(block[nz])).sum() / len(tok)
                eig = np.sort(np.abs(np.linalg.eigvals(block)))[::-1]
                logp = np.log(block[nz])
                got = df[(df["call"] == call) & (df["batch"] == b) & (df["head"] == h)].set_index("metric").value
                # float64 on both sides, from the same float32 P: rounding only (sums of ≤ 64 terms)
                assert got["entropy"] == pytest.approx(entropy, rel=1e-12, abs=1e-12)
                assert got["p_mean"] == pytest.approx(block[nz].mean(), rel=1e-12)
                assert got["logp_mean"] == pytest.approx(logp.mean(), rel=1e-12)
                assert got["logp_var"] == pytest.approx(logp.var(), rel=1e-9, abs=1e-15)
                # eigenvalues of an 8×8 (or 5×5) matrix: LAPACK on both sides, backward-stable to ~1e-15
                assert got["spectral_gap"] == pytest.approx(1 - eig[1], abs=1e-10)


def test_store_stats_computes_the_same_numbers_from_p_and_keeps_no_p(runs):
    run = runs["bloom", "left"]
    with torch.no_grad(), attnstats.record(run["model"], store="stats") as rec:
        run["model"](**run["inputs"])
    assert [r.p is None and r.stats is not None for r in rec.records] == [True, True]
    assert "store=stats" in repr(rec.records[0])
    metrics = ("entropy", "spectral_gap", "lognormal", "moments")
    a = rec.frame(metrics=metrics, batch="each")
    b = run["rec"].frame(metrics=metrics, batch="each")
    assert a.equals(b)  # the same function on the same P


def test_p_only_record_says_so_and_refuses_what_needs_q_k(runs):
    r = runs["gpt_neo", "left"]["rec"].records[0]  # computes softmax itself (transformers 5.23 and 5.24)
    text = repr(r)
    assert "store=p" in text and "d=None" in text and "backend='softmax'" in text
    assert r.p.dtype == torch.float32 and r.p.shape == (B, 4, N, N)
    assert math.isnan(r.scale) and r.sigma_q is None and r.sigma_k is None
    with pytest.raises(ValueError, match=r"scores\(\) needs q and k, but this record holds only P"):
        r.scores()
    with pytest.raises(ValueError, match=r"probs\(kernel=...\) needs q and k"):
        r.probs(kernel="lln")
    p = r.probs()
    p.zero_()  # a copy: the record is unchanged
    assert r.probs().sum() > 0
    assert runs["gpt_neo", "left"]["rec"].frame(metrics="temperature").empty


def test_kernels_alongside_skip_p_only_records(runs):
    run = runs["roformer", "right"]
    with torch.no_grad(), attnstats.record(run["model"], alongside=["lln"]) as rec:
        run["model"](**run["inputs"])
    df = rec.frame(metrics="entropy")
    assert set(df.kernel) == {"softmax"} and len(df) == 2 * 4  # 2 layers × 4 heads, no lln rows (no q, k)


def test_moe_router_softmax_is_not_recorded():
    """Mixtral: its eager attention goes through transformers' registry, its routers softmax [tokens, experts]."""
    model, inputs = build("mixtral", MIXTRAL, "left")
    with torch.no_grad():
        reference = tensors(model(**inputs))
        attentions = model(**inputs, output_attentions=True).attentions
        with attnstats.record(model) as auto:  # hf records the eager function; softmax must not again
            out = tensors(model(**inputs))
        with attnstats.record(model, backend="softmax") as alone:  # the eager function's softmax, the routers'
            model(**inputs)
    assert all(torch.equal(a, b) for a, b in zip(reference, out))
    paths = ["layers.0.self_attn", "layers.1.self_attn"]
    assert [(r.name, r.backend) for r in auto.records] == [(p, "hf") for p in paths]
    assert [(r.name, r.backend) for r in alone.records] == [(p, "softmax") for p in paths]
    real = inputs["attention_mask"].bool()[:, None, :, None].expand(B, 4, N, N)
    for r, eager in zip(alone.records, attentions):
        torch.testing.assert_close(r.probs()[real], eager[real], rtol=0, atol=2**-24)  # as above: the same softmax


class RoutedAttention(nn.Module):
    """Attention by hand, next to two softmaxes of the same shapes that are not attention."""

    def __init__(self, d=8, heads=2, n=6):
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)
        self.heads = heads
        self.router = nn.Linear(d, n)  # logits [B, N, N]: a router over N = 6 experts
        self.gate = nn.Parameter(torch.randn(heads, d, n))  # [B, 1, N, d] @ gate: [B, H, N, n], from a weight

    def forward(self, x):
        b, n, d = x.shape
        q, k = self.qk(x).view(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), -1)
        routed = F.softmax(self.router(x), dim=-1)
        gated = (x[:, None] @ self.gate).softmax(-1)
        return p, routed, gated


def test_only_the_softmax_of_a_product_of_activations_is_recorded():
    torch.manual_seed(0)
    model = RoutedAttention().eval()
    x = torch.randn(2, 6, 8)
    with torch.no_grad():
        reference = model(x)
        with attnstats.record(model) as rec:
            out = model(x)
    assert all(torch.equal(a, b) for a, b in zip(reference, out))
    (r,) = rec.records
    assert (r.name, r.backend, r.shape, r.mask, r.is_causal) == ("", "softmax", (2, 2, 6, 6), None, False)
    assert torch.equal(r.probs(), reference[0])  # the module's own P, copied


class BmmAttention(nn.Module):
    """[B·H, N, N] scores by bmm (fairseq style), an additive key-padding mask of finfo.min."""

    def __init__(self, d=8, heads=2, head_attribute="num_heads"):
        super().__init__()
        self.qk = nn.Linear(d, 2 * d)
        self.h = heads
        if head_attribute:
            setattr(self, head_attribute, heads)

    def forward(self, x, pad):
        b, n, d = x.shape
        q, k = self.qk(x).view(b, n, 2, self.h, d // self.h).permute(2, 0, 3, 1, 4).reshape(2, b * self.h, n, d // self.h)
        s = torch.bmm(q, k.transpose(1, 2)) * (d // self.h) ** -0.5
        s = (s.view(b, self.h, n, n) + pad[:, None, None, :] * torch.finfo(s.dtype).min).view(b * self.h, n, n)
        return F.softmax(s, dim=-1)


class Outer(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = BmmAttention(**kwargs)

    def forward(self, x, pad):
        return self.attn(x, pad)


@pytest.mark.parametrize("head_attribute", ["num_heads", "n_head"])
def test_bmm_layout_is_split_with_the_module_head_count(head_attribute):
    torch.manual_seed(1)
    model = Outer(head_attribute=head_attribute).eval()
    x, pad = torch.randn(2, 5, 8), torch.tensor([[0.0] * 5, [0.0] * 3 + [1.0] * 2])
    with torch.no_grad(), attnstats.record(model) as rec:
        p = model(x, pad)
    (r,) = rec.records
    assert r.name == "attn" and r.shape == (2, 2, 5, 5)
    keys = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    assert torch.equal(r.mask, keys[:, None, None, :]) and not r.is_causal  # key padding, read from the scores
    torch.testing.assert_close(r.probs(), p.view(2, 2, 5, 5), rtol=0, atol=0)


def test_unknown_layout_warns_once_naming_the_module_and_records_nothing():
    model = Outer(head_attribute=None).eval()
    x, pad = torch.randn(2, 5, 8), torch.zeros(2, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), attnstats.record(model) as rec:
            model(x, pad)
            model(x, pad)
    layout = [str(w.message) for w in caught if "layout cannot be decided" in str(w.message)]
    assert len(layout) == 1 and "'attn'" in layout[0] and "no head count" in layout[0] and "capture=fn" in layout[0]
    assert any(issubclass(w.category, NothingCapturedWarning) for w in caught)
    assert rec.records == []


class HeadsOnAxisTwo(nn.Module):
    num_heads = 2

    def forward(self, q, k):  # [B, N, H, d] each: scores [B, Nq, H, Nk]
        return torch.einsum("bqhd,bkhd->bqhk", q, k).softmax(-1)


def test_heads_on_the_wrong_axis_are_refused_not_guessed():
    q, k = torch.randn(2, 5, 2, 4), torch.randn(2, 5, 2, 4)
    with pytest.warns(UserWarning, match=r"heads on axis 2"):
        with torch.no_grad(), attnstats.record(HeadsOnAxisTwo()) as rec:
            HeadsOnAxisTwo()(q, k)
    assert rec.records == []


class Fails(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = RoutedAttention()

    def forward(self, x):
        self.inner(x)
        raise RuntimeError("boom")


def test_hooks_and_modes_are_removed_when_the_forward_raises():
    model = Fails().eval()
    x = torch.randn(2, 6, 8)
    rec = attnstats.record(model)
    with pytest.raises(RuntimeError, match="boom"), torch.no_grad(), rec:
        model(x)
    assert [r.name for r in rec.records] == ["inner"]  # what was captured before the error stays
    assert hooks_left(model) == 0 and torch._C._len_torch_function_stack() == 0
    with torch.no_grad(), attnstats.record(model.inner) as again:
        model.inner(x)
    assert [r.name for r in again.records] == [""]


def test_auto_picks_softmax_unless_a_capture_function_is_given():
    model = RoutedAttention()
    assert "softmax" in attnstats.record(model).backends
    assert attnstats.record(model, capture=lambda *a: None).backends == ("sdpa", "module")
    assert attnstats.record(model, backend="softmax").backends == ("softmax",)


def test_capture_probs_checks_its_arguments():
    rec = attnstats.record(RoutedAttention())
    with pytest.raises(ValueError, match=r"p: expected float probabilities \[B, H, Nq, Nk\], got shape \(2, 3, 3\)"):
        rec.capture_probs("x", torch.zeros(2, 3, 3), backend="softmax")
    with pytest.raises(TypeError, match="attn_mask: expected None or a bool tensor"):
        rec.capture_probs("x", torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), backend="softmax")


class MatMul(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


class ChildOps(nn.Module):
    """The product in one child module, the softmax in another (SqueezeBERT's MatMulWrapper and nn.Softmax)."""

    num_attention_heads = 2

    def __init__(self):
        super().__init__()
        self.matmul_qk = MatMul()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k):
        return self.softmax(self.matmul_qk(q, k.transpose(-1, -2)) / 2.0)


def test_record_is_named_after_the_module_holding_product_and_softmax():
    model = nn.Sequential(ChildOps())
    q, k = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
    with torch.no_grad(), attnstats.record(model) as rec:
        p = model[0](q, k)
    (r,) = rec.records
    assert r.name == "0" and torch.equal(r.probs(), p)


class DeadSoftmaxThenSDPA(nn.Module):
    """SAM2's multi-scale attention: a softmax over heads per token that is never used, then SDPA."""

    num_heads = 2

    def forward(self, q, k, v):  # [B, N, H, d] each
        unused = (q @ k.transpose(-2, -1)).softmax(-1)  # [B, N, H, H]: heads on axis 2 when N != H
        del unused
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))


@pytest.mark.parametrize("n", [2, 5])  # N = H: the dead softmax looks like [B, H, N, N]; N != H: heads on axis 2
def test_a_module_another_backend_captured_in_the_same_forward_is_not_recorded_again(n):
    q, k, v = (torch.randn(2, n, 2, 4) for _ in range(3))
    model = DeadSoftmaxThenSDPA()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no layout warning for the dead softmax
        with torch.no_grad(), attnstats.record(model) as rec:
            model(q, k, v)
    assert [(r.name, r.backend) for r in rec.records] == [("", "sdpa")]


def test_a_capture_function_and_the_softmax_backend_record_a_module_once():
    model = RoutedAttention().eval()
    x = torch.randn(2, 6, 8)

    def capture(module, args, kwargs, output):
        if module is model:
            return torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), None, False, None
        return None

    with torch.no_grad(), attnstats.record(model, backend=["module", "softmax"], capture=capture) as rec:
        model(x)
    assert [(r.name, r.backend) for r in rec.records] == [("", "module")]
