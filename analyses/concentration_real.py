"""Entropy and spectral gap per layer × head of all-MiniLM-L6-v2: softmax next to LLN run alongside.

Writes figures/concentration_real.png and figures/concentration_real.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/concentration_real.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce concentration)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "concentration", *sys.argv[1:]]))
