"""record() on random-initialised transformers models built from small configs (no download).

For each model, under attn_implementation "sdpa" and "eager": outputs bit-identical with and without
record, every record's probs() equal to the attentions the eager model returns (output_attentions),
and no hook, mode or registry entry left afterwards.
"""
from __future__ import annotations

import sys

import pytest
import torch

import attnstats

transformers = pytest.importorskip("transformers")
from transformers.modeling_utils import AttentionInterface  # noqa: E402

B, N = 2, 10


def _ids():
    return torch.randint(0, 100, (B, N), generator=torch.Generator().manual_seed(1))


def _right_padding():
    m = torch.ones(B, N, dtype=torch.long)
    m[1, 7:] = 0
    return m


def _left_padding():
    m = torch.ones(B, N, dtype=torch.long)
    m[1, :3] = 0
    return m


def bert(impl):
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100,
        attn_implementation=impl,
    )
    return transformers.BertModel(cfg), dict(input_ids=_ids(), attention_mask=_right_padding()), _right_padding()


def gpt2(impl):
    cfg = transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=32, bos_token_id=0, eos_token_id=0,
        attn_implementation=impl,
    )
    return transformers.GPT2Model(cfg), dict(input_ids=_ids(), attention_mask=_left_padding()), _left_padding()


def llama_gqa(impl):
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        vocab_size=100, max_position_embeddings=32, attn_implementation=impl,
    )
    return transformers.LlamaModel(cfg), dict(input_ids=_ids(), attention_mask=_right_padding()), _right_padding()


def llama_gqa_unpadded(impl):
    # no padding mask: transformers' sdpa path uses is_causal=True with enable_gqa=True
    model, _, _ = llama_gqa(impl)
    return model, dict(input_ids=_ids()), torch.ones(B, N, dtype=torch.long)


def vit(impl):
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16,
        patch_size=4, attn_implementation=impl,
    )
    pixels = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return transformers.ViTModel(cfg), dict(pixel_values=pixels), torch.ones(B, 17, dtype=torch.long)


MODELS = {"bert": bert, "gpt2": gpt2, "llama_gqa": llama_gqa, "llama_gqa_unpadded": llama_gqa_unpadded, "vit": vit}
CAUSAL = {"gpt2", "llama_gqa", "llama_gqa_unpadded"}


@pytest.fixture(scope="module")
def built():
    out = {}
    for name, make in MODELS.items():
        models = {}
        for impl in ("sdpa", "eager"):
            torch.manual_seed(0)
            model, inputs, valid = make(impl)
            models[impl] = model.eval()
        with torch.no_grad():
            att = models["eager"](**inputs, output_attentions=True).attentions
        out[name] = (models, inputs, valid.bool(), att)
    return out


def _hooks(model):
    """Every forward hook of the model (transformers installs its own for output_attentions: kept as they were)."""
    return [(id(m), list(m._forward_hooks), list(m._forward_pre_hooks)) for m in model.modules()]


def _registry_snapshot():
    files = {m: getattr(sys.modules[m], "eager_attention_forward", None) for m in sorted(sys.modules)
             if m.startswith("transformers.models.") and m.endswith(".modeling_" + m.split(".")[-2])}
    return dict(AttentionInterface._global_mapping), files


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_probs_equal_eager_attentions(built, name, impl):
    models, inputs, valid, att = built[name]
    model = models[impl]
    before = _registry_snapshot()
    with torch.no_grad():
        reference = model(**inputs).last_hidden_state
        hooks = _hooks(model)
        with attnstats.record(model) as rec:
            out = model(**inputs).last_hidden_state
    assert torch.equal(out, reference)
    assert _registry_snapshot() == before
    assert _hooks(model) == hooks
    assert torch._C._len_torch_function_stack() == 0
    assert len(rec.records) == len(att) == 2
    heads = model.config.num_attention_heads
    for i, r in enumerate(rec.records):
        assert r.layer == i
        assert r.backend == ("sdpa" if impl == "sdpa" else "hf")
        assert r.q.shape[1] == r.k.shape[1] == heads  # grouped-query heads expanded
        assert r.is_causal == (name in CAUSAL)
        p = r.probs()
        assert p.shape == att[i].shape
        # query rows of pad tokens: eager gives a uniform row where every key is masked, probs() gives 0
        rows = valid[:, None, :, None].expand_as(p)
        diff = (p - att[i]).abs().masked_fill(~rows, 0)
        assert diff.max().item() < 1e-5, (name, impl, i)
    if name.startswith("llama"):
        assert "self_attn" in rec.records[0].name


def test_hf_backend_alone_and_names(built):
    models, inputs, valid, att = built["gpt2"]
    with torch.no_grad(), attnstats.record(models["sdpa"], backend="hf") as rec:
        models["sdpa"](**inputs)
    assert [r.name for r in rec.records] == ["h.0.attn", "h.1.attn"]
    assert all(r.backend == "hf" for r in rec.records)
    for i, r in enumerate(rec.records):
        rows = valid[:, None, :, None].expand_as(att[i])
        assert ((r.probs() - att[i]).abs().masked_fill(~rows, 0)).max().item() < 1e-5


def test_hf_eager_restored_after_exception(built):
    models, inputs, _, _ = built["bert"]
    model = models["eager"]
    before = _registry_snapshot()
    hooks = _hooks(model)

    class Stop(Exception):
        pass

    def fail(module, args, output):
        raise Stop

    handle = model.encoder.layer[1].register_forward_hook(fail)
    try:
        with pytest.raises(Stop), attnstats.record(model) as rec:
            model(**inputs)
    finally:
        handle.remove()
    assert len(rec.records) == 2  # both layers' attention ran before the hook raised
    assert _registry_snapshot() == before
    assert _hooks(model) == hooks
