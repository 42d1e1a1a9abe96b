"""use_kernel: run the packaged MiniLM (BERT, 6 layers × 12 heads, d = 32) with attnstats kernels."""
import pytest
import torch

pytest.importorskip("transformers")

import attnstats  # noqa: E402
from attnstats.app.models import load_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["a short sentence", "a much longer sentence, with several more tokens in it than the first"]


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_model()
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert bool((enc["attention_mask"] == 0).any())  # the batch is padded
    return model, tok, enc


def hidden(model, enc):
    with torch.no_grad():
        return model(**enc).last_hidden_state


def test_lln_swap_changes_outputs_and_restores_them_bit_for_bit(minilm):
    model, _, enc = minilm
    before = hidden(model, enc)
    impl = model.config._attn_implementation
    with attnstats.use_kernel(model, "lln") as swap:
        assert len(swap.kernels) == 6 and model.config._attn_implementation == "attnstats"
        swapped = hidden(model, enc)
    assert bool(torch.isfinite(swapped).all())
    assert (swapped - before).abs().max() > 0.1
    assert model.config._attn_implementation == impl
    assert torch.equal(hidden(model, enc), before)
    assert not any(n.endswith("attnstats_kernel") for n, _ in model.named_modules())


def test_softmax_swap_reproduces_the_model(minilm):
    """The softmax kernel through the registry gives SDPA's numbers, and eager attention's within
    float32 rounding (an independent implementation in transformers)."""
    model, _, enc = minilm
    before = hidden(model, enc)
    with attnstats.use_kernel(model, "softmax"):
        swapped = hidden(model, enc)
    torch.testing.assert_close(swapped, before, rtol=0, atol=1e-6)
    eager, _ = load_model(attn_implementation="eager")
    torch.testing.assert_close(swapped, hidden(eager, enc), rtol=1e-4, atol=1e-4)


def test_swap_respects_padding(minilm):
    """Real tokens of the short sentence give the same output alone and in the padded batch, so
    the padding mask reaches the kernel."""
    model, tok, enc = minilm
    alone = tok(TEXTS[:1], return_tensors="pt")
    n = alone["input_ids"].shape[1]
    # LLN's α, β come from the whole q, k tensors (as in the paper's implementation), so they depend
    # on the batch: compare kernels whose features do not
    for name, kwargs in (("performer", {}), ("lln_diag", {"moment_matching": False})):
        with attnstats.use_kernel(model, name, **kwargs):
            batch = hidden(model, enc)[0, :n]
            single = hidden(model, alone)[0]
        torch.testing.assert_close(batch, single, rtol=0, atol=1e-4)
    # without the mask the padded tokens would be attended to and the outputs would differ
    with attnstats.use_kernel(model, "lln_no_mm"):
        unmasked = dict(enc)
        unmasked["attention_mask"] = torch.ones_like(enc["attention_mask"])
        assert (hidden(model, unmasked)[0, :n] - hidden(model, alone)[0]).abs().max() > 1e-2


def test_learnable_lln_diag_trains_and_is_removed(minilm):
    model, _, enc = minilm
    n_params = sum(p.numel() for p in model.parameters())
    swap = attnstats.use_kernel(model, "lln_diag", mode="learnable_ratio")
    try:
        added = sum(p.numel() for p in model.parameters()) - n_params
        assert added == 6 * 12 * 32  # one [heads, head_dim] ratio per layer
        out = model(**enc).last_hidden_state
        out.pow(2).mean().backward()
        grads = [k.r.grad for k in swap.kernels.values()]
        assert all(g is not None and bool(torch.isfinite(g).all()) and g.abs().sum() > 0 for g in grads)
    finally:
        swap.restore()
        model.zero_grad(set_to_none=True)
    assert sum(p.numel() for p in model.parameters()) == n_params
    swap.restore()  # a second restore does nothing


def test_swap_bad_input(minilm):
    model, _, _ = minilm
    with pytest.raises(ValueError, match=r"name: unknown kernel 'flash'"):
        attnstats.use_kernel(model, "flash")
    with pytest.raises(TypeError, match=r"kernel: expected a kernel name"):
        attnstats.use_kernel(model, 3)
    with pytest.raises(TypeError, match=r"model: expected a transformers PreTrainedModel"):
        attnstats.use_kernel(torch.nn.Linear(2, 2), "lln")
    with attnstats.use_kernel(model, "lln"):
        with pytest.raises(ValueError, match=r"model: an attnstats kernel is already swapped in"):
            attnstats.use_kernel(model, "relu")
    assert model.config._attn_implementation != "attnstats"


def test_additive_float_masks_are_read_as_padding():
    """transformers may hand an additive float mask (0 = attend, dtype min = masked); the swap reads
    it as a bool mask and refuses real attention biases."""
    from attnstats.kernels.swap import attnstats_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    keep = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    keep[0, ..., 7:] = False
    additive = torch.zeros(2, 1, 1, 10).masked_fill(~keep, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.attnstats_kernel = attnstats.get_kernel("lln")
    out, weights = attnstats_attention(module, q, k, v, additive)
    assert weights is None and out.shape == (2, 10, 3, 8)
    torch.testing.assert_close(out, attnstats.get_kernel("lln")(q, k, v, mask=keep).transpose(1, 2))
    with pytest.raises(ValueError, match="additive attention bias"):
        attnstats_attention(module, q, k, v, additive + 0.5)


def test_causal_model_with_shared_key_heads_and_left_padding():
    """A random-init Llama (causal, 4 query heads sharing 2 key heads), left-padded batch: the
    softmax kernel reproduces SDPA exactly, LLN runs, and restoring is exact."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
                      intermediate_size=128, vocab_size=100)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12))
    am = torch.ones(2, 12, dtype=torch.long)
    am[0, :3] = 0
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=am).logits
        with attnstats.use_kernel(model, "softmax") as swap:
            assert len(swap.kernels) == 2
            soft = model(input_ids=ids, attention_mask=am).logits
        with attnstats.use_kernel(model, "lln"):
            lln = model(input_ids=ids, attention_mask=am).logits
        after = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(soft[1], base[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(soft[0, 3:], base[0, 3:], rtol=0, atol=1e-6)
    assert bool(torch.isfinite(lln).all()) and (lln - base).abs().max() > 1e-3
    assert torch.equal(after, base)
