"""attnstats.stats.parallel: numpy work shared over threads gives what the loop gives; the BLAS limit is shared.

The reference of ``map_each`` is the plain loop of the same numpy function (each matrix is computed by the
same routine, only on another thread: equality is exact). The BLAS thread counts are read back through
threadpoolctl, the library that sets them.
"""
import numpy as np
import pytest
import torch
from threadpoolctl import ThreadpoolController

from attnstats.stats import parallel


def stacks():
    rng = np.random.default_rng(0)
    return [rng.random((m, n, n)) for m, n in ((7, 5), (40, 12), (3, 30), (1, 2))]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_map_each_gives_what_the_loop_gives(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        arrays = stacks()
        got = parallel.map_each(np.linalg.eigvals, arrays, cost=lambda a: a.shape[0] * a.shape[-1] ** 3)
        sorted_rows = parallel.map_each(lambda a: np.sort(a, axis=1), [a.reshape(a.shape[0], -1) for a in arrays])
    finally:
        torch.set_num_threads(before)
    assert len(got) == len(arrays)
    for g, a in zip(got, arrays):
        np.testing.assert_array_equal(g, np.linalg.eigvals(a))  # the same LAPACK call per matrix
    for g, a in zip(sorted_rows, arrays):
        np.testing.assert_array_equal(g, np.sort(a.reshape(a.shape[0], -1), axis=1))


def blas_threads(controller) -> list[int]:
    return [info["num_threads"] for info in controller.select(user_api="blas").info()]


def test_overlapping_bodies_share_one_blas_limit_and_restore_it():
    controller = ThreadpoolController()
    if not controller.select(user_api="blas").lib_controllers:
        pytest.skip("numpy loaded no BLAS library that threadpoolctl can set")
    with controller.limit(limits=2, user_api="blas"):  # a known count to come back to
        first, second = parallel.one_blas_thread(), parallel.one_blas_thread()
        first.__enter__()
        assert set(blas_threads(controller)) == {1}
        second.__enter__()  # e.g. a second thread's map_each, while the first one runs
        first.__exit__(None, None, None)
        assert set(blas_threads(controller)) == {1}  # the second body still runs: still one thread
        second.__exit__(None, None, None)
        assert set(blas_threads(controller)) == {2}  # the count before the first body, not the first's limit
