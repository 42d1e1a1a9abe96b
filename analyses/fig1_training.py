"""Figure 1: temperature, entropy and spectral gap of every layer at every step of training a small encoder.

Writes figures/fig1_training.png and figures/fig1_training.csv (the numbers behind the picture);
with --quick, small sizes into figures-quick/ instead, so that the full-size figures stay as they are.
Run: python analyses/fig1_training.py [--out DIR] [--quick] [--seed N]   (same as: attnstats reproduce fig1)
"""
import sys

from attnstats.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "fig1", *sys.argv[1:]]))
