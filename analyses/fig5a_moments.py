"""Figure 5a: mean and variance of ``P`` and of ``ln P`` against the input variance ``σ_q²σ_k²``.

Writes figures/fig5a_moments.png and figures/fig5a_moments.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/fig5a_moments.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce fig5a)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "fig5a", *sys.argv[1:]]))
