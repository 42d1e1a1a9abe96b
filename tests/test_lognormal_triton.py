"""The log-normal fit's Triton sums against their PyTorch reference, on the CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, so the check runs in a fresh interpreter
with the variable set (as tests/test_streaming_triton.py). The GPU path of the whole fit is checked
against scipy on the same samples by benchmarks/record_gpu.py (part ``check``).
"""
import textwrap

import pytest
from helpers import printed_numbers, run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import math, numpy as np, torch
    from attnstats.stats import lognormal_triton
    from attnstats.stats.lognormal import _sorted_row_sums

    assert lognormal_triton.available()
    rng = np.random.default_rng(0)
    # rows of different lengths (more than one chunk of the interpreter's 32 samples), NaN padding;
    # a Cauchy row reaches |w| of several hundred, deep in the continued fraction's range
    rows = [rng.normal(-3.0, 1.5, 150), rng.lognormal(0.0, 0.8, 97), rng.standard_t(3, 64) - 8.0,
            rng.standard_cauchy(120), rng.normal(0.0, 1.0, 3), rng.normal(2.0, 0.1, 33)]
    width = max(r.size for r in rows) + 5
    y = torch.full((len(rows), width), math.nan, dtype=torch.float64)
    for i, r in enumerate(rows):
        y[i, : r.size] = torch.from_numpy(np.sort(r))
    cnt = torch.tensor([r.size for r in rows])
    nf = cnt.double()
    svalid = torch.arange(width)[None, :] < cnt[:, None]
    got = lognormal_triton.sorted_row_sums(y, cnt)
    ref = _sorted_row_sums(y, cnt, svalid, nf)
    rel = max(float(((g - r).abs() / r.abs()).max()) for g, r in zip(got[:4], ref[:4]))
    print("MOMENTS", rel)
    print("KS", float((got[4] - ref[4]).abs().max()))
    print("AD", float(((got[5] - ref[5]).abs() / nf).max()))
    """
)


def test_sorted_row_sums_under_interpreter():
    out = printed_numbers(run_interpreted(SCRIPT))
    # float64 sums of ≤ 150 terms in another order: a few hundred ulp at most relative to the result
    # (the 4th moment of the Cauchy row is dominated by two terms, so no cancellation either)
    assert out["MOMENTS"] < 1e-13, out
    # Φ as 0.5·(1 + erf) against torch's 0.5·erfc: both within an ulp or two of 1 in absolute terms
    assert out["KS"] < 1e-15, out
    # A² per sample: each term's ln Φ agrees to 5e-14 relative (1 − erf below x = 2, where erfc ≥ 4.7e-3)
    # times a weight ≤ 2, plus float64 rounding of the sum
    assert out["AD"] < 2e-13, out
