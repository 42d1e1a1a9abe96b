"""Log-normality of the attention of all-MiniLM-L6-v2 on real sentences.

Writes figures/lognormal_real.png and figures/lognormal_real.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/lognormal_real.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce lognormal)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "lognormal", *sys.argv[1:]]))
