"""Kernels against independent dense float64 references (docs/theory.md §1, §4)."""
import math

import numpy as np
import pytest
import torch

import attnstats
from attnstats import kernels
from attnstats.budget import DenseTooLargeError, memory_budget
from attnstats.kernels import (
    BlockDiagonalAttention,
    LinearAttention,
    LLNAttention,
    LLNPlusDiagAttention,
    SoftmaxAttention,
    get_kernel,
)
from attnstats.theory import LLN_A, LLN_B

pytestmark = pytest.mark.usefixtures("one_thread")


B, H, N, D = 2, 3, 37, 16  # N is not a multiple of D: LLN+Diag has a remainder block

EPS_FREE = {"lln": {"eps": 0.0}, "lln_paper": {"eps": 0.0}, "lln_no_mm": {"eps": 0.0}, "lln_diag": {"eps": 0.0},
            "relu": {"eps": 0.0}, "elu_plus_one": {"eps": 0.0}, "exp": {"eps": 0.0}, "performer": {"eps": 0.0}}
LINEARISED = ("lln", "lln_paper", "lln_no_mm", "relu", "elu_plus_one", "exp", "performer")


def qkv(seed=0, dtype=torch.float64, b=B, h=H, n=N, d=D, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    return (q * scale).to(dtype), (k * scale).to(dtype), v.to(dtype)


def key_padding(b=B, n=N):
    """[B, 1, 1, N]: batch 0 has its last 9 keys padded, batch 1 none."""
    lengths = torch.tensor([n - 9, n])[:b]
    return (torch.arange(n)[None, :] < lengths[:, None])[:, None, None, :]


def make(name, exact=True):
    return get_kernel(name, **(EPS_FREE.get(name, {}) if exact else {}))


# ---------------------------------------------------------------- interface


def test_names_and_registry():
    assert set(kernels.KERNEL_NAMES) == {"softmax", "lln", "lln_paper", "lln_no_mm", "block_diag", "lln_diag", "relu",
                                         "elu_plus_one", "exp", "performer"}
    for name in kernels.KERNEL_NAMES:
        ker = get_kernel(name)
        assert ker.name == name
        assert isinstance(ker, kernels.Kernel) and isinstance(ker, torch.nn.Module)
    assert get_kernel("lln_no_mm").alpha_beta(*qkv()[:2]) == (1.0, 1.0)


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_output_equals_matrix_times_v(name, causal, padded):
    q, k, v = qkv(seed=1)
    mask = key_padding() if padded else None
    ker = make(name)
    out = ker(q, k, v, causal=causal, mask=mask)
    p = ker.matrix(q, k, causal=causal, mask=mask)
    assert out.shape == (B, H, N, D) and out.dtype == torch.float64
    assert p.shape == (B, H, N, N) and p.dtype == torch.float64
    torch.testing.assert_close(out, p @ v, rtol=1e-10, atol=1e-12)
    # rows sum to 1 over valid entries; masked entries are exactly 0
    torch.testing.assert_close(p.sum(-1), torch.ones(B, H, N, dtype=torch.float64), rtol=0, atol=1e-12)
    if padded:
        assert bool((p[0, :, :, N - 9:] == 0).all())
    if causal:
        assert bool((p.triu(1) == 0).all())


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
def test_float32_output_within_float32_tolerance(name):
    """float32 compute against the float64 matrix, with the default eps."""
    q, k, v = qkv(seed=2)
    ker = make(name, exact=False)
    for causal in (False, True):
        ref = ker.matrix(q, k, causal=causal, mask=key_padding()) @ v
        out = ker(q.float(), k.float(), v.float(), causal=causal, mask=key_padding())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.double(), ref, rtol=2e-5, atol=2e-5)
        p32 = ker.matrix(q.float(), k.float(), causal=causal)
        assert p32.dtype == torch.float32
        torch.testing.assert_close(p32.sum(-1), torch.ones(B, H, N), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
def test_matrix_and_gap_are_computed_in_the_compute_dtype_not_the_input_dtype(name):
    """The base class fixes one dtype policy: on the CPU every kernel computes its matrix and gap in
    float64 whatever the input dtype, so float32 inputs give the float64 numbers of the same values
    (the matrix then rounded once to float32) to the bit."""
    q, k, _ = qkv(seed=3, dtype=torch.float32)
    ker = make(name)
    for causal in (False, True):
        for mask in (None, key_padding()):
            p32 = ker.matrix(q, k, causal=causal, mask=mask)
            p64 = ker.matrix(q.double(), k.double(), causal=causal, mask=mask)
            assert p32.dtype == torch.float32 and torch.equal(p32, p64.float())
            gap32 = ker.spectral_gap(q, k, causal=causal, mask=mask)
            assert torch.equal(gap32, ker.spectral_gap(q.double(), k.double(), causal=causal, mask=mask))


def _template_kernel():
    """The minimal kernel of attnstats.kernels.base's docstring, run from the docstring itself."""
    import textwrap

    from attnstats.kernels import base

    doc = base.__doc__
    code = doc[doc.index("class UniformAttention(Kernel):"):doc.index("Register it under a name")]
    namespace = {name: getattr(base, name) for name in ("Kernel", "check_qkv", "result_dtype")} | {"torch": torch}
    exec(textwrap.dedent("    " + code), namespace)
    return namespace["UniformAttention"]()


def test_the_documented_template_kernel_gets_checks_budget_dtype_and_gap_from_the_base():
    uniform = _template_kernel()
    q, k, v = qkv(seed=4, b=1, h=2, n=6, d=3)
    # uniform over all keys: every entry 1/6; rank one, so λ_2 = 0 and the gap is 1
    p = uniform.matrix(q, k)
    assert p.dtype == torch.float64 and torch.equal(p, torch.full((1, 2, 6, 6), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(uniform(q, k, v), v.mean(-2, keepdim=True).expand(1, 2, 6, 3), rtol=0, atol=1e-15)
    # LAPACK on a rank-one 6 × 6 matrix: λ_2 is 0 up to a few ulps of ‖P‖ = 1
    torch.testing.assert_close(uniform.spectral_gap(q, k), torch.ones(1, 2, dtype=torch.float64), rtol=0, atol=1e-12)
    # causal: P_ij = 1/(i+1) for j <= i, lower-triangular with eigenvalues 1/(i+1): λ_2 = 1/2 exactly
    pc = uniform.matrix(q.float(), k.float(), causal=True)
    want = torch.tril(torch.ones(6, 6)) / torch.arange(1, 7)[:, None]
    assert pc.dtype == torch.float32 and torch.equal(pc[0, 0], want)
    torch.testing.assert_close(uniform.spectral_gap(q, k, causal=True), torch.full((1, 2), 0.5, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    # key padding: 1/4 on the 4 valid keys, exactly 0 on the 2 padded ones
    pad = torch.tensor([True, True, False, True, False, True])[None, None, None, :]
    pp = uniform.matrix(q, k, mask=pad)
    assert torch.equal(pp[0, 1, 2], torch.tensor([0.25, 0.25, 0, 0.25, 0, 0.25], dtype=torch.float64))
    # the checks and the budget are the base class's
    with pytest.raises(ValueError, match=r"q: expected shape \[B, H, N, d\], got a 3-d tensor"):
        uniform.matrix(q[0], k)
    with pytest.raises(ValueError, match="q, k: a spectral gap needs as many queries as keys"):
        uniform.spectral_gap(q, k[:, :, :5])
    with pytest.raises(ValueError, match=r"k: expected finite values, found nan"):
        uniform.matrix(q, k.masked_fill(torch.ones_like(k, dtype=torch.bool), float("nan")))
    with memory_budget(100), pytest.raises(DenseTooLargeError, match=r"the uniform attention matrix of shape \(1, 2, 6, 6\)"):
        uniform.matrix(q, k)


# ---------------------------------------------------------------- softmax and block-diagonal


def dense_softmax(q, k, valid, scale):
    s = (q @ k.transpose(-2, -1)).double() * scale
    s = s.masked_fill(~valid, -math.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return p / p.sum(-1, keepdim=True)


def test_softmax_is_sdpa_and_dense_reference():
    q, k, v = qkv(seed=3)
    sa = SoftmaxAttention()
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert torch.equal(sa(q, k, v, causal=causal), expected)
        valid = torch.ones(N, N, dtype=torch.bool).tril() if causal else torch.ones(N, N, dtype=torch.bool)
        torch.testing.assert_close(sa.matrix(q, k, causal=causal), dense_softmax(q, k, valid, D**-0.5),
                                   rtol=1e-12, atol=1e-14)
    # a custom scale
    torch.testing.assert_close(SoftmaxAttention(scale=0.3).matrix(q, k),
                               dense_softmax(q, k, torch.ones(N, N, dtype=torch.bool), 0.3), rtol=1e-12, atol=1e-14)


def test_softmax_fully_masked_row_is_zero_not_nan():
    q, k, v = qkv(seed=4)
    mask = torch.ones(N, N, dtype=torch.bool)
    mask[5] = False
    out = SoftmaxAttention()(q, k, v, mask=mask)
    assert bool(torch.isfinite(out).all()) and bool((out[:, :, 5] == 0).all())


@pytest.mark.parametrize("block", [None, 5, 16, 40])
@pytest.mark.parametrize("causal", [False, True])
def test_block_diagonal_against_dense_reference(block, causal):
    q, k, v = qkv(seed=5)
    size = D if block is None else block
    ids = torch.arange(N) // size  # consecutive blocks, the remainder forms the last one
    valid = ids[:, None] == ids[None, :]
    if causal:
        valid = valid & torch.ones(N, N, dtype=torch.bool).tril()
    ref = dense_softmax(q, k, valid, D**-0.5)
    ker = BlockDiagonalAttention(block=block)
    torch.testing.assert_close(ker.matrix(q, k, causal=causal), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ker(q, k, v, causal=causal), ref @ v, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- LLN


def reference_lln(q, k, v, a=LLN_A, b=LLN_B, causal=False, moment_matching=True):
    """docs/theory.md §4 written out in NumPy float64, no shifts (small inputs only)."""
    qn, kn, vn = (x.double().numpy() for x in (q, k, v))
    if moment_matching:
        sq, sk = qn.std(ddof=1), kn.std(ddof=1)
        s_tilde = np.sqrt((sq**2 * sk**2 - b) / (2 * a))
        alpha, beta = s_tilde / sq, s_tilde / sk
    else:
        alpha = beta = 1.0
    fq, fk = np.exp(alpha * qn), np.exp(beta * kn)
    a_mat = fq @ np.swapaxes(fk, -1, -2)
    if causal:
        a_mat = np.tril(a_mat)
    p = a_mat / a_mat.sum(-1, keepdims=True)
    return torch.from_numpy(p), torch.from_numpy(p @ vn), (alpha, beta)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mm", [True, False])
def test_lln_reproduces_dense_float64_formulas(causal, mm):
    q, k, v = qkv(seed=6, scale=0.7)
    p_ref, out_ref, (alpha, beta) = reference_lln(q, k, v, causal=causal, moment_matching=mm)
    ker = LLNAttention(moment_matching=mm, eps=0.0, matching="paper")
    a, b = ker.alpha_beta(q, k)
    assert a == pytest.approx(alpha, rel=1e-12) and b == pytest.approx(beta, rel=1e-12)
    torch.testing.assert_close(ker.matrix(q, k, causal=causal), p_ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ker(q, k, v, causal=causal), out_ref, rtol=1e-10, atol=1e-12)
    # the default eps moves outputs by far less than float32 resolution
    torch.testing.assert_close(LLNAttention(moment_matching=mm, matching="paper")(q, k, v, causal=causal), out_ref,
                               rtol=1e-7, atol=1e-8)


def test_lln_curve_rule_inverts_the_stored_curve_at_softmax_log_variance():
    """The default rule, against numpy: the feature scale s = ασ_q = βσ_k is where the stored LLN
    curve of the head dim, interpolated linearly in (ln s, ln Var), reaches σ² + σ⁴/(2d)."""
    from attnstats.kernels.moment_matching import CURVE_SIGMAS, LLN_CURVES

    q, k, v = qkv(seed=6, scale=0.7)
    sq, sk = q.std().item(), k.std().item()
    target = (sq * sk) ** 2 + (sq * sk) ** 4 / (2 * D)
    s = math.exp(np.interp(math.log(target), np.log(LLN_CURVES[D]), np.log(CURVE_SIGMAS)))
    ker = LLNAttention(eps=0.0)
    alpha, beta = ker.alpha_beta(q, k)
    assert alpha == pytest.approx(s / sq, rel=1e-12) and beta == pytest.approx(s / sk, rel=1e-12)
    p = np.exp(alpha * q.numpy()) @ np.swapaxes(np.exp(beta * k.numpy()), -1, -2)
    p /= p.sum(-1, keepdims=True)
    torch.testing.assert_close(ker.matrix(q, k), torch.from_numpy(p), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ker(q, k, v), torch.from_numpy(p) @ v, rtol=1e-10, atol=1e-12)


def test_lln_alpha_beta_is_moment_matching_rule():
    q, k, _ = qkv(seed=7)
    q, k = q * 0.6, k * 1.7
    sq, sk = q.std().item(), k.std().item()
    alpha, beta = LLNAttention(matching="paper").alpha_beta(q, k)
    s_tilde = math.sqrt((sq**2 * sk**2 - LLN_B) / (2 * LLN_A))
    assert alpha == pytest.approx(s_tilde / sq, rel=1e-12)
    assert beta == pytest.approx(s_tilde / sk, rel=1e-12)
    # α σ_q = β σ_k, and a·σ_t² + b reproduces the softmax score variance σ_q²σ_k²
    sigma_t2 = alpha**2 * sq**2 + beta**2 * sk**2
    assert LLN_A * sigma_t2 + LLN_B == pytest.approx(sq**2 * sk**2, rel=1e-12)
    # a softmax scale c/sqrt(d) makes scores of variance c²σ_q²σ_k²: that is the variance matched
    c = 0.5
    alpha_c, beta_c = LLNAttention(scale=c / D**0.5, matching="paper").alpha_beta(q, k)
    s_c = math.sqrt((c**2 * sq**2 * sk**2 - LLN_B) / (2 * LLN_A))
    assert alpha_c == pytest.approx(s_c / sq, rel=1e-12) and beta_c == pytest.approx(s_c / sk, rel=1e-12)
    # no gradient flows into α, β; gradients still flow through the features
    qg = q.clone().requires_grad_(True)
    out = LLNAttention()(qg, k, k)
    out.sum().backward()
    assert qg.grad is not None and bool(torch.isfinite(qg.grad).all())


def test_causal_chunked_lln_equals_noncausal_on_prefixes():
    """Row i of causal LLN is non-causal LLN of query i over keys 0..i (α = β = 1 so the prefix
    does not change the temperatures); every chunk size gives the same numbers."""
    q, k, v = qkv(seed=8, n=45)
    ker = LLNAttention(moment_matching=False, eps=0.0)
    causal = ker(q, k, v, causal=True)
    for i in range(45):
        prefix = ker(q[:, :, i:i + 1], k[:, :, : i + 1], v[:, :, : i + 1])
        torch.testing.assert_close(causal[:, :, i:i + 1], prefix, rtol=1e-10, atol=1e-12)
    # gradients through the chunked scan match those through the dense matrix
    qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))
    ker(qg, kg, vg, causal=True).pow(2).sum().backward()
    qd, kd, vd = (x.clone().requires_grad_(True) for x in (q, k, v))
    (ker.matrix(qd, kd, causal=True) @ vd).pow(2).sum().backward()
    for got, want in ((qg, qd), (kg, kd), (vg, vd)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-8, atol=1e-10)
    for chunk in (1, 7, 16, 64):
        torch.testing.assert_close(LLNAttention(moment_matching=False, eps=0.0, chunk=chunk)(q, k, v, causal=True),
                                   causal, rtol=1e-10, atol=1e-12)


def dense_causal_linear(fq, fk, v):
    """``tril(φ_Q φ_Kᵀ)`` row-normalised, times v: causal linear attention in float64, no shifts."""
    a = np.tril(fq @ np.swapaxes(fk, -1, -2))
    return torch.from_numpy(a / a.sum(-1, keepdims=True) @ v)


@pytest.mark.parametrize("chunk", [1, 5, 16, 64])
def test_causal_product_form_and_log_space_equal_the_dense_reference(chunk):
    """Both causal algorithms, on the same features, against the dense float64 formula; the product
    form's gradients against autograd through that formula (float64 rounding: 1e-10)."""
    from attnstats.kernels.linear import _shifted_features, causal_log_space, causal_product_form

    q, k, v = qkv(seed=31, n=45)
    lq, lk = q * 0.8, k * 0.8  # LLN log-features
    ref = dense_causal_linear(np.exp(lq.numpy()), np.exp(lk.numpy()), v.numpy())
    qt, kt = _shifted_features(lq, lk)
    torch.testing.assert_close(causal_product_form(qt, kt, v, 0.0, chunk), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(causal_log_space(lq, lk, v, 0.0, chunk), ref, rtol=1e-10, atol=1e-12)
    xs = [x.clone().requires_grad_(True) for x in (lq, lk, v)]
    qt, kt = _shifted_features(xs[0], xs[1])
    causal_product_form(qt, kt, xs[2], 0.0, chunk).pow(2).sum().backward()
    ys = [x.clone().requires_grad_(True) for x in (lq, lk, v)]
    a = torch.tril(torch.exp(ys[0]) @ torch.exp(ys[1]).transpose(-2, -1))
    (a / a.sum(-1, keepdim=True) @ ys[2]).pow(2).sum().backward()
    for got, want in zip(xs, ys):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_backwards_pass_gradcheck():
    """The non-causal hand-written backward, and autograd through the causal product form, against
    finite differences in float64, with a padded key. eps = 0: the shifts are held constant, which is
    exact when they cancel (eps = 0) and off by O(eps) otherwise (1e-8 by default)."""
    from attnstats.kernels.linear import _shifted_features, causal_product_form, linear_attention

    g = torch.Generator().manual_seed(33)
    lq, lk, v = (torch.randn(1, 2, 11, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keys = torch.ones(1, 2, 11, dtype=torch.bool)
    keys[0, 1, 7] = False
    torch.autograd.gradcheck(lambda a, b, c: linear_attention(a, b, c, key_valid=keys, eps=0.0), (lq, lk, v))

    def causal(a, b, c):
        qt, kt = _shifted_features(a, b)
        return causal_product_form(qt, kt, c, 0.0, 4)  # 11 tokens: chunks of 4, the last one padded

    torch.autograd.gradcheck(causal, (lq, lk, v))


def test_autocast_does_not_change_the_kernels():
    """Inside a bf16 autocast region the linearised kernels still compute in float32: the same outputs
    as outside it, bit for bit (none of their operations is autocast), causal and not. (Softmax and
    block-diagonal attention are SDPA, which autocast runs in bf16 as it would without attnstats.)"""
    q, k, v = qkv(seed=35, dtype=torch.float32)
    for name in ("lln", "exp", "performer"):
        ker = get_kernel(name)
        for causal in (False, True):
            plain = ker(q, k, v, causal=causal)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                inside = ker(q, k, v, causal=causal)
            assert inside.dtype == torch.float32 and torch.equal(inside, plain), (name, causal)


def test_non_causal_backward_refuses_a_second_derivative():
    """The hand-written backward keeps no graph: asking for a second derivative raises instead of
    returning a wrong one."""
    q, k, v = (x.requires_grad_(True) for x in qkv(seed=36))
    out = get_kernel("lln")(q, k, v)
    (g,) = torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|not support"):
        g.sum().backward()


def test_causal_half_inputs_go_to_fla_only_where_its_guard_is_harmless(monkeypatch):
    """The dispatch rule (fla itself needs a GPU): bfloat16 inputs with fla present, key spread within
    FLA_SPREAD_LIMIT and no gradient needed go to fla, with the shifted features and values; float16
    and float32 inputs, spreads past the limit, and calls that need gradients stay with attnstats' own
    algorithms."""
    from attnstats.kernels import linear

    calls = []

    def fake_fla(qt, kt, v, half):
        calls.append(half)
        return linear.causal_product_form(qt, kt, v, 0.0, 16)

    monkeypatch.setattr(linear, "fla_available", lambda x: True)
    monkeypatch.setattr(linear, "_fla_causal", fake_fla)
    q, k, v = qkv(seed=34, n=20, d=4)
    ker = get_kernel("exp", eps=0.0)
    ref = dense_causal_linear(np.exp(q.numpy()), np.exp(k.numpy()), v.numpy())
    out = ker(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [torch.bfloat16]
    # bf16 inputs: the output is within bf16 rounding of the float64 formula on the unrounded inputs
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)
    ker(q.float(), k.float(), v.float(), causal=True)
    ker(q.half(), k.half(), v.half(), causal=True)  # float16: fla keeps denominators in its narrow range
    far = k.clone()
    far[:, :, 10:] += linear.FLA_SPREAD_LIMIT + 1
    ker(q.bfloat16(), far.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [torch.bfloat16]
    # fla's bf16 backward is off by ~8e-2 of the largest gradient (benchmarks/RESULTS.md §4): a call that
    # needs gradients stays with the product form, and gets them right to bf16 rounding
    qg = q.bfloat16().requires_grad_()
    out = ker(qg, k.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [torch.bfloat16]
    qd = q.double().requires_grad_()
    want = ker(qd, k.double(), v.double(), causal=True)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    (got_grad,) = torch.autograd.grad(out, qg, go.bfloat16())
    (want_grad,) = torch.autograd.grad(want, qd, go)
    # against float64 on the unrounded inputs: the inputs' bf16 rounding (2^-9 relative, through exp) and a
    # bf16 gradient give a few 2^-8 of the largest entry (5.5e-3 here); 3e-2 stays well under fla's 8e-2
    assert float((got_grad.double() - want_grad).abs().max() / want_grad.abs().max()) < 3e-2
    with torch.no_grad():
        ker(qg, k.bfloat16(), v.bfloat16(), causal=True)
    assert calls == [torch.bfloat16] * 2


def test_lln_reads_the_causal_key_spread_off_k():
    """LLN hands the causal algorithm its key spread from the same transfer as σ_q, σ_k: β times k's
    spread over the valid keys, which must equal the spread measured on the masked log-features."""
    from attnstats.kernels import linear

    q, k, v = qkv(seed=37)
    keys = key_padding().expand(B, H, 1, N)[:, :, 0, :]  # [B, H, N]
    ker = LLNAttention()
    _, lk, spread = ker._checked_features(q, k, v, torch.float64, True, keys, False)
    want = float(linear._key_spread(linear._mask_keys(lk, keys))[0])
    assert spread == pytest.approx(want, rel=1e-12)
    _, _, none = ker._checked_features(q, k, v, torch.float64, False, None, False)
    assert none is None


def test_causal_keys_spread_past_the_underflow_limit_take_the_log_space_path(monkeypatch):
    """float32 exp features with keys 80 log units apart: a shared shift would underflow the early
    rows (e^-80 < float32's tiny), so the exact log-space algorithm runs; it matches the dense
    float64 formula to float32 rounding (1e-5 relative), and the product form is never called."""
    from attnstats.kernels import linear

    q, k, v = qkv(seed=32, n=40, d=4)
    k = k.clone()
    k[:, :, 20:] += 80.0  # later keys dominate every feature by e^80
    ref = dense_causal_linear(np.exp(q.numpy()), np.exp(k.numpy()), v.numpy())
    assert float(linear._key_spread(k)[0]) > linear.causal_underflow_limit(torch.float32)

    def refuse(*args, **kwargs):
        raise AssertionError("the product form ran on keys it would underflow")

    monkeypatch.setattr(linear, "causal_product_form", refuse)
    out = get_kernel("exp", eps=0.0)(q.float(), k.float(), v.float(), causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_lln_half_inputs_compute_in_float32():
    q, k, v = qkv(seed=9)
    ker = LLNAttention()
    ref = ker(q.float(), k.float(), v.float())
    for dt in (torch.float16, torch.bfloat16):
        out = ker(q.to(dt), k.to(dt), v.to(dt))
        assert out.dtype == dt
        # the only differences: rounding the inputs to dt and the output to dt
        exp = ker(q.to(dt).float(), k.to(dt).float(), v.to(dt).float()).to(dt)
        torch.testing.assert_close(out, exp, rtol=0, atol=0)
        assert (out.float() - ref).abs().max() < (0.05 if dt == torch.bfloat16 else 0.01)


# ---------------------------------------------------------------- linear feature maps


def reference_linear(q, k, feature_map):
    q, k = q.double(), k.double()
    fmap = {"relu": torch.relu, "elu_plus_one": lambda x: torch.nn.functional.elu(x) + 1, "exp": torch.exp}[feature_map]
    a = fmap(q) @ fmap(k).transpose(-2, -1)
    return a / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("fmap", ["relu", "elu_plus_one", "exp"])
def test_feature_maps_against_dense_reference(fmap):
    q, k, v = qkv(seed=10, scale=0.8)
    ker = LinearAttention(fmap, eps=0.0)
    ref = reference_linear(q, k, fmap)
    torch.testing.assert_close(ker.matrix(q, k), ref, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ker(q, k, v), ref @ v, rtol=1e-10, atol=1e-12)


def test_relu_attention_has_no_temperature():
    """docs/theory.md §3: rescaling q and k leaves ReLU linear attention exactly unchanged."""
    q, k, _ = qkv(seed=11)
    ker = LinearAttention("relu")
    torch.testing.assert_close(ker.matrix(q * 0.5, k * 0.5), ker.matrix(q * 2.0, k * 2.0), rtol=1e-12, atol=1e-14)


def test_relu_row_with_no_weight_raises():
    q, k, v = qkv(seed=12)
    q[0, 0, 3] = -q[0, 0, 3].abs() - 0.1  # every feature of query 3 is 0 under ReLU
    ker = LinearAttention("relu")
    assert bool((ker(q, k, v)[0, 0, 3] == 0).all())  # output 0 (eps), never NaN
    with pytest.raises(ValueError, match=r"row \(0, 0, 3\).*zero weight"):
        ker.matrix(q, k)
    with pytest.raises(ValueError, match="zero weight"):
        ker.spectral_gap(q, k)


def test_performer_projection_and_softmax_estimate():
    ker = LinearAttention("performer", num_features=64, seed=3)
    w = ker.projection(16, "cpu", torch.float64)
    assert w.shape == (64, 16)
    block = w[:16] / w[:16].norm(dim=-1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(w, LinearAttention("performer", num_features=64, seed=3).projection(16, "cpu", torch.float64))
    assert not torch.equal(w, LinearAttention("performer", num_features=64, seed=4).projection(16, "cpu", torch.float64))
    # FAVOR+ is an unbiased estimate of the softmax kernel: many features approach softmax attention
    q, k, _ = qkv(seed=13, b=1, h=2, scale=0.5)
    sa = SoftmaxAttention().matrix(q, k)
    err = [(LinearAttention("performer", num_features=m).matrix(q, k) - sa).abs().mean() / sa.mean()
           for m in (16, 4096)]
    assert err[1] < 0.05 and err[1] < err[0] / 4


# ---------------------------------------------------------------- LLN + Diag


def test_lln_diag_average_is_half_lln_plus_half_block():
    q, k, v = qkv(seed=14)
    for causal in (False, True):
        ker = LLNPlusDiagAttention(eps=0.0)
        lln = LLNAttention(eps=0.0)(q, k, v, causal=causal)
        diag = BlockDiagonalAttention()(q, k, v, causal=causal)
        torch.testing.assert_close(ker(q, k, v, causal=causal), 0.5 * (lln + diag), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["learnable_ratio", "learnable_scale"])
def test_lln_diag_learnable_weights_per_head_and_channel(mode):
    q, k, v = qkv(seed=15)
    ker = LLNPlusDiagAttention(mode, num_heads=H, head_dim=D, eps=0.0)
    assert sum(p.numel() for p in ker.parameters()) == (1 if mode == "learnable_ratio" else 2) * H * D
    with torch.no_grad():
        ker.r.copy_(torch.linspace(0.1, 0.9, H * D).reshape(H, D))
        if mode == "learnable_scale":
            ker.p.copy_(torch.linspace(1.0, 0.3, H * D).reshape(H, D))
    out = ker(q, k, v)
    for c in (0, 7, D - 1):
        torch.testing.assert_close(out[..., c], (ker.matrix(q, k, channel=c) @ v[..., c:c + 1])[..., 0],
                                   rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="channel"):
        ker.matrix(q, k)
    out.sum().backward()
    assert ker.r.grad is not None and ker.r.grad.shape == (H, D)


# ---------------------------------------------------------------- spectral gap


def test_kernel_matrix_and_gap_against_numpy_eigvals():
    q, k, _ = qkv(seed=16, b=1, h=2)
    for name in kernels.KERNEL_NAMES:
        ker = get_kernel(name)
        p = ker.matrix(q, k).numpy()
        ev = np.sort(np.abs(np.linalg.eigvals(p)), axis=-1)[..., ::-1]
        torch.testing.assert_close(ker.spectral_gap(q, k), torch.from_numpy(1 - ev[..., 1]), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_spectral_gap_equals_dense_solver(name, causal, padded):
    q, k, _ = qkv(seed=17)
    mask = key_padding() if padded else None
    ker = get_kernel(name)
    gap = ker.spectral_gap(q, k, causal=causal, mask=mask)
    assert gap.shape == (B, H)
    full = None if mask is None else mask.expand(B, H, N, N)
    dense = attnstats.spectral_gap(ker.matrix(q, k, causal=causal, mask=mask), full)
    torch.testing.assert_close(gap, dense, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("name", LINEARISED)
def test_linearised_spectral_gap_never_builds_the_dense_matrix(name):
    q, k, _ = qkv(seed=18, b=1, h=2, n=600)
    ker = get_kernel(name)
    with memory_budget(600 * 600):  # less than one dense [1, 2, 600, 600] matrix in any dtype
        with pytest.raises(DenseTooLargeError):
            ker.matrix(q, k)
        for causal in (False, True):
            gap = ker.spectral_gap(q, k, causal=causal)
            assert gap.shape == (1, 2) and bool(((gap >= -1e-9) & (gap <= 1 + 1e-9)).all())


@pytest.mark.parametrize("name", ["softmax", "block_diag"])
def test_dense_spectral_gap_is_guarded_before_the_matrix_is_built(name, monkeypatch):
    # [1, 2, 600, 600] in float64 is 5.5 MiB: past a 5 MiB budget the gap refuses before building it
    import attnstats.kernels.block_diagonal as bd
    import attnstats.kernels.softmax as sm

    def built(*args, **kwargs):
        raise AssertionError("the dense matrix was built")

    q, k, _ = qkv(seed=18, b=1, h=2, n=600)
    ker = get_kernel(name)
    with memory_budget(5 * 2**20):
        monkeypatch.setattr(sm, "softmax_attention", built)
        monkeypatch.setattr(bd, "softmax_attention", built)
        with pytest.raises(DenseTooLargeError, match=r"attention matrix \(for its spectral gap\) of shape \(1, 2, 600, 600\)"):
            ker.spectral_gap(q, k)


@pytest.mark.parametrize("name", LINEARISED)
def test_linearised_spectral_gap_of_a_matrix_with_no_valid_entry_raises(name):
    # as attnstats.spectral_gap does on the dense matrix, instead of reporting a gap of 1
    q, k, _ = qkv(seed=20, b=2, h=2, n=8)
    ker = get_kernel(name)
    pad = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    pad[1] = False
    for causal in (False, True):
        with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1, 0\)"):
            ker.spectral_gap(q, k, causal=causal, mask=pad)
        with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1, 0\)"):
            attnstats.spectral_gap(ker.matrix(q, k, causal=causal, mask=pad), pad)
    # queries 0-3 attend keys 4-7 only: valid entries, but no token is both a query and a key
    cross = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    cross[..., :4, 4:] = True
    with pytest.raises(ValueError, match=r"batch index \(0, 0\) has no token that is both a valid query and a valid key"):
        ker.spectral_gap(q, k, mask=cross)
    one = torch.zeros(2, 1, 1, 8, dtype=torch.bool)
    one[..., 3] = True  # a single token: gap 1, as the dense rule says
    assert torch.equal(ker.spectral_gap(q, k, mask=one), torch.ones(2, 2, dtype=torch.float64))


@pytest.mark.parametrize(
    "make_kernel, arg, value, error",
    [
        (lambda v: LLNAttention(b=v, matching="paper"), "b", float("nan"), ValueError),
        (lambda v: LLNAttention(b=v, matching="paper"), "b", float("inf"), ValueError),
        (lambda v: LLNAttention(a=v, matching="paper"), "a", float("inf"), ValueError),
        (lambda v: LLNAttention(a=v, matching="paper"), "a", float("nan"), ValueError),
        (lambda v: LLNAttention(a=v, matching="paper"), "a", 0.0, ValueError),
        (lambda v: LLNAttention(a=v, matching="paper"), "a", -0.1, ValueError),
        (lambda v: LLNAttention(a=v, matching="paper"), "a", True, TypeError),
        (lambda v: LLNAttention(b=v, matching="paper"), "b", "0.1", TypeError),
        (lambda v: LLNAttention(eps=v), "eps", -1e-8, ValueError),
        (lambda v: LLNAttention(eps=v), "eps", float("inf"), ValueError),
        (lambda v: LLNAttention(scale=v), "scale", float("inf"), ValueError),
        (lambda v: LLNAttention(scale=v), "scale", 0.0, ValueError),
        (lambda v: LLNAttention(chunk=v), "chunk", True, ValueError),
        (lambda v: LLNPlusDiagAttention(b=v), "b", float("nan"), ValueError),
        (lambda v: LinearAttention("relu", eps=v), "eps", float("nan"), ValueError),
        (lambda v: LinearAttention("relu", eps=v), "eps", float("inf"), ValueError),
        (lambda v: LinearAttention("performer", num_features=v), "num_features", True, ValueError),
        (lambda v: LinearAttention("performer", seed=v), "seed", 1.5, ValueError),
        (lambda v: SoftmaxAttention(scale=v), "scale", float("inf"), ValueError),
        (lambda v: SoftmaxAttention(scale=v), "scale", float("nan"), ValueError),
        (lambda v: BlockDiagonalAttention(scale=v), "scale", float("inf"), ValueError),
    ],
)
def test_constructor_numbers_are_checked(make_kernel, arg, value, error):
    # each of these used to give NaN or uniform attention (or a confusing error later) instead
    with pytest.raises(error, match=rf"^{arg}: expected"):
        make_kernel(value)


def test_constructor_accepts_numpy_and_int_numbers():
    ker = LLNAttention(a=np.float64(0.15), b=-1, eps=0, scale=np.float32(0.25), chunk=np.int64(16), matching="paper")
    assert (ker.a, ker.b, ker.eps, ker.scale, ker.chunk) == (0.15, -1.0, 0.0, 0.25, 16)
    q, k, v = qkv(seed=21)
    assert bool(torch.isfinite(ker(q, k, v, causal=True)).all())


def test_lln_curve_rule_refuses_the_papers_constants():
    """a, b belong to the paper's line: given with the default curve rule they would be ignored, so
    they raise, naming the argument; an unknown rule raises too."""
    with pytest.raises(ValueError, match=r"^a: the constants of the paper's line apply to matching='paper' only"):
        LLNAttention(a=0.2)
    with pytest.raises(ValueError, match=r"^b: the constants"):
        get_kernel("lln", b=-0.3)
    with pytest.raises(ValueError, match=r"^matching: unknown rule 'line', expected one of curve, paper"):
        LLNAttention(matching="line")
    assert get_kernel("lln_paper", a=0.2).a == 0.2


# ---------------------------------------------------------------- bad input and overflow


def test_bad_input_errors_name_the_argument():
    q, k, v = qkv(seed=19)
    ker = LLNAttention()
    with pytest.raises(ValueError, match=r"q, k: head dims differ"):
        ker(q, k[..., :8], v)
    with pytest.raises(ValueError, match=r"v: has N = 30 tokens but k has 37"):
        ker(q, k, v[:, :, :30])
    with pytest.raises(ValueError, match=r"q: expected shape \[B, H, N, d\]"):
        ker(q[0], k, v)
    with pytest.raises(ValueError, match=r"q, k: batch and head dims differ"):
        ker(q[:, :2], k, v)
    with pytest.raises(ValueError, match=r"causal attention needs as many queries as keys"):
        ker(q[:, :, :10], k, v, causal=True)
    with pytest.raises(ValueError, match=r"q, k: block-diagonal attention needs as many queries as keys"):
        BlockDiagonalAttention()(q[:, :, :10], k, v)
    with pytest.raises(TypeError, match=r"v: expected a floating-point tensor"):
        ker(q, k, v.long())
    bad = q.clone()
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match=r"q: expected finite values, found nan at index \(1, 2, 3, 4\)"):
        ker(bad, k, v)
    with pytest.raises(ValueError, match=r"feature_map: unknown feature map 'tanh'"):
        LinearAttention("tanh")
    with pytest.raises(ValueError, match=r"name: unknown kernel 'flash'"):
        get_kernel("flash")
    for block in (0, -3):
        with pytest.raises(ValueError, match=r"block: expected a positive int"):
            BlockDiagonalAttention(block=block)
        with pytest.raises(ValueError, match=r"block: expected a positive int"):
            LLNPlusDiagAttention(block=block)
    with pytest.raises(ValueError, match=r"mode: unknown mode"):
        LLNPlusDiagAttention("max")
    with pytest.raises(ValueError, match=r"num_heads: mode 'learnable_ratio'"):
        LLNPlusDiagAttention("learnable_ratio")
    with pytest.raises(ValueError, match=r"feature_map: fixed by kernel name 'relu'"):
        get_kernel("relu", feature_map="exp")
    with pytest.raises(TypeError, match=r"mask: expected dtype torch.bool"):
        ker(q, k, v, mask=torch.ones(N, N))
    with pytest.raises(ValueError, match=r"mask: shape \(5, 5\) does not broadcast"):
        ker(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool))


@pytest.mark.parametrize("name", LINEARISED)
def test_linearised_kernels_reject_non_padding_masks(name):
    q, k, v = qkv(seed=20)
    band = (torch.arange(N)[:, None] - torch.arange(N)[None, :]).abs() <= 3
    with pytest.raises(ValueError, match=r"mask: kernel .* supports only padding masks.*entry \(0, 0, 0, 4\)"):
        get_kernel(name)(q, k, v, mask=band)
    # a causal mask passed as a mask (instead of causal=True) is not a padding mask either ...
    tril = torch.ones(N, N, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="only padding masks"):
        get_kernel(name)(q, k, v, mask=tril)
    # ... but the same mask with causal=True is, and a query mask combined with key padding is too
    torch.testing.assert_close(get_kernel(name)(q, k, v, causal=True, mask=tril), get_kernel(name)(q, k, v, causal=True))
    qmask = torch.ones(N, dtype=torch.bool)
    qmask[4] = False
    both = qmask[:, None] & key_padding()
    out = get_kernel(name)(q, k, v, mask=both)
    assert bool((out[:, :, 4] == 0).all())
    torch.testing.assert_close(out[:, :, 5], get_kernel(name)(q, k, v, mask=key_padding())[:, :, 5])


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_inputs_give_finite_outputs(name, dtype):
    """|q|, |k| up to 50: the stabilising shifts keep every output, matrix and gap finite."""
    g = torch.Generator().manual_seed(21)
    q = (torch.rand(B, H, N, D, generator=g) * 100 - 50).to(dtype)
    k = (torch.rand(B, H, N, D, generator=g) * 100 - 50).to(dtype)
    v = torch.randn(B, H, N, D, generator=g).to(dtype)
    ker = get_kernel(name)
    for causal in (False, True):
        for mask in (None, key_padding()):
            out = ker(q, k, v, causal=causal, mask=mask)
            assert out.dtype == dtype and bool(torch.isfinite(out).all()), (name, causal)
            p = ker.matrix(q, k, causal=causal, mask=mask)
            assert bool(torch.isfinite(p).all())
            torch.testing.assert_close(p.sum(-1).double(), torch.ones(B, H, N, dtype=torch.float64), rtol=0, atol=1e-5)
            # the output is a convex combination of the values: it stays inside their range
            assert bool((out.float().abs() <= v.float().abs().amax() * (1 + 1e-2) + 1e-3).all())
    assert bool(torch.isfinite(ker.spectral_gap(q, k)).all())


def test_block_diagonal_all_padding_block_falls_back_to_softmax():
    """Tokens 32..36 form the remainder block, all padding in batch 0: those (padding) queries
    attend like softmax attention over the valid keys, so every row stays a distribution."""
    q, k, v = qkv(seed=22)
    mask = key_padding()
    ker = BlockDiagonalAttention()
    sa = SoftmaxAttention()
    torch.testing.assert_close(ker.matrix(q, k, mask=mask)[0, :, 32:], sa.matrix(q, k, mask=mask)[0, :, 32:],
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ker(q, k, v, mask=mask)[0, :, 32:], sa(q, k, v, mask=mask)[0, :, 32:],
                               rtol=1e-10, atol=1e-12)
    # statistics accept the matrix with the caller's padding mask
    h = attnstats.row_entropy(ker.matrix(q, k, mask=mask), mask)
    assert bool(torch.isfinite(h).all())


@pytest.mark.parametrize("name", ["lln", "relu", "performer"])
def test_gradients_match_the_dense_matrix_with_padding(name):
    """Backward through the chunked and non-causal algorithms equals backward through matrix() @ v,
    padded keys included (a logsumexp over only -inf would give NaN gradients)."""
    q, k, v = qkv(seed=23)
    ker = get_kernel(name, eps=0.0, chunk=16)
    for causal in (False, True):
        grads = []
        for f in (lambda a, b, c: ker(a, b, c, causal=causal, mask=key_padding()),
                  lambda a, b, c: ker.matrix(a, b, causal=causal, mask=key_padding()) @ c):
            xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
            f(*xs).pow(2).sum().backward()
            grads.append([x.grad for x in xs])
        for got, want in zip(*grads):
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name", kernels.KERNEL_NAMES)
def test_causal_left_padding(name):
    """Left padding with causal attention: the first padded queries see no valid key (output 0,
    matrix row 0, never NaN); every other row matches the dense float64 reference."""
    q, k, v = qkv(seed=25)
    keep = (torch.arange(N) >= 5)[None, None, None, :]
    ker = make(name)
    out = ker(q, k, v, causal=True, mask=keep)
    p = ker.matrix(q, k, causal=True, mask=keep)
    assert bool(torch.isfinite(out).all()) and bool(torch.isfinite(p).all())
    assert bool((out[:, :, :5] == 0).all()) and bool((p[:, :, :5] == 0).all())
    torch.testing.assert_close(p[:, :, 5:].sum(-1), torch.ones(B, H, N - 5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(out, p @ v, rtol=1e-10, atol=1e-12)
    gap = ker.spectral_gap(q, k, causal=True, mask=keep)
    torch.testing.assert_close(gap, attnstats.spectral_gap(p, keep & torch.ones(N, N, dtype=torch.bool).tril()),
                               rtol=1e-8, atol=1e-9)
