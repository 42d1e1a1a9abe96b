"""Figure 2: mean row entropy and spectral gap of SA, LLN and other linearised kernels against temperature.

Writes figures/fig2_kernels.png and figures/fig2_kernels.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/fig2_kernels.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce fig2)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "fig2", *sys.argv[1:]]))
