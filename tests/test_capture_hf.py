"""The ``hf`` backend on attention that is more than q, k and a mask (random tiny models, no download).

Each case builds a tiny random transformers model from a small config and checks ``probs()`` of every
record against the model's own eager ``output_attentions`` (or, where those are not the attention the
model applies, against its attention output ``P·V``), with outputs bit-identical with and without
``record``:

- relative position biases passed as ``position_bias=`` (T5, mT5, UMT5, Switch, wav2vec2-BERT,
  wav2vec2-Conformer, Inkling), softcapping and sliding windows;
- attention sinks (GPT-OSS and the other sink models; per-row sinks of Inkling 2; Granite-SWA's
  sinks applied as an output rescaling);
- eager functions under other names (``text_eager_attention_forward``, ...);
- the grouped-query decode step under SDPA, whose query heads transformers packs before SDPA;
- layouts record cannot map: a clear error or warning naming the module.

Tolerance: eager attention runs in float32 (eps 6e-8); the scores here are O(1-10) sums of ≤ 128
products, each carrying ≲ 1e-6 absolute rounding, which moves each probability by at most about that,
while probs() is float64 rounded to float32. 1e-5 leaves a margin of 10; the largest difference measured
on these models is 2.4e-7, while each missing bias or sink is off by 1e-3 to 0.9.
"""
from __future__ import annotations

import sys
import warnings

import pytest
import torch

import attnstats

transformers = pytest.importorskip("transformers")
from transformers import CONFIG_MAPPING, AttentionInterface, AutoModel  # noqa: E402

TOL = 1e-5  # see the module docstring
B, N, DEC = 2, 8, 5

_COMMON = {"vocab_size": 99, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
_T5 = {"d_model": 32, "num_layers": 2, "num_heads": 4, "d_ff": 64, "d_kv": 8, "num_decoder_layers": 2}
_DECODER = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64, "head_dim": 8}
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32, "n_routed_experts": 4}

# model type -> (config kwargs, inputs: "text" / "text+decoder" / "features" / "waveform", padding side)
CONFIGS = {
    "t5": ({**_COMMON, **_T5}, "text+decoder", "right"),
    "mt5": ({**_COMMON, **_T5, "decoder_start_token_id": 0}, "text+decoder", "right"),
    "umt5": ({**_COMMON, **_T5, "decoder_start_token_id": 0}, "text+decoder", "right"),
    "switch_transformers": ({**_COMMON, **_T5, "num_experts": 4}, "text+decoder", "right"),
    "wav2vec2-bert": ({**_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "intermediate_size": 64, "max_source_positions": 32, "tdnn_dim": [32, 32],
                       "tdnn_kernel": [3, 1], "tdnn_dilation": [1, 1], "xvector_output_dim": 32,
                       "feature_projection_input_dim": 32, "conv_depthwise_kernel_size": 3}, "features", "right"),
    "wav2vec2-conformer": ({**_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "intermediate_size": 64, "max_source_positions": 32, "conv_dim": [32, 32],
                            "conv_stride": [4, 4], "conv_kernel": [8, 8], "num_conv_pos_embeddings": 16,
                            "num_conv_pos_embedding_groups": 4, "tdnn_dim": [32, 32], "tdnn_kernel": [3, 1],
                            "tdnn_dilation": [1, 1], "xvector_output_dim": 32}, "waveform", "right"),
    "inkling_text": ({**_COMMON, **_DECODER, **_MOE, "intermediate_size": 64, "n_shared_experts": 1}, "text", "left"),
    "gpt_oss": ({**_COMMON, **_DECODER, "intermediate_size": 64, "num_local_experts": 4,
                 "num_experts_per_tok": 2}, "text", "left"),
    "openai_privacy_filter": ({**_COMMON, **_DECODER, "intermediate_size": 64, "num_local_experts": 4,
                               "num_experts_per_tok": 2}, "text", "right"),
    "flint": ({**_COMMON, **_DECODER, "intermediate_size": 64, "num_experts": 4, "num_experts_per_tok": 2,
               "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32}, "text", "left"),
    "hy_v4": ({**_COMMON, **_DECODER, **_MOE, "intermediate_size": 64, "n_shared_experts": 1, "kv_lora_rank": 16,
               "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "n_group": 1,
               "topk_group": 1}, "text", "left"),
    "mimo_v2_flash": ({**_COMMON, **_DECODER, **_MOE, "intermediate_size": 64, "v_head_dim": 8, "n_group": 1,
                       "topk_group": 1}, "text", "left"),
    "deepseek_v4": ({**_COMMON, **_DECODER, **_MOE, "n_shared_experts": 1, "q_lora_rank": 16}, "text", "left"),
    "inkling2_text": ({**_COMMON, **_DECODER, **_MOE}, "text", "left"),
    "granite_swa": ({**_COMMON, **_DECODER, "intermediate_size": 64}, "text", "left"),
    "tipsv2_text_model": ({**_COMMON, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                           "intermediate_size": 64, "max_position_embeddings": 64}, "text", "right"),
    "gemma2": ({**_COMMON, **_DECODER, "intermediate_size": 64, "sliding_window": 4,
                "attn_logit_softcapping": 1.0}, "text", "left"),
    "mistral": ({**_COMMON, **_DECODER, "intermediate_size": 64, "sliding_window": 4}, "text", "left"),
    "llama": ({**_COMMON, **_DECODER, "intermediate_size": 64}, "text", "left"),
}
POSITION_BIAS = ["t5", "mt5", "umt5", "switch_transformers", "wav2vec2-bert", "wav2vec2-conformer", "inkling_text"]
SINKS = ["gpt_oss", "openai_privacy_filter", "flint", "hy_v4", "mimo_v2_flash", "deepseek_v4", "inkling2_text"]


def build(model_type: str, impl: str = "eager", seed: int = 0, causal_lm: bool = False):
    """``(model, inputs, valid [B, N] bool)``: the tiny model in eval mode and a batch of 2, the second padded."""
    kwargs, kind, side = CONFIGS[model_type]
    config = CONFIG_MAPPING[model_type](**kwargs)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if causal_lm else AutoModel
    model = auto.from_config(config, attn_implementation=impl).eval()
    g = torch.Generator().manual_seed(seed)
    if kind == "waveform":
        n = 1600
        inputs = {"input_values": torch.randn(B, n, generator=g)}
    elif kind == "features":
        n = 16
        inputs = {"input_features": torch.randn(B, n, 32, generator=g)}
    else:
        n = N
        inputs = {"input_ids": torch.randint(5, 99, (B, n), generator=g)}
    valid = torch.ones(B, n, dtype=torch.long)
    pad = n // 4 if kind in ("waveform", "features") else 3
    if side == "left":
        valid[1, :pad] = 0
    else:
        valid[1, n - pad:] = 0
    inputs["attention_mask"] = valid
    if kind == "waveform":
        inputs["input_values"][1, n - pad:] = 0
    if kind == "text+decoder":
        inputs["decoder_input_ids"] = torch.randint(5, 99, (B, DEC), generator=g)
    return model, inputs, valid.bool()


def eager_attentions(out) -> list[torch.Tensor]:
    """The eager attention matrices in call order (encoder, then per decoder layer: self, cross)."""
    if getattr(out, "encoder_attentions", None) is not None:
        dec = [a for pair in zip(out.decoder_attentions, out.cross_attentions) for a in pair]
        return list(out.encoder_attentions) + dec
    return list(out.attentions)


def outputs(out) -> list[torch.Tensor]:
    return [v for k, v in out.items() if isinstance(v, torch.Tensor) and not k.endswith("attentions")]


def eager_functions() -> dict:
    """Every ``*eager_attention_forward`` of the loaded model files and the registry: what record must restore."""
    found = {(m, n): f for m in sorted(sys.modules) if m.startswith("transformers.models.")
             for n, f in list(vars(sys.modules[m]).items()) if n.endswith("eager_attention_forward")}
    return {**found, **{("registry", k): v for k, v in AttentionInterface._global_mapping.items()}}


# Modules whose attention is not over the tokens (no entry in output_attentions), by class-name ending
NOT_TOKEN_ATTENTION = ("BlockAttentionResidual",)


def record_and_compare(model, inputs, reference: list[torch.Tensor], backend: str = "hf"):
    """Record ``model(**inputs)``; check outputs bit-identical and ``probs()`` = ``reference`` on valid rows."""
    before = eager_functions()
    with torch.no_grad():
        plain = outputs(model(**inputs))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # none of these models may give a capture warning
            with attnstats.record(model) as rec:
                recorded = outputs(model(**inputs))
    assert eager_functions() == before
    assert len(plain) == len(recorded) and all(torch.equal(a, b) for a, b in zip(plain, recorded))
    # Inkling 2 also calls SDPA directly, and (from transformers 5.24) its block attention residuals, which
    # attend over the stacked outputs of earlier blocks rather than over tokens, go through the attention
    # interface too: recorded, but not among output_attentions
    modules = dict(model.named_modules())
    records = [r for r in rec.records if r.backend == backend
               and not type(modules[r.name]).__name__.endswith(NOT_TOKEN_ATTENTION)]
    assert len(records) == len(reference)
    for r, ref in zip(records, reference):
        p = r.probs()
        assert p.shape == ref.shape, r
        rows = torch.ones(p.shape[:-1], dtype=torch.bool) if r.query_valid() is None else r.query_valid()
        assert rows.float().mean() >= 0.5
        err = (p - ref).abs()[rows].max().item()
        assert err < TOL, (r.name, err)
    return records


# ---- 1. additive biases passed as arguments, softcapping, sliding windows ----------------------------------

@pytest.mark.parametrize("model_type", POSITION_BIAS)
def test_position_bias_is_in_the_record(model_type):
    model, inputs, _ = build(model_type)
    with torch.no_grad():
        reference = eager_attentions(model(**inputs, output_attentions=True))
    records = record_and_compare(model, inputs, reference)
    assert any(r.bias is not None for r in records)


@pytest.mark.parametrize("model_type", ["t5", "umt5"])
def test_position_bias_under_sdpa(model_type):
    eager, inputs, _ = build(model_type, "eager")
    model, _, _ = build(model_type, "sdpa")
    model.load_state_dict(eager.state_dict())
    with torch.no_grad():
        reference = eager_attentions(eager(**inputs, output_attentions=True))
    records = record_and_compare(model, inputs, reference, backend="sdpa")
    # transformers folds position_bias into SDPA's mask (cross-attention has none: its bias is all zero)
    assert sum(r.bias is not None for r in records) == 4


def test_position_bias_is_folded_with_its_mask():
    # a bias with its own masked entries, added to a float16 mask: masked stays masked, the rest is bias
    from attnstats.capture.hf import _fold_bias
    from attnstats.capture.record import normalize_mask

    mask = torch.zeros(1, 1, 2, 3, dtype=torch.float16)
    mask[..., 2] = torch.finfo(torch.float16).min
    bias = torch.tensor([[0.5, -torch.inf, 1.0], [2.0, 3.0, 4.0]]).reshape(1, 1, 2, 3)
    m, b, _ = normalize_mask(_fold_bias(mask, bias), False, 2, 3)
    assert m.tolist() == [[[[True, False, False], [True, True, False]]]]
    assert b.masked_fill(~m, 0).tolist() == [[[[0.5, 0.0, 0.0], [2.0, 3.0, 0.0]]]]


def test_softcap_and_sliding_window():
    model, inputs, _ = build("gemma2")
    with torch.no_grad():
        reference = eager_attentions(model(**inputs, output_attentions=True))
    records = record_and_compare(model, inputs, reference)
    assert all(r.softcap == 1.0 for r in records)
    # the first layer slides (window 4): the last query sees 4 keys; the second is global causal
    assert records[0].full_mask()[0, 0, -1].sum().item() == 4
    assert records[1].full_mask()[0, 0, -1].sum().item() == N


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_mistral_sliding_window(impl):
    eager, inputs, _ = build("mistral", "eager")
    model, _, _ = build("mistral", impl)
    model.load_state_dict(eager.state_dict())
    with torch.no_grad():
        reference = eager_attentions(eager(**inputs, output_attentions=True))
    records = record_and_compare(model, inputs, reference, backend="hf" if impl == "eager" else "sdpa")
    assert all(r.full_mask()[0, 0, -1].sum().item() == 4 for r in records)


# ---- 2. attention sinks ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", SINKS)
def test_sinks_probs_equal_eager(model_type):
    model, inputs, _ = build(model_type)
    with torch.no_grad():
        reference = eager_attentions(model(**inputs, output_attentions=True))
    records = record_and_compare(model, inputs, reference)
    with_sinks = [r for r in records if r.sinks is not None]
    assert with_sinks
    for r in with_sinks:
        assert r.sinks.dtype == torch.float32 and r.sinks.dim() == 3
        rows = r.query_valid() if r.query_valid() is not None else torch.ones(r.shape[:-1], dtype=torch.bool)
        total = r.probs(dtype=torch.float64).sum(-1)[rows]
        assert total.max().item() < 1 - 1e-3  # the sink takes mass from every valid row
    if model_type == "inkling2_text":  # one sink logit per query row, from the hidden states
        assert with_sinks[0].sinks.shape == with_sinks[0].shape[:3]


def _attention_output(model_type):
    """Eager model, inputs, recorded records and, per attention module, its output ``P·V`` and its V."""
    model, inputs, valid = build(model_type)
    layers = [m for m in model.modules() if hasattr(m, "o_proj") and hasattr(m, "v_proj")]
    seen = {}
    hooks = []
    for i, layer in enumerate(layers):
        hooks.append(layer.v_proj.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("v", i), out)))
        hooks.append(layer.o_proj.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(("o", i), a[0])))
    try:
        with torch.no_grad(), attnstats.record(model) as rec:
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return model, rec.records, seen, valid


@pytest.mark.parametrize("model_type", ["gpt_oss", "granite_swa"])
def test_sinks_weigh_the_values_as_the_model_does(model_type):
    # the attention output the model computes is probs() @ V: for GPT-OSS that is its output_attentions,
    # for Granite-SWA (whose output_attentions leave the sink out) the softmax rescaled by sigmoid(lse - sink)
    model, records, seen, valid = _attention_output(model_type)
    assert len(records) == 2 and all(r.sinks is not None for r in records)
    for i, r in enumerate(records):
        h, d = r.shape[1], r.q.shape[-1]
        v = seen[("v", i)].double().view(B, N, -1, d).transpose(1, 2)
        v = v.repeat_interleave(h // v.shape[1], dim=1)
        expected = (r.probs(dtype=torch.float64) @ v).transpose(1, 2).reshape(B, N, h * d)
        err = (expected - seen[("o", i)].double())[valid].abs().max().item()
        assert err < TOL, err
        assert r.probs(dtype=torch.float64).sum(-1).max().item() < 1


def test_sinks_ignored_by_sdpa_warn_once():
    # transformers' sdpa_attention_forward does not apply s_aux: record what SDPA computed, and say so once
    model, inputs, valid = build("gpt_oss")
    model.config._attn_implementation = "sdpa"
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnstats.record(model) as rec:
            model(**inputs)
    messages = [str(w.message) for w in caught if "record()" in str(w.message)]
    assert len(messages) == 1
    assert "layers.0.self_attn" in messages[0] and "s_aux" in messages[0] and "sdpa" in messages[0]
    assert len(rec.records) == 2 and all(r.sinks is None for r in rec.records)


def test_sinks_in_store_stats_equal_the_dense_path():
    # store="stats" counts the sink as one more key in the streaming pass (LSE' = logaddexp(LSE, sink)):
    # every metric, sink_mass included, equals the frame of the kept q, k. Both are float64 on the CPU
    # from the same float32 q, k; 1e-9 leaves room for the log-normal fit's different summation order.
    model, inputs, _ = build("gpt_oss")
    with torch.no_grad():
        with attnstats.record(model) as dense:
            model(**inputs)
        with attnstats.record(model, store="stats") as streamed:
            model(**inputs)
    metrics = ("entropy", "moments", "lognormal", "sinks")
    a = dense.frame(metrics=metrics).set_index(["call", "head", "metric"]).value
    b = streamed.frame(metrics=metrics).set_index(["call", "head", "metric"]).value
    assert "sink_mass" in set(a.index.get_level_values("metric"))
    assert a.index.equals(b.index)
    assert float((a - b).abs().max()) < 1e-9


def test_sinks_probs_reference():
    # probs() with a per-head sink against a dense float64 softmax over [scores, sink] with the sink dropped
    from attnstats.capture.record import AttentionRecord

    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 3, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    sinks = torch.tensor([0.7, -1.5]).reshape(1, 2, 1)
    mask = torch.tensor([True, True, True, False, True]).reshape(1, 1, 1, 5)
    rec = AttentionRecord("a", 0, q, k, mask, False, 0.5, sinks=sinks)
    s = (q.double() @ k.double().transpose(-1, -2) * 0.5).masked_fill(~mask, -torch.inf)
    full = torch.cat([s, sinks.double()[..., None].expand(1, 2, 3, 1)], -1).softmax(-1)
    assert torch.allclose(rec.probs(dtype=torch.float64), full[..., :5], atol=1e-15, rtol=0)
    assert (rec.probs().sum(-1) < 1).all()


# ---- 3. eager functions under other names ------------------------------------------------------------------------

def test_eager_functions_under_other_names():
    model, inputs, _ = build("tipsv2_text_model")
    with torch.no_grad():
        reference = eager_attentions(model(**inputs, output_attentions=True))
    record_and_compare(model, inputs, reference)  # also checks every *eager_attention_forward is restored


# ---- 4. grouped-query heads under SDPA: the decode step ----------------------------------------------------------

def _twins(model_type, causal_lm=False):
    eager, inputs, _ = build(model_type, "eager", causal_lm=causal_lm)
    sdpa, _, _ = build(model_type, "sdpa", causal_lm=causal_lm)
    sdpa.load_state_dict(eager.state_dict())
    return eager, sdpa, inputs


@pytest.mark.parametrize("model_type", ["llama", "inkling_text"])  # Inkling also packs its per-head bias
def test_gqa_decode_step_keeps_query_heads(model_type):
    eager, model, inputs = _twins(model_type)
    step = {"input_ids": torch.tensor([[7], [9]]),
            "attention_mask": torch.cat([inputs["attention_mask"], torch.ones(B, 1, dtype=torch.long)], 1)}
    with torch.no_grad():
        past = eager(**inputs, use_cache=True).past_key_values
        reference = eager(**step, past_key_values=past, output_attentions=True).attentions
        past = model(**inputs, use_cache=True).past_key_values
        plain = model(**step, past_key_values=past).last_hidden_state
        past = model(**inputs, use_cache=True).past_key_values
        with attnstats.record(model) as rec:
            out = model(**step, past_key_values=past).last_hidden_state
    assert torch.equal(out, plain)
    heads = reference[0].shape[1]
    assert len(rec.records) == len(reference)
    for r, ref in zip(rec.records, reference):
        assert r.shape == (B, heads, 1, N + 1)  # not SDPA's packed [B, Hkv, n_rep, Nk]
        assert (r.probs() - ref).abs().max().item() < TOL


def test_gqa_generate_keeps_query_heads():
    eager, model, inputs = _twins("llama", causal_lm=True)
    kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        ref = eager.generate(**inputs, **kwargs, output_attentions=True, return_dict_in_generate=True)
        plain = model.generate(**inputs, **kwargs)
        with attnstats.record(model) as rec:
            tokens = model.generate(**inputs, **kwargs)
    assert torch.equal(tokens, plain) and torch.equal(tokens, ref.sequences)
    reference = [a for step in ref.attentions for a in step]
    assert len(rec.records) == len(reference) == 3 * 2
    for r, a in zip(rec.records, reference):
        assert r.shape == tuple(a.shape) and r.shape[1] == 4
        rows = torch.ones(r.shape[:-1], dtype=torch.bool) if r.query_valid() is None else r.query_valid()
        assert (r.probs() - a).abs()[rows].max().item() < TOL


@pytest.fixture
def registered():
    """Register attention functions under test names in transformers' registry; remove them afterwards."""
    names = []

    def register(name, fn):
        AttentionInterface.register(name, fn)
        names.append(name)

    yield register
    for name in names:
        AttentionInterface._global_mapping.pop(name, None)


def test_undecidable_query_layout_raises(registered):
    def folded(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # heads folded into the batch before SDPA: not a layout record can map back
        b, h, n, d = query.shape
        k, v = (x.repeat_interleave(h // x.shape[1], 1).reshape(b * h, 1, -1, d) for x in (key, value))
        out = torch.nn.functional.scaled_dot_product_attention(query.reshape(b * h, 1, n, d), k, v, scale=scaling)
        return out.reshape(b, h, n, d).transpose(1, 2), None

    registered("attnstats_test_folded", folded)
    model, inputs, _ = build("llama")
    model.set_attn_implementation("attnstats_test_folded")
    with torch.no_grad(), pytest.raises(ValueError, match=r"layers\.0\.self_attn.*\(8, 1, 8, 8\)"):
        with attnstats.record(model):
            model(**inputs)
    assert eager_functions()[("registry", "attnstats_test_folded")] is folded


# ---- 5. unknown layouts warn, naming the module ------------------------------------------------------------------

def test_unknown_layout_warns_once(registered):
    def flat(module, query, key, value, attention_mask, scaling=None, **kwargs):
        # [B*H, N, d] tensors, as some custom functions take them: no [B, H, N, d] record can be made
        p = torch.softmax(query @ key.transpose(-1, -2) * scaling, dim=-1)
        return p @ value, p

    registered("attnstats_test_flat", flat)
    model, _, _ = build("llama")
    module = model.layers[0].self_attn
    x = torch.randn(8, 5, 8)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with attnstats.record(model) as rec:
            fn = AttentionInterface._global_mapping["attnstats_test_flat"]
            for _ in range(2):
                out, _ = fn(module, x, x, x, None, scaling=0.5)
    assert torch.equal(out, flat(module, x, x, x, None, scaling=0.5)[0])
    messages = [str(w.message) for w in caught if "is not recorded" in str(w.message)]
    assert len(messages) == 1
    assert "layers.0.self_attn" in messages[0] and "(8, 5, 8)" in messages[0] and "[B, H, Nq, d]" in messages[0]
    assert rec.records == []  # (and the block says nothing was captured)
