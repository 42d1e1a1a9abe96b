"""Figure 5b: ``Var[ln P]`` of SA and of LLN before (α = β = 1) and after moment matching.

Writes figures/fig5b_moment_matching.png and figures/fig5b_moment_matching.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/fig5b_moment_matching.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce fig5b)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "fig5b", *sys.argv[1:]]))
