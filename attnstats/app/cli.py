"""The ``attnstats`` command: ``analyze``, ``reproduce`` and ``validate``."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main"]

# argument names of the library's errors, as the command line spells them
_OPTIONS = {"max_tokens": "--max-tokens", "model": "--model", "texts": "--corpus/--text/--sentences",
            "corpus": "--corpus", "text_field": "--text-field", "long": "--long", "shard_size": "--shard-size",
            "store": "--store", "device": "--device", "dtype": "--dtype"}


class UserError(Exception):
    """A mistake in the command line or its files: printed without a traceback, exit code 2."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that the same cleanup runs: temporary files
    of :func:`attnstats.app.files.atomic_path` are removed and an output folder the run created and left
    empty is removed."""


def _format_table(frame) -> str:
    cols = ["section", "source", "claim", "prediction", "measurement", "tolerance", "holds", "documented outcome",
            "regime"]
    rows = [cols]
    for r in frame.itertuples(index=False):
        outcome = ("not claimed (outside regime)" if r.expected is None or r.expected != r.expected
                   else ("holds" if r.expected else "fails (documented finding)"))
        if not r.documented:
            outcome += "  <-- UNEXPECTED"
        rows.append([
            r.section, r.source, r.claim, f"{r.prediction:.6g}", f"{r.measurement:.6g}", r.tolerance,
            "yes" if r.holds else "no", outcome, r.regime,
        ])
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_validate(args) -> int:
    from .claims import claims_frame, run_claims
    from .files import write_csv

    csv = _writable_file(args.csv, "--csv", args.created) if args.csv else None  # fail before the work, not after it
    frame = claims_frame(run_claims(quick=args.quick, seed=args.seed))
    print(_format_table(frame))
    if csv:
        write_csv(frame, csv)
    unexpected = frame[~frame.documented]
    recorded = frame[frame.documented & frame.expected.notna()]
    holding = int(recorded.holds.sum())
    print(f"\n{int(frame.documented.sum())} of {len(frame)} outcomes are the documented ones: "
          f"{holding} statements hold as documented, {len(recorded) - holding} documented failures of the paper's "
          f"statements; {int(frame.expected.isna().sum())} checks outside their regime, reported only.")
    if len(unexpected):
        print(f"UNEXPECTED: {len(unexpected)} outcome(s) differ from the documented ones: " + "; ".join(
            f"{r.claim} [{r.regime}]: {'holds' if r.holds else 'fails'}" for r in unexpected.itertuples()), file=sys.stderr)
        return 1
    return 0


def cmd_reproduce(args) -> int:
    from .reproduce import FIGURES, default_out

    out = _writable_dir(args.out if args.out is not None else default_out(args.quick), args.created)
    names = list(FIGURES) if args.figure == "all" else [args.figure]
    written = []
    for name in names:
        print(f"reproducing {name} into {out}/ ...", flush=True)
        written += FIGURES[name](out, quick=args.quick, seed=args.seed)
    print("done: " + ", ".join(str(p) for p in written))
    return 0


def _read_documents(args) -> list[str] | None:
    from pathlib import Path

    if args.text:
        path = Path(args.text)
        if path.is_dir():
            raise UserError(f"--text: {path} is a directory; expected a UTF-8 text file, one sentence per line")
        if not path.is_file():
            raise UserError(f"--text: no such file: {path}")
        try:
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except UnicodeDecodeError:
            raise UserError(f"--text: {path} is not UTF-8 text") from None
        lines = [line for line in lines if line]
        if not lines:
            raise UserError(f"--text: {path} holds no non-empty line")
        return lines
    if args.sentences:
        return list(args.sentences)
    if args.corpus:
        from .corpus import read_corpus

        return read_corpus(args.corpus, args.text_field)
    return None  # the default corpus: the Python documentation topics


def cmd_analyze(args) -> int:
    from .analysis import analyze_model
    from ..kernels import KERNEL_NAMES

    unknown = [k for k in args.alongside if k not in KERNEL_NAMES]
    if unknown:
        raise UserError(f"--alongside: unknown kernel {unknown[0]!r}; expected some of {', '.join(KERNEL_NAMES)}")
    if args.max_tokens < 2:
        raise UserError(f"--max-tokens: expected at least 2, got {args.max_tokens}")
    out = _writable_dir(args.out, args.created)
    texts = _read_documents(args)
    if args.shard_size < 1:
        raise UserError(f"--shard-size: expected at least 1, got {args.shard_size}")
    summary = analyze_model(args.model, texts, out, alongside=args.alongside, max_tokens=args.max_tokens,
                            seed=args.seed, long=args.long, shard_size=args.shard_size, store=args.store,
                            device=args.device, dtype=args.dtype,
                            note=lambda message: print(f"attnstats analyze: note: {message}", file=sys.stderr, flush=True))
    if summary is None:  # a rank other than 0 of a torchrun launch: rank 0 writes and reports
        return 0
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    print(f"\nwrote {out / 'stats.csv'}, {out / 'summary.csv'}, the per-sequence statistics in {out / 'shards'}/ and "
          f"the plots {', '.join(p.name for p in sorted(out.glob('*.png')))} in {out}/")
    return 0


def _writable_dir(path, created: list) -> Path:
    """``path`` as an output folder, created if missing (new folders appended to ``created``, deepest first)."""
    p = Path(path)
    missing = []
    for d in (p, *p.parents):
        if d.exists() or d.is_symlink():
            break
        missing.append(d)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {p}: {e.strerror}") from None
    created.extend(missing)
    if not os.access(p, os.W_OK):
        raise UserError(f"the output folder {p} is not writable")
    return p


def _writable_file(path, option: str, created: list) -> Path:
    """``path`` as an output file: not a folder, its folder created if missing and writable."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{option}: {p} is a directory; expected a file name, e.g. {p / 'claims.csv'}")
    _writable_dir(p.parent, created)
    return p


def _user_error(e: BaseException) -> str | None:
    """The one-line message of an exception that is a user's mistake, or None for a bug (traceback)."""
    from .analysis import AnalysisInputError
    from ..budget import DenseTooLargeError
    from .models import ModelFolderError

    if isinstance(e, UserError):
        return str(e)
    from .corpus import CorpusError
    from .corpus_run import RunMismatchError, ShardFileError

    if isinstance(e, (AnalysisInputError, CorpusError)):
        return f"{_OPTIONS.get(e.argument, e.argument)}: {e.detail}"
    if isinstance(e, (RunMismatchError, ShardFileError)):
        return f"--out: {e}"
    if isinstance(e, ModelFolderError):
        return "--" + str(e) if str(e).startswith("model: ") else str(e)
    if isinstance(e, DenseTooLargeError):  # the check before the work could not know the size
        return f"{str(e).split('. ')[0]}; lower --max-tokens"
    if isinstance(e, FileNotFoundError) and str(e).startswith("model: "):
        return "--" + str(e)
    if isinstance(e, (OSError, ImportError)):  # an unreadable model folder, a full disk, a missing extra
        return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return None


def _remove_if_empty(folders: list) -> None:
    """Remove the folders a failed run created (deepest first) as long as they are empty."""
    for d in folders:
        try:
            d.rmdir()
        except OSError:  # not empty (or gone): it and its parents stay
            break


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnstats", description="Measure what attention does.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{analyze,reproduce,validate}")

    a = sub.add_parser("analyze", help="capture a model's attention and write every statistic and the standard plots",
                       description="Run a transformers model over a corpus, capture the attention of every layer "
                       "(SDPA included), compute entropy, spectral gap, log-normal fit, moments and temperature per "
                       "layer and head, with LLN attention alongside on the same q, k; write stats.csv (long format) "
                       "and the plots; shards of the corpus are written as they finish, so a stopped run resumes, "
                       "and under torchrun the processes share them. Default model: the packaged all-MiniLM-L6-v2; "
                       "default corpus: the Python documentation topics.")
    a.add_argument("--model", metavar="PATH_OR_NAME", default=None,
                   help="local model folder (default: the packaged all-MiniLM-L6-v2; no model hub is reached)")
    src = a.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE", help="UTF-8 text file, one sentence per line")
    src.add_argument("--sentences", nargs="+", metavar="SENTENCE", help="sentences given on the command line")
    src.add_argument("--corpus", metavar="PATH", help="a corpus: a text file (documents separated by blank lines), "
                     "a folder of .txt/.md/.jsonl/.parquet files, a .jsonl or .parquet file, or a dataset saved with "
                     "datasets (default: the Python documentation topics, 79 documents)")
    a.add_argument("--text-field", default="text", metavar="NAME", help="the field / column holding the text in "
                   "JSONL, Parquet and saved datasets (default text)")
    a.add_argument("--long", choices=["truncate", "split"], default="truncate",
                   help="a document longer than --max-tokens: keep its first window (truncate, default) or cut it "
                   "into windows, each a sequence (split)")
    a.add_argument("--shard-size", type=int, default=32, metavar="DOCS",
                   help="documents per shard, the unit written to OUT/shards and skipped when a stopped run is "
                   "started again with the same arguments (default 32)")
    a.add_argument("--out", default="attnstats-out", metavar="DIR", help="output folder (default attnstats-out)")
    a.add_argument("--alongside", nargs="*", default=["lln"], metavar="KERNEL",
                   help="kernels run alongside on the same q, k (default: lln; none: --alongside; softmax is the "
                   "captured attention, always there)")
    a.add_argument("--max-tokens", type=int, default=128,
                   help="tokens per sequence (default 128; at most what the model takes, "
                   "512 for all-MiniLM-L6-v2)")
    a.add_argument("--store", choices=["qk", "stats"], default="qk",
                   help="qk (default): q, k kept per batch, kernels alongside, lognormal.png; stats: statistics "
                   "computed during the forward pass (long sequences, GPUs), no kernel alongside (give --alongside "
                   "with no name)")
    a.add_argument("--device", default=None, metavar="DEVICE", help="where the model runs: cpu (default), cuda "
                   "(under torchrun, each rank's own GPU), or auto (device_map='auto': a model spread over the GPUs)")
    a.add_argument("--dtype", default=None, metavar="DTYPE", help="the model's dtype, e.g. bfloat16 (default: as loaded)")
    a.add_argument("--seed", type=int, default=0, help="seed of the ln P sample of lognormal.png (default 0)")
    a.set_defaults(func=cmd_analyze)

    r = sub.add_parser("reproduce", help="reproduce the paper's figures (PNG + CSV)",
                       description="Measure and draw the paper's figures: fig1 (training), fig2 (kernels vs "
                       "temperature), fig5a (moments vs input variance), fig5b (moment matching), lognormal and "
                       "concentration (all-MiniLM-L6-v2). Each writes <name>.png and <name>.csv.")
    r.add_argument("figure", nargs="?", default="all",
                   choices=["fig1", "fig2", "fig5a", "fig5b", "lognormal", "concentration", "all"])
    r.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default figures, or figures-quick with --quick, so that a quick run "
                   "never replaces the full-size figures)")
    r.add_argument("--quick", action="store_true",
                   help="small sizes: seconds per figure (for tests); written into figures-quick unless --out is given")
    r.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    r.set_defaults(func=cmd_reproduce)

    v = sub.add_parser("validate", help="check the paper's propositions numerically and print a table",
                       description="Run each proposition of docs/theory.md §2–4, and attnstats' own moment-matching "
                       "rule, on Gaussian inputs; print for each whose statement it is (paper or attnstats), what is "
                       "checked, prediction, measurement, tolerance, whether it holds, the outcome docs/theory.md "
                       "records, and the regime. Exit code 0 exactly when every outcome is the documented one (a paper "
                       "statement failing where the docs say it fails is a finding, not an error); 1 otherwise.")
    v.add_argument("--quick", action="store_true", help="N = 256 and 8 heads instead of 1024 and 4 (seconds)")
    v.add_argument("--seed", type=int, default=0, help="random seed of the Gaussian inputs (default 0)")
    v.add_argument("--csv", metavar="FILE", help="also write the table to this CSV file")
    v.set_defaults(func=cmd_validate)
    return parser


def main(argv=None) -> int:
    """Run the command; returns the exit code: 0 done, 1 a failed check, 2 a user mistake (one line on
    stderr), 130 Ctrl-C, 143 SIGTERM. On any failure the output folders the run created are removed
    if they are still empty."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.created = []
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if on_main_thread else None
    code = 1
    try:
        code = args.func(args)
        return code
    except Terminated:
        code = 128 + signal.SIGTERM
        print(f"attnstats {args.command}: terminated", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        code = 130
        print(f"attnstats {args.command}: interrupted", file=sys.stderr)
        return code
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        code = 2
        print(f"attnstats {args.command}: error: {message}", file=sys.stderr)
        return code
    finally:
        if code != 0:
            _remove_if_empty(args.created)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
