"""Row-wise numpy work spread over the CPU threads torch uses.

numpy's stacked LAPACK calls (``eigvals``) run one matrix after another, and its sorts one row after
another, each on a single core, and release the GIL while they do. Short-length statistics are many
small independent problems (1,152 heads of 64 tokens for a batch of 16 sentences through a 6-layer,
12-head model), so sharing the stacks (and chunks of large ones) out over ``torch.get_num_threads()``
threads divides their wall time by up to the number of cores while giving the same numbers: each matrix
or row is computed exactly as before, by the same routine, only on another thread.

While the threads run, numpy's BLAS is held to one thread of its own (threadpoolctl): LAPACK's blocked
routines would otherwise start BLAS threads inside every call, more threads than cores, which then spin
between calls. The eigenvalues of 192 heads of 128 tokens on 2 cores (``benchmarks/threads_cpu.py``):
1.19 s over the pool with BLAS threads inside it, 0.42 s with one BLAS thread per worker, 0.86 s as one
stacked numpy call.
"""
from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

__all__ = ["map_each", "one_blas_thread"]

_pool: ThreadPoolExecutor | None = None
_blas: ThreadpoolController | None = None  # the BLAS libraries loaded with numpy and torch, found once
_blas_limit = None  # the limit in force while any body of one_blas_thread runs
_blas_users = 0  # how many such bodies run
_pool_size = 0
_lock = threading.Lock()


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="attnstats")
            _pool_size = workers
        return _pool


@contextlib.contextmanager
def one_blas_thread():
    """numpy's BLAS held to one thread for the ``with`` body, the threads it had put back when the last of
    the overlapping bodies (in any threads) ends: the limit is process-wide, so bodies that overlap share one
    limit rather than each restoring what another one set."""
    global _blas, _blas_limit, _blas_users
    with _lock:
        if _blas_users == 0:
            if _blas is None:
                _blas = ThreadpoolController()  # finding the libraries costs ~0.6 ms; limiting them ~10 µs
            _blas_limit = _blas.limit(limits=1, user_api="blas")
        _blas_users += 1
    try:
        yield
    finally:
        with _lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limit.restore_original_limits()
                _blas_limit = None


def map_each(fn, arrays: list[np.ndarray], cost=lambda a: a.size) -> list[np.ndarray]:
    """``[fn(a) for a in arrays]``, the arrays (and large ones' row chunks) shared out over the threads.

    Args:
        fn: a numpy function that maps ``[m, ...]`` to ``[m, ...]`` row by row (row ``i`` of the
            result depends on row ``i`` of the input only), e.g. ``np.linalg.eigvals``.
        arrays: arrays ``[m_i, ...]`` of any shapes (e.g. stacks of ``n_i × n_i`` matrices).
        cost: an array's work, for splitting the large ones (``a.size`` by default; ``m n³`` for
            eigen-solves).

    Returns:
        ``fn(a)`` for each array, in order; the same arrays as the loop gives.
    """
    workers = torch.get_num_threads()
    costs = [float(cost(a)) for a in arrays]
    if workers <= 1 or len(arrays) == 0 or threading.current_thread().name.startswith("attnstats"):
        return [fn(a) for a in arrays]
    share = sum(costs) / (2 * workers)  # two pieces per thread on average: the pool balances them
    pieces, owner = [], []
    for i, (a, c) in enumerate(zip(arrays, costs)):
        parts = max(1, min(a.shape[0], int(c // share) if share > 0 else 1))
        for chunk in np.array_split(a, parts):
            pieces.append(chunk)
            owner.append(i)
    if len(pieces) == 1:
        return [fn(arrays[0])]
    with one_blas_thread():  # no BLAS threads inside ours (module docstring)
        results = list(_executor(workers).map(fn, pieces))
    grouped: list[list] = [[] for _ in arrays]
    for i, r in zip(owner, results):
        grouped[i].append(r)
    return [np.concatenate(g) for g in grouped]
