"""The memory budget: what set_memory_budget accepts, and that memory_budget restores the old value."""
import math

import pytest

import attnstats
from attnstats.budget import DEFAULT_MEMORY_BUDGET, check_dense_fits


@pytest.mark.parametrize("bad", [True, False, "1024", None, [1024]])
def test_set_memory_budget_refuses_what_is_no_number(bad):
    # True used to set a budget of one byte
    with pytest.raises(TypeError, match=r"nbytes: expected a number of bytes"):
        attnstats.set_memory_budget(bad)
    assert attnstats.get_memory_budget() == DEFAULT_MEMORY_BUDGET


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, 0, -5, 0.5])
def test_set_memory_budget_refuses_numbers_that_are_no_budget(bad):
    with pytest.raises(ValueError, match=r"nbytes: expected a finite number of bytes >= 1"):
        attnstats.set_memory_budget(bad)
    with pytest.raises(ValueError, match=r"nbytes"):
        with attnstats.memory_budget(bad):
            pass
    assert attnstats.get_memory_budget() == DEFAULT_MEMORY_BUDGET


def test_memory_budget_is_restored_after_the_block_also_on_error():
    with pytest.raises(attnstats.DenseTooLargeError, match=r"needs .* more than the memory budget"):
        with attnstats.memory_budget(1024.9):
            assert attnstats.get_memory_budget() == 1024  # bytes, rounded down
            check_dense_fits((16, 17), 4)  # 1088 bytes
    assert attnstats.get_memory_budget() == DEFAULT_MEMORY_BUDGET
    with attnstats.memory_budget(16 * 16 * 4):
        check_dense_fits((16, 16), 4)  # exactly the budget fits
