"""The Smirnov tail's Triton kernel against its PyTorch reference and scipy, on the CPU under
TRITON_INTERPRET=1 (in a fresh interpreter: helpers.run_interpreted)."""
import textwrap

import pytest
from helpers import printed_numbers, run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from scipy import special
    from attnstats.stats import kolmogorov_triton
    from attnstats.stats.kolmogorov import _smirnov_one_n

    assert kolmogorov_triton.available()
    worst_ref = worst_scipy = 0.0
    # n spanning one to several of the interpreter's 32-term chunks; d from the Smirnov regime's ends
    # (n·d² from 2.2 to 370) and d ≥ 1/2, where the sum has a single term
    for n in (7, 50, 141, 1000):
        d = torch.tensor([(2.2 / n) ** 0.5, (10.0 / n) ** 0.5, min(0.45, (300.0 / n) ** 0.5), 0.5, 0.8],
                         dtype=torch.float64)
        got = kolmogorov_triton.smirnov_sf_one_n(n, d)
        ref = _smirnov_one_n(n, d)
        sci = torch.tensor(special.smirnov(n, d.numpy()))
        worst_ref = max(worst_ref, float(((got - ref).abs() / ref).max()))
        worst_scipy = max(worst_scipy, float(((got - sci).abs() / sci).max()))
    print("REF", worst_ref)
    print("SCIPY", worst_scipy)
    """
)


def test_smirnov_kernel_under_interpreter():
    out = printed_numbers(run_interpreted(SCRIPT))
    # the same float64 terms, log-sum-exp'd in another order: a few ulp of the sum's log (|ln S| ≤ ~400
    # here, so ~1e-13 relative on S)
    assert out["REF"] < 1e-12, out
    # scipy sums the same series without logs; ln n! from lgamma costs ~1e-11 relative at n = 1000 (the
    # bound of kolmogorov.smirnov_sf)
    assert out["SCIPY"] < 1e-10, out
