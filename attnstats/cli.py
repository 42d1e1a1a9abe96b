"""The ``attnstats`` command: ``analyze``, ``reproduce`` and ``validate``."""
from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


class UserError(Exception):
    """A mistake in the command line or its files: printed without a traceback, exit code 2."""


def _format_table(frame) -> str:
    cols = ["section", "claim", "prediction", "measurement", "tolerance", "holds", "expected", "regime"]
    rows = [[str(c) for c in cols]]
    for r in frame[cols].itertuples(index=False):
        rows.append([
            r.section, r.claim, f"{r.prediction:.6g}", f"{r.measurement:.6g}", r.tolerance,
            "yes" if r.holds else "no", "yes" if r.expected else "no (outside regime)", r.regime,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_validate(args) -> int:
    from .claims import claims_frame, run_claims
    from .files import write_csv

    csv = _writable(args.csv) if args.csv else None  # fail before the work, not after it
    frame = claims_frame(run_claims(quick=args.quick, seed=args.seed))
    print(_format_table(frame))
    if csv:
        write_csv(frame, csv)
    broken = frame[frame.expected & ~frame.holds]
    surprises = frame[~frame.expected & frame.holds]
    print(f"\n{int((frame.expected & frame.holds).sum())} of {int(frame.expected.sum())} claims inside their regime hold; "
          f"{int((~frame.expected).sum())} checks lie outside the regime ({len(surprises)} of them hold anyway).")
    if len(broken):
        print(f"FAILED: {len(broken)} claim(s) that should hold do not: " + "; ".join(broken.claim), file=sys.stderr)
        return 1
    return 0


def _writable(path):
    from pathlib import Path

    p = Path(path)
    parent = p.parent if p.suffix else p
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {parent}: {e.strerror}") from None
    import os

    if not os.access(parent, os.W_OK):
        raise UserError(f"the output folder {parent} is not writable")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnstats", description="Measure what attention does.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{analyze,reproduce,validate}")

    v = sub.add_parser("validate", help="check the paper's propositions numerically and print a table",
                       description="Run each proposition of THEORY.md §2–4 on Gaussian inputs and print claim, "
                       "prediction, measurement, tolerance, whether it holds, and its regime. Exit code 1 if a "
                       "claim that should hold (inside its regime) does not.")
    v.add_argument("--quick", action="store_true", help="N = 256 instead of 1024 (seconds)")
    v.add_argument("--seed", type=int, default=0, help="random seed of the Gaussian inputs (default 0)")
    v.add_argument("--csv", metavar="FILE", help="also write the table to this CSV file")
    v.set_defaults(func=cmd_validate)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"attnstats {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"attnstats {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
