"""A model measured over a corpus: sharded, resumable, and spread over processes by torch.distributed.

The documents are cut into shards of ``shard_size`` consecutive documents. Each shard runs on its own
(its sequences batched by length, so that padding stays small) and leaves two files in
``<out>/shards/``, each written whole or not at all: ``shard-NNNNN.parquet``, one row per sequence,
layer, head, kernel and metric (columns ``doc, window, tokens, call, layer, name, kernel, head, metric,
value``), and ``shard-NNNNN.summary``, the shard's :class:`attnstats.summary.CorpusSummary` and pooled
``ln P``, written last: a shard whose summary exists is finished. A run started again with the same
arguments skips the finished shards; ``<out>/shards/run.json`` holds the arguments and a fingerprint
of the documents, and a run whose arguments differ is refused, naming the difference.

Under ``torchrun`` (``WORLD_SIZE`` > 1) rank ``r`` runs the shards ``i`` with ``i % world == r``; the
ranks' summaries are gathered with ``torch.distributed.all_gather_object`` (gloo on the CPU) and merged
in shard order on rank 0, so the merged statistics equal a one-process run's: bit for bit for counts,
means, variances, minima and maxima (exact sums), within the sketch's error for quantiles.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .files import atomic_path, write_text

__all__ = ["RunSpec", "RunMismatchError", "ShardFileError", "run_corpus", "distributed_context"]


@dataclass(frozen=True)
class RunSpec:
    """What determines a corpus run's result; a resumed run must match it field for field."""

    model: str
    max_tokens: int
    long: str
    alongside: tuple
    shard_size: int
    batch_size: int
    seed: int
    documents: int
    fingerprint: str
    store: str = "qk"
    device: str = "cpu"
    dtype: str = "float32"


class RunMismatchError(ValueError):
    """A resumed run whose arguments differ from the run that wrote the output folder."""


class ShardFileError(ValueError):
    """A shard file of an earlier run that cannot be read."""


def fingerprint(documents) -> str:
    """SHA-256 of the documents, in order (the identity of a corpus for resuming)."""
    h = hashlib.sha256()
    for d in documents:
        b = d.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def distributed_context():
    """``(rank, world)``: from an initialised ``torch.distributed`` group, or one started here from the
    ``torchrun`` environment (gloo on the CPU, NCCL when CUDA is there), else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and dist.is_available():
        if torch.cuda.is_available():  # NCCL: each rank on its own GPU before the group forms
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_spec(folder: Path, spec: RunSpec, rank: int, world: int) -> None:
    path = folder / "run.json"
    mine = asdict(spec)
    mine["alongside"] = list(spec.alongside)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            raise ShardFileError(f"{path} is not readable; delete the folder {folder} to start the run again") from None
        diff = [k for k in mine if old.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise RunMismatchError(f"{folder.parent} holds a run with {k} = {old.get(k)!r}, this one has {mine[k]!r}; "
                                   f"use another --out, or delete {folder} to start again")
    elif rank == 0:
        write_text(path, json.dumps(mine, indent=1))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _load_shard(path: Path):
    from ..summary import CorpusSummary

    try:
        state = pickle.loads(path.read_bytes())  # noqa: S301 - written by this module
        return CorpusSummary.from_bytes(state["summary"]), state["pooled"], state["tokens"]
    except Exception:
        raise ShardFileError(f"{path} is damaged; delete it (and its .parquet) to recompute the shard") from None


def _check_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    try:
        pq.read_metadata(path)
    except Exception:
        raise ShardFileError(f"{path} is missing or damaged; delete it (and its .summary) to recompute the shard") from None


def run_corpus(documents, spec: RunSpec, out, process_shard, *, bar=None):
    """Run every unfinished shard of this rank, then merge all shards' summaries.

    Args:
        documents: the corpus, in order.
        spec: the run's arguments (checked against an earlier run in ``out``).
        out: output folder; the shards go to ``out/shards``.
        process_shard: ``(index, documents) -> (frame, summary, pooled, tokens)``: the per-sequence
            frame, its CorpusSummary, the pooled ``ln P`` state and the tokens it ran.
        bar: a progress bar advanced by documents (``set_postfix`` shows tokens per second).

    Returns:
        ``(summary, pooleds, tokens, kept)`` on rank 0 (None elsewhere): the merged CorpusSummary, the pooled
        ``ln P`` states of every shard in shard order, the tokens of the whole corpus, and the shards that
        an earlier run had finished (kept, not run again) on any rank.
    """
    rank, world = distributed_context()
    folder = Path(out) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    _check_spec(folder, spec, rank, world)
    n_shards = (len(documents) + spec.shard_size - 1) // spec.shard_size
    mine = [i for i in range(n_shards) if i % world == rank]
    kept, tokens_run, start = [], 0, time.perf_counter()
    for i in mine:
        summary_path = folder / f"shard-{i:05d}.summary"
        docs = documents[i * spec.shard_size:(i + 1) * spec.shard_size]
        if summary_path.is_file():
            _load_shard(summary_path)  # a damaged file stops the run here, before any merge
            _check_parquet(folder / f"shard-{i:05d}.parquet")
            kept.append(i)
            if bar is not None:
                bar.update(len(docs))
            continue
        frame, summary, pooled, tokens = process_shard(i, docs)
        with atomic_path(folder / f"shard-{i:05d}.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        with atomic_path(summary_path) as tmp:  # last: its presence marks the shard finished
            tmp.write_bytes(pickle.dumps({"summary": summary.to_bytes(), "pooled": pooled, "tokens": tokens}))
        tokens_run += tokens
        if bar is not None:
            bar.update(len(docs))
            bar.set_postfix(tokens_per_s=f"{tokens_run / max(time.perf_counter() - start, 1e-9):,.0f}")
    # every rank reads back its own shards (run now or earlier) and sends them to rank 0
    own = {i: _load_shard(folder / f"shard-{i:05d}.summary") for i in mine}
    blobs = {i: (s.to_bytes(), p, t) for i, (s, p, t) in own.items()}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, (blobs, kept))
        blobs, kept = {}, []
        for part, k in gathered:
            blobs.update(part)
            kept += k
    if rank != 0:
        return None
    from ..summary import CorpusSummary

    merged = CorpusSummary()
    pooleds, tokens = [], 0
    for i in range(n_shards):  # shard order: the same merge whatever the number of processes
        blob, pooled, t = blobs[i]
        merged.merge(CorpusSummary.from_bytes(blob))
        pooleds.append(pooled)
        tokens += t
    return merged, pooleds, tokens, sorted(kept)


def read_sequences(out, max_shards: int | None = None) -> tuple[pd.DataFrame, int, int]:
    """The per-sequence statistics of the shards of a run in ``out`` (pyarrow), in shard order.

    ``max_shards``: read at most that many shards, evenly spaced over the run (memory stays bounded
    for a corpus of any size), or None for all. Returns ``(frame, shards read, shards there are)``.
    """
    files = sorted((Path(out) / "shards").glob("shard-*.parquet"))
    chosen = files
    if max_shards is not None and len(files) > max_shards:
        step = len(files) / max_shards
        chosen = [files[int(i * step)] for i in range(max_shards)]
    frame = pd.concat([pd.read_parquet(f) for f in chosen], ignore_index=True) if chosen else pd.DataFrame()
    return frame, len(chosen), len(files)
