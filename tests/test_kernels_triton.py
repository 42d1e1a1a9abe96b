"""The fused Triton kernels of LLN and of the block softmax of LLN+Diag against dense float64 references,
on the CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the checks run in a fresh interpreter with
the variable set. Sizes are small (the interpreter runs each program in Python) but not multiples of the
tiles, with several programs per head, so the tile masks and the partial sums are exercised. bf16 is
checked on the GPU (benchmarks/lln_gpu.py, part `agreement`): the interpreter has no bf16 arithmetic.
"""
import json
import textwrap

import pytest
import torch
from helpers import run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import json, math, torch
    from attnstats.kernels import BlockDiagonalAttention, LLNAttention, LLNPlusDiagAttention, block_diagonal_triton, lln_triton
    from attnstats.kernels.linear import causal_log_space, linear_attention

    assert lln_triton.available(torch.zeros(1))
    out = {}

    def rel(a, ref):
        return float((a.double() - ref).abs().max() / ref.abs().max())

    def dense(q, k, v, alpha, beta, causal):
        # float64 LLN from its definition: P ∝ Σ_l exp(αq_il + βk_jl), rows normalised
        w = torch.exp(alpha * q[..., :, None, :] + beta * k[..., None, :, :]).sum(-1)  # [B, H, N, M]
        if causal:
            w = w.tril()
        return (w / w.sum(-1, keepdim=True)) @ v

    g = torch.Generator().manual_seed(0)
    worst = {"out": 0.0, "grad": 0.0, "sigma": 0.0}
    # (b, h, n, m, d, dv, causal, dtype): ragged tiles, N != M, d not a power of two, d_v != d
    for b, h, n, m, d, dv, causal, dt in [
        (1, 2, 150, 150, 32, 32, False, torch.float32),
        (2, 1, 70, 130, 24, 16, False, torch.float32),
        (1, 2, 150, 150, 32, 32, True, torch.float32),
        (2, 1, 97, 97, 20, 40, True, torch.float32),
        (1, 1, 1, 1, 16, 16, True, torch.float32),
        (1, 2, 80, 80, 16, 16, True, torch.float16),
        (1, 2, 80, 80, 16, 16, False, torch.float16),
    ]:
        q = (torch.randn(b, h, n, d, generator=g) * 0.9).to(dt).requires_grad_()
        k = (torch.randn(b, h, m, d, generator=g) * 1.3 + 0.2).to(dt).requires_grad_()
        v = torch.randn(b, h, m, dv, generator=g).to(dt).requires_grad_()
        st = lln_triton.moments(q, k, v, spread=causal)
        for s, x in ((st.sigma_q, q), (st.sigma_k, k)):
            worst["sigma"] = max(worst["sigma"], abs(s / float(x.detach().double().std()) - 1))
        if causal:
            ref_spread = float((k.detach().double().amax(-2) - k.detach().double().amin(-2)).amax())
            assert abs(st.spread - ref_spread) <= 1e-6 * ref_spread, (st.spread, ref_spread)
        assert st.v_finite
        alpha, beta = 0.8 / st.sigma_q, 0.8 / st.sigma_k
        fn = lln_triton.lln_causal if causal else lln_triton.lln_noncausal
        o = fn(q, k, v, alpha, beta, 0.0, st)
        assert o.dtype == dt and o.shape == (b, h, n, dv)
        go = torch.randn(b, h, n, dv, generator=g)
        grads = torch.autograd.grad(o, (q, k, v), go.to(dt))
        qd, kd, vd = (x.detach().double().requires_grad_() for x in (q, k, v))
        ref = dense(qd, kd, vd, alpha, beta, causal)
        refs = torch.autograd.grad(ref, (qd, kd, vd), go.double())
        tag = "half" if dt == torch.float16 else "out"
        worst[tag] = max(worst.get(tag, 0.0), rel(o.detach(), ref.detach()))
        # relative to the largest entry of the whole gradient (q, k, v together): with one token dq and
        # dk are 0 exactly and the kernels' are rounding, ~1e-8 of dv
        scale = max(float(want.abs().max()) for want in refs)
        key = "half_grad" if dt == torch.float16 else "grad"
        for got, want in zip(grads, refs):
            worst[key] = max(worst.get(key, 0.0), float((got.double() - want).abs().max()) / scale)
    out["worst"] = worst

    # long calls: more programs per head, their partial states summed by torch.sum between the kernels
    # (the thresholds lowered so that it happens at test sizes)
    lln_triton.WIDE_FROM_TOKENS, lln_triton._SUMMED_IN_KERNEL = 0, 1
    q = torch.randn(2, 2, 200, 16, generator=g).requires_grad_()
    k = torch.randn(2, 2, 200, 16, generator=g).requires_grad_()
    v = torch.randn(2, 2, 200, 24, generator=g).requires_grad_()
    st = lln_triton.moments(q, k, v)
    assert lln_triton._splits(4, 200, 64, q.device) > 1 and st.split == 1  # several programs, partials summed
    o = lln_triton.lln_noncausal(q, k, v, 0.6, 0.7, 0.0, st)
    go = torch.randn(2, 2, 200, 24, generator=g)
    grads = torch.autograd.grad(o, (q, k, v), go)
    xs = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = dense(*xs, 0.6, 0.7, False)
    refs = torch.autograd.grad(ref, xs, go.double())
    scale = max(float(r.abs().max()) for r in refs)
    out["wide"] = [rel(o.detach(), ref.detach())] + [float((a.double() - b).abs().max()) / scale for a, b in zip(grads, refs)]
    lln_triton.WIDE_FROM_TOKENS, lln_triton._SUMMED_IN_KERNEL = 32768, 16

    # the module path: LLNAttention sends a call here when lln_triton.applies (CUDA only, so forced here)
    # (forced for float32 CPU tensors here; the float64 references below take the PyTorch path)
    lln_triton.applies = lambda q, k, v, mask: mask is None and q.dtype == torch.float32
    calls = []
    for name in ("lln_causal", "lln_noncausal"):
        def counted(*a, _f=getattr(lln_triton, name), _n=name):
            diag = a[7] if len(a) > 7 else None
            calls.append(_n + ("" if diag is None else "+diag" if diag[3] is None else "+block"))
            return _f(*a)
        setattr(lln_triton, name, counted)
    q, k, v = (torch.randn(1, 2, 90, 16, generator=g, dtype=torch.float32) for _ in range(3))
    mod = {}
    for causal in (False, True):
        for mm in (True, False):
            got = LLNAttention(moment_matching=mm)(q, k, v, causal=causal)
            want = LLNAttention(moment_matching=mm)(q.double(), k.double(), v.double(), causal=causal)
            mod[f"lln causal={causal} mm={mm}"] = rel(got, want)
        got = LLNPlusDiagAttention()(q, k, v, causal=causal)
        want = LLNPlusDiagAttention()(q.double(), k.double(), v.double(), causal=causal)
        mod[f"lln_diag causal={causal}"] = rel(got, want)
    out["module"] = mod
    out["calls"] = list(calls)
    calls.clear()

    # keys spread past the float32 underflow limit: the PyTorch log-space path, still exact
    kw = k.clone()
    kw[0, 0, 5, 3] = 400.0
    got = LLNAttention(moment_matching=False)(q, kw, v, causal=True)
    want = LLNAttention(moment_matching=False)(q.double(), kw.double(), v.double(), causal=True)
    out["spread"] = rel(got, want)
    out["spread_calls"] = list(calls)

    # the block softmax, alone and as LLN+Diag's weighted sum (every mode: the learnable weights get
    # gradients), against the PyTorch path in float64; blocks not dividing N, d_v != d
    block_diagonal_triton.applies = lambda q, k, v, mask, block: mask is None and q.dtype == torch.float32
    real_fuses = lln_triton.fuses_diag  # half precision only on a GPU; the rule is tested apart, below
    lln_triton.fuses_diag = lambda q, v, block, causal: real_fuses(q.half(), v, block, causal)
    real_block = block_diagonal_triton.block_diagonal

    def counted_block(*a, **kw):
        calls.append("block_with_base" if kw.get("base") is not None else "block")
        return real_block(*a, **kw)

    block_diagonal_triton.block_diagonal = counted_block
    diag = {}
    # (blocks of 64 tokens are the LLN kernels' tiles: the block softmax runs inside them)
    for n, d, dv, block in ((70, 16, 16, None), (45, 20, 24, 12), (150, 16, 24, 64)):
        qb, kb = (torch.randn(2, 2, n, d, generator=g) for _ in range(2))
        vb = torch.randn(2, 2, n, dv, generator=g)
        go = torch.randn(2, 2, n, dv, generator=g)
        for causal in (False, True):
            kinds = [("block_diag", BlockDiagonalAttention(block=block))]
            for mode in ("average", "learnable_scale", "learnable_ratio"):
                kinds.append((mode, LLNPlusDiagAttention(mode, num_heads=2, head_dim=dv, block=block)))
            for name, kern in kinds:
                for p in kern.parameters():
                    with torch.no_grad():
                        p.copy_(torch.rand(p.shape, generator=g))
                ref = kern.double()
                xs = [x.double().requires_grad_() for x in (qb, kb, vb)]
                want = ref(*xs, causal=causal)
                wants = torch.autograd.grad(want, xs + list(ref.parameters()), go.double())
                kern = kern.float()
                xs = [x.clone().requires_grad_() for x in (qb, kb, vb)]
                got = kern(*xs, causal=causal)
                gots = torch.autograd.grad(got, xs + list(kern.parameters()), go)
                scale = max(float(w.abs().max()) for w in wants[:3])
                diag[f"{name} n={n} causal={causal}"] = [rel(got, want)] + [
                    float((a.double() - b).abs().max()) / max(scale, float(b.abs().max())) for a, b in zip(gots, wants)]
    out["diag"] = diag
    out["diag_calls"] = list(calls)

    # half inputs: the block kernel multiplies the fp16 tiles themselves (q kᵀ, g vᵀ), as on a GPU; against
    # the float64 PyTorch path on the same (rounded) inputs, with a base and scalar weights (w_D factors
    # out of g vᵀ) and without
    half = []
    for causal in (False, True):
        qh, kh, vh, gh, bh_ = (torch.randn(1, 2, 70, 16, generator=g).half() for _ in range(5))
        for base, wl, wd in ((None, None, None), (bh_, 0.3, 0.7)):
            xs = [x.clone().requires_grad_() for x in (qh, kh, vh)]
            got = real_block(*xs, 0.25, 16, causal, base=base, wl=wl, wd=wd)
            gots = torch.autograd.grad(got, xs, gh)
            xd = [x.double().requires_grad_() for x in (qh, kh, vh)]
            want = BlockDiagonalAttention(block=16, scale=0.25)._output(*xd, causal, None)
            if base is not None:
                want = wl * base.double() + wd * want
            wants = torch.autograd.grad(want, xd, gh.double())
            scale_g = max(float(w.abs().max()) for w in wants)
            half.append(max([rel(got, want)] + [float((a.double() - b).abs().max()) / scale_g
                                                for a, b in zip(gots, wants)]))
    out["block_half"] = half

    # the causal path's running sums over chunks, more chunks than one step of the prefix kernel takes
    hs, zs = lln_triton._states(2, 70, 32, 16, q.device)
    hs.copy_(torch.randn(hs.shape, generator=g))
    zs.copy_(torch.randn(zs.shape, generator=g))
    want_h, want_z = hs.double().cumsum(1), zs.double().cumsum(1)
    lln_triton._prefix_sums(hs, zs)
    out["prefix"] = [rel(hs, want_h), rel(zs, want_z)]

    # bad input: the error names the tensor and the index
    msgs = []
    for name, idx in (("q", (0, 1, 7, 2)), ("k", (0, 0, 3, 5)), ("v", (0, 1, 88, 0))):
        xs = {"q": q.clone(), "k": k.clone(), "v": v.clone()}
        xs[name][idx] = float("nan")
        try:
            LLNAttention()(xs["q"], xs["k"], xs["v"])
        except ValueError as e:
            msgs.append(str(e))
    out["errors"] = msgs

    # σ and the curve rule on the device (the non-causal module path) against moments() and the host's rule
    # on the same q, k: inside the curve's range, past both its ends, another softmax scale, no matching
    rule = []
    for n, d, sq_, sk_, scale in ((150, 32, 0.3, 2.0, None), (97, 20, 1.1, 0.9, 0.5), (40, 64, 4.0, 3.0, None),
                                  (33, 16, 0.05, 0.1, None)):
        qr = torch.randn(2, 3, n, d, generator=g) * sq_ + 0.3
        kr = torch.randn(2, 3, n + 7, d, generator=g) * sk_
        vr = torch.randn(2, 3, n + 7, 8, generator=g)
        st = lln_triton.moments(qr, kr, vr)
        for mm in (True, False):
            _, ab = lln_triton.device_rule(qr, kr, vr, 1.0 if scale is None else scale * d**0.5, curve=mm)
            a_host, b_host = LLNAttention(moment_matching=mm, scale=scale)._rule(st.sigma_q, st.sigma_k, d)
            rule.append(max(abs(float(ab[0]) / a_host - 1), abs(float(ab[1]) / b_host - 1),
                            abs(float(ab[2]) / st.sigma_q - 1), abs(float(ab[3]) / st.sigma_k - 1), float(ab[4])))
    out["rule"] = rule
    # a NaN in q makes σ_q NaN, which the rule reads as 1, as on the host; v's non-finite entries are counted
    qn, vn = qr.clone(), vr.clone()
    qn[0, 0, 0, 0] = float("nan")
    vn[1, 2, 3, 4], vn[0, 0, 0, 0] = float("inf"), float("nan")
    st = lln_triton.moments(qn, kr, vn)
    _, ab = lln_triton.device_rule(qn, kr, vn, 1.0, curve=True)
    a_host, _ = LLNAttention()._rule(st.sigma_q, st.sigma_k, qr.shape[-1])
    out["rule_nan"] = [math.isnan(float(ab[2])), abs(float(ab[0]) / a_host - 1), float(ab[4])]
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.skipif(
    tuple(int(x) for x in __import__("triton").__version__.split(".")[:2]) < (3, 9),
    reason="older Triton interpreters cannot run these kernels; the compiled kernels are checked on the GPU by "
    "benchmarks/lln_gpu.py",
)
def test_fused_lln_kernels_under_interpreter():
    got = json.loads(run_interpreted(SCRIPT, timeout=600).split("RESULT")[-1])
    w = got["worst"]
    # float32 features and sums of at most a few hundred terms, against float64: rounding of a few 1e-7
    # per step; 1e-5 leaves room for the exp of |αq| up to ~5 (relative error ~ 5·6e-8) and the sums.
    assert w["out"] < 1e-5 and w["grad"] < 1e-5, w
    # σ from per-program float32 means and squared deviations, combined in float64: float32 rounding
    assert w["sigma"] < 1e-5, w
    # float16 inputs and outputs: the output's rounding (2^-11 ≈ 4.9e-4 relative) dominates; gradients
    # are rounded to float16 too and carry the inputs' float16 rounding through exp(αq): a few 1e-3
    assert w["half"] < 2e-3 and w["half_grad"] < 5e-3, w
    for case, err in got["module"].items():
        assert err < 1e-5, (case, err)  # float32 against float64, as above
    # every float32 module call above went through the kernels (LLN+Diag's LLN part too) …
    assert got["calls"] == ["lln_noncausal"] * 3 + ["lln_causal"] * 3, got["calls"]
    # … but keys 400 log units apart did not (the product form would lose rows to underflow)
    assert got["spread"] < 1e-5 and got["spread_calls"] == [], (got["spread"], got["spread_calls"])
    # the partial states summed between the kernels: float32 against float64, as above
    assert max(got["wide"]) < 1e-5, got["wide"]
    for case, errs in got["diag"].items():
        # float32 against float64 (outputs, then the gradients of q, k, v and of the weights), as above
        assert max(errs) < 1e-5, (case, errs)
    # every float32 call above went through the kernels: 3 sizes × 2 causal rules, block_diag alone once
    # and LLN+Diag's three modes: for blocks of 64, LLN's kernels with the block softmax inside; for the
    # others, LLN's kernels and then the block kernel in the same autograd node
    calls = got["diag_calls"]
    assert calls.count("block") == 6 and calls.count("block_with_base") == 0, calls
    assert calls.count("lln_noncausal+block") == 6 and calls.count("lln_causal+block") == 6, calls
    assert calls.count("lln_noncausal+diag") == 3 and calls.count("lln_causal+diag") == 3, calls
    assert len(calls) == 24, calls
    # fp16 inputs, outputs and gradients (rounded to 2^-11 ≈ 4.9e-4): the products of the fp16 tiles are
    # exact, so what is left is a few of those roundings
    assert max(got["block_half"]) < 2e-3, got["block_half"]
    # float32 running sums of up to 70 terms against float64: at most 70 roundings of 2^-24 relative to
    # the largest sum, 4.2e-6
    assert max(got["prefix"]) < 1e-5, got["prefix"]
    q_msg, k_msg, v_msg = got["errors"]
    assert "q: expected finite values" in q_msg and "(0, 1, 7, 2)" in q_msg, q_msg
    assert "k: expected finite values" in k_msg and "(0, 0, 3, 5)" in k_msg, k_msg
    assert "v: expected finite values" in v_msg and "(0, 1, 88, 0)" in v_msg, v_msg
    # the device rule repeats the host's float64 arithmetic on the same float32 partials, in another order of
    # summation: σ and α, β agree to float64 rounding (a few 1e-16, times the curve's slope); no v entry counted
    assert max(got["rule"]) < 1e-12, got["rule"]
    nan_sigma, nan_alpha, v_bad = got["rule_nan"]
    assert nan_sigma and nan_alpha < 1e-12 and v_bad == 2.0, got["rule_nan"]


def test_diag_fusion_rule():
    """LLN+Diag's block softmax goes inside LLN's kernels only where that measured faster and fits: blocks
    equal to the kernels' tiles, half precision, at most DIAG_FUSED_MAX_TOKENS tokens."""
    from attnstats.kernels import lln_triton

    def x(n, d, dtype=torch.bfloat16):
        return torch.empty(1, 2, n, d, dtype=dtype, device="meta")  # the rule reads shapes and dtypes only

    limit = lln_triton.DIAG_FUSED_MAX_TOKENS
    for causal in (False, True):
        assert lln_triton.fuses_diag(x(limit, 64), x(limit, 64), 64, causal=causal)
        assert not lln_triton.fuses_diag(x(limit + 1, 64), x(limit + 1, 64), 64, causal=causal)
    assert lln_triton.fuses_diag(x(100, 64, torch.float16), x(100, 64, torch.float16), 64, causal=False)
    assert not lln_triton.fuses_diag(x(100, 64, torch.float32), x(100, 64, torch.float32), 64, causal=True)
    assert not lln_triton.fuses_diag(x(100, 64), x(100, 64), 32, causal=True)  # blocks are not the tiles
    assert lln_triton.fuses_diag(x(100, 128), x(100, 128), 32, causal=True)  # wide heads: tiles of 32
    assert not lln_triton.fuses_diag(x(100, 64), x(90, 64), 64, causal=False)  # N != M


def test_32_bit_offset_rule_counts_whole_storages_and_buffers():
    """The kernels address entries with 32-bit offsets: the rule their dispatch (``applies``) uses refuses a
    tensor (its whole storage, for a view) or a buffer of 2^31 entries or more."""
    from attnstats.kernels.triton_common import offsets_fit

    big = torch.empty(2**31, dtype=torch.bfloat16, device="meta")  # no memory: shapes only
    assert offsets_fit(torch.empty(2, 3, 64, 8, device="meta"))
    assert not offsets_fit(big)
    assert not offsets_fit(big[:64])  # a small view of a large storage is addressed from the storage
    assert offsets_fit(big[:64].clone())
    assert not offsets_fit(torch.empty(2, 3, device="meta"), buffers=2**31)


def test_direct_launch_key_and_argument_order():
    """What `triton_launch.launch` keys a compiled kernel on, and the argument list it hands it (checked
    here without a GPU: the direct launches themselves run in benchmarks/lln_gpu.py's agreement part)."""
    from attnstats import triton_launch
    from attnstats.kernels import lln_triton

    key = triton_launch._arg_key
    x = torch.zeros(64, dtype=torch.float32)
    # Triton specialises on a tensor's dtype and 16-byte alignment and on an integer's value (== 1, % 16,
    # width): each must change the key; a float's value must not (it is always typed fp32)
    assert key(x) == (torch.float32, True)
    assert key(x[1:]) == (torch.float32, False)  # 4 bytes in: not 16-aligned
    assert key(x.half()) != key(x)
    assert key(1) != key(16) and key(2**31) != key(2**31 - 1)
    assert key(True) != key(1)
    assert key(0.5) == key(2.0)
    kernel = lln_triton._nc_state_kernel
    params = list(kernel.params)
    n_args = sum(not p.is_constexpr for p in params)
    meta = {p.name: p.name for p in params if p.is_constexpr}
    # the launcher takes every parameter in the kernel's order: the positional ones, then the constexprs
    assert triton_launch._tail(kernel, (0,) * n_args, meta) == tuple(p.name for p in params[n_args:])
    assert all(p.is_constexpr for p in params[n_args:])
    assert triton_launch._tail(kernel, (0,) * n_args, {}) is None  # a constexpr missing: Triton's own launch
